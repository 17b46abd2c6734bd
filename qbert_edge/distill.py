"""Knowledge distillation for fine-tuning: the loss of a student against a teacher's logits.

The standard recipe of TernaryBERT/BinaryBERT (logit distillation, Hinton et al. 2015), not part
of Q-BERT itself: during QAT the fp32 model the plan was made from is the teacher, and the
fake-quantized copy learns from its softened outputs as well as from the labels::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

``T^2`` keeps the soft term's gradients on the scale of the hard one as ``T`` grows. ``alpha = 0``
is plain cross-entropy. This module holds the settings and the loss; it does not run the teacher
or train (:func:`qbert_edge.train.fine_tune` does) and has no intermediate-layer (hidden-state or
attention) distillation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qbert_edge.errors import QbertEdgeError


@dataclass(frozen=True)
class DistillConfig:
    """Weight ``alpha`` of the distillation term (in [0, 1]) and the softmax ``temperature`` (> 0)."""

    alpha: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise QbertEdgeError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise QbertEdgeError(f"distillation temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: DistillConfig,
    ce: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``, KL averaged over the batch.

    ``student_logits`` and ``teacher_logits`` are ``[batch, classes]``; ``ce`` is the student's
    cross-entropy if already computed (a transformers model's ``.loss``), else it is computed here.
    No gradient flows into ``teacher_logits``.

    >>> s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    >>> float(distillation_loss(s, t, torch.tensor([0]), DistillConfig(1.0, 3.0)))  # same logits: KL = 0
    0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise QbertEdgeError(
            f"distillation: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ (is the teacher a classifier of the same labels?)"
        )
    if ce is None:
        ce = F.cross_entropy(student_logits, labels)
    t = config.temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return config.alpha * t * t * kl + (1.0 - config.alpha) * ce
