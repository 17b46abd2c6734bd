"""Quantize a loaded model with a plan: DirectQ (post-training) or QAT (quantization-aware fine-tuning).

Both end the same way: activation ranges observed, integer codes frozen, and a
:class:`~qbert_edge.checkpoint.LoadedModel` that :func:`~qbert_edge.checkpoint.save_quantized`
writes as ``model.pt``. DirectQ only calibrates the activation ranges on a few batches; QAT
first calibrates, then fine-tunes the latent fp32 weights through the straight-through
estimator (:func:`qbert_edge.train.fine_tune`), then freezes. With ``distill`` the QAT loss
also distils from an fp32 copy of the model taken before quantization (:mod:`qbert_edge.distill`;
beyond Q-BERT, the recipe of TernaryBERT/BinaryBERT).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Iterable, Mapping

import torch

from qbert_edge.checkpoint import LoadedModel
from qbert_edge.distill import DistillConfig
from qbert_edge.plan import Plan
from qbert_edge.qmodel import calibrate, freeze, quantize_model

log = logging.getLogger(__name__)


def direct_quantize(loaded: LoadedModel, plan: Plan, calibration: Iterable[Mapping[str, torch.Tensor]]) -> LoadedModel:
    """DirectQ: quantize ``loaded.model`` in place with ``plan``; no training."""
    quantize_model(loaded.model, plan)
    n = calibrate(loaded.model, calibration) if plan.activation_bits else 0
    freeze(loaded.model)
    log.info("DirectQ: %d modules quantized, activation ranges from %d batches", len(plan.modules), n)
    return replace(loaded, plan=plan, meta={**loaded.meta, "method": "directq", "source": loaded.name})


def qat_quantize(
    loaded: LoadedModel,
    plan: Plan,
    dataset,
    *,
    epochs: int = 1,
    lr: float = 2e-5,
    batch_size: int = 32,
    max_length: int = 64,
    seed: int = 0,
    calibration_batches: int = 8,
    checkpoint_dir=None,
    max_steps: int | None = None,
    progress: bool = True,
    distill: DistillConfig | None = None,
    group_by_length: bool = True,
) -> LoadedModel:
    """Q-BERT QAT: fake-quantize with ``plan``, fine-tune on ``dataset``, freeze the codes.

    ``group_by_length``: batches of texts of similar length (see :func:`qbert_edge.train.fine_tune`).

    ``distill``: the teacher is ``loaded.model`` as it is on entry (fp32), copied before
    quantization; the settings land in ``meta["distill"]`` (``None`` without distillation)."""
    import copy

    from qbert_edge.data import torch_batches
    from qbert_edge.train import fine_tune

    teacher = copy.deepcopy(loaded.model).eval() if distill is not None else None
    quantize_model(loaded.model, plan)
    if plan.activation_bits:
        batches = torch_batches(dataset, loaded.tokenizer, batch_size, max_length, shuffle=True, seed=seed)
        calibrate(loaded.model, (b for _, b in zip(range(calibration_batches), batches)))
    result = fine_tune(
        loaded.model,
        dataset,
        loaded.tokenizer,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        max_steps=max_steps,
        teacher=teacher,
        distill=distill,
        group_by_length=group_by_length,
    )
    del teacher
    freeze(loaded.model)
    meta = {**loaded.meta, "method": "qat", "source": loaded.name, "training": result.to_dict(),
            "distill": None if distill is None else {"teacher": f"{loaded.name} (fp32)", **distill.to_dict()}}
    return replace(loaded, plan=plan, max_length=max_length, meta=meta)
