import numpy as np
import pytest
import torch

from qbert_edge.plan import ModuleQuant
from qbert_edge.quant import (SHRINK_GRID, activation_params, dequantize, fake_quantize, mse_shrink, quant_params, quantize,
                              quantize_activation)


def spec(bits, groups, rows=24, cols=10, symmetric=False):
    return ModuleQuant(bits=bits, groups=groups, shape=(rows, cols), symmetric=symmetric)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_error_at_most_half_a_step_of_its_group(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(24, 10) * torch.linspace(0.1, 3, 24)[:, None]  # groups with very different ranges
    q = quantize(w, spec(bits, 6, symmetric=symmetric))
    step = q.scale.repeat_interleave(4)[:, None]
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 * (1 + 1e-5)).all()
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**bits


def test_scales_are_per_block_of_rows():
    w = torch.zeros(6, 4)
    w[0:2] = torch.tensor([-1.0, 2.0, 0.5, 0.0])
    w[2:4] = 10 * torch.tensor([-1.0, 2.0, 0.5, 0.0])
    w[4:6] = 100 * torch.tensor([-1.0, 2.0, 0.5, 0.0])
    scale, zero = quant_params(w, 4, 3, symmetric=False)
    assert torch.allclose(scale, torch.tensor([3 / 15, 30 / 15, 300 / 15]))
    assert zero.tolist() == [5, 5, 5]
    # one head per group: 12 groups on a 12-head query matrix of 384 rows = 32 rows each
    assert spec(4, 12, rows=384).rows_per_group == 32


def test_symmetric_zero_point_is_the_middle_code():
    scale, zero = quant_params(torch.randn(8, 8), 3, 2, symmetric=True)
    assert zero.tolist() == [4, 4]


def test_all_positive_group_keeps_zero_in_range():
    w = torch.rand(4, 4) + 1.0
    q = quantize(w, spec(2, 1, rows=4, cols=4))
    assert int(q.zero[0]) == 0
    assert (q.dequantize() - w).abs().max() <= q.scale[0] / 2 + 1e-6


def test_constant_zero_weight_does_not_divide_by_zero():
    q = quantize(torch.zeros(4, 4), spec(2, 2, rows=4, cols=4))
    assert torch.equal(q.dequantize(), torch.zeros(4, 4))


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_fake_quantize_equals_quantize_then_dequantize(bits):
    w = torch.randn(24, 10)
    s = spec(bits, 4)
    assert torch.equal(fake_quantize(w, s), quantize(w, s).dequantize())


def test_straight_through_gradient():
    w = torch.randn(24, 10, requires_grad=True)
    fake_quantize(w, spec(2, 4)).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_numpy_dequantization_is_bit_identical():
    w = torch.randn(24, 10)
    q = quantize(w, spec(3, 6))
    codes, scale, zero = q.codes.numpy(), q.scale.numpy(), q.zero.numpy()
    rows = np.repeat(np.arange(6), 4)
    ref = (codes.astype(np.float32) - zero[rows, None].astype(np.float32)) * scale[rows, None]
    assert np.array_equal(ref, dequantize(q.codes, q.scale, q.zero).numpy())


def test_activation_params():
    scale, zero = activation_params(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == 64
    assert activation_params(0.0, 0.0) == (1.0, 0)
    assert activation_params(2.0, 5.0)[1] == 0  # range extended to contain 0


def test_activation_fake_quantization_is_quantize_linear_with_a_clipped_straight_through_gradient():
    x = torch.linspace(-3, 4, 701, requires_grad=True)
    scale, zero = activation_params(-1.0, 3.0)
    y = quantize_activation(x, torch.tensor(scale), zero)
    xs = x.detach().numpy()
    codes = np.clip(np.round(xs / np.float32(scale)) + zero, 0, 255)  # ONNX QuantizeLinear, uint8
    assert np.array_equal(y.detach().numpy(), ((codes - zero) * np.float32(scale)).astype(np.float32))
    y.sum().backward()
    inside = (np.round(xs / np.float32(scale)) + zero >= 0) & (np.round(xs / np.float32(scale)) + zero <= 255)
    assert 0 < inside.sum() < len(xs)
    assert np.array_equal(x.grad.numpy(), inside.astype(np.float32))


def _sq_err(w, s, shrink=None):
    return (quantize(w, s, shrink).dequantize() - w).square().reshape(s.groups, -1).sum(dim=1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_shrink_never_loses_to_min_max_and_wins_on_laplace_weights(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.distributions.Laplace(0.0, 1.0).sample((24, 64))  # heavier tails than a Gaussian, as trained weights
    s = spec(bits, 6, cols=64, symmetric=symmetric)
    shrink = mse_shrink(w, s)
    assert shrink.shape == (6,) and all(min(abs(x - g) for g in SHRINK_GRID) < 1e-6 for x in shrink.tolist())
    assert (_sq_err(w, s, shrink) <= _sq_err(w, s) * (1 + 1e-6)).all()
    if bits <= 3:
        assert _sq_err(w, s, shrink).sum() < 0.8 * _sq_err(w, s).sum()


@pytest.mark.parametrize("chunk", [1, 64 * 5, 1 << 20])
def test_mse_shrink_is_the_brute_force_argmin_whatever_the_chunk(chunk):
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 1.0).sample((24, 64))
    s = spec(3, 12, cols=64)
    errs = torch.stack([_sq_err(w, s, torch.full((12,), f)) for f in SHRINK_GRID])  # [factors, groups]
    expected = torch.tensor(SHRINK_GRID)[errs.argmin(dim=0)]  # argmin takes the first of equal errors
    assert torch.equal(mse_shrink(w, s, chunk=chunk), expected)


def test_mse_shrink_keeps_the_full_range_where_clipping_cannot_help():
    w = torch.tensor([[-1.0, 0.0, 1.0, 2.0]] * 2)  # exactly on the 2-bit grid of its min/max range
    assert mse_shrink(w, spec(2, 1, rows=2, cols=4)).tolist() == [1.0]


def test_shrink_narrows_the_range_and_clips_the_outlier():
    w = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0, 10.0]])
    s = spec(2, 1, rows=1, cols=6)
    scale, zero = quant_params(w, 2, 1, False, torch.tensor([0.5]))
    assert torch.allclose(scale, torch.tensor([5.5 / 3]))
    q = quantize(w, s, torch.tensor([0.5]))
    assert int(q.codes.max()) == 3 and float(q.dequantize().max()) < 10.0
    assert torch.equal(quant_params(w, 2, 1, False, torch.ones(1))[0], quant_params(w, 2, 1, False)[0])


def test_fake_quantize_with_shrink_equals_quantize_then_dequantize():
    w = torch.randn(24, 10, requires_grad=True)
    s = spec(2, 4)
    shrink = mse_shrink(w, s)
    out = fake_quantize(w, s, shrink)
    assert torch.equal(out.detach(), quantize(w, s, shrink).dequantize())
    out.sum().backward()  # straight-through: gradient 1 inside the narrowed range, 0 where clipped
    assert set(w.grad.unique().tolist()) <= {0.0, 1.0}
