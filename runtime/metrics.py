"""Classification metrics from labels and predictions (NumPy only; used on the device too).

>>> accuracy([0, 1, 1, 0], [0, 1, 0, 0])
0.75
>>> round(macro_f1([0, 1, 1, 0], [0, 1, 0, 0]), 4)
0.7333

Macro-F1 averages the per-class F1 = 2·TP / (2·TP + FP + FN) over the classes that occur in
the labels or the predictions (scikit-learn's default). :func:`paired_difference` compares two
models scored on the same examples. This module does not run models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def _arrays(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    if y.size == 0:
        raise ValueError("no examples to score")
    return y, p


def accuracy(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray) -> float:
    """Fraction of predictions equal to the label."""
    y, p = _arrays(labels, preds)
    return float(np.mean(y == p))


def per_class_f1(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray) -> dict[int, float]:
    """F1 of each class that occurs in ``labels`` or ``preds``.

    >>> per_class_f1([0, 0, 1], [0, 1, 1])
    {0: 0.6666666666666666, 1: 0.6666666666666666}
    """
    y, p = _arrays(labels, preds)
    out = {}
    for c in np.union1d(y, p):
        tp = int(np.sum((y == c) & (p == c)))
        fp = int(np.sum((y != c) & (p == c)))
        fn = int(np.sum((y == c) & (p != c)))
        out[int(c)] = 2 * tp / (2 * tp + fp + fn)
    return out


def macro_f1(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray) -> float:
    """Unweighted mean of :func:`per_class_f1`."""
    return float(np.mean(list(per_class_f1(labels, preds).values())))


@dataclass(frozen=True)
class Metrics:
    """Accuracy and macro-F1 (fractions in [0, 1]) over ``examples`` examples."""

    accuracy: float
    macro_f1: float
    examples: int

    def __post_init__(self) -> None:
        for name in ("accuracy", "macro_f1"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.examples < 1:
            raise ValueError(f"examples must be at least 1, got {self.examples}")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"accuracy {100 * self.accuracy:.2f}%  macro-F1 {100 * self.macro_f1:.2f}%  ({self.examples} examples)"


def score(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray) -> Metrics:
    """:class:`Metrics` of predicted class ids against labels."""
    y, p = _arrays(labels, preds)
    return Metrics(accuracy(y, p), macro_f1(y, p), int(y.size))


def score_logits(labels: Sequence[int] | np.ndarray, logits: np.ndarray) -> Metrics:
    """:class:`Metrics` of ``argmax(logits [n, classes])`` against labels."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [examples, classes], got shape {logits.shape}")
    return score(labels, logits.argmax(axis=1))


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of model A minus that of model B on the same ``examples`` (fractions): the
    discordant counts ``a_only`` (A right, B wrong) and ``b_only`` (A wrong, B right), the exact
    two-sided McNemar ``p_value`` and the 95% interval ``low``..``high`` of the difference."""

    difference: float
    a_only: int
    b_only: int
    examples: int
    p_value: float
    low: float
    high: float


def paired_difference(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> PairedDifference:
    """Compare two models from their per-example correctness on the same examples, in order.

    Only the discordant examples carry information: the difference is ``(a_only - b_only) / n``;
    the p-value is the exact binomial (McNemar) test of ``a_only`` out of ``a_only + b_only`` at
    one half, two-sided (1 when there are none); the interval is Wald's on the paired
    differences, ``difference +- 1.96 * sqrt(a_only + b_only - (a_only - b_only)**2 / n) / n``
    (a single point when there are no discordant examples).

    >>> d = paired_difference([1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 1])
    >>> d.difference, d.a_only, d.b_only, d.p_value
    (0.5, 3, 0, 0.25)
    >>> round(d.low, 3), round(d.high, 3)
    (0.1, 0.9)
    """
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    b = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{a.size} examples for A but {b.size} for B")
    if a.size == 0:
        raise ValueError("no examples to compare")
    n, a_only, b_only = int(a.size), int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = a_only + b_only
    tail = sum(math.comb(discordant, k) for k in range(min(a_only, b_only) + 1))
    p_value = min(1.0, 2 * tail / 2**discordant)
    difference = (a_only - b_only) / n
    half = 1.96 * math.sqrt(discordant - (a_only - b_only) ** 2 / n) / n
    return PairedDifference(difference, a_only, b_only, n, p_value, difference - half, difference + half)
