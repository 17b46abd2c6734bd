"""Export of tiny quantized BERTs: every width, mixed plans, both targets, sizes, determinism, validation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from _export_fixtures import mixed_plan, quantized_checkpoint
from onnx import numpy_helper

from qbert_edge.errors import QbertEdgeError
from qbert_edge.exporters.metadata import FORMAT, model_info
from qbert_edge.exporters.onnx_export import ALIGN, _raw_offsets, export_model, fp32_checkpoint
from qbert_edge.exporters.sizes import size_report, theoretical_size
from qbert_edge.exporters.validate import check_model, validate_export
from qbert_edge.runtime.packing import packed_size


@pytest.fixture(scope="module")
def mixed():
    return quantized_checkpoint(plan=mixed_plan())


def nodes_by_domain(model):
    out = {}
    for n in model.graph.node:
        out.setdefault(n.domain, []).append(n.op_type)
    return out


@pytest.mark.parametrize("bits", range(2, 9))
def test_every_width_exports_and_validates_on_both_targets(bits):
    data = quantized_checkpoint(bits)
    for target in ("portable", "ort"):
        model = export_model(data, target=target)
        report = validate_export(model, data)
        assert report.ok, report.summary()
        assert report.checks[0].same_class == report.texts
        ops = nodes_by_domain(model)
        if target == "portable":
            assert report.backend == "reference"
            assert sorted(set(ops["qbert_edge"])) == ["QGather", "QMatMul"]
            assert ops[""].count("QuantizeLinear") == 2 * 6 + 2  # 6 Linears per layer, pooler, classifier
            assert "com.microsoft" not in ops
        else:
            assert report.backend == "onnxruntime"
            assert "qbert_edge" not in ops
            # 7-8-bit Linears (the 8-bit pooler and classifier, every Linear at 7-8 bits) run integer matmuls
            integer = {"MatMulIntegerToFloat"} | ({"MatMulNBits"} if bits < 7 else set())
            assert set(ops["com.microsoft"]) == {"GatherBlockQuantized"} | integer


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_clipped_ranges_export_and_validate(bits):
    data = quantized_checkpoint(bits, clip="mse")
    assert {q["clip"] for q in data["plan"]["modules"].values()} == {"mse"}
    for target in ("portable", "ort"):
        report = validate_export(export_model(data, target=target), data)
        assert report.ok, report.summary()


def test_mixed_plan_exports_and_validates(mixed):
    for target in ("portable", "ort"):
        model = export_model(mixed, target=target)
        report = validate_export(model, mixed)
        assert report.ok, report.summary()
    portable = export_model(mixed)
    names = {n.name.split("/")[0] for n in portable.graph.node if n.op_type == "QMatMul"}
    assert "encoder.layer.1.attention.self.key" not in names and "classifier" not in names
    assert "encoder.layer.0.attention.self.value" in names
    plain = {n.name.split("/")[0] for n in portable.graph.node if n.op_type == "MatMul" and "/MatMul" in n.name}
    assert {"encoder.layer.1.attention.self.key", "encoder.layer.1.attention.output.dense", "classifier"} <= plain
    gathers = {n.name.split("/")[0]: n.op_type for n in portable.graph.node if "Gather" in n.op_type and "embeddings." in n.name}
    assert gathers == {
        "embeddings.word_embeddings": "QGather",
        "embeddings.token_type_embeddings": "Gather",
        "embeddings.position_embeddings": "QGather",
    }


def test_packed_initializers_are_exactly_ceil_n_bits_over_8(mixed):
    model = export_model(mixed)
    inits = {t.name: t for t in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.domain != "qbert_edge":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        rows, cols = (attrs["N"], attrs["K"]) if node.op_type == "QMatMul" else (attrs["rows"], attrs["cols"])
        w = inits[node.input[1] if node.op_type == "QMatMul" else node.input[0]]
        assert w.data_type == onnx.TensorProto.UINT8 and list(w.dims) == [packed_size(rows * cols, attrs["bits"])]
        module = node.name.split("/")[0]
        assert attrs["bits"] == mixed["weights"][module]["bits"]
        checked += 1
    assert checked == len(mixed["weights"])


def test_sizes_add_up_and_match_theory(mixed):
    model = export_model(mixed)
    blob = model.SerializeToString()
    report = size_report(model, len(blob))
    theory = theoretical_size(mixed)
    assert report.total == len(blob)
    assert report.packed + report.quant_params + report.fp32 + report.metadata + report.graph == report.total
    assert report.packed == theory.codes
    assert report.quant_params == theory.quant_params
    assert report.fp32 == theory.fp32
    assert "packed weights" in report.table() and "total (file)" in report.table()


def test_same_model_pt_gives_the_same_bytes_twice(mixed):
    for target in ("portable", "ort"):
        a = export_model(mixed, target=target).SerializeToString()
        b = export_model(mixed, target=target).SerializeToString()
        assert a == b


def test_large_initializers_are_aligned(mixed):
    blob = export_model(mixed).SerializeToString()
    offsets = _raw_offsets(blob)
    large = [(n, o) for n, o, length in offsets if length >= 1024]
    assert large, "the tiny model has initializers of 1 KB and more"
    assert all(o % ALIGN == 0 for _, o in large), [(n, o % ALIGN) for n, o in large if o % ALIGN]
    assert onnx.load_from_string(blob).graph.initializer[0].name == export_model(mixed).graph.initializer[0].name


def test_metadata_carries_what_the_runtime_needs(mixed):
    from qbert_edge.runtime.text import load_tokenizer

    model = export_model(mixed)
    info = model_info(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["qbert_edge.format"] == FORMAT and props["qbert_edge.format_version"] == "1"
    assert info.architecture == "BertForSequenceClassification" and info.target == "portable"
    assert info.outputs == ("logits",) and info.labels == ("label0", "label1") and info.max_length == 32
    assert info.plan["activation_bits"] == 8
    assert info.plan["modules"]["encoder.layer.0.attention.self.value"] == {"bits": 5, "groups": 1}
    tok = load_tokenizer(info.tokenizer)
    assert tok.encode("a brilliant film").tokens == ["[CLS]", "a", "brilliant", "film", "[SEP]"]
    assert info.source["method"] == "directq"
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "sequence"]] * 3


def test_bare_encoder_outputs_hidden_state_and_pooler():
    data = quantized_checkpoint(4, num_labels=None)
    for target in ("portable", "ort"):
        model = export_model(data, target=target)
        assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooler_output"]
        report = validate_export(model, data)
        assert report.ok, report.summary()
        assert [c.name for c in report.checks] == ["last_hidden_state", "pooler_output"]


def test_fp32_baseline_uses_plain_matmul(tiny_tokenizer):
    from conftest import make_tiny_bert

    from qbert_edge.checkpoint import LoadedModel

    loaded = LoadedModel(make_tiny_bert(2, init_range=0.3), tiny_tokenizer, ["neg", "pos"], "tiny-fp32", max_length=32)
    data = fp32_checkpoint(loaded)
    model = export_model(data)
    ops = nodes_by_domain(model)
    assert set(ops) == {""} and ops[""].count("MatMul") == 2 * 6 + 2 + 2 * 2  # Linears + attention matmuls
    assert [o.domain for o in model.opset_import] == [""]
    assert [o.domain for o in export_model(data, target="ort").opset_import] == [""]  # nothing to rewrite
    assert model_info(model).plan is None
    report = validate_export(model, data)
    assert report.ok and report.checks[0].max_abs_diff < 1e-5, report.summary()
    assert size_report(model).packed == 0


def test_validation_fails_on_a_wrong_scale(mixed):
    """Validation must catch a real export error: one group's scale off by 10%."""
    model = export_model(mixed)
    t = next(t for t in model.graph.initializer if t.name == "encoder.layer.0.intermediate.dense.weight_scale")
    arr = numpy_helper.to_array(t).copy()
    arr[3] *= 1.1
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    report = validate_export(model, mixed)
    assert not report.ok
    assert "past it" in report.summary()


