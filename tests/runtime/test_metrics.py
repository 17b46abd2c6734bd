"""Classification metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from qbert_edge.runtime.metrics import (
    Metrics,
    accuracy,
    macro_f1,
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
