"""GELU and LayerNorm with cheap second derivatives give PyTorch's numbers to every order the Hessian uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_bert

from qbert_edge.second_order import Gelu, _layer_norm_forward, cheap_second_derivatives


def derivatives(fn, x, v):
    """fn(x), its gradient, and the Hessian-vector product of sum(fn(x) * w) along v."""
    x = x.clone().requires_grad_(True)
    w = torch.linspace(-1.0, 2.0, x.numel(), dtype=x.dtype).reshape(x.shape)
    y = fn(x)
    (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    return y.detach(), g.detach(), hv


def frozen_layer_norm(width: int, seed: int = 0) -> torch.nn.LayerNorm:
    ln = torch.nn.LayerNorm(width, eps=1e-5).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(width, generator=gen, dtype=torch.float64))
        ln.bias.copy_(torch.randn(width, generator=gen, dtype=torch.float64))
    ln.requires_grad_(False)
    return ln


def test_gelu_values_and_two_derivatives_match_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(derivatives(Gelu(), x, v), derivatives(F.gelu, x, v)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_layer_norm_values_and_two_derivatives_match_torch():
    ln = frozen_layer_norm(24)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64) * 2 + 0.5
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours = derivatives(lambda t: _layer_norm_forward(ln, t), x, v)
    theirs = derivatives(ln, x, v)
    assert ours[2].abs().max() > 1e-3  # the second derivative is not trivially zero here
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradgradcheck():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Gelu(), (x,))
    assert torch.autograd.gradgradcheck(Gelu(), (x,))
    ln = frozen_layer_norm(6)
    y = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda t: _layer_norm_forward(ln, t)
    assert torch.autograd.gradcheck(fn, (y,))
    assert torch.autograd.gradgradcheck(fn, (y,))


def test_swapped_in_same_logits_and_restored():
    model = make_tiny_bert(layers=2, hidden=8, heads=2).eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    originals = [layer.intermediate.intermediate_act_fn for layer in model.bert.encoder.layer]
    model.requires_grad_(False)
    with cheap_second_derivatives(model) as (gelus, norms):
        assert (gelus, norms) == (2, 5)  # embeddings + 2 per layer
        assert all(isinstance(layer.intermediate.intermediate_act_fn, Gelu) for layer in model.bert.encoder.layer)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-6, atol=1e-6)
    assert [layer.intermediate.intermediate_act_fn for layer in model.bert.encoder.layer] == originals
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_trainable_layer_norm_left_alone_and_tanh_gelu_left_alone():
    model = make_tiny_bert(layers=1, hidden=8, heads=2)
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = torch.nn.GELU(approximate="tanh")
    with cheap_second_derivatives(model) as (gelus, norms):
        assert (gelus, norms) == (0, 0)


def test_layer_norm_refuses_parameter_gradients():
    ln = frozen_layer_norm(4)
    ln.weight.requires_grad_(True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="must not require grad"):
        _layer_norm_forward(ln, x).sum().backward()
