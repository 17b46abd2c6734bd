"""The 2-bit rule (runtime/native.py ``keeps_2bit``): 2-bit ``MatMulNBits`` kept where onnxruntime has a native kernel.

A 2-bit matmul stays 2-bit only at ``accuracy_level`` 4 with a block of 64 or 128 (onnxruntime's
int8-compute 2-bit kernel, where it is nearly as fast as the 4-bit one); everywhere else it is widened to 4 bits exactly as before. The same
rule drives the portable rewrite at load time, the widening of a ``--target ort`` file, the
exporter's ``--target ort`` and the DRAM budget's ``native_4bit_bytes``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qbert_edge.runtime import backends, kernels, native
from qbert_edge.runtime.backends import RuntimeOptions
from qbert_edge.runtime.loader import load_graph
from qbert_edge.runtime.native import keeps_2bit, matmul_layout, native_rewrite, to_native
from qbert_edge.runtime.packing import pack

#: accuracy_level 4 quantizes the activations to int8 per block (scale = max|x| / 127 per block of
#: K): its output may differ from the exact (fp32) kernel by this much of the output's range.
#: Measured on these Gaussian inputs: 2-4e-3.
LEVEL4_RTOL = 2e-2
#: fp32 compute (levels 0/1): the same function summed in another order.
EXACT_RTOL = 1e-5
N, K, GROUPS = 48, 256, 6  # K = 256: the 2-bit block (128) differs from the 4-bit one (256)


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def qmatmul_2bit(seed: int = 0):
    """A one-node portable graph ``y = x @ W.T`` with a 2-bit ``QMatMul`` ``[N, K]``; and its weights."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (N, K), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.3, GROUPS).astype(np.float32)
    zeros = rng.integers(0, 4, GROUPS, dtype=np.uint8)
    packed = pack(codes, 2)
    node = helper.make_node("QMatMul", ["x", "w", "s", "z"], ["y"], name="fc/QMatMul", domain="qbert_edge",
                            bits=2, N=N, K=K, groups=GROUPS, layout="dense-le-v1", version=1)
    graph = helper.make_graph(
        [node], "qmatmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s"), numpy_helper.from_array(zeros, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)],
                              ir_version=8)
    return model, (packed, scales, zeros)


def expected(x, w) -> np.ndarray:
    return kernels.qmatmul(x, *w, None, bits=2, n=N, k=K, groups=GROUPS)


def run_ort(model, x) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def feeds(seed: int = 1):
    return np.random.default_rng(seed).standard_normal((2, 5, K)).astype(np.float32)


# ----------------------------------------------------------------------------- the rule


def test_the_rule():
    assert keeps_2bit(4, 64) and keeps_2bit(4, 128)
    assert not keeps_2bit(4, 16) and not keeps_2bit(4, 256)  # no native 2-bit kernel for these blocks
    assert not keeps_2bit(4, 32)  # a native kernel, but 1.5-2.2x slower than 4-bit: widened
    assert not any(keeps_2bit(level, 128) for level in (None, 0, 1, 2, 3))  # fp32 compute: dequantized per call
    assert matmul_layout(2, 768, 4, None) == (2, 128)  # kept: a block the kernel takes
    assert matmul_layout(2, 768, 0, None) == (4, 256)  # widened: as before
    assert matmul_layout(2, 3072, None, None) == (4, 256)
    assert matmul_layout(2, 768, 0, False) == (2, 256)  # never widen: the old 2-bit layout
    assert matmul_layout(2, 768, 4, True) == (4, 256)  # always widen
    assert matmul_layout(3, 768, 4, None) == (4, 256)  # 3 bits: no kernel, always 4
    assert matmul_layout(2, 40, 4, None)[1] is None  # K not a multiple of 16: not expressible


# ----------------------------------------------------------------------------- level 4: kept at 2 bits


def test_2bit_kept_at_level_4_matches_the_reference_kernel():
    model, w = qmatmul_2bit()
    x = feeds()
    native = to_native(model, accuracy_level=4, widen_2bit=None)
    a = _attrs(native.graph.node[0])
    assert (a["bits"], a["block_size"], a["accuracy_level"]) == (2, 128, 4)
    b = next(t for t in native.graph.initializer if t.name.endswith("nbits_B"))
    assert numpy_helper.to_array(b).nbytes == N * K // 4  # 2 bits per weight, not 4
    assert rel_err(run_ort(native, x), expected(x, w)) <= LEVEL4_RTOL

    # the same weight widened to 4 bits at the same block and level: the same numbers, same int8 compute
    widened = to_native(model, accuracy_level=4, widen_2bit=True, max_block=128)
    assert _attrs(widened.graph.node[0])["bits"] == 4
    np.testing.assert_allclose(run_ort(native, x), run_ort(widened, x), rtol=0,
                               atol=EXACT_RTOL * np.abs(expected(x, w)).max())


