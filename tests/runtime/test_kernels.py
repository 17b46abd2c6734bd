"""NumPy reference kernels of QMatMul / QGather: math, tiling, partial dequantization, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_edge.runtime import kernels
from qbert_edge.runtime.kernels import group_dequantize, qgather, qmatmul, tile_rows_for
from qbert_edge.runtime.packing import pack

OPS_DIR = Path(kernels.__file__).parent / "ops"


def make_weight(rng, rows, cols, bits, groups):
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.5, size=groups).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, size=groups, dtype=np.uint8)
    return codes, scales, zeros


def dense(codes, scales, zeros):
    """The spec's formula, written independently of the kernel."""
    rows = codes.shape[0]
    g = np.arange(rows) // (rows // scales.size)
    return (codes.astype(np.float32) - zeros[g].astype(np.float32)[:, None]) * scales[g][:, None]


SHAPES = [(6, 5, 3), (12, 7, 4), (8, 16, 8), (9, 3, 1), (4, 1, 4), (32, 24, 32)]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("rows,cols,groups", SHAPES)
def test_group_dequantize_every_row_range(bits, rows, cols, groups):
    rng = np.random.default_rng(bits * 100 + rows)
    codes, scales, zeros = make_weight(rng, rows, cols, bits, groups)
    packed = pack(codes, bits)
    ref = dense(codes, scales, zeros)
    assert np.array_equal(group_dequantize(packed, scales, zeros, bits, rows, cols, groups), ref)
    for start in range(rows + 1):
        for stop in range(start, rows + 1):
            got = group_dequantize(packed, scales, zeros, bits, rows, cols, groups, start, stop)
            assert got.dtype == np.float32 and np.array_equal(got, ref[start:stop]), (start, stop)


def test_group_dequantize_matches_torch_dequantize_bit_for_bit():
    torch = pytest.importorskip("torch")
    from qbert_edge.quant import dequantize

    rng = np.random.default_rng(1)
    for bits in range(2, 9):
        codes, scales, zeros = make_weight(rng, 24, 13, bits, 6)
        expected = dequantize(torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(zeros)).numpy()
        got = group_dequantize(pack(codes, bits), scales, zeros, bits, 24, 13, 6)
        assert np.array_equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 8),
    groups=st.integers(1, 6),
    per_group=st.integers(1, 5),
    cols=st.integers(1, 40),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_qmatmul_property(bits, groups, per_group, cols, lead, seed):
    rng = np.random.default_rng(seed)
    rows = groups * per_group
    codes, scales, zeros = make_weight(rng, rows, cols, bits, groups)
    x = rng.standard_normal((*lead, cols)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    tile = per_group * rng.integers(1, groups + 1)
    y = qmatmul(x, pack(codes, bits), scales, zeros, bias, bits=bits, n=rows, k=cols, groups=groups, tile_rows=int(tile))
    ref = x.astype(np.float64) @ dense(codes, scales, zeros).T.astype(np.float64) + bias
    assert y.shape == (*lead, rows) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_qmatmul_without_bias_and_default_tile():
    rng = np.random.default_rng(2)
    codes, scales, zeros = make_weight(rng, 48, 32, 4, 12)
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    y = qmatmul(x, pack(codes, 4), scales, zeros, None, bits=4, n=48, k=32, groups=12)
    np.testing.assert_allclose(y, x @ dense(codes, scales, zeros).T, rtol=1e-5, atol=1e-5)


def test_qmatmul_dequantizes_one_tile_of_whole_groups_at_a_time(monkeypatch):
    """Memory-lean: never more than ``tile_rows`` fp32 rows, each tile a whole number of groups."""
    rng = np.random.default_rng(3)
    rows, cols, groups = 60, 16, 10  # 6 rows per group
    codes, scales, zeros = make_weight(rng, rows, cols, 3, groups)
    calls = []
    real = kernels.group_dequantize

    def spy(*args):
        out = real(*args)
        calls.append((args[7], args[8], out.shape[0]))
        return out

    monkeypatch.setattr(kernels, "group_dequantize", spy)
    x = rng.standard_normal((4, cols)).astype(np.float32)
    y = qmatmul(x, pack(codes, 3), scales, zeros, None, bits=3, n=rows, k=cols, groups=groups, tile_rows=18)
    np.testing.assert_allclose(y, x @ dense(codes, scales, zeros).T, rtol=1e-5, atol=1e-5)
    assert [c[:2] for c in calls] == [(0, 18), (18, 36), (36, 54), (54, 60)]
    assert max(c[2] for c in calls) <= 18
    assert all(start % 6 == 0 for start, _, _ in calls)


def test_tile_rows_for_keeps_whole_groups_and_the_budget():
    assert tile_rows_for(768, 768, 128) == 336
    assert tile_rows_for(768, 768, 128) % 6 == 0
    assert tile_rows_for(768, 768, 128) * 768 <= kernels.TILE_ELEMENTS
    assert tile_rows_for(10, 10**7, 2) == 5  # a group larger than the budget: one group per tile
    with pytest.raises(ValueError, match="multiple of the group size"):
        rng = np.random.default_rng(0)
        codes, scales, zeros = make_weight(rng, 12, 4, 4, 4)
        qmatmul(np.zeros((1, 4), np.float32), pack(codes, 4), scales, zeros, None, bits=4, n=12, k=4, groups=4, tile_rows=4)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 3, 5, 8, 13, 32])
