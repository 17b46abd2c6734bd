"""QMatMul / QGather as ONNX nodes: the reference evaluator, the checker schemas, the ORT-native rewrite."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qbert_edge.errors import QbertEdgeError
from qbert_edge.runtime import kernels
from qbert_edge.runtime.native import block_size_for, native_bits, native_rewrite, to_native
from qbert_edge.runtime.packing import pack
from qbert_edge.runtime.reference import register_schemas, run_reference


def weight(rng, rows, cols, bits, groups):
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.3, size=groups).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, size=groups, dtype=np.uint8)
    return pack(codes, bits), scales, zeros


def qmatmul_model(packed, scales, zeros, bias, *, bits, n, k, groups, **override):
    attrs = dict(bits=bits, N=n, K=k, groups=groups, layout="dense-le-v1", version=1)
    attrs.update(override)
    inputs = ["x", "w", "s", "z"] + (["b"] if bias is not None else [])
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s"), numpy_helper.from_array(zeros, "z")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
    node = helper.make_node("QMatMul", inputs, ["y"], name="fc/QMatMul", domain="qbert_edge", **attrs)
    graph = helper.make_graph(
        [node], "qmatmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])], inits,
    )
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)]
    return helper.make_model(graph, opset_imports=ops, ir_version=8)


def qgather_model(packed, scales, zeros, *, bits, rows, cols, groups):
    node = helper.make_node(
        "QGather", ["w", "s", "z", "ids"], ["y"], name="emb/QGather", domain="qbert_edge",
        bits=bits, rows=rows, cols=cols, groups=groups, layout="dense-le-v1", version=1,
    )
    graph = helper.make_graph(
        [node], "qgather", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", cols])],
        [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s"), numpy_helper.from_array(zeros, "z")],
    )
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)]
    return helper.make_model(graph, opset_imports=ops, ir_version=8)


def run_ort(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("with_bias", [True, False])
def test_qmatmul_node_reference_and_ort_native_match_the_kernel(bits, with_bias):
    rng = np.random.default_rng(bits)
    n, k, groups = 24, 64, 6
    packed, scales, zeros = weight(rng, n, k, bits, groups)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    model = qmatmul_model(packed, scales, zeros, bias, bits=bits, n=n, k=k, groups=groups)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    expected = kernels.qmatmul(x, packed, scales, zeros, bias, bits=bits, n=n, k=k, groups=groups)

    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    assert np.array_equal(run_reference(model, {"x": x})["y"], expected)

    native = to_native(model)
    assert [n.op_type for n in native.graph.node] == ["MatMulNBits"]
    assert {o.domain for o in native.opset_import} == {"", "com.microsoft"}
    node = native.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == native_bits(bits) and attrs["block_size"] == 64
    # fp32 sums in another order: relative to the output's range
    np.testing.assert_allclose(run_ort(native, {"x": x}), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("bits", range(2, 9))
def test_qgather_node_reference_and_ort_native_match_the_kernel(bits):
    rng = np.random.default_rng(10 + bits)
    rows, cols = 50, 48  # 48 = 3 blocks of 16
    packed, scales, zeros = weight(rng, rows, cols, bits, rows)
    model = qgather_model(packed, scales, zeros, bits=bits, rows=rows, cols=cols, groups=rows)
    ids = rng.integers(0, rows, size=(3, 7)).astype(np.int64)
    expected = kernels.qgather(packed, scales, zeros, ids, bits=bits, rows=rows, cols=cols, groups=rows)

    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    assert np.array_equal(run_reference(model, {"ids": ids})["y"], expected)

    native = to_native(model)
    assert [n.op_type for n in native.graph.node] == ["GatherBlockQuantized"]
    assert np.array_equal(run_ort(native, {"ids": ids}), expected)  # a gather: exact


def test_checker_knows_the_schemas():
    rng = np.random.default_rng(0)
    packed, scales, zeros = weight(rng, 4, 16, 4, 2)
    register_schemas()
    register_schemas()  # idempotent
    bad = qmatmul_model(packed, scales, zeros, None, bits=4, n=4, k=16, groups=2)
    del bad.graph.node[0].attribute[-1]  # drop "version"
    with pytest.raises(onnx.checker.ValidationError, match="version"):
        onnx.checker.check_model(bad, full_check=True)
    wrong_type = qmatmul_model(packed, scales, zeros, None, bits=4, n=4, k=16, groups=2)
    wrong_type.graph.initializer[1].CopyFrom(numpy_helper.from_array(scales.astype(np.float64), "s"))
    with pytest.raises(Exception):
        onnx.checker.check_model(wrong_type, full_check=True)


@pytest.mark.parametrize("override,match", [({"layout": "dense-be-v9"}, "layout"), ({"version": 2}, "version")])
def test_reference_refuses_unknown_layout_or_version(override, match):
    rng = np.random.default_rng(1)
    packed, scales, zeros = weight(rng, 4, 16, 4, 2)
    model = qmatmul_model(packed, scales, zeros, None, bits=4, n=4, k=16, groups=2, **override)
    with pytest.raises(Exception, match=match):
        run_reference(model, {"x": np.zeros((1, 1, 16), np.float32)})
    with pytest.raises(QbertEdgeError, match=match):
        to_native(model)


def test_native_rewrite_keeps_weights_zero_copy_and_separate():
    """With an external weights dict (the runtime's mapped file), 2/4/8-bit codes are a reshape, not a copy."""
    rng = np.random.default_rng(2)
    packed, scales, zeros = weight(rng, 32, 64, 4, 8)
    model = qmatmul_model(packed, scales, zeros, None, bits=4, n=32, k=64, groups=8)
    weights = {"w": packed}
    del model.graph.initializer[0]  # "w" lives outside the model
    before = model.SerializeToString()
    new_model, new_weights = native_rewrite(model, weights)
    assert model.SerializeToString() == before  # input untouched
    b_name = new_model.graph.node[0].input[1]
    assert np.shares_memory(new_weights[b_name], packed)
    assert new_weights[b_name].shape == (32, 1, 32)
    assert "w" not in new_weights and not any(t.name in ("s", "z") for t in new_model.graph.initializer)


def test_native_rewrite_widens_3_bits_exactly_and_can_keep_the_custom_op():
    rng = np.random.default_rng(3)
    packed, scales, zeros = weight(rng, 16, 32, 3, 4)
    model = qmatmul_model(packed, scales, zeros, None, bits=3, n=16, k=32, groups=4)
    kept = to_native(model, widen=False)
    assert [(n.domain, n.op_type) for n in kept.graph.node] == [("qbert_edge", "QMatMul")]
    widened = to_native(model)
    attrs = {a.name: helper.get_attribute_value(a) for a in widened.graph.node[0].attribute}
    assert attrs["bits"] == 4
    b = next(t for t in widened.graph.initializer if t.name.endswith("nbits_B"))
    assert numpy_helper.to_array(b).nbytes == 16 * 32 // 2


def test_native_rewrite_refuses_k_not_a_multiple_of_16():
    rng = np.random.default_rng(4)
    packed, scales, zeros = weight(rng, 8, 24, 4, 2)
    model = qmatmul_model(packed, scales, zeros, None, bits=4, n=8, k=24, groups=2)
    with pytest.raises(QbertEdgeError, match="K=24 is not a multiple of 16"):
        to_native(model)
    kept = to_native(model, strict=False)
    assert kept.graph.node[0].op_type == "QMatMul"
    assert {o.domain for o in kept.opset_import} == {"", "qbert_edge"}  # nothing was rewritten


def test_block_size_choice():
    assert block_size_for(16) == 16
    assert block_size_for(384) == 128
    assert block_size_for(768) == 256
    assert block_size_for(3072) == 256  # capped: onnxruntime refuses 2-bit blocks above 256
    assert block_size_for(3072, max_block=1024) == 1024
    assert block_size_for(40) is None
    assert [native_bits(b) for b in range(2, 9)] == [2, 4, 4, 8, 8, 8, 8]


def test_quantize_dequantize_linear_match_torch_activation_quant_exactly():
    """The reference Q/DQ (every opset) computes what qmodel.ActivationQuant computes, ties included."""
    torch = pytest.importorskip("torch")
    from qbert_edge.quant import quantize_activation

    scale, zero = np.float32(0.05), np.uint8(100)
    x = np.concatenate([
        np.random.default_rng(5).normal(0, 4, 1000).astype(np.float32),
        (np.arange(-10, 10, dtype=np.float32) + 0.5) * scale,  # exact halves: round half to even
        np.array([1e6, -1e6], np.float32),  # saturation
    ])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    for opset in (17, 21):
        graph = helper.make_graph(
            nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
            [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        got = run_reference(model, {"x": x})["y"]
        expected = quantize_activation(torch.from_numpy(x), torch.tensor(scale), int(zero)).numpy()
        assert np.array_equal(got, expected)
        assert np.array_equal(run_ort(model, {"x": x}), expected)