def test_backend_keeps_2bit_codes_as_a_view_of_the_file_at_level_4(tmp_path):
    """Through the runtime: at level 4 the 2-bit codes reach onnxruntime uncopied (a view of the mapped file)."""
    model, w = qmatmul_2bit()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = feeds()
    codes_bytes = N * K // 4
    got = {}
    for level in (4, 0):
        backend = backends.create("ort", load_graph(path), RuntimeOptions(accuracy_level=level, threads=1))
        got[level] = (backend.run({"x": x})["y"], backend.copied_bytes)
        backend.close()
    scales_zeros = N * (K // 128) * 4 + N * 1  # level 4: per-block scales (block 128), packed 2-bit zero points
    assert got[4][1] == scales_zeros  # the codes were not copied: kept at 2 bits, zero-copy
    assert got[0][1] >= 2 * codes_bytes  # level 0: widened to 4 bits, a new array
    assert rel_err(got[4][0], expected(x, w)) <= LEVEL4_RTOL
    assert rel_err(got[0][0], expected(x, w)) <= EXACT_RTOL


# ----------------------------------------------------------------------------- level 0: widened as before


def test_level_0_widens_exactly_as_before():
    """The rule at level 0 gives the same graph and bytes as the old path (keep 2-bit, then widen every 2-bit node)."""
    model, w = qmatmul_2bit()
    weights = {"w": w[0]}
    del model.graph.initializer[0]
    old_model, old_weights = native_rewrite(model, weights)  # widen_2bit=False: the old rewrite
    old_weights = native.widen_2bit_matmuls(old_model, old_weights)  # rule=True: the old load-time widening
    new_model, new_weights = native_rewrite(model, weights, widen_2bit=None)  # level None = 0
    assert _attrs(new_model.graph.node[0]) == _attrs(old_model.graph.node[0])
    assert _attrs(new_model.graph.node[0])["bits"] == 4 and _attrs(new_model.graph.node[0])["block_size"] == 256
    assert new_weights.keys() == old_weights.keys()
    for name in new_weights:
        np.testing.assert_array_equal(np.asarray(new_weights[name]).reshape(-1), np.asarray(old_weights[name]).reshape(-1))
    full = to_native(qmatmul_2bit()[0], accuracy_level=0, widen_2bit=None)
    x = feeds()
    assert rel_err(run_ort(full, x), expected(x, w)) <= EXACT_RTOL


def test_widen_2bit_rule_on_a_target_ort_graph():
    """A --target ort file: each 2-bit node is widened by its own level and block (or by the option)."""
    def graph(level, block):
        node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=2,
                                block_size=block, accuracy_level=level)
        weights = {"B": np.zeros((N, K // block, block // 4), np.uint8)}
        return helper.make_model(helper.make_graph([node], "g", [], [])), weights

    for level, block, widened in [(4, 128, False), (4, 64, False), (4, 32, True), (4, 256, True), (0, 128, True),
                                  (1, 64, True)]:
        model, weights = graph(level, block)
        out = native.widen_2bit_matmuls(model, weights, rule=None)
        assert (_attrs(model.graph.node[0])["bits"] == 4) == widened, (level, block)
        assert out["B"].nbytes == N * K // (2 if widened else 4)
    for rule, widened in [(True, True), (False, False)]:
        model, weights = graph(4, 128)
        native.widen_2bit_matmuls(model, weights, rule=rule)
        assert (_attrs(model.graph.node[0])["bits"] == 4) == widened
    with pytest.raises(Exception, match="widen_2bit"):
        RuntimeOptions(widen_2bit="auto")


def test_target_ort_file_with_small_zero_points_widens_them_in_the_graph(tmp_path):
    """A --target ort file with 2-bit zero points of <= 1 KiB (they stay in the graph when loaded):
    widened at level 0 with the codes (onnxruntime refused the 2-bit-sized zero points before)."""
    k = 768  # 3 blocks of 256: 2-bit zero points take 1 byte per row, 4-bit ones 2
    rng = np.random.default_rng(3)
    codes, scales = rng.integers(0, 4, (N, k), dtype=np.uint8), rng.uniform(0.01, 0.3, GROUPS).astype(np.float32)
    zeros = rng.integers(0, 4, GROUPS, dtype=np.uint8)
    node = helper.make_node("QMatMul", ["x", "w", "s", "z"], ["y"], name="fc/QMatMul", domain="qbert_edge",
                            bits=2, N=N, K=k, groups=GROUPS, layout="dense-le-v1", version=1)
    graph = helper.make_graph(
        [node], "qmatmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(pack(codes, 2), "w"), numpy_helper.from_array(scales, "s"),
         numpy_helper.from_array(zeros, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)],
                              ir_version=8)
    path = tmp_path / "m.ort.onnx"
    onnx.save(to_native(model, widen_2bit=False), str(path))  # 2-bit kept in the file, block 256
    loaded = load_graph(path)
    zero_name = next(n for n in loaded.model.graph.node if n.op_type == "MatMulNBits").input[3]
    assert zero_name not in loaded.weights  # 48 bytes: kept in the graph by the loader
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    backend = backends.create("ort", loaded, RuntimeOptions(accuracy_level=0, threads=1))
    want = kernels.qmatmul(x, pack(codes, 2), scales, zeros, None, bits=2, n=N, k=k, groups=GROUPS)
    assert rel_err(backend.run({"x": x})["y"], want) <= EXACT_RTOL


def test_native_4bit_bytes_follows_the_rule(tmp_path):
    from qbert_edge.runtime.memory import native_4bit_bytes

    model, _ = qmatmul_2bit()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    graph = load_graph(path)
    assert native_4bit_bytes(graph, accuracy_level=0) == N * K // 2
    assert native_4bit_bytes(graph, accuracy_level=4) == 0
    assert native_4bit_bytes(graph, accuracy_level=4, widen_2bit=True) == N * K // 2
    assert native_4bit_bytes(graph, accuracy_level=0, widen_2bit=False) == 0
    onnx.save(to_native(model, accuracy_level=4, widen_2bit=None), str(tmp_path / "t.onnx"))
    target_ort = load_graph(tmp_path / "t.onnx")
    assert native_4bit_bytes(target_ort, accuracy_level=None) == 0  # as exported: level 4, block 128
    assert native_4bit_bytes(target_ort, accuracy_level=0) == N * K // 2


# ----------------------------------------------------------------------------- the exporter agrees


def test_exporter_target_ort_follows_the_same_rule():
    """``--target ort`` writes every MatMulNBits at the default level, 2-bit kept exactly where the runtime keeps it."""
    from conftest import make_tiny_bert, make_tokenizer
    from qbert_edge.checkpoint import LoadedModel, to_checkpoint
    from qbert_edge.exporters.onnx_export import export_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import freeze, quantizable_shapes, quantize_model
    from qbert_edge.runtime.native import DEFAULT_ACCURACY_LEVEL

    model = make_tiny_bert(2, hidden=32, heads=4, init_range=0.3)
    plan = uniform_plan(quantizable_shapes(model), 2, 4, activation_bits=None, head_bits=None)  # only 2-bit matmuls
    quantize_model(model, plan)
    freeze(model)
    data = to_checkpoint(LoadedModel(model, make_tokenizer(), ["a", "b"], "tiny", plan, 32, {}))
    exported = export_model(data, target="ort", align=False)
    nodes = [n for n in exported.graph.node if n.op_type == "MatMulNBits"]
    assert nodes
    for node in nodes:
        a = _attrs(node)
        assert a["accuracy_level"] == DEFAULT_ACCURACY_LEVEL
        assert (a["bits"], a["block_size"]) == matmul_layout(2, a["K"], DEFAULT_ACCURACY_LEVEL, None)
    # and the runtime leaves such a file as it is: nothing left to widen at the file's own level
    weights = {}
    for node in nodes:
        b = next(t for t in exported.graph.initializer if t.name == node.input[1])
        weights[node.input[1]] = numpy_helper.to_array(b)
    before = [_attrs(n) for n in nodes]
    native.widen_2bit_matmuls(exported, weights, rule=None)
    assert [_attrs(n) for n in exported.graph.node if n.op_type == "MatMulNBits"] == before