def test_validation_fails_on_a_wrong_activation_zero_point():
    data = quantized_checkpoint(8)
    model = export_model(data)
    t = next(t for t in model.graph.initializer if t.name == "encoder.layer.1.output.dense.input_zero")
    t.CopyFrom(numpy_helper.from_array(np.uint8(numpy_helper.to_array(t) + 3), t.name))
    report = validate_export(model, data)
    assert not report.ok, report.summary()
    assert len(report.activation_errors) == 1, report.activation_errors
    assert report.activation_errors[0].startswith("encoder.layer.1.output.dense: ")
    assert "codes differ from clamp(rint(x/scale)+zero)" in report.activation_errors[0]


def test_validation_fails_on_an_activation_scale_from_another_layer():
    """Swapping two modules' activation ranges is caught on every pair, not only where outputs move."""
    data = quantized_checkpoint(8)
    model = export_model(data)
    inits = {t.name: t for t in model.graph.initializer}
    a, b = "encoder.layer.0.attention.self.query.input_scale", "encoder.layer.1.intermediate.dense.input_scale"
    va, vb = numpy_helper.to_array(inits[a]), numpy_helper.to_array(inits[b])
    inits[a].CopyFrom(numpy_helper.from_array(vb, a))
    inits[b].CopyFrom(numpy_helper.from_array(va, b))
    report = validate_export(model, data)
    assert not report.ok
    assert {e.split(":")[0] for e in report.activation_errors} == {
        "encoder.layer.0.attention.self.query", "encoder.layer.1.intermediate.dense"
    }