def test_qgather_rows_any_alignment(bits, cols):
    rng = np.random.default_rng(bits + cols)
    rows = 20
    codes, scales, zeros = make_weight(rng, rows, cols, bits, rows)
    idx = np.array([[0, 19, 7, 7], [3, 3, 0, 11]], dtype=np.int64)
    got = qgather(pack(codes, bits), scales, zeros, idx, bits=bits, rows=rows, cols=cols, groups=rows)
    assert got.shape == (2, 4, cols) and got.dtype == np.float32
    assert np.array_equal(got, dense(codes, scales, zeros)[idx])


def test_qgather_with_grouped_rows_and_scalar_and_empty_indices():
    rng = np.random.default_rng(5)
    codes, scales, zeros = make_weight(rng, 12, 6, 5, 3)
    packed, ref = pack(codes, 5), dense(codes, scales, zeros)
    assert np.array_equal(qgather(packed, scales, zeros, np.int64(7), bits=5, rows=12, cols=6, groups=3), ref[7])
    empty = qgather(packed, scales, zeros, np.zeros((2, 0), np.int64), bits=5, rows=12, cols=6, groups=3)
    assert empty.shape == (2, 0, 6)


def test_qgather_dequantizes_only_the_gathered_rows(monkeypatch):
    """A gather of 3 distinct rows from a 10,000-row table unpacks 3 rows' codes, not the table."""
    from qbert_edge.runtime import packing

    rng = np.random.default_rng(6)
    rows, cols = 10_000, 16
    codes, scales, zeros = make_weight(rng, rows, cols, 4, rows)
    seen = []
    real = packing.unpack

    def spy(packed, bits, n):
        seen.append(n)
        return real(packed, bits, n)

    monkeypatch.setattr(kernels, "unpack", spy)
    idx = np.array([[5, 9999, 5, 42]], dtype=np.int64)
    got = qgather(pack(codes, 4), scales, zeros, idx, bits=4, rows=rows, cols=cols, groups=rows)
    assert np.array_equal(got, dense(codes, scales, zeros)[idx])
    assert seen == [3 * cols]


def test_qgather_index_out_of_range():
    rng = np.random.default_rng(7)
    codes, scales, zeros = make_weight(rng, 4, 8, 2, 4)
    for bad in ([4], [-1]):
        with pytest.raises(IndexError, match="out of range"):
            qgather(pack(codes, 2), scales, zeros, np.array(bad), bits=2, rows=4, cols=8, groups=4)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=9), "bits must be in 2..8"),
        (dict(groups=5), "does not divide"),
        (dict(packed_extra=1), "needs"),
        (dict(scales_n=3), "expected 4 scales"),
        (dict(zero_dtype=np.int32), "zero points must be uint8"),
        (dict(x_dtype=np.float64), "x must be float32"),
        (dict(x_cols=7), "last axis must be K=8"),
        (dict(bias_n=3), "bias must be float32"),
    ],
)
def test_qmatmul_rejects_bad_arguments(change, match):
    rng = np.random.default_rng(8)
    codes, scales, zeros = make_weight(rng, 8, 8, 4, 4)
    packed = pack(codes, 4)
    if "packed_extra" in change:
        packed = np.concatenate([packed, np.zeros(1, np.uint8)])
    if "scales_n" in change:
        scales = scales[: change["scales_n"]]
    if "zero_dtype" in change:
        zeros = zeros.astype(change["zero_dtype"])
    x = np.zeros((2, change.get("x_cols", 8)), dtype=change.get("x_dtype", np.float32))
    bias = np.zeros(change.get("bias_n", 8), np.float32)
    with pytest.raises(ValueError, match=match):
        qmatmul(x, packed, scales, zeros, bias, bits=change.get("bits", 4), n=8, k=8, groups=change.get("groups", 4))


def test_spec_worked_examples_hold():
    """The numbers in runtime/ops/*.md are what the kernels compute."""
    qm = (OPS_DIR / "QMatMul.md").read_text()
    codes = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    packed = pack(codes, 2)
    assert "[0xE4, 0x1B]" in qm and packed.tolist() == [0xE4, 0x1B]
    y = qmatmul(np.ones((1, 4), np.float32), packed, np.array([0.5, 1.0], np.float32), np.array([1, 2], np.uint8),
                np.array([0, 10], np.float32), bits=2, n=2, k=4, groups=2)
    assert y.tolist() == [[1.0, 8.0]] and "Y          = [[1.0, 8.0]]" in qm

    qg = (OPS_DIR / "QGather.md").read_text()
    codes = np.array([[5, 3], [7, 0], [1, 2]], np.uint8)
    packed = pack(codes, 3)
    hexes = "[" + ", ".join(f"0x{b:02X}" for b in packed.tolist()) + "]"
    assert hexes in qg, hexes
    y = qgather(packed, np.array([0.5, 1.0, 2.0], np.float32), np.array([4, 4, 1], np.uint8), np.array([[2, 0]]),
                bits=3, rows=3, cols=2, groups=3)
    assert y.tolist() == [[[0.0, 2.0], [0.5, -0.5]]]
    assert re.search(r"Y\s+= \[\[\[0\.0, 2\.0\], \[0\.5, -0\.5\]\]\]", qg)


def test_kernels_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, qbert_edge.runtime.kernels, qbert_edge.runtime.native, qbert_edge.runtime.reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
