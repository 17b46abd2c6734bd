"""Exact (erf) GELU whose *second* derivative is cheap: the Hessian analysis's hot spot.

A Hessian-vector product by double backward differentiates GELU's backward once more.
PyTorch builds that second derivative from a dozen unfused elementwise operations, and on
MiniLM it took about 40% of an HVP pass (profiled: 5.2 s of 12 s for 128 examples). Here the
values are PyTorch's own (``F.gelu`` and its fused ``gelu_backward``), and the second
derivative is written out::

    gelu(x)   = x * Phi(x)
    gelu'(x)  = Phi(x) + x * phi(x)          (aten.gelu_backward, fused; kept once computed)
    gelu''(x) = phi(x) * (2 - x**2)          phi(x) = exp(-x**2 / 2) / sqrt(2 pi)

:func:`swapped_gelu` puts :class:`Gelu` in place of a BERT model's exact-GELU activations for
the duration of a ``with`` block (same numbers, faster double backward).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class _GeluGrad(torch.autograd.Function):
    """``grad * gelu'(x)``, differentiable once more in both arguments.

    An HVP pass takes one second backward per encoder layer through the same first-backward
    graph, so ``gelu'(x)`` and ``grad * gelu''(x)`` are computed once here and each second
    backward costs two multiplications.
    """

    @staticmethod
    def forward(ctx, first: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        x2 = x * x
        second = torch.exp(x2 * -0.5).mul_(_INV_SQRT_2PI).mul_(x2.neg_().add_(2.0))  # gelu''(x)
        ctx.save_for_backward(first, second.mul_(grad))
        return grad * first

    @staticmethod
    @once_differentiable
    def backward(ctx, gg: torch.Tensor) -> tuple[None, torch.Tensor, torch.Tensor]:
        first, grad_second = ctx.saved_tensors
        return None, gg * grad_second, gg * first


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if not hasattr(ctx, "first"):  # gelu'(x): every second backward of an HVP pass visits it
            ctx.first = torch.ops.aten.gelu_backward(torch.ones_like(x), x)
        if not torch.is_grad_enabled():  # a plain backward: no second derivative will be asked for
            return grad * ctx.first
        return _GeluGrad.apply(ctx.first, x, grad)


class Gelu(torch.nn.Module):
    """Exact GELU (``F.gelu``, erf form) with a fused first and a short second derivative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Gelu.apply(x)


def _is_exact_gelu(module: torch.nn.Module) -> bool:
    return getattr(module, "act", None) is F.gelu or isinstance(module, torch.nn.GELU) and module.approximate == "none"


@contextlib.contextmanager
def swapped_gelu(model: torch.nn.Module) -> Iterator[int]:
    """Replace every exact-GELU ``intermediate_act_fn`` of ``model`` by :class:`Gelu` (restored on exit).

    Yields how many were swapped; activations of other kinds (tanh GELU, ReLU) are left alone.
    """
    swapped = []
    for module in model.modules():
        act = getattr(module, "intermediate_act_fn", None)
        if isinstance(act, torch.nn.Module) and _is_exact_gelu(act):
            swapped.append((module, act))
            module.intermediate_act_fn = Gelu()
    try:
        yield len(swapped)
    finally:
        for module, act in swapped:
            module.intermediate_act_fn = act