def test_explain_tells_a_rounding_flip_from_a_mismatch():
    """Codes one step apart at a rounding tie are a flip; anything else is a mismatch."""
    from qbert_edge.exporters.validate import explain

    activations = {"m1": {"scale": 0.5, "zero": 10}, "m2": {"scale": 0.5, "zero": 10}}
    x = np.array([[0.25 + 1e-7, 3.0], [0.25 + 1e-7, 3.0], [1.0, 2.0], [1.0, 2.0]], np.float32)  # t = x / 0.5
    base = np.clip(np.rint(x / np.float32(0.5)) + 10, 0, 255).astype(np.uint8)
    codes = base.copy()
    codes[0, 0] += 1  # at a tie (t = 0.5 + 2e-7): flip
    codes[1, 1] += 1  # t = 6.0, no tie: mismatch
    codes[2, 0] += 2  # two steps: mismatch
    quantizers = [("m1", "m1/QuantizeLinear"), ("m2", "m2/QuantizeLinear")]
    onnx_codes = {"m1/QuantizeLinear": codes, "m2/QuantizeLinear": base}
    verdicts = explain(quantizers, {"m1": x, "m2": x}, onnx_codes, activations, [0, 1, 2, 3])
    assert verdicts[0].startswith("flip: 1 code(s) of m1")
    assert verdicts[1].startswith("mismatch: 1 code(s) of m1")
    assert verdicts[2].startswith("mismatch") and "up to 2" in verdicts[2]
    assert verdicts[3].startswith("mismatch: no activation code differs")


def test_report_passes_only_flips_with_an_agreeing_unquantized_recheck():
    from qbert_edge.exporters.validate import OutputCheck, ValidationReport

    past = (OutputCheck("logits", 0.3, 2.0, 0.003, (4,), 12, 12),)
    fine = (OutputCheck("logits", 1e-6, 2.0, 0.003, (), 12, 12),)
    flip = {4: "flip: 1 code(s) of x one step apart"}
    assert ValidationReport("reference", 12, 100, fine).ok
    assert ValidationReport("reference", 12, 100, past, fine, flip).ok
    assert not ValidationReport("reference", 12, 100, past, None, None).ok
    assert not ValidationReport("reference", 12, 100, past, past, flip).ok
    assert not ValidationReport("reference", 12, 100, past, fine, {4: "mismatch: 3 code(s)"}).ok
    assert "sentence 4: flip" in ValidationReport("reference", 12, 100, past, fine, flip).summary()


@pytest.mark.parametrize("opset", [17, 21, 27])
def test_opsets(mixed, opset):
    for target in ("portable", "ort"):
        model = export_model(mixed, opset=opset, target=target)
        assert next(o.version for o in model.opset_import if o.domain == "") == opset
        check_model(model)
        assert validate_export(model, mixed, check=False).ok


def test_bad_opset_and_target(mixed):
    with pytest.raises(QbertEdgeError, match="supported opsets are 17"):
        export_model(mixed, opset=16)
    with pytest.raises(QbertEdgeError, match="supported opsets are 17..27"):
        export_model(mixed, opset=28)
    with pytest.raises(QbertEdgeError, match="unknown target"):
        export_model(mixed, target="tflite")


def test_codes_that_do_not_fit_the_width_are_refused(mixed):
    import torch

    bad = dict(mixed)
    bad["weights"] = dict(mixed["weights"])
    w = dict(bad["weights"]["encoder.layer.0.attention.self.query"])  # 2 bits
    w["codes"] = w["codes"].clone()
    w["codes"][0, 0] = 9
    bad["weights"]["encoder.layer.0.attention.self.query"] = w
    with pytest.raises(QbertEdgeError, match="do not fit in 2 bits"):
        export_model(bad)
    bad["weights"]["encoder.layer.0.attention.self.query"] = {**w, "codes": torch.zeros(32, 32, dtype=torch.uint8), "bits": 1}
    with pytest.raises(QbertEdgeError, match="1-bit width cannot be packed"):
        export_model(bad)


def test_ort_target_refuses_a_width_it_cannot_block():
    """K = 40 (hidden 40) is not a multiple of MatMulNBits' smallest block (16): one-line error."""
    data = quantized_checkpoint(4, hidden=40, groups=4)
    assert export_model(data, target="portable")
    with pytest.raises(QbertEdgeError, match="not a multiple of 16"):
        export_model(data, target="ort")


def test_plan_summary_is_json_and_sorted(mixed):
    props = {p.key: p.value for p in export_model(mixed).metadata_props}
    plan = json.loads(props["qbert_edge.plan"])
    assert list(plan["modules"]) == sorted(plan["modules"])


def test_bare_encoder_runs_as_sentence_vectors(tmp_path, capsys):
    from qbert_edge.cli import main
    from qbert_edge.runtime.session import Session

    data = quantized_checkpoint(8, num_labels=None)
    path = tmp_path / "encoder.onnx"
    onnx.save(export_model(data), path)
    texts = ["a brilliant film", "a dull and boring film that goes on"]
    with Session(path, backend="reference") as session:
        assert not session.is_classifier
        both = session.embed(texts)
        alone = session.embed(texts[:1])
        with pytest.raises(QbertEdgeError, match="bare encoder"):
            session.predict(texts)
    assert both.shape == (2, 32) and both.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(alone[0], both[0], atol=1e-5)  # padding is not pooled
    assert abs(float(both[0] @ both[1])) < 0.9999
    assert main(["run", str(path), "--backend", "reference", "--json", *[a for t in texts for a in ("--text", t)]]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "qbert-edge/embeddings" and [e["text"] for e in out["embeddings"]] == texts
    np.testing.assert_allclose(out["embeddings"][1]["vector"], both[1], atol=1e-5)
