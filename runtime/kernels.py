"""NumPy reference kernels of the ``qbert_edge`` custom ops (domain ``qbert_edge``, opset 1).

One pure function per op; the same functions serve the ``onnx.reference`` evaluator
(:mod:`qbert_edge.runtime.reference`), the exporter's validation and the onnxruntime
custom-op kernels. The specs are ``runtime/ops/QMatMul.md`` and ``runtime/ops/QGather.md``.

- :func:`group_dequantize`: rows ``[row_start, row_stop)`` of a packed ``[rows, cols]`` weight
  as fp32, ``w_hat[r, :] = (codes[r, :] - zp[g]) * scale[g]`` with ``g = r // (rows / groups)``;
- :func:`qmatmul`: ``y = x @ w_hat.T + bias`` (``QMatMul``), computed one tile of output rows
  (whole groups) at a time, so a whole fp32 copy of the weight never exists;
- :func:`qgather`: ``w_hat[indices]`` (``QGather``), dequantizing only the gathered rows.

Codes are packed by :mod:`qbert_edge.runtime.packing` (layout ``dense-le-v1``). All math is
fp32 and matches :func:`qbert_edge.quant.dequantize` bit for bit (``(code - zero) * scale``).
The kernels check their arguments and raise ``ValueError`` / ``IndexError``; they do not read
files, know nothing of ONNX and never import torch.

>>> from qbert_edge.runtime.packing import pack
>>> codes = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
>>> group_dequantize(pack(codes, 2), np.array([0.5, 1.0], np.float32), np.array([1, 2], np.uint8),
...                  bits=2, rows=2, cols=4, groups=2).tolist()
[[-0.5, 0.0, 0.5, 1.0], [1.0, 0.0, -1.0, -2.0]]
"""

from __future__ import annotations

import numpy as np

from qbert_edge.runtime.packing import LAYOUT, WIDTHS, packed_size, unpack

DOMAIN = "qbert_edge"
OPSET = 1
OP_VERSION = 1
#: Default budget of one dequantized tile in :func:`qmatmul`, in fp32 elements (1 MiB).
TILE_ELEMENTS = 1 << 18

__all__ = ["DOMAIN", "OPSET", "OP_VERSION", "LAYOUT", "group_dequantize", "qmatmul", "qgather", "tile_rows_for"]


def _check_weight(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, rows: int, cols: int, groups: int):
    if int(bits) not in WIDTHS:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if rows < 1 or cols < 1:
        raise ValueError(f"weight shape [{rows}, {cols}] is empty")
    if groups < 1 or rows % groups:
        raise ValueError(f"groups={groups} does not divide rows={rows}")
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"packed weight must be uint8, got {packed.dtype}")
    packed = packed.reshape(-1)
    need = packed_size(rows * cols, bits)
    if packed.size != need:
        raise ValueError(f"packed weight has {packed.size} bytes; [{rows}, {cols}] at {bits} bits needs {need}")
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    zero_points = np.asarray(zero_points)
    if zero_points.dtype != np.uint8:
        raise ValueError(f"zero points must be uint8, got {zero_points.dtype}")
    zero_points = zero_points.reshape(-1)
    if scales.size != groups or zero_points.size != groups:
        raise ValueError(f"expected {groups} scales and zero points, got {scales.size} and {zero_points.size}")
    return packed, scales, zero_points


def _codes(packed: np.ndarray, bits: int, start: int, stop: int) -> np.ndarray:
    """Codes ``[start, stop)`` of a packed stream, unpacking only the bytes that hold them."""
    per_chunk = 8 // int(np.gcd(bits, 8))  # codes that fill a whole number of bytes
    first = (start // per_chunk) * per_chunk
    byte0 = first * bits // 8
    return unpack(packed[byte0:], bits, stop - first)[start - first:]


def group_dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    bits: int,
    rows: int,
    cols: int,
    groups: int,
    row_start: int = 0,
    row_stop: int | None = None,
) -> np.ndarray:
    """fp32 rows ``[row_start, row_stop)`` of the packed ``[rows, cols]`` weight."""
    packed, scales, zero_points = _check_weight(packed, scales, zero_points, bits, rows, cols, groups)
    row_stop = rows if row_stop is None else row_stop
    if not 0 <= row_start <= row_stop <= rows:
        raise ValueError(f"row range [{row_start}, {row_stop}) is outside [0, {rows})")
    n = row_stop - row_start
    codes = _codes(packed, bits, row_start * cols, row_stop * cols).reshape(n, cols)
    g = np.arange(row_start, row_stop) // (rows // groups)
    out = codes.astype(np.float32)
    out -= zero_points[g].astype(np.float32)[:, None]
    out *= scales[g][:, None]
    return out


