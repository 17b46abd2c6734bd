"""Knowledge distillation for fine-tuning: the loss of a student against a teacher's logits.

The standard recipe of TernaryBERT/BinaryBERT (logit distillation, Hinton et al. 2015), not part
of Q-BERT itself: during QAT the fp32 model the plan was made from is the teacher, and the
fake-quantized copy learns from its softened outputs as well as from the labels::

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)
         + hidden * mean over layers of MSE(student hidden state, teacher hidden state)

``T^2`` keeps the soft term's gradients on the scale of the hard one as ``T`` grows. ``alpha = 0``
is plain cross-entropy. The hidden-state term (TernaryBERT's intermediate-layer distillation; off
at ``hidden = 0``) compares the embedding output and every encoder layer's output at the real,
unpadded tokens: a 2-bit layer learns to reproduce what its fp32 original passed on, not only the
final logits. This module holds the settings and the losses; it does not run the teacher or train
(:func:`qbert_edge.train.fine_tune` does) and has no attention-score distillation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from qbert_edge.errors import QbertEdgeError


@dataclass(frozen=True)
class DistillConfig:
    """Weight ``alpha`` of the logit term (in [0, 1]), the softmax ``temperature`` (> 0) and the
    weight ``hidden`` (>= 0) of the hidden-state term."""

    alpha: float = 0.5
    temperature: float = 2.0
    hidden: float = 0.0

    def __post_init__(self) -> None:
        if not self.hidden >= 0:
            raise QbertEdgeError(f"hidden-state distillation weight must be >= 0, got {self.hidden}")
        if not 0.0 <= self.alpha <= 1.0:
            raise QbertEdgeError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise QbertEdgeError(f"distillation temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean squared difference of ``[batch, seq, hidden]`` states at unpadded tokens.

    >>> h = (torch.ones(1, 2, 4),)
    >>> float(hidden_state_loss(h, (torch.zeros(1, 2, 4),), torch.tensor([[1, 0]])))
    1.0
    """
    if len(student) != len(teacher):
        raise QbertEdgeError(f"distillation: student has {len(student)} hidden states, teacher {len(teacher)}")
    mask = attention_mask.unsqueeze(-1).to(student[0].dtype)
    count = mask.sum() * student[0].shape[-1]
    total = sum(((s - t.detach()).square() * mask).sum() for s, t in zip(student, teacher))
    return total / (count * len(student))


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
