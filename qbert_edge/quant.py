"""Group-wise uniform quantization: the one definition of the math.

A weight ``[rows, cols]`` is split into ``groups`` contiguous blocks of rows; each block
has its own scale and integer zero point. Codes are unsigned, ``0 .. 2**bits - 1``::

    asymmetric: scale = (max(w, 0) - min(w, 0)) / (2**bits - 1),  zero = round(-min / scale)
    symmetric:  scale = max|w| / (2**(bits-1) - 1),                zero = 2**(bits-1)
    code  = clamp(round(w / scale) + zero, 0, 2**bits - 1)      (round half to even)
    w_hat = (code - zero) * scale                                (fp32)

Every element is within half a step (``scale / 2``) of its group's range. The range always
contains 0, so the zero point is a valid code. Fake quantization for training
(:func:`fake_quantize`, straight-through estimator) and the codes saved for export
(:func:`quantize`) call the same :func:`quant_params` and :func:`quantize_codes`; the device
computes ``w_hat`` with the same fp32 formula in NumPy (``qbert_edge.runtime.kernels``).

This module does not pack bits (``qbert_edge.runtime.packing`` does) and knows nothing of
models (``qbert_edge.qmodel`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qbert_edge.plan import ModuleQuant

_EPS = 1e-12


@dataclass(frozen=True)
class QTensor:
    """Codes ``uint8 [rows, cols]``, ``scale float32 [groups]``, ``zero uint8 [groups]``."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    @property
    def groups(self) -> int:
        return self.scale.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero)


def quant_params(w: torch.Tensor, bits: int, groups: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale float32 [groups], zero float32 [groups])`` of ``w [rows, cols]``."""
    g = w.detach().float().reshape(groups, -1)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = g.abs().amax(dim=1) / (half - 1 if bits > 1 else 1)
        scale = torch.where(scale > _EPS, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(half))
    else:
        lo = g.amin(dim=1).clamp(max=0)
        hi = g.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
        scale = torch.where(scale > _EPS, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)``, group-broadcast."""
    groups = scale.numel()
    g = w.float().reshape(groups, -1)
    q = torch.round(g / scale[:, None]) + zero[:, None]
    return q.clamp(0, 2**bits - 1).reshape(w.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` per group of rows, in fp32."""
    groups = scale.numel()
    shape = codes.shape
    c = codes.float().reshape(groups, -1)
    return ((c - zero.float()[:, None]) * scale.float()[:, None]).reshape(shape)


def quantize(w: torch.Tensor, spec: ModuleQuant) -> QTensor:
    """Integer codes of ``w`` under ``spec``: what a device stores."""
    scale, zero = quant_params(w, spec.bits, spec.groups, spec.symmetric)
    codes = quantize_codes(w.detach(), scale, zero, spec.bits)
    return QTensor(codes=codes.to(torch.uint8), scale=scale.float(), zero=zero.to(torch.uint8), bits=spec.bits)


class _RoundSTE(torch.autograd.Function):
    """Round in the forward pass, identity in the backward pass (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize(w: torch.Tensor, spec: ModuleQuant) -> torch.Tensor:
    """``dequantize(quantize(w))`` with a straight-through gradient to ``w``.

    The scales follow the weights (recomputed each call, no gradient through them); the
    gradient is passed unchanged inside the range and is zero where a value is clipped.
    """
    scale, zero = quant_params(w, spec.bits, spec.groups, spec.symmetric)
    g = w.reshape(spec.groups, -1)
    q = _RoundSTE.apply(g / scale[:, None]) + zero[:, None]
    q = torch.clamp(q, 0, 2**spec.bits - 1)
    return ((q - zero[:, None]) * scale[:, None]).reshape(w.shape).to(w.dtype)


def quantize_activation(x: torch.Tensor, scale: float, zero: int, bits: int = 8) -> torch.Tensor:
    """Per-tensor activation fake quantization, exactly ONNX QuantizeLinear + DequantizeLinear (uint8).

    ``y = (clamp(round(x / scale) + zero, 0, 255) - zero) * scale``, straight-through gradient.
    """
    q = torch.clamp(_RoundSTE.apply(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def activation_params(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """``(scale, zero)`` of a uint8 activation range that contains 0: ``activation_params(-1, 1)``."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2**bits - 1)
    if scale <= _EPS:
        return 1.0, 0
    scale = float(torch.tensor(scale, dtype=torch.float32))
    zero = int(min(max(round(-lo / scale), 0), 2**bits - 1))
    return scale, zero
