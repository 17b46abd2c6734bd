"""Quantized BERT: swap a transformers BERT's Linears and embeddings for quantized twins, as a plan says.

:func:`quantize_model` replaces, in place, every module the plan names:

- ``nn.Linear`` -> :class:`QuantLinear`: group-wise fake-quantized weight (straight-through
  estimator) and, when ``plan.activation_bits`` is 8, a uint8 fake quantization of its input
  whose range is tracked with an EMA in training mode and frozen in eval mode;
- ``nn.Embedding`` -> :class:`QuantEmbedding`: one group per row, its own bits.

Both subclass their torch originals (``.weight`` stays a trainable fp32 parameter), so
transformers' code keeps working and QAT trains the latent fp32 weights. :func:`freeze` then
fixes the integer codes (what ``model.pt`` stores and the device computes): after it, the
forward pass uses exactly ``dequantize(codes)``.

It handles ``BertModel`` and ``BertForSequenceClassification`` (and the reference MiniLM); any
other model is refused before a single module is touched. It does not save or load files
(:mod:`qbert_edge.checkpoint` does).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import EMBEDDINGS, LAYER_LINEARS, ModuleQuant, Plan
from qbert_edge.quant import QTensor, activation_params, fake_quantize, mse_shrink, quantize, quantize_activation

EMA_MOMENTUM = 0.9


class ActivationQuant(nn.Module):
    """Per-tensor uint8 fake quantization of an activation with an EMA-tracked range.

    In training mode (or while :attr:`observing`) each batch's min/max updates the range:
    ``lo = m * lo + (1 - m) * batch_min``; in eval mode the range is frozen. Before any batch has
    been observed it passes values through unchanged.
    """

    def __init__(self, bits: int = 8, momentum: float = EMA_MOMENTUM) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.observing = False
        self.fixed: tuple[float, int] | None = None  # (scale, zero) read from a model.pt
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def params(self) -> tuple[float, int]:
        """``(scale, zero)`` of the current range: what ONNX QuantizeLinear gets."""
        if self.fixed is not None:
            return self.fixed
        return activation_params(float(self.lo), float(self.hi), self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.observing:
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                if int(self.seen) == 0:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                else:
                    self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
                    self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
                self.seen += 1
        if int(self.seen) == 0:
            return x
        scale, zero = self.params()
        return quantize_activation(x, torch.tensor(scale, dtype=x.dtype), zero, self.bits)


class _Quantized:
    """What QuantLinear and QuantEmbedding share: a spec, a fake-quantized weight, frozen codes.

    With ``spec.clip == "mse"`` the per-group shrink factors are chosen once, from the weight
    the first forward pass (or :meth:`freeze`) sees, and then held: QAT trains against the
    same narrowed ranges that the frozen codes use.
    """

    spec: ModuleQuant
    frozen: QTensor | None
    shrink: torch.Tensor | None = None

    def range_shrink(self) -> torch.Tensor | None:
        """The per-group shrink factors of this module (``None``: min/max ranges)."""
        if self.spec.clip == "minmax":
            return None
        if self.shrink is None:
            self.shrink = mse_shrink(self.weight, self.spec)
        return self.shrink

    def quantized_weight(self) -> torch.Tensor:
        if self.frozen is not None:
            return self.weight
        return fake_quantize(self.weight, self.spec, self.range_shrink())

    def freeze(self) -> QTensor:
        """Fix the integer codes of the current weight; the weight becomes ``dequantize(codes)``."""
        with torch.no_grad():
            self.frozen = quantize(self.weight, self.spec, self.range_shrink())
            self.weight.copy_(self.frozen.dequantize())
        return self.frozen

    def load_frozen(self, q: QTensor) -> None:
        """Install saved codes (from ``model.pt``)."""
        if tuple(q.codes.shape) != self.spec.shape or q.bits != self.spec.bits or q.groups != self.spec.groups:
            raise QbertEdgeError(
                f"saved codes {tuple(q.codes.shape)}/{q.bits}b/{q.groups}g do not match the plan's {self.spec}"
            )
        with torch.no_grad():
            self.weight.copy_(q.dequantize())
        self.frozen = q


class QuantLinear(_Quantized, nn.Linear):
    """``nn.Linear`` whose weight (and, optionally, input) is quantized as ``spec`` says."""

    def __init__(self, linear: nn.Linear, spec: ModuleQuant, activation_bits: int | None) -> None:
        nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.frozen = None
        self.input_quant = ActivationQuant(activation_bits) if activation_bits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.spec.bits}, groups={self.spec.groups}, clip={self.spec.clip}"


class QuantEmbedding(_Quantized, nn.Embedding):
    """``nn.Embedding`` whose table is quantized as ``spec`` says (one group per row by default)."""

    def __init__(self, embedding: nn.Embedding, spec: ModuleQuant) -> None:
        nn.Embedding.__init__(
            self, embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx, device="meta"
        )
        self.weight = embedding.weight
        self.spec = spec
        self.frozen = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None or self.spec.groups != self.num_embeddings:
            return F.embedding(ids, self.quantized_weight(), self.padding_idx)
        # One group per row: fake-quantize only the rows this batch reads (the same numbers as the
        # whole table, gathered; a 30k-row table costs ~0.5 s per training step otherwise).
        rows, inverse = torch.unique(ids, return_inverse=True)
        shrink = self.range_shrink()
        spec = replace(self.spec, groups=len(rows), shape=(len(rows), self.embedding_dim))
        table = fake_quantize(self.weight[rows], spec, None if shrink is None else shrink[rows])
        if self.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
            table = torch.where((rows == self.padding_idx)[:, None], table.detach(), table)
        return table[inverse]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.spec.bits}, clip={self.spec.clip}"


def encoder_of(model: nn.Module) -> nn.Module:
    """The ``BertModel`` inside ``model`` (the model itself for a bare encoder)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "bert":
        raise QbertEdgeError(
            f"{type(model).__name__} is not a transformers BERT model; qbert-edge quantizes "
            "BertModel and BertForSequenceClassification"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise QbertEdgeError(f"position_embedding_type={config.position_embedding_type!r} is not supported (absolute only)")
    from transformers import BertForSequenceClassification, BertModel

    if isinstance(model, BertModel):
        return model
    if isinstance(model, BertForSequenceClassification):
        return model.bert
    raise QbertEdgeError(
        f"{type(model).__name__} is not supported; qbert-edge quantizes BertModel and BertForSequenceClassification"
    )


def module_paths(model: nn.Module) -> dict[str, str]:
    """Plan name -> attribute path in ``model``, for every quantizable module it has."""
    encoder = encoder_of(model)
    prefix = "" if encoder is model else "bert."
    paths = {v: prefix + v for v in EMBEDDINGS.values()}
    for i in range(len(encoder.encoder.layer)):
        for suffix in LAYER_LINEARS:
            name = f"encoder.layer.{i}.{suffix}"
            paths[name] = prefix + name
    if getattr(encoder, "pooler", None) is not None:
        paths["pooler.dense"] = prefix + "pooler.dense"
    if encoder is not model and isinstance(getattr(model, "classifier", None), nn.Linear):
        paths["classifier"] = "classifier"
    return paths


def quantizable_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Plan name -> weight shape ``(rows, cols)`` of every quantizable module of ``model``."""
    return {name: tuple(model.get_submodule(path).weight.shape) for name, path in module_paths(model).items()}


def quantize_model(model: nn.Module, plan: Plan) -> nn.Module:
    """Replace, in place, each module the plan names by its quantized twin; returns ``model``.

    The plan is checked against the model first, so a model that cannot be handled is left
    untouched.
    """
    paths = module_paths(model)
    if any(isinstance(m, _Quantized) for m in model.modules()):
        raise QbertEdgeError("model is already quantized")
    plan.check_model(quantizable_shapes(model))
    for name, spec in plan.modules.items():
        parent_path, _, attr = paths[name].rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(old, spec)
        elif isinstance(old, nn.Linear):
            new = QuantLinear(old, spec, plan.activation_bits)
        else:
            raise QbertEdgeError(f"{name}: {type(old).__name__} cannot be quantized")
        setattr(parent, attr, new)
    return model


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(plan name, module)`` for each quantized module of ``model``, in plan order."""
    for name, path in module_paths(model).items():
        module = model.get_submodule(path)
        if isinstance(module, _Quantized):
            yield name, module


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Observe activation ranges over ``batches`` (eval mode, no training); returns the batch count."""
    observers = [m for m in model.modules() if isinstance(m, ActivationQuant)]
    for o in observers:
        o.observing = True
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            n += 1
    finally:
        for o in observers:
            o.observing = False
        model.train(was_training)
    return n


def freeze(model: nn.Module) -> dict[str, QTensor]:
    """Fix the integer codes of every quantized module; returns plan name -> codes."""
    return {name: module.freeze() for name, module in quantized_modules(model)}
