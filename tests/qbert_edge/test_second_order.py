"""The cheap-second-derivative GELU gives PyTorch's numbers to every order the Hessian uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import make_tiny_bert

from qbert_edge.gelu import Gelu, swapped_gelu


def derivatives(fn, x, v):
    """fn(x), its gradient, and the Hessian-vector product of sum(fn(x) * w) along v."""
    x = x.clone().requires_grad_(True)
    w = torch.linspace(-1.0, 2.0, x.numel(), dtype=x.dtype).reshape(x.shape)
    y = fn(x)
    (g,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    return y.detach(), g.detach(), hv


def test_values_and_two_derivatives_match_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours = derivatives(Gelu(), x, v)
    theirs = derivatives(F.gelu, x, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradgradcheck():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Gelu(), (x,))
    assert torch.autograd.gradgradcheck(Gelu(), (x,))


def test_swapped_gelu_same_logits_and_restored():
    model = make_tiny_bert(layers=2, hidden=8, heads=2).eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    originals = [layer.intermediate.intermediate_act_fn for layer in model.bert.encoder.layer]
    with swapped_gelu(model) as n:
        assert n == 2
        assert all(isinstance(layer.intermediate.intermediate_act_fn, Gelu) for layer in model.bert.encoder.layer)
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert [layer.intermediate.intermediate_act_fn for layer in model.bert.encoder.layer] == originals


def test_tanh_gelu_left_alone():
    model = make_tiny_bert(layers=1, hidden=8, heads=2)
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = torch.nn.GELU(approximate="tanh")
    with swapped_gelu(model) as n:
        assert n == 0
