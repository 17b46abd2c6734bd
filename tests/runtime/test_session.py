"""Session and backends on tiny inline ONNX classifiers: agreement, predictions, bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
import onnx
import pytest

from _tiny_onnx import numpy_logits, save, tiny_classifier
from qbert_edge.errors import QbertEdgeError
from qbert_edge.runtime import backends, native
from qbert_edge.runtime.backends import RuntimeOptions
from qbert_edge.runtime.loader import load_graph
from qbert_edge.runtime.session import Session, softmax

TEXTS = ["a brilliant and moving film", "the worst movie ever", "a boring , dull mess", "i love this story"]
ALL = ["reference", "ort-custom", "ort"]
#: Backends agree to fp32 rounding of different summation orders; the tiny logits are O(10).
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture
def tiny_model(tmp_path, tiny_tokenizer):
    model, weights = tiny_classifier(tiny_tokenizer)
    return save(model, tmp_path / "tiny.onnx"), weights


@pytest.mark.parametrize("backend", ALL)
def test_backend_matches_numpy_math(tiny_model, backend):
    path, weights = tiny_model
    with Session(path, backend=backend) as s:
        feeds = s.encode(TEXTS)
        got = s.logits(TEXTS)
    np.testing.assert_allclose(got, numpy_logits(weights, feeds), rtol=RTOL, atol=ATOL)


def test_backends_agree_on_logits_and_labels(tiny_model):
    path, _ = tiny_model
    results = {}
    for backend in ALL:
        with Session(path, backend=backend) as s:
            results[backend] = (s.logits(TEXTS), [p.label for p in s.predict(TEXTS)])
    ref_logits, ref_labels = results["reference"]
    for backend, (logits, labels) in results.items():
        np.testing.assert_allclose(logits, ref_logits, rtol=RTOL, atol=ATOL, err_msg=backend)
        assert labels == ref_labels, backend


def test_ort_backend_runs_onnxruntime_native_ops(tiny_model):
    with Session(tiny_model[0], backend="ort") as s:
        ops = {n.op_type for n in onnx.load(tiny_model[0]).graph.node}
        assert {"QMatMul", "QGather"} <= ops
        assert type(s._backend).__name__ == "OrtBackend"  # every op became MatMulNBits/GatherBlockQuantized


def test_predict_labels_and_probabilities(tiny_model):
    path, weights = tiny_model
    with Session(path, backend="ort-custom") as s:
        preds = s.predict(TEXTS, batch_size=3)
        expected = softmax(numpy_logits(weights, s.encode(TEXTS)))
    assert [p.text for p in preds] == TEXTS
    for p, row in zip(preds, expected):
        assert p.label == ("negative", "positive")[int(row.argmax())]
        assert p.label_id == int(row.argmax())
        assert sum(p.probabilities.values()) == pytest.approx(1.0)
        assert p.probabilities["positive"] == pytest.approx(row[1], rel=1e-4)


def test_run_takes_raw_feeds_and_checks_them(tiny_model):
    path, weights = tiny_model
    feeds = {"input_ids": np.array([[2, 10, 11, 3]]), "attention_mask": np.ones((1, 4), np.int32),
             "token_type_ids": np.zeros((1, 4), np.int64)}
    with Session(path, backend="ort-custom") as s:
        out = s.run(feeds)
        np.testing.assert_allclose(out["logits"], numpy_logits(weights, feeds), rtol=RTOL, atol=ATOL)
        with pytest.raises(QbertEdgeError, match="missing input"):
            s.run({"input_ids": feeds["input_ids"]})
        with pytest.raises(QbertEdgeError, match="must be integers"):
            s.run({**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})
        with pytest.raises(QbertEdgeError, match="shape"):
            s.run({**feeds, "attention_mask": np.ones((1, 5), np.int64)})


@pytest.mark.parametrize("backend", ALL)
def test_out_of_vocabulary_index_is_a_one_line_error(tiny_model, backend):
    path, _ = tiny_model
    feeds = {"input_ids": np.array([[2, 10_000, 3]]), "attention_mask": np.ones((1, 3), np.int64),
             "token_type_ids": np.zeros((1, 3), np.int64)}
    with Session(path, backend=backend) as s:
        with pytest.raises(QbertEdgeError, match="input_ids holds 10000, outside the model's table of 58 rows"):
            s.run(feeds)
        with pytest.raises(QbertEdgeError, match="token_type_ids holds -1"):
            s.run({**feeds, "input_ids": np.array([[2, 5, 3]]), "token_type_ids": -np.ones((1, 3), np.int64)})


def test_kernel_errors_in_python_ops_do_not_abort(tiny_model):
    """An exception inside a Python custom op would abort the process; it becomes a one-line error."""
    path, _ = tiny_model
    feeds = {"input_ids": np.array([[2, 10_000, 3]]), "attention_mask": np.ones((1, 3), np.int64),
             "token_type_ids": np.zeros((1, 3), np.int64)}
    with Session(path, backend="ort-custom") as s:
        with pytest.raises(QbertEdgeError, match="backend ort-custom failed: QGather .*out of range") as err:
            s._limits.clear()  # bypass the session's own check to reach the kernel
            s.run(feeds)
        assert "\n" not in str(err.value)
        assert s.run({**feeds, "input_ids": np.array([[2, 5, 3]])})["logits"].shape == (1, 2)  # still usable


def test_ort_custom_keeps_weights_out_of_onnxruntime(tiny_model):
    from qbert_edge.runtime import ort_custom

    path, _ = tiny_model
    s = Session(path, backend="ort-custom")
    scope = s._backend.scope
    held = ort_custom.registered(scope)
    assert sorted(w.op for w in held.values()) == ["QGather", "QMatMul", "QMatMul"]
    emb = next(w for w in held.values() if w.op == "QGather")
    assert emb.packed.base is not None and not emb.packed.flags.owndata  # a view of the mapped file
    s.close()
    assert ort_custom.registered(scope) == {}


def test_loader_maps_weights_without_copying(tiny_model, tmp_path):
    path, _ = tiny_model
    graph = load_graph(path)
    full = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    assert set(graph.weights) | {t.name for t in graph.model.graph.initializer} == set(full)
    assert "emb.packed" in graph.weights and "minus1" not in graph.weights  # small constants stay in the graph
    for name, arr in graph.weights.items():
        np.testing.assert_array_equal(arr, full[name])
        assert not arr.flags.writeable


def test_loader_reads_external_data(tiny_model, tmp_path, tiny_tokenizer):
    model, weights = tiny_classifier(tiny_tokenizer)
    ext = tmp_path / "ext.onnx"
    onnx.save(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    with Session(ext, backend="ort-custom") as a, Session(tiny_model[0], backend="ort-custom") as b:
        np.testing.assert_array_equal(a.logits(TEXTS), b.logits(TEXTS))
        assert a.static_bytes > (tmp_path / "ext.onnx.data").stat().st_size


def test_auto_backend_and_threads(tiny_model):
    with Session(tiny_model[0], options=RuntimeOptions(threads=1)) as s:
        assert s.backend == backends.AUTO_ORDER[0]
    assert 1 <= backends.default_threads() <= backends.MAX_DEFAULT_THREADS
    with pytest.raises(QbertEdgeError, match="threads"):
        RuntimeOptions(threads=0)


# ----------------------------------------------------------------------------- bad input


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text('{"this": "is json"}\n' * 20)
    with pytest.raises(QbertEdgeError, match="not an ONNX model"):
        Session(bad, backend="ort-custom")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(QbertEdgeError, match="empty file"):
        Session(empty)
    with pytest.raises(QbertEdgeError, match="no such file"):
        Session(tmp_path / "missing.onnx")


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.99])
def test_truncated_file(tiny_model, tmp_path, fraction):
    data = open(tiny_model[0], "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(QbertEdgeError, match="truncated"):
        Session(cut, backend="ort-custom")


def test_model_without_metadata(tmp_path, tiny_tokenizer):
    model, weights = tiny_classifier(tiny_tokenizer, metadata=False)
    path = save(model, tmp_path / "bare.onnx")
    with pytest.raises(QbertEdgeError, match="not a qbert-edge ONNX model"):
        Session(path, backend="ort-custom")
    with Session(path, backend="ort-custom", require_metadata=False) as s:  # raw run still works
        feeds = {"input_ids": np.array([[2, 9, 3]]), "attention_mask": np.ones((1, 3), np.int64),
                 "token_type_ids": np.zeros((1, 3), np.int64)}
        np.testing.assert_allclose(s.run(feeds)["logits"], numpy_logits(weights, feeds), rtol=RTOL, atol=ATOL)
        with pytest.raises(QbertEdgeError, match="no qbert-edge metadata"):
            s.predict(["a film"])


def test_newer_op_version(tmp_path, tiny_tokenizer):
    model, _ = tiny_classifier(tiny_tokenizer, op_version=2)
    path = save(model, tmp_path / "v2.onnx")
    for backend in ("reference", "ort-custom"):
        with pytest.raises(QbertEdgeError, match="QGather version 2 is newer than this runtime"):
            Session(path, backend=backend)
    model, _ = tiny_classifier(tiny_tokenizer)
    for opset in model.opset_import:
        if opset.domain == "qbert_edge":
            opset.version = 3
    with pytest.raises(QbertEdgeError, match="opset 3"):
        Session(save(model, tmp_path / "opset3.onnx"))


def test_empty_and_long_texts(tiny_model, caplog):
    with Session(tiny_model[0], backend="ort-custom") as s:
        with pytest.raises(QbertEdgeError, match="text 2 is empty"):
            s.predict(["a film", "   "])
        with pytest.raises(QbertEdgeError, match="no texts"):
            s.predict([])
        long_text = " ".join(["good"] * 100)
        with caplog.at_level(logging.WARNING):
            preds = s.predict([long_text])
        assert "truncated" in caplog.text
        assert s.encode([long_text])["input_ids"].shape[1] == s.max_length == 16
        assert preds[0].label in ("negative", "positive")


def test_unknown_and_missing_backends(tiny_model, monkeypatch):
    with pytest.raises(QbertEdgeError, match="unknown backend 'tensorrt'"):
        Session(tiny_model[0], backend="tensorrt")
    monkeypatch.setitem(backends.BACKENDS, "ort-custom",
                        (("onnxruntime", "no_such_module_qbert"), "onnxruntime-extensions", "test"))
    with pytest.raises(QbertEdgeError, match="pip install onnxruntime-extensions"):
        Session(tiny_model[0], backend="ort-custom")


def test_auto_falls_back_when_onnxruntime_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(backends, "missing_packages", lambda b: [] if b == "reference" else ["onnxruntime"])
    with caplog.at_level(logging.WARNING):
        assert backends.resolve("auto") == "reference"
    assert "not installed" in caplog.text


@pytest.mark.parametrize("options", [RuntimeOptions(widen_2bit=False), RuntimeOptions(prepacking=False),
                                     RuntimeOptions(return_memory=False, arena=True)])
def test_ort_options_keep_the_numbers(tiny_model, options):
    path, weights = tiny_model
    with Session(path, backend="ort", options=options) as s:
        feeds = s.encode(TEXTS)
        np.testing.assert_allclose(s.logits(TEXTS), numpy_logits(weights, feeds), rtol=RTOL, atol=ATOL)


def test_widen_2bit_is_exact():
    from onnx import helper

    from qbert_edge.runtime.packing import pack

    rng = np.random.default_rng(1)
    n, k, block = 8, 64, 32
    codes = rng.integers(0, 4, (n, k), dtype=np.uint8)
    zeros = rng.integers(0, 4, (n, 2), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=2, block_size=block)
    graph = helper.make_graph([node], "g", [], [])
    model = helper.make_model(graph)
    weights = {"B": pack(codes, 2).reshape(n, 2, block // 4), "z": pack(np.pad(zeros, ((0, 0), (0, 2))), 2).reshape(n, 1)}
    out = native.widen_2bit_matmuls(model, weights)
    assert helper.get_attribute_value(next(a for a in model.graph.node[0].attribute if a.name == "bits")) == 4
    np.testing.assert_array_equal(out["B"].reshape(n, -1), pack(codes, 4).reshape(n, -1))
    np.testing.assert_array_equal(out["z"], pack(zeros, 4).reshape(n, 1))


def test_accuracy_level_option_is_set_on_matmulnbits(tiny_model):
    with Session(tiny_model[0], backend="ort", options=RuntimeOptions(accuracy_level=4)) as s:
        assert s.predict(TEXTS)[0].label in ("negative", "positive")
    with pytest.raises(QbertEdgeError, match="accuracy_level"):
        RuntimeOptions(accuracy_level=7)


# ----------------------------------------------------------------------------- the reference model (slow)

#: Agreement between backends on the real model. The 8-bit activation quantizers
#: (QuantizeLinear) round a value one step apart when it lies within float rounding of a step
#: boundary and two backends computed it in a different order; in a 2/3-bit encoder that one step
#: moves the logits by up to ~0.3. How many sentences meet such a tie depends on the kernels (92%
#: of 128 rt:dev sentences were free of it on an AVX-512 machine, 82% on an AVX2 one), so the test
#: checks the mechanism instead of a rate, as the exporter's validation does: every sentence past
#: ATOL/RTOL must be explained (:func:`qbert_edge.exporters.validate.explain`) by a flip, codes one
#: step apart at rounding ties, at the first layer where its codes differ from the reference's.
#: Measured here: tie-free sentences within 2.4e-6; flips within 6e-6 step of a tie.
#: Labels may still flip where a tie moved a small margin: 100% agreed on 128 sentences on both machines.
DEV_SAME_LABELS = 0.98
#: The reference backend takes about a second per sentence on 2 busy cores.
DEV_SENTENCES = 128


@pytest.fixture(scope="module")
def minilm_classifier(tmp_path_factory):
    """A 2/3 MP MiniLM classifier (DirectQ) whose fp32 head is fitted to the quantized encoder.

    A DirectQ 2/3 MP encoder has lost most of what a fine-tuned head expects, and a random head
    leaves almost every sentence within the logit tolerance of the other class, so the labels
    would mean nothing. The head here is a nearest-class-mean probe on the quantized encoder's
    pooled output for 256 training sentences (seconds, not a fine-tuning run): its margins are
    real, so a label that flips between backends is a real disagreement.
    """
    import torch

    from qbert_edge.checkpoint import save_quantized
    from qbert_edge.data import load_data, subsets, torch_batches
    from qbert_edge.exporters.onnx_export import export_file
    from qbert_edge.loading import load_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes
    from qbert_edge.quantize import direct_quantize

    torch.manual_seed(0)
    loaded = load_model("minilm", num_labels=2)
    plan = uniform_plan(quantizable_shapes(loaded.model), 2, 128, layer_bits={0: 3, 1: 3, 2: 3}, head_bits=None)
    train = load_data("rt:train", labels=("negative", "positive"))
    calib, probe = subsets(train, 2, 256 / len(train), 0)
    q = direct_quantize(loaded, plan, torch_batches(calib, loaded.tokenizer, 32, 64))
    feats, ys = [], []
    with torch.no_grad():
        for batch in torch_batches(probe, q.tokenizer, 32, 64):
            ys.append(batch.pop("labels"))
            feats.append(q.model.bert(**batch).pooler_output)
    x, y = torch.cat(feats).double(), torch.cat(ys)
    pos, neg = x[y == 1].mean(0), x[y == 0].mean(0)
    w, b = pos - neg, -(pos - neg) @ (pos + neg) / 2  # nearest class mean: no overfitting, small weights
    scale = 2.0 / float((x @ w + b).std())  # margins of a few units, like a trained head
    head = q.model.classifier
    head.weight.data = (torch.stack([-w, w]) * scale / 2).float()
    head.bias.data = (torch.stack([-b, b]) * scale / 2).float()
    q = dataclasses.replace(q, labels=["negative", "positive"])
    out = tmp_path_factory.mktemp("minilm")
    save_quantized(q, out / "model.pt")
    export_file(out / "model.pt", out / "model.onnx", validate=False)
    return out / "model.onnx"


def _probe_quantizers(path, out):
    """A copy of ``path`` that also outputs every QuantizeLinear's input and codes; the quantizers
    (:func:`~qbert_edge.exporters.validate.quantizer_outputs`), each one's input and its range."""
    from qbert_edge.exporters.validate import quantizer_outputs

    model = onnx.load(path)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    quantizers = quantizer_outputs(model)
    inputs = {module: nodes[codes].input[0] for module, codes in quantizers}
    ranges = {module: {"scale": float(init[nodes[codes].input[1]]), "zero": int(init[nodes[codes].input[2]])}
              for module, codes in quantizers}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in [*inputs.values(), *nodes])
    onnx.save(model, out)
    return out, quantizers, inputs, ranges


