"""Classification metrics against values worked out by hand."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from qbert_edge.runtime import metrics
from qbert_edge.runtime.metrics import (
    Metrics,
    accuracy,
    macro_f1,
    paired_difference,
    per_class_f1,
    score,
    score_logits,
)


def test_accuracy_by_hand():
    assert accuracy([0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == pytest.approx(3 / 5)


def test_macro_f1_binary_by_hand():
    # class 0: tp=2 fp=2 fn=0 -> 4/6;  class 1: tp=1 fp=0 fn=2 -> 2/4
    labels, preds = [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]
    assert per_class_f1(labels, preds) == pytest.approx({0: 4 / 6, 1: 2 / 4})
    assert macro_f1(labels, preds) == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_macro_f1_three_classes_counts_predicted_only_class():
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=1 -> 2/4; class 2: tp=0 fp=1 fn=0 -> 0
    labels, preds = [0, 0, 1, 1], [0, 1, 1, 2]
    assert macro_f1(labels, preds) == pytest.approx((2 / 3 + 2 / 4 + 0) / 3)


def test_constant_prediction_on_balanced_data():
    m = score([0, 1, 0, 1], [1, 1, 1, 1])
    assert (m.accuracy, m.macro_f1, m.examples) == (0.5, pytest.approx(1 / 3), 4)


def test_score_logits_uses_argmax_and_to_dict():
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.0, 5.0]], dtype=np.float32)
    m = score_logits(np.array([0, 0, 1]), logits)
    assert m.to_dict() == {"accuracy": pytest.approx(2 / 3), "macro_f1": pytest.approx((2 / 3 + 2 / 3) / 2), "examples": 3}
    assert "accuracy 66.67%" in str(m)


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        score([], [])
    with pytest.raises(ValueError, match=r"\[examples, classes\]"):
        score_logits([0], np.zeros(2))
    with pytest.raises(ValueError, match="accuracy must be in"):
        Metrics(1.5, 0.5, 3)


def _pairs(both: int, a_only: int, b_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Correctness vectors of A and B with these counts of (right, right), (right, wrong), ..."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_paired_difference_by_hand():
    # 854 sentences, A alone right on 12, B alone on 10: p = 2 * P(X <= 10), X ~ Bin(22, 1/2) = 1 - C(22, 11) / 2**22
    d = paired_difference(*_pairs(690, 12, 10, 142))
    assert (d.a_only, d.b_only, d.examples) == (12, 10, 854)
    assert d.difference == pytest.approx(2 / 854)
    assert d.p_value == pytest.approx(1 - math.comb(22, 11) / 2**22) and d.p_value == pytest.approx(0.8318, abs=1e-4)
    half = 1.96 * math.sqrt(22 - 2**2 / 854) / 854
    assert (d.low, d.high) == (pytest.approx(2 / 854 - half), pytest.approx(2 / 854 + half))


def test_paired_difference_is_antisymmetric():
    a, b = _pairs(5, 1, 10, 4)  # p = 2 * (1 + 11) / 2**11
    ab, ba = paired_difference(a, b), paired_difference(b, a)
    assert ab.p_value == ba.p_value == pytest.approx(24 / 2048)
    assert (ab.difference, ab.low, ab.high) == pytest.approx((-ba.difference, -ba.high, -ba.low))
    assert ab.difference == pytest.approx(-9 / 20) and ab.high < 0


def test_paired_difference_without_discordant_examples():
    d = paired_difference(np.array([1, 0, 1]), np.array([1, 0, 1]))
    assert (d.difference, d.a_only, d.b_only, d.p_value, d.low, d.high) == (0.0, 0, 0, 1.0, 0.0, 0.0)


def test_paired_difference_bad_inputs():
    with pytest.raises(ValueError, match="3 examples for A but 2 for B"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        paired_difference([], [])


def test_doctests():
    assert doctest.testmod(metrics).failed == 0
