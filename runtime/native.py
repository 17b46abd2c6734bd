"""Rewrite a portable graph to onnxruntime's own low-bit kernels (pure onnx + NumPy, no torch).

onnx is imported where a graph is rewritten: importing this module (its rule, :func:`keeps_2bit`)
costs nothing.

``qbert_edge::QMatMul`` becomes ``com.microsoft::MatMulNBits`` and ``qbert_edge::QGather``
becomes ``com.microsoft::GatherBlockQuantized``, with the same numbers:

- onnxruntime 1.32's CPU kernels take 2, 4 and 8 bits (measured: 3 and 5 are refused at session
  creation). Widths 3, 5, 6, 7 are *widened* (3 -> 4, 5..7 -> 8): every code and zero point still
  fits, so the result is exactly the same; only the bytes grow. docs/export.md has the measurement
  behind widening rather than keeping the custom op.
- 2-bit matmuls follow one rule, :func:`keeps_2bit`, shared by the exporter (``--target ort``) and
  the runtime's ``ort`` backend: onnxruntime 1.32 has a native 2-bit kernel only for int8 compute
  (``accuracy_level`` 4) and blocks of 32/64/128; anywhere else it dequantizes the 2-bit weight to
  fp32 on every call (2.8-3.9x slower than the same weight at 4 bits), so the weight is widened to 4
  bits (exact, +0.25 byte per weight). Measured at BERT-base shapes (M = 128, 2 threads,
  benchmarks/results/matmulnbits/): the native 2-bit kernel takes 1.0-1.4x the 4-bit one's time
  at blocks 64 and 128 (kept), 1.5-2.2x at block 32 (widened: it does not pay).
- Our groups are blocks of output rows; MatMulNBits' blocks run along K inside one row. A row's
  group scale and zero point are repeated over its ``K / block_size`` blocks, which expresses our
  quantization exactly. ``block_size`` is the largest power of two >= 16 dividing K, at most
  :data:`MAX_BLOCK` (onnxruntime refuses 2-bit blocks above 256).
- ``dense-le-v1`` packs a row-major ``[N, K]`` weight exactly as MatMulNBits' ``[N, K/bs, bs*bits/8]``
  blob (low bits first) when K*bits is a multiple of 8, so an un-widened weight is a reshape of
  the same bytes (zero-copy); a widened one is unpacked and repacked a few rows at a time
  (:data:`WIDEN_CHUNK` codes: the temporaries stay ~2 MB, where one pass over a 768 x 3072 3-bit
  matrix made ~28 MB of them).
- Zero points are passed packed (uint8, ``ceil(blocks*bits/8)`` bytes per row), as both ops expect.
- Opt-in ``int8=True`` (the runtime's "fast" option, ``RuntimeOptions(int8_matmul=True)``): a
  ``QMatMul`` whose input is ``QuantizeLinear -> DequantizeLinear`` (uint8, per-tensor: the
  plan's 8-bit activations) and whose weight has at most :data:`INT8_MAX_BITS` (6) bits becomes
  ``com.microsoft::MatMulIntegerToFloat`` on the ``QuantizeLinear`` output and an int8 ``[K, N]``
  weight ``code - zero`` (fits: ``|code - zero| < 128``) with a per-column scale. The products are
  integers, summed exactly in int32, then scaled: the same numbers as dequantize-then-matmul up to
  float rounding. onnxruntime's u8 x s8 GEMM (VNNI/AMX on x86, SDOT on ARM) is several times
  faster than its fp32 paths, but the weights are held at 8 bits (1 byte per weight, twice a
  4-bit ``MatMulNBits``): :func:`int8_weight`. Why at most 6 bits: on an AVX2 CPU without VNNI
  onnxruntime multiplies u8 x s8 with ``vpmaddubsw``, which adds two products in int16 and
  saturates: ``2 * 255 * |w|`` fits only for ``|w| <= 64``. A 7-bit weight (``|w|`` up to 127)
  came out 20% wrong on such a machine (an AMD EPYC, AVX2 only); 6 bits (``|w| <= 63``) is exact
  on every kernel.
- By default (``uint8=True``) a ``QMatMul`` with 8-bit activations and a 7- or 8-bit weight becomes
  ``MatMulIntegerToFloat`` on the uint8 codes (``[K, N]``) with per-column zero points
  (:func:`uint8_weight`): u8 x u8 products are widened before they are added, exact on every
  kernel, and the weight stays at one byte per code. onnxruntime's 8-bit ``MatMulNBits`` dequantizes
  at ``accuracy_level`` 0: it took 1.05-2.5x an fp32 MatMul at MiniLM/BERT-base FFN shapes, the u8 x u8
  GEMM 0.5-1.0x, exact to 7e-8 (``benchmarks/results/matmul8.md``).

:func:`native_rewrite` works on a model plus a separate ``name -> array`` dict of weights (what the
runtime's memory-mapped loader holds); :func:`to_native` is the same on a self-contained model.
It makes one matrix at a time and can hand each widened matmul weight to a ``store`` (the
runtime's :class:`~qbert_edge.runtime.spill.Spill` writes it to a temporary file and keeps only
a mapped view), so the widened codes of the whole model never sit in memory together.
Shapes that cannot be expressed (K or the embedding width not a multiple of 16) raise
:class:`~qbert_edge.errors.QbertEdgeError`, or with ``strict=False`` keep the custom op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from qbert_edge.errors import QbertEdgeError
from qbert_edge.runtime.kernels import DOMAIN, LAYOUT, OP_VERSION
from qbert_edge.runtime.packing import pack, unpack

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
NATIVE_BITS = (2, 4, 8)
MIN_BLOCK = 16
MAX_BLOCK = 256
#: widest weight the int8 rewrite takes: u8 x s8 pairs summed in int16 (AVX2 without VNNI) saturate above 6 bits
INT8_MAX_BITS = 6
#: narrowest weight the uint8 rewrite takes (on by default): u8 x u8 products are exact on every
#: kernel; below 7 bits ``MatMulNBits`` (4 bits: half the bytes) is the better trade
UINT8_MIN_BITS = 7
#: ``accuracy_level`` at which onnxruntime computes a ``MatMulNBits`` with int8 activations; the
#: only one with a native 2-bit CPU kernel (0/1: fp32, exact, 2-bit dequantized per call).
INT8_LEVEL = 4
#: Blocks at which onnxruntime's native 2-bit kernel (MLAS ``SQ2BitGemm_CompInt8``) is within
#: 1.4x of its 4-bit one (measured; it also takes 32, at 1.5-2.2x: widened there).
FAST_2BIT_BLOCKS = (64, 128)
#: Codes widened per step (:func:`widen_codes`): its temporaries are ~9 bytes per code.
WIDEN_CHUNK = 1 << 18
#: The ``ort`` backend's and the ``--target ort`` exporter's ``accuracy_level``
#: (docs/runtime.md has the measurement behind it; ``--accuracy-level 0`` is exact).
DEFAULT_ACCURACY_LEVEL = 0


def native_bits(bits: int) -> int:
    """The onnxruntime width that holds ``bits`` exactly: ``native_bits(3) -> 4``, ``native_bits(6) -> 8``."""
    return next(b for b in NATIVE_BITS if b >= bits)


def keeps_2bit(accuracy_level: int | None, block_size: int) -> bool:
    """Does a 2-bit ``MatMulNBits`` stay at 2 bits? Only where onnxruntime has a native kernel for it.

    >>> keeps_2bit(4, 128), keeps_2bit(4, 256), keeps_2bit(4, 32), keeps_2bit(0, 128)
    (True, False, False, False)
    """
    return accuracy_level == INT8_LEVEL and block_size in FAST_2BIT_BLOCKS


def matmul_layout(bits: int, k: int, accuracy_level: int | None, widen_2bit: bool | None,
                  max_block: int = MAX_BLOCK) -> tuple[int, int | None]:
    """``(bits, block_size)`` of the ``MatMulNBits`` that holds a ``bits``-bit ``[N, K]`` weight.

    3 -> 4 and 5..7 -> 8 always. 2 bits: ``widen_2bit`` True widens, False keeps, None follows
    :func:`keeps_2bit`; a kept 2-bit weight at the int8 level gets a block its native kernel
    takes (at most 128). ``block_size`` is None when K is not a multiple of 16.

    >>> matmul_layout(2, 768, 4, None), matmul_layout(2, 768, 0, None), matmul_layout(3, 768, 4, None)
    ((2, 128), (4, 256), (4, 256))
    """
    new_bits = native_bits(bits)
    if bits != 2:
        return new_bits, block_size_for(k, max_block)
    fast = block_size_for(k, min(max_block, max(FAST_2BIT_BLOCKS)))
    if widen_2bit is None:
        keep = fast is not None and keeps_2bit(accuracy_level, fast)
    else:
        keep = not widen_2bit
    if not keep:
        return 4, block_size_for(k, max_block)
    return 2, fast if accuracy_level == INT8_LEVEL else block_size_for(k, max_block)


def block_size_for(k: int, max_block: int = MAX_BLOCK) -> int | None:
    """Largest power of two in ``[16, max_block]`` dividing ``k`` (None if 16 does not):

    >>> block_size_for(384), block_size_for(768), block_size_for(40)
    (128, 256, None)
    """
    if k % MIN_BLOCK:
        return None
    b = MIN_BLOCK
    while b * 2 <= max_block and k % (b * 2) == 0:
        b *= 2
    return b


def _packed_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack each row of ``values [n, m]`` on its own: ``[n, ceil(m*bits/8)]`` bytes."""
    n, m = values.shape
    per_byte = 8 // bits
    padded = -(-m // per_byte) * per_byte
    buf = np.zeros((n, padded), np.uint8)
    buf[:, :m] = values
    return pack(buf, bits).reshape(n, padded * bits // 8)


def _blocks(scales, zero_points, rows: int, groups: int, blocks: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row group scale/zero repeated over ``blocks`` blocks: ``scales [rows, blocks]``, packed zeros."""
    row_scale, row_zero = _row_params(scales, zero_points, rows, groups)
    block_scale = np.ascontiguousarray(np.broadcast_to(row_scale[:, None], (rows, blocks)))
    block_zero = np.broadcast_to(row_zero[:, None], (rows, blocks))
    return block_scale, _packed_rows(block_zero, bits)


def _codes(packed: np.ndarray, bits: int, rows: int, cols: int, new_bits: int) -> np.ndarray:
    """The packed bytes as ``[rows, cols*new_bits/8]``: a reshape when the width is kept, else widened."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if new_bits == bits:
        return packed.reshape(rows, cols * bits // 8)
    return widen_codes(packed, bits, rows, cols, new_bits)


def widen_codes(packed: np.ndarray, bits: int, rows: int, cols: int, new_bits: int,
                chunk: int = WIDEN_CHUNK) -> np.ndarray:
    """Row-major ``bits``-bit codes of a ``[rows, cols]`` matrix repacked at ``new_bits``: ``[rows, cols*new_bits/8]``.

    Works ``chunk`` codes (whole rows) at a time when a row fills whole bytes at both widths, so
    the temporaries of unpacking (8 bytes per code) never cover the whole matrix.

    >>> from qbert_edge.runtime.packing import pack
    >>> widen_codes(pack(np.array([5, 3, 7, 1], np.uint8), 3), 3, 2, 2, 4).tolist()
    [[53], [23]]
    """
    packed = np.asarray(packed, np.uint8).reshape(-1)
    out_row = cols * new_bits // 8
    if (cols * bits) % 8 or (cols * new_bits) % 8:  # rows do not start on byte boundaries: one pass
        return pack(unpack(packed, bits, rows * cols), new_bits).reshape(rows, out_row)
    in_row = cols * bits // 8
    out = np.empty((rows, out_row), np.uint8)
    step = max(1, chunk // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes = unpack(packed[r0 * in_row: r1 * in_row], bits, (r1 - r0) * cols)
        if new_bits == 4:  # two codes per byte, low nibble first: what pack(., 4) gives, without its 8x temporaries
            out[r0:r1] = (codes[0::2] | (codes[1::2] << 4)).reshape(r1 - r0, out_row)
        elif new_bits == 8:
            out[r0:r1] = codes.reshape(r1 - r0, out_row)
        else:
            out[r0:r1] = pack(codes, new_bits).reshape(r1 - r0, out_row)
    return out


def int8_weight(packed: np.ndarray, bits: int, rows: int, cols: int, scales, zero_points, groups: int,
                chunk: int = WIDEN_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``(B int8 [cols, rows], scale float32 [rows])`` of a packed ``[rows, cols]`` weight: ``B = (code - zero).T``.

    For ``MatMulIntegerToFloat`` (``y = A @ B * scale``), which takes ``B`` as ``[K, N]`` and one
    scale per column. Exact for ``bits <= 7``. Works ``chunk`` codes (whole rows) at a time.

    >>> from qbert_edge.runtime.packing import pack
    >>> b, s = int8_weight(pack(np.array([5, 3, 7, 1], np.uint8), 3), 3, 2, 2, [0.5, 2.0], [4, 1], 2)
    >>> b.tolist(), s.tolist()
    ([[1, 6], [-1, 0]], [0.5, 2.0])
    """
    if bits > 7:
        raise ValueError(f"a {bits}-bit weight minus its zero point does not fit in int8")
    row_scale, row_zero = _row_params(scales, zero_points, rows, groups)
    zero = row_zero.astype(np.int16)
    b = _transposed_codes(packed, bits, rows, cols, np.int8, lambda c, r0, r1: c.astype(np.int16) - zero[r0:r1, None], chunk)
    return b, row_scale


def uint8_weight(packed: np.ndarray, bits: int, rows: int, cols: int, scales, zero_points, groups: int,
                 chunk: int = WIDEN_CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B uint8 [cols, rows], scale float32 [rows], zero uint8 [rows])`` of a packed ``[rows, cols]``
    weight: the codes transposed, with the per-column scale and zero point ``MatMulIntegerToFloat``
    subtracts itself (``b_zero_point``). Exact for every width (u8 x u8 products are widened, never
    saturated: ``benchmarks/matmul8.py``). Works ``chunk`` codes (whole rows) at a time.

    >>> from qbert_edge.runtime.packing import pack
    >>> b, s, z = uint8_weight(pack(np.array([5, 3, 7, 1], np.uint8), 8), 8, 2, 2, [0.5, 2.0], [4, 1], 2)
    >>> b.tolist(), s.tolist(), z.tolist()
    ([[5, 7], [3, 1]], [0.5, 2.0], [4, 1])
    """
    row_scale, row_zero = _row_params(scales, zero_points, rows, groups)
    return _transposed_codes(packed, bits, rows, cols, np.uint8, lambda c, r0, r1: c, chunk), row_scale, row_zero


def _row_params(scales, zero_points, rows: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's scale (float32) and zero point (uint8) repeated over its rows: ``[rows]`` each."""
    per_group = rows // groups
    return (np.repeat(np.asarray(scales, np.float32).reshape(-1), per_group),
            np.repeat(np.asarray(zero_points, np.uint8).reshape(-1), per_group))


def _transposed_codes(packed: np.ndarray, bits: int, rows: int, cols: int, dtype, values, chunk: int) -> np.ndarray:
    """``values(codes[r0:r1], r0, r1).T`` of a packed ``[rows, cols]`` weight as ``dtype [cols, rows]``,
    ``chunk`` codes (whole rows) at a time (one pass when rows do not start on byte boundaries)."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    out = np.empty((cols, rows), dtype)
    if (cols * bits) % 8:
        out[:] = values(unpack(packed, bits, rows * cols).reshape(rows, cols), 0, rows).T
        return out
    in_row = cols * bits // 8
    step = max(1, chunk // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes = unpack(packed[r0 * in_row: r1 * in_row], bits, (r1 - r0) * cols).reshape(r1 - r0, cols)
        out[:, r0:r1] = values(codes, r0, r1).T
    return out


def _attrs(node: onnx.NodeProto) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def native_rewrite(
    model: onnx.ModelProto,
    weights: Mapping[str, np.ndarray] | None = None,
    *,
    strict: bool = True,
    max_block: int = MAX_BLOCK,
    widen: bool = True,
    accuracy_level: int | None = None,
    widen_2bit: bool | None = False,
    store: Callable[[np.ndarray], np.ndarray] | None = None,
    release: Callable[[Iterable[np.ndarray]], object] | None = None,
    int8: bool = False,
    uint8: bool = True,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Rewrite every ``QMatMul``/``QGather`` of ``model``; returns ``(new model, new weights)``.

    ``weights`` holds initializers kept outside ``model.graph.initializer`` (None: all are inside).
    The new model keeps those of its own initializers that are still used; the returned dict holds
    every other initializer the new graph uses (the new ``MatMulNBits``/``GatherBlockQuantized``
    inputs, and the untouched entries of ``weights``). ``model`` itself is not modified.
    ``widen=False`` keeps the custom op for widths onnxruntime lacks (3, 5, 6, 7) instead of
    widening them. ``accuracy_level`` (None: not set) is written on every new ``MatMulNBits``;
    ``widen_2bit`` decides 2-bit matmuls as in :func:`matmul_layout` (False: kept, as exported
    before; None: the rule of :func:`keeps_2bit`). 2-bit gathers are always kept.

    ``store`` (with ``weights``) receives each widened ``MatMulNBits`` weight as soon as it is made
    and returns what the result holds instead (the runtime: a view of a temporary file that
    onnxruntime reads, prepacks and frees; scales, zero points and gathers' tables, which
    onnxruntime keeps as they are, are not stored); ``release`` receives the source arrays a
    rewritten node no longer needs (the runtime drops their mapped pages). Both are for memory
    only: the numbers are the same without them. ``int8``: matmuls with 8-bit activations become
    ``MatMulIntegerToFloat`` on int8 weights (module docstring; their weights also go to ``store``).
    ``uint8`` (default on): matmuls with 8-bit activations and 7- or 8-bit weights become
    ``MatMulIntegerToFloat`` on the uint8 codes with per-column zero points (module docstring).
    Either way the ``DequantizeLinear`` nodes left without a consumer are removed.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inside = {t.name: t for t in graph.initializer}
    external = dict(weights or {})

    def array(name: str) -> np.ndarray:
        if name in external:
            return np.asarray(external[name])
        if name in inside:
            return numpy_helper.to_array(inside[name])
        raise QbertEdgeError(f"model.onnx: {name!r} is not an initializer; the rewrite needs constant weights")

    new_weights: dict[str, np.ndarray] = {}
    nodes = []
    kept_custom = rewritten = integer_rewrites = 0
    quantized = _quantized_inputs(graph, inside, external) if int8 or uint8 else {}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        a = _attrs(node)
        layout = a.get("layout", b"")
        layout = layout.decode() if isinstance(layout, bytes) else layout
        if layout != LAYOUT or a.get("version") != OP_VERSION:
            raise QbertEdgeError(f"model.onnx: {node.name}: unknown {node.op_type} layout {layout!r} / version {a.get('version')}")
        bits = int(a["bits"])
        if node.op_type == "QMatMul":
            rows, cols, what = int(a["N"]), int(a["K"]), "K"
            new_bits, block = matmul_layout(bits, cols, accuracy_level, widen_2bit, max_block)
        elif node.op_type == "QGather":
            rows, cols, what = int(a["rows"]), int(a["cols"]), "the embedding width"
            new_bits, block = native_bits(bits), block_size_for(cols, max_block)
        else:
            raise QbertEdgeError(f"model.onnx: unknown {DOMAIN} op {node.op_type!r}")
        integer = (int8 and bits <= INT8_MAX_BITS) or (uint8 and bits >= UINT8_MIN_BITS)
        if node.op_type == "QMatMul" and node.input[0] in quantized and integer:  # MatMulIntegerToFloat
            base = node.name.split("/")[0] or node.output[0]
            x, w, s, z = node.input[:4]
            bias = node.input[4] if len(node.input) > 4 else ""
            xq, a_scale, a_zero = quantized[x]
            if bits <= INT8_MAX_BITS:
                codes, scale = int8_weight(array(w), bits, rows, cols, array(s), array(z), int(a["groups"]))
                names, zero = (f"{base}.int8_B", f"{base}.int8_scale"), None
            else:
                codes, scale, zero = uint8_weight(array(w), bits, rows, cols, array(s), array(z), int(a["groups"]))
                names = (f"{base}.uint8_B", f"{base}.uint8_scale", f"{base}.uint8_zero")
            inputs = [xq, names[0], a_scale, names[1], a_zero] + ([names[2]] if zero is not None else [])
            if bias:
                inputs += [""] * (6 - len(inputs)) + [bias]
            new = helper.make_node("MatMulIntegerToFloat", inputs, list(node.output), name=node.name, domain=MS_DOMAIN)
            if store is not None and weights is not None:
                codes = store(codes)
            new_weights.update(zip(names, (codes, scale) if zero is None else (codes, scale, zero)))
            if release is not None:
                release([external[i] for i in (w, s, z) if i in external])
            nodes.append(new)
            rewritten += 1
            integer_rewrites += 1
            continue
        if native_bits(bits) != bits and not widen:
            nodes.append(node)
            kept_custom += 1
            continue
        if block is None:
            msg = f"{node.name}: {what}={cols} is not a multiple of {MIN_BLOCK}; onnxruntime's low-bit ops cannot hold it"
            if strict:
                raise QbertEdgeError(msg)
            log.warning("%s; keeping %s", msg, node.op_type)
            nodes.append(node)
            kept_custom += 1
            continue
        if new_bits != bits:
            log.info("%s: %d-bit codes widened to %d bits for onnxruntime", node.name, bits, new_bits)
        groups = int(a["groups"])
        blocks = cols // block
        base = node.name.split("/")[0] or node.output[0]
        if node.op_type == "QMatMul":
            x, w, s, z = node.input[:4]
            bias = node.input[4] if len(node.input) > 4 else ""
            codes = _codes(array(w), bits, rows, cols, new_bits).reshape(rows, blocks, block * new_bits // 8)
            scale, zero = _blocks(array(s), array(z), rows, groups, blocks, new_bits)
            names = (f"{base}.nbits_B", f"{base}.nbits_scales", f"{base}.nbits_zero_points")
            extra = {} if accuracy_level is None else {"accuracy_level": int(accuracy_level)}
            new = helper.make_node(
                "MatMulNBits", [x, *names, "", bias] if bias else [x, *names], list(node.output),
                name=node.name, domain=MS_DOMAIN, K=cols, N=rows, bits=new_bits, block_size=block, **extra,
            )
        else:
            w, s, z, ids = node.input[:4]
            codes = _codes(array(w), bits, rows, cols, new_bits)
            scale, zero = _blocks(array(s), array(z), rows, groups, blocks, new_bits)
            names = (f"{base}.gbq_data", f"{base}.gbq_scales", f"{base}.gbq_zero_points")
            new = helper.make_node(
                "GatherBlockQuantized", [names[0], ids, names[1], names[2]], list(node.output),
                name=node.name, domain=MS_DOMAIN, bits=new_bits, block_size=block, gather_axis=0, quantize_axis=1,
            )
        if store is not None and weights is not None and new_bits != bits and node.op_type == "QMatMul":
            codes = store(codes)
        new_weights.update(zip(names, (codes, scale, zero)))
        if release is not None:
            release([external[i] for i in ((w, s, z) if new_bits != bits else (s, z)) if i in external])
        nodes.append(new)
        rewritten += 1

    if integer_rewrites:
        nodes = _drop_unused(nodes, {o.name for o in graph.output}, ("DequantizeLinear",))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    result = {k: v for k, v in external.items() if k in used}
    if weights is None:
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new_weights.items())
    else:
        result.update(new_weights)
    imports = {o.domain: o.version for o in out.opset_import}
    if not kept_custom:
        imports.pop(DOMAIN, None)
    if rewritten:
        imports.setdefault(MS_DOMAIN, 1)
    del out.opset_import[:]
    out.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(imports.items(), key=lambda kv: (kv[0] != "", kv[0])))
    return out, result


def _quantized_inputs(graph, inside, external) -> dict[str, tuple[str, str, str]]:
    """``DequantizeLinear`` outputs fed by a per-tensor uint8 ``QuantizeLinear`` with the same scale and
    zero point -> ``(quantized tensor, scale, zero point)``: the inputs ``MatMulIntegerToFloat`` takes."""
    from onnx import TensorProto

    def dtype(name: str):
        if name in inside:
            return inside[name].data_type, tuple(inside[name].dims)
        if name in external:
            arr = np.asarray(external[name])
            return {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.float32): TensorProto.FLOAT}.get(arr.dtype), arr.shape
        return None, None

    producers = {o: n for n in graph.node for o in n.output}
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        q = producers.get(node.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or tuple(q.input[1:3]) != tuple(node.input[1:3]):
            continue
        (zt, zshape), (st, sshape) = dtype(node.input[2]), dtype(node.input[1])
        if zt == TensorProto.UINT8 and st == TensorProto.FLOAT and int(np.prod(zshape)) == 1 and int(np.prod(sshape)) == 1:
            found[node.output[0]] = (node.input[0], node.input[1], node.input[2])
    return found


def _drop_unused(nodes: list, outputs: set[str], op_types: tuple[str, ...]) -> list:
    """``nodes`` without those of ``op_types`` whose outputs nothing reads."""
    used = {i for n in nodes for i in n.input} | outputs
    return [n for n in nodes if n.op_type not in op_types or any(o in used for o in n.output)]


def widen_2bit_matmuls(model, weights: dict[str, np.ndarray], rule: bool | None = True, store=None,
                       release=None) -> dict[str, np.ndarray]:
    """Rewrite 2-bit ``MatMulNBits`` of ``model`` (in place) to 4 bits; returns the new weights.

    ``rule`` True: every one; False: none; None: those onnxruntime has no native 2-bit kernel
    for, by their own ``accuracy_level`` and ``block_size`` (:func:`keeps_2bit`).

    Exact: a 2-bit code and zero point are the same numbers in 4 bits. ``B`` is
    ``[N, blocks, block/4]`` bytes of 2-bit codes, low bits first; the 4-bit blob is
    ``[N, blocks, block/2]``, two codes per byte, low nibble first. Zero points are packed per
    row the same way (4 per byte -> 2 per byte, padded to whole bytes). ``store``/``release``
    as in :func:`native_rewrite`: each widened ``B`` goes to ``store`` as it is made, each
    replaced array to ``release``. Zero points small enough to have stayed in the graph
    (``loader.SMALL_BYTES``) are widened there. The ``ort`` backend calls it at load time with
    ``RuntimeOptions.widen_2bit`` as ``rule``.
    """
    from onnx import helper, numpy_helper

    out = dict(weights)
    inside = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("bits") != 2 or node.input[1] not in out or rule is False:
            continue
        if rule is None and keeps_2bit(attrs.get("accuracy_level", 0), int(attrs["block_size"])):
            continue
        n, k, block = int(attrs["N"]), int(attrs["K"]), int(attrs["block_size"])
        blocks = k // block
        keep = store or (lambda arr: arr)
        replaced = [out[node.input[1]]]
        codes = widen_codes(out[node.input[1]], 2, n, blocks * block, 4)
        out[node.input[1]] = keep(codes.reshape(n, blocks, block // 2))
        if len(node.input) > 3 and node.input[3] in out:
            replaced.append(out[node.input[3]])
            out[node.input[3]] = _widen_zero_rows(out[node.input[3]], n, blocks)  # small, kept as it is by onnxruntime: not stored
        elif len(node.input) > 3 and node.input[3] in inside:
            tensor = inside[node.input[3]]
            tensor.CopyFrom(numpy_helper.from_array(_widen_zero_rows(numpy_helper.to_array(tensor), n, blocks), tensor.name))
        if release is not None:
            release(replaced)
        _set_attribute(node, "bits", 4)
    return out


def _widen_zero_rows(packed: np.ndarray, rows: int, count: int) -> np.ndarray:
    """2-bit values packed per row (``[rows, ceil(count/4)]`` bytes) -> 4-bit per row (``[rows, ceil(count/2)]``)."""
    packed = np.asarray(packed, np.uint8).reshape(rows, -1)
    return _packed_rows(unpack(packed.reshape(-1), 2, packed.size * 4).reshape(rows, -1)[:, :count], 4)


def set_accuracy_level(model, level: int) -> None:
    """Set ``accuracy_level`` on every ``MatMulNBits`` node of ``model`` (in place)."""
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            _set_attribute(node, "accuracy_level", int(level))


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    """Give ``node`` the attribute ``name = value``, replacing one of that name (in place)."""
    from onnx import helper

    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])


def to_native(model: onnx.ModelProto, *, strict: bool = True, max_block: int = MAX_BLOCK, widen: bool = True,
              accuracy_level: int | None = None, widen_2bit: bool | None = False, int8: bool = False,
              uint8: bool = True) -> onnx.ModelProto:
    """:func:`native_rewrite` of a self-contained model (all initializers inside)."""
    return native_rewrite(model, None, strict=strict, max_block=max_block, widen=widen,
                          accuracy_level=accuracy_level, widen_2bit=widen_2bit, int8=int8, uint8=uint8)[0]
