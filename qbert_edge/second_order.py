"""GELU and LayerNorm whose *second* derivatives are cheap: the Hessian analysis's hot spots.

A Hessian-vector product by double backward differentiates every backward formula once more,
and each encoder layer's second backward visits every layer above it. PyTorch builds the second
derivatives of GELU and LayerNorm from dozens of unfused elementwise operations and row
reductions; profiled on MiniLM they were the largest costs after the matrix products. Here the
values and first derivatives are PyTorch's own fused kernels (``F.gelu``/``gelu_backward``,
``native_layer_norm``/``native_layer_norm_backward``) and the second derivatives are written out,
with what every second backward of a pass shares computed once:

    gelu''(x) = phi(x) * (2 - x**2)              phi(x) = exp(-x**2 / 2) / sqrt(2 pi)

    LayerNorm, one row of n values, u = g * gamma, x^ = (x - mean) * rstd,
    P v = v - mean(v) - x^ * mean(v * x^)        (symmetric)
    dx = rstd * P u                              (the first backward)
    for a cotangent c of dx:
      d/dg = gamma * rstd * P c
      d/dx = -rstd**2 * (mean(c * Pu) * x^ + mean(c * x^) * Pu + mean(u * x^) * P c)

:func:`cheap_second_derivatives` puts them in place in a BERT model for the duration of a
``with`` block (same numbers; LayerNorm parameters must be frozen, as they are in the analysis).
"""

from __future__ import annotations

import contextlib
import math
import types
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


class _LayerNormGrad(torch.autograd.Function):
    """``dx`` of LayerNorm from ``(x, g)``, differentiable once more in both (gamma held fixed)."""

    @staticmethod
    def forward(ctx, x, grad, weight, mean, rstd):
        xhat = (x - mean).mul_(rstd)
        u = grad * weight if weight is not None else grad
        b = (u * xhat).mean(-1, keepdim=True)
        pu = u - u.mean(-1, keepdim=True) - xhat * b
        ctx.save_for_backward(xhat, rstd, pu, b, weight)
        return pu * rstd

    @staticmethod
    @once_differentiable
    def backward(ctx, c):
        xhat, rstd, pu, b, weight = ctx.saved_tensors
        mcx = (c * xhat).mean(-1, keepdim=True)
        pc = c - c.mean(-1, keepdim=True) - xhat * mcx
        grad_grad = pc * rstd
        if weight is not None:
            grad_grad = grad_grad * weight
        cpu = (c * pu).mean(-1, keepdim=True)
        grad_x = (xhat * cpu).add_(pu * mcx).add_(pc * b).mul_(-(rstd * rstd))
        return grad_x, grad_grad, None, None, None


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        y, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("cheap_second_derivatives: LayerNorm parameters must not require grad")
        if not torch.is_grad_enabled():  # a plain backward: PyTorch's fused kernel
            dx, _, _ = torch.ops.aten.native_layer_norm_backward(
                grad, x, ctx.shape, mean, rstd, weight, bias, [True, False, False]
            )
            return dx, None, None, None, None
        return _LayerNormGrad.apply(x, grad, weight, mean, rstd), None, None, None, None


def _layer_norm_forward(self: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return _LayerNorm.apply(x, self.weight, self.bias, list(self.normalized_shape), self.eps)


@contextlib.contextmanager
def cheap_second_derivatives(model: torch.nn.Module) -> Iterator[tuple[int, int]]:
    """Swap in :class:`Gelu` for every exact-GELU ``intermediate_act_fn`` and the LayerNorm above
    for every ``nn.LayerNorm`` whose parameters are frozen; everything is restored on exit.

    Yields ``(gelus, layer_norms)`` swapped; other activations (tanh GELU, ReLU) are left alone.
    """
    gelus, norms = [], []
    for module in model.modules():
        act = getattr(module, "intermediate_act_fn", None)
        if isinstance(act, torch.nn.Module) and _is_exact_gelu(act):
            gelus.append((module, act))
            module.intermediate_act_fn = Gelu()
        if isinstance(module, torch.nn.LayerNorm) and not any(p.requires_grad for p in module.parameters()):
            norms.append(module)
            module.forward = types.MethodType(_layer_norm_forward, module)
    try:
        yield len(gelus), len(norms)
    finally:
        for module, act in gelus:
            module.intermediate_act_fn = act
        for module in norms:
            del module.forward
