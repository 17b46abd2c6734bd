"""Fine-tune and evaluate a sequence classifier in PyTorch (fp32, or with fake-quantized layers).

:func:`fine_tune` is AdamW with linear warm-up and linear decay, seeded and repeatable: the
same seed, data and thread count give the same weights. It takes any ``nn.Module`` whose
forward accepts ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels`` and returns
an object with ``.loss`` (a ``BertForSequenceClassification``, or the same model with its
Linear layers replaced by quantization modules for QAT). With a ``teacher`` model it distils
(:mod:`qbert_edge.distill`: the loss mixes the teacher's softened logits with the labels).
:func:`evaluate_torch` returns accuracy, macro-F1 and the logits.

This module does not build, quantize or save models (other than per-epoch checkpoints of the
weights); ``qbert_edge.reference`` makes the reference classifier with it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qbert_edge.data import Dataset, torch_batches
from qbert_edge.distill import DistillConfig, distillation_loss, hidden_state_loss
from qbert_edge.errors import QbertEdgeError
from qbert_edge.fileio import atomic_path
from qbert_edge.runtime.metrics import Metrics, score_logits

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "qbert-edge-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`fine_tune`, validated."""

    epochs: int
    lr: float
    batch_size: int
    max_length: int
    seed: int
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    distill: DistillConfig | None = None
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise QbertEdgeError(f"epochs must be at least 1, got {self.epochs}")
        if not self.lr > 0:
            raise QbertEdgeError(f"learning rate must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise QbertEdgeError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise QbertEdgeError(f"max length must be at least 2 tokens, got {self.max_length}")
        if not 0 <= self.warmup < 1:
            raise QbertEdgeError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise QbertEdgeError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise QbertEdgeError(f"max steps must be at least 1, got {self.max_steps}")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What a fine-tuning run did: per-step losses, per-epoch mean losses, time, checkpoints."""

    config: TrainConfig
    steps: int
    losses: tuple[float, ...]
    epoch_losses: tuple[float, ...]
    seconds: float
    checkpoints: tuple[Path, ...] = ()

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "steps": self.steps,
            "epoch_losses": list(self.epoch_losses),
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "seconds": self.seconds,
            "checkpoints": [str(p) for p in self.checkpoints],
        }


def linear_schedule(step: int, total: int, warmup_steps: int) -> float:
    """LR multiplier at optimizer step ``step`` (from 0): up to 1 over ``warmup_steps``, then down to 0 at ``total``.

    >>> [round(linear_schedule(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
    [0.333, 0.667, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (total - step) / max(1, total - warmup_steps))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on biases, LayerNorm weights or other 1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise QbertEdgeError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fine_tune(
    model: torch.nn.Module,
    dataset: Dataset,
    tokenizer,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    teacher: torch.nn.Module | None = None,
    distill: DistillConfig | None = None,
    group_by_length: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``dataset``; the model is left in eval mode.

    Each epoch sees the examples in a seeded shuffle (``seed + epoch``); ``torch.manual_seed(seed)``
    fixes dropout; ``group_by_length`` makes each batch's texts of similar length
    (:func:`~qbert_edge.data.length_grouped_order`: about half the padding, half the time a step
    takes on ``rt:train``). ``max_steps`` stops early (the LR schedule is laid out over the steps actually
    run). With ``checkpoint_dir``, the weights are saved after each epoch as
    ``epoch-<n>.safetensors`` (metadata: format, version, epoch, step).

    With a ``teacher`` (a classifier of the same labels, run in eval mode under ``no_grad``; its
    weights and mode are left as they were) the loss is :func:`~qbert_edge.distill.distillation_loss`
    with ``distill`` (default :class:`~qbert_edge.distill.DistillConfig`); ``alpha = 0`` trains
    exactly as without a teacher.
    """
    if distill is not None and teacher is None:
        raise QbertEdgeError("distillation settings given without a teacher model")
    if teacher is not None and distill is None:
        distill = DistillConfig()
    config = TrainConfig(epochs, lr, batch_size, max_length, seed, warmup, weight_decay, max_grad_norm, max_steps, distill,
                         group_by_length)
    if len(dataset) == 0:
        raise QbertEdgeError(f"data {dataset.name}: no examples to train on")
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    warmup_steps = int(warmup * total)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_schedule(s, total, warmup_steps))
    params = [p for p in model.parameters() if p.requires_grad]

    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not progress, desc=f"fine-tune {dataset.name}", unit="step", dynamic_ncols=True)
    losses: list[float] = []
    epoch_losses: list[float] = []
    checkpoints: list[Path] = []
    step = 0
    start = time.perf_counter()
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    model.train()
    try:
        for epoch in range(epochs):
            epoch_sum, epoch_n = 0.0, 0
            for batch in torch_batches(dataset, tokenizer, batch_size, max_length, shuffle=True, seed=seed + epoch,
                                       group_by_length=group_by_length):
                hidden = teacher is not None and distill.hidden > 0
                out = model(**batch, output_hidden_states=True) if hidden else model(**batch)
                loss = out.loss
                if teacher is not None and loss is not None:
                    with torch.no_grad():
                        taught = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=hidden)
                    loss = distillation_loss(out.logits, taught.logits, batch["labels"], distill, ce=loss)
                    if hidden:
                        loss = loss + distill.hidden * hidden_state_loss(out.hidden_states, taught.hidden_states,
                                                                         batch["attention_mask"])
                if loss is None or not torch.isfinite(loss):
                    raise QbertEdgeError(f"fine-tuning diverged at step {step + 1}: loss is {loss}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                value = float(loss.detach())
                losses.append(value)
                epoch_sum += value
                epoch_n += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if step >= total:
                    break
            epoch_losses.append(epoch_sum / max(1, epoch_n))
            log.info("epoch %d/%d: mean loss %.4f (%d steps)", epoch + 1, epochs, epoch_losses[-1], epoch_n)
            if ckpt_dir is not None:
                checkpoints.append(save_checkpoint(model, ckpt_dir / f"epoch-{epoch + 1}.safetensors", epoch + 1, step))
            if step >= total:
                break
    finally:
        bar.close()
        model.eval()
        if teacher is not None:
            teacher.train(teacher_was_training)
    return TrainResult(config, step, tuple(losses), tuple(epoch_losses), time.perf_counter() - start, tuple(checkpoints))


def save_checkpoint(model: torch.nn.Module, path: str | Path, epoch: int, step: int) -> Path:
    """Write the model's tensors to ``path`` as safetensors, atomically; returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen and tensor.numel() > 0:  # tied weights: keep one copy
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().clone()
    metadata = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "epoch": str(epoch), "step": str(step)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> dict:
    """Load a :func:`save_checkpoint` file into ``model`` (non-strict for tied weights); returns its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise QbertEdgeError(f"{path}: no such checkpoint")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise QbertEdgeError(f"{path}: not a qbert-edge checkpoint")
    if int(metadata.get("version", "0")) > CHECKPOINT_VERSION:
        raise QbertEdgeError(f"{path}: checkpoint version {metadata['version']} is newer than this qbert-edge reads")
    _missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected:
        raise QbertEdgeError(f"{path}: tensors the model does not have: {', '.join(unexpected[:5])}")
    return metadata


@torch.no_grad()
def predict_logits(model: torch.nn.Module, dataset: Dataset, tokenizer, batch_size: int, max_length: int) -> np.ndarray:
    """Logits ``float32 [examples, classes]`` of ``model`` on ``dataset``, in data order."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for batch in torch_batches(dataset, tokenizer, batch_size, max_length):
            batch.pop("labels")
            out.append(model(**batch).logits.float().numpy())
    finally:
        model.train(was_training)
    if not out:
        raise QbertEdgeError(f"data {dataset.name}: no examples to evaluate")
    return np.concatenate(out, axis=0)


def evaluate_torch(
    model: torch.nn.Module, dataset: Dataset, tokenizer, batch_size: int = 64, max_length: int = 128
) -> tuple[Metrics, np.ndarray]:
    """Accuracy and macro-F1 of ``model`` on ``dataset``, and the logits ``[examples, classes]``."""
    logits = predict_logits(model, dataset, tokenizer, batch_size, max_length)
    if logits.shape[1] < len(dataset.labels):
        raise QbertEdgeError(
            f"data {dataset.name}: {len(dataset.labels)} labels but the model has {logits.shape[1]} outputs"
        )
    return score_logits(dataset.label_ids, logits), logits
