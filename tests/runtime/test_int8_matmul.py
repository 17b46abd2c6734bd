"""The integer paths of the ``ort`` backend (runtime/native.py).

A ``QMatMul`` fed by ``QuantizeLinear -> DequantizeLinear`` (the plan's 8-bit activations) becomes
``MatMulIntegerToFloat`` on the quantized activations: with the opt-in int8 path
(``RuntimeOptions(int8_matmul=True)``) on an int8 ``code - zero`` weight (at most 6 bits), and by
default for 7- and 8-bit weights on the uint8 codes with per-column zero points. Integer products
are summed exactly, then scaled, so both agree with dequantize-then-matmul to float rounding.
Everything else (no activation quantization, 2-6-bit weights by default) keeps ``MatMulNBits``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qbert_edge.runtime import backends
from qbert_edge.runtime.backends import RuntimeOptions
from qbert_edge.runtime.loader import load_graph
from qbert_edge.runtime.native import int8_weight, to_native, uint8_weight
from qbert_edge.runtime.packing import pack

A_SCALE, A_ZERO = np.float32(0.031), np.uint8(121)
RTOL = 1e-5  # of the output's largest magnitude: the same sums in another order


def _quant(rng, n, k, bits, groups):
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.3, groups).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, groups, dtype=np.uint8)
    return codes, scales, zeros


def _dequant(codes, scales, zeros):
    g = np.arange(codes.shape[0]) // (codes.shape[0] // scales.size)
    return (codes.astype(np.float32) - zeros[g].astype(np.float32)[:, None]) * scales[g][:, None]


def graph(bits: int, k: int, n: int = 24, groups: int = 4, act_quant: bool = True, bias: bool = True, seed: int = 0):
    """``y = DQ(Q(x)) @ W.T + b`` with one ``QMatMul`` (or ``y = x @ W.T + b`` without ``act_quant``)."""
    rng = np.random.default_rng(seed)
    codes, scales, zeros = _quant(rng, n, k, bits, groups)
    b = rng.normal(0, 0.1, n).astype(np.float32)
    inits = [numpy_helper.from_array(pack(codes, bits), "w"), numpy_helper.from_array(scales, "s"),
             numpy_helper.from_array(zeros, "z"), numpy_helper.from_array(b, "b")]
    nodes, x = [], "x"
    if act_quant:
        inits += [numpy_helper.from_array(A_SCALE, "as"), numpy_helper.from_array(A_ZERO, "az")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"], name="fc/QuantizeLinear"),
                  helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"], name="fc/DequantizeLinear")]
        x = "xd"
    nodes.append(helper.make_node("QMatMul", [x, "w", "s", "z"] + (["b"] if bias else []), ["y"], name="fc/QMatMul",
                                  domain="qbert_edge", bits=bits, N=n, K=k, groups=groups, layout="dense-le-v1",
                                  version=1))
    g = helper.make_graph(nodes, "int8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)],
                              ir_version=8)

    def expected(xv, quantize_input: bool = act_quant):
        if quantize_input:
            q = np.clip(np.round(xv / A_SCALE) + float(A_ZERO), 0, 255)
            xv = ((q - float(A_ZERO)) * A_SCALE).astype(np.float32)
        return xv @ _dequant(codes, scales, zeros).T + (b if bias else 0)

    return model, expected


def run(model, x):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def feeds(k: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((2, 5, k)) * 2).astype(np.float32)


def op_types(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_int8_weight_is_code_minus_zero_transposed():
    rng = np.random.default_rng(3)
    for bits, k in ((3, 20), (3, 64), (2, 40), (7, 16)):  # 3 x 20 bits: rows cross byte boundaries
        codes, scales, zeros = _quant(rng, 12, k, bits, 3)
        b, s = int8_weight(pack(codes, bits), bits, 12, k, scales, zeros, 3, chunk=2 * k)  # several chunks
        assert b.dtype == np.int8 and b.shape == (k, 12) and s.shape == (12,)
        np.testing.assert_array_equal(b.T.astype(np.float32) * s[:, None], _dequant(codes, scales, zeros))
    with pytest.raises(ValueError):
        int8_weight(pack(codes, 8), 8, 12, k, scales, zeros, 3)


@pytest.mark.parametrize("bits,k,bias", [(3, 20, True), (3, 64, False), (2, 64, True), (4, 48, True), (6, 32, True)])
def test_int8_rewrite_agrees_with_dequantize_then_matmul(bits, k, bias):
    model, expected = graph(bits, k, bias=bias)
    native = to_native(model, int8=True, strict=False)
    assert op_types(native) == ["QuantizeLinear", "MatMulIntegerToFloat"]  # the DequantizeLinear is gone
    x = feeds(k)
    want = expected(x)
    got = run(native, x)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()
    # the default path (MatMulNBits at level 0) computes the same function; K = 20 (not a multiple
    # of 16) has no MatMulNBits and keeps the custom op there, while the int8 path takes any K
    default = to_native(model, accuracy_level=0, widen_2bit=None, strict=False)
    if k % 16:
        assert "QMatMul" in op_types(default)
        return
    assert "MatMulNBits" in op_types(default)
    assert np.abs(run(default, x) - want).max() <= RTOL * np.abs(want).max()


def test_what_the_integer_paths_leave_alone():
    # no activation quantization: nothing integer to multiply, MatMulNBits as before
    for bits in (3, 8):
        model, expected = graph(bits, 32, act_quant=False)
        assert op_types(to_native(model, int8=True)) == ["MatMulNBits"]
    # 2-6 bits without the opt-in int8 path: MatMulNBits after the Q/DQ pair
    model, expected = graph(4, 32)
    assert op_types(to_native(model)) == ["QuantizeLinear", "DequantizeLinear", "MatMulNBits"]
    # 8-bit weights with uint8=False: MatMulNBits as before, the same function
    model, expected = graph(8, 32)
    native = to_native(model, uint8=False)
    assert op_types(native) == ["QuantizeLinear", "DequantizeLinear", "MatMulNBits"]
    x = feeds(32)
    assert np.abs(run(native, x) - expected(x)).max() <= RTOL * np.abs(expected(x)).max()


def test_uint8_weight_is_the_codes_transposed():
    rng = np.random.default_rng(4)
    for bits, k in ((8, 16), (7, 20), (7, 64)):  # 7 x 20 bits: rows cross byte boundaries
        codes, scales, zeros = _quant(rng, 12, k, bits, 3)
        b, s, z = uint8_weight(pack(codes, bits), bits, 12, k, scales, zeros, 3, chunk=2 * k)  # several chunks
        assert b.dtype == np.uint8 and b.shape == (k, 12) and s.shape == z.shape == (12,) and z.dtype == np.uint8
        np.testing.assert_array_equal(b.T, codes)
        np.testing.assert_array_equal((b.T.astype(np.float32) - z[:, None]) * s[:, None], _dequant(codes, scales, zeros))


@pytest.mark.parametrize("bits,k,bias,int8", [(8, 64, True, False), (8, 20, False, False), (7, 48, True, False),
                                              (8, 32, True, True)])
def test_wide_weights_become_a_uint8_matmul_by_default(bits, k, bias, int8):
    """Codes of 7-8 bits with their zero points as ``b_zero_point``: exact (u8 x u8 never saturates,
    where u8 x s8 did above 6 bits on AVX2), any K (MatMulNBits needs multiples of 16)."""
    model, expected = graph(bits, k, bias=bias)
    native = to_native(model, int8=int8, strict=False)
    assert op_types(native) == ["QuantizeLinear", "MatMulIntegerToFloat"]
    node = native.graph.node[1]
    assert len(node.input) == (7 if bias else 6) and node.input[5].endswith("uint8_zero")
    x = feeds(k)
    assert np.abs(run(native, x) - expected(x)).max() <= RTOL * np.abs(expected(x)).max()


def test_backend_option_spills_the_int8_weights(tmp_path):
    """Through the runtime: the int8 weight is made at load, spilled beside the model, and the result is exact."""
    k, n = 256, 256  # 64 KiB of int8 weight: the spill's minimum size
    model, expected = graph(3, k, n=n)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = feeds(k)
    backend = backends.create("ort", load_graph(path), RuntimeOptions(int8_matmul=True, threads=1))
    try:
        got = backend.run({"x": x})["y"]
        assert backend.spilled_bytes == k * n  # one byte per weight, through the spill file
    finally:
        backend.close()
    assert np.abs(got - expected(x)).max() <= RTOL * np.abs(expected(x)).max()
    assert not list(tmp_path.glob(".qbert-edge-*"))  # the spill file is gone once the session exists
    with pytest.raises(Exception, match="int8_matmul"):
        RuntimeOptions(int8_matmul=1)


def test_backend_spills_the_uint8_weights_by_default(tmp_path):
    k, n = 256, 256
    model, expected = graph(8, k, n=n)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = feeds(k)
    backend = backends.create("ort", load_graph(path), RuntimeOptions(threads=1))
    try:
        got = backend.run({"x": x})["y"]
        assert backend.spilled_bytes == k * n  # the transposed codes, one byte per weight
    finally:
        backend.close()
    assert np.abs(got - expected(x)).max() <= RTOL * np.abs(expected(x)).max()


def test_cli_flag_reaches_the_session(tmp_path):
    from click.testing import CliRunner

    from qbert_edge.cli import eval as eval_cli, measure as measure_cli, run as run_cli

    for cmd in (run_cli.command, eval_cli.command, measure_cli.command):
        assert "--int8-matmul" in CliRunner().invoke(cmd, ["--help"]).output
    k, n = 64, 24
    model, expected = graph(3, k, n=n)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = feeds(k)
    with run_cli.open_session(str(path), "ort", 1, None, True, require_metadata=False) as session:
        assert session.options.int8_matmul
        got = session._backend.run({"x": x})["y"]  # Session.run checks for token-id inputs
    assert np.abs(got - expected(x)).max() <= RTOL * np.abs(expected(x)).max()


def test_7_bit_weights_never_take_the_int8_path():
    # u8 x s8 pairs saturate in int16 on AVX2 without VNNI above 6 bits: a 7-bit weight takes the
    # uint8 path (or MatMulNBits without it), never an int8 weight
    model, _ = graph(7, 32, bias=True)
    names = {i for n in to_native(model, int8=True, strict=False).graph.node for i in n.input}
    assert not any(i.endswith("int8_B") and not i.endswith("uint8_B") for i in names)
    assert op_types(to_native(model, int8=True, uint8=False)) == ["QuantizeLinear", "DequantizeLinear", "MatMulNBits"]


def test_export_validator_reads_integer_matmuls():
    """The validator's checks on a ``--target ort`` graph whose 8-bit matmul reads the
    ``QuantizeLinear`` output directly: the codes are still checked, and without activation
    quantization the node is the fp32 matmul of the dequantized weight (not fused back by onnxruntime)."""
    from qbert_edge.exporters.validate import activation_pairs, without_activation_quant

    model, expected = graph(8, 32)
    native = to_native(model)
    assert activation_pairs(native) == [("fc", "x", "xq", None)]
    plain = without_activation_quant(native)
    assert op_types(plain) == ["MatMul", "Add"]
    x = feeds(32)
    want = expected(x, quantize_input=False)
    assert np.abs(run(plain, x) - want).max() <= RTOL * np.abs(want).max()