def tile_rows_for(n: int, k: int, groups: int, tile_elements: int = TILE_ELEMENTS) -> int:
    """Output rows per :func:`qmatmul` tile: whole groups, about ``tile_elements`` fp32 values.

    >>> tile_rows_for(768, 768, 128)   # 6 rows per group; 341 rows fit 2**18 values -> 56 groups
    336
    """
    per_group = n // groups
    return per_group * max(1, tile_elements // (per_group * k))


def qmatmul(
    x: np.ndarray,
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    bias: np.ndarray | None,
    *,
    bits: int,
    n: int,
    k: int,
    groups: int,
    tile_rows: int | None = None,
) -> np.ndarray:
    """``x [..., k] @ w_hat.T + bias`` -> fp32 ``[..., n]``; ``w_hat`` is the packed ``[n, k]`` weight.

    The weight is dequantized ``tile_rows`` output rows at a time (a multiple of ``n / groups``;
    default :func:`tile_rows_for`), so at most one fp32 tile exists at once.
    """
    packed, scales, zero_points = _check_weight(packed, scales, zero_points, bits, n, k, groups)
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise ValueError(f"x must be float32, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {list(x.shape)}; its last axis must be K={k}")
    if bias is not None:
        bias = np.asarray(bias)
        if bias.dtype != np.float32 or bias.shape != (n,):
            raise ValueError(f"bias must be float32 [{n}], got {bias.dtype} {list(bias.shape)}")
    per_group = n // groups
    if tile_rows is None:
        tile_rows = tile_rows_for(n, k, groups)
    if tile_rows < 1 or tile_rows % per_group:
        raise ValueError(f"tile_rows={tile_rows} is not a positive multiple of the group size {per_group}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    y = np.empty((x2.shape[0], n), dtype=np.float32)
    for r0 in range(0, n, tile_rows):
        r1 = min(n, r0 + tile_rows)
        w = group_dequantize(packed, scales, zero_points, bits, n, k, groups, r0, r1)
        np.matmul(x2, w.T, out=y[:, r0:r1])
    if bias is not None:
        y += bias
    return y.reshape(*lead, n)


def qgather(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
    indices: np.ndarray,
    *,
    bits: int,
    rows: int,
    cols: int,
    groups: int,
) -> np.ndarray:
    """``w_hat[indices]`` -> fp32 ``[..., cols]``, dequantizing only the distinct gathered rows.

    Indices must lie in ``[0, rows)`` (``IndexError`` otherwise; no negative wrap-around).
    """
    packed, scales, zero_points = _check_weight(packed, scales, zero_points, bits, rows, cols, groups)
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if indices.size and (indices.min() < 0 or indices.max() >= rows):
        raise IndexError(f"gather index out of range [0, {rows}): min {indices.min()}, max {indices.max()}")
    uniq, inverse = np.unique(indices.reshape(-1), return_inverse=True)
    table = np.empty((uniq.size, cols), dtype=np.float32)
    row_bits = cols * bits
    if row_bits % 8 == 0:  # every row starts on a byte: slice its bytes directly
        row_bytes = row_bits // 8
        block = packed.reshape(rows, row_bytes)[uniq]
        codes = unpack(block, bits, uniq.size * cols).reshape(uniq.size, cols)
    else:  # rows start mid-byte: read a 16-bit window around each code
        codes = _codes_at(packed, bits, uniq.astype(np.int64)[:, None] * cols + np.arange(cols, dtype=np.int64))
    g = uniq // (rows // groups)
    np.subtract(codes, zero_points[g].astype(np.float32)[:, None], out=table, dtype=np.float32)
    table *= scales[g][:, None]
    return table[inverse].reshape(*indices.shape, cols)


def _codes_at(packed: np.ndarray, bits: int, positions: np.ndarray) -> np.ndarray:
    """Codes at arbitrary flat positions: ``(byte | next_byte << 8) >> offset & mask``."""
    padded = np.concatenate([packed, np.zeros(1, np.uint8)])
    bit = positions * bits
    byte = bit >> 3
    window = padded[byte].astype(np.uint16) | (padded[byte + 1].astype(np.uint16) << 8)
    return ((window >> (bit & 7).astype(np.uint16)) & ((1 << bits) - 1)).astype(np.uint8)