@pytest.mark.slow
def test_backends_agree_on_the_reference_dev_set(minilm_classifier, tmp_path):
    from qbert_edge.data import load_data
    from qbert_edge.exporters.validate import explain

    probe, quantizers, inputs, ranges = _probe_quantizers(minilm_classifier, tmp_path / "probe.onnx")
    flips, same = {"ort": 0, "ort-custom": 0}, {"ort": [], "ort-custom": []}
    with contextlib.ExitStack() as stack:
        sessions = {backend: stack.enter_context(Session(probe, backend=backend)) for backend in ALL}
        logit = sessions["reference"].output_names[0]
        texts = load_data("rt:dev", labels=sessions["reference"].labels).texts[:DEV_SENTENCES]
        for start in range(0, len(texts), 32):
            feeds = sessions["reference"].encode(texts[start:start + 32])
            ref = sessions["reference"].run(feeds)
            tol = ATOL + RTOL * float(np.abs(ref[logit]).max())
            for backend in flips:
                out = sessions[backend].run(feeds)
                same[backend].extend(out[logit].argmax(1) == ref[logit].argmax(1))
                past = np.flatnonzero(np.abs(out[logit] - ref[logit]).max(axis=1) > tol)
                verdicts = explain(quantizers, {m: ref[x] for m, x in inputs.items()},
                                   {codes: out[codes] for _, codes in quantizers}, ranges, past)
                bad = {start + b: v for b, v in verdicts.items() if not v.startswith("flip")}
                assert not bad, f"{backend}: sentences past {tol:.1e} without a rounding flip: {bad}"
                flips[backend] += len(past)
    print({b: f"{n} of {len(texts)} sentences past the tolerance by a rounding flip, "
              f"{np.mean(same[b]):.1%} same labels" for b, n in flips.items()})
    for backend, agree in same.items():
        assert np.mean(agree) >= DEV_SAME_LABELS, f"{backend}: only {np.mean(agree):.1%} of labels agree"


def test_target_ort_model_runs_on_ort_only(tmp_path, tiny_tokenizer):
    from qbert_edge.runtime.native import to_native

    model, weights = tiny_classifier(tiny_tokenizer)
    native = to_native(model)
    for prop in native.metadata_props:
        if prop.key == "qbert_edge.target":
            prop.value = "ort"
    path = save(native, tmp_path / "tiny.ort.onnx")
    assert not any(n.domain == "qbert_edge" for n in native.graph.node)
    with Session(path, backend="ort") as s:
        feeds = s.encode(TEXTS)
        np.testing.assert_allclose(s.logits(TEXTS), numpy_logits(weights, feeds), rtol=RTOL, atol=ATOL)
    with pytest.raises(QbertEdgeError, match="exported with --target ort"):
        Session(path, backend="reference")
