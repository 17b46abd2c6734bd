"""runtime.memory: static bytes, activation estimate, percentiles, and a fresh-process measurement."""

from __future__ import annotations

import json

import pytest

from _tiny_onnx import HIDDEN, INNER, save, tiny_classifier
from qbert_edge.cli import main
from qbert_edge.errors import QbertEdgeError
from qbert_edge.runtime import budget
from qbert_edge.runtime.loader import load_graph
from qbert_edge.runtime.memory import (
    FORMAT, MeasureConfig, ModelDims, activation_bytes, measure, measure_series, model_dims, percentile, proc_status,
    static_bytes,
)


@pytest.fixture
def tiny_path(tmp_path, tiny_tokenizer):
    return save(tiny_classifier(tiny_tokenizer)[0], tmp_path / "tiny.onnx")


def test_static_bytes_by_kind(tiny_path, tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab_size()
    got = static_bytes(load_graph(tiny_path))
    packed = vocab * HIDDEN + (INNER * HIDDEN * 3 + 7) // 8 + (2 * INNER * 2 + 7) // 8
    assert got["packed_codes"] == packed
    assert got["scales"] == 4 * (vocab + 4 + 2)
    assert got["zero_points"] == vocab + 4 + 2
    assert got["fp32"] == 4 * (2 * HIDDEN + INNER + 2)  # token types + biases
    assert got["other"] == 16  # the two int64 axis constants
    assert got["total"] == sum(v for k, v in got.items() if k != "total")
    assert got["graph"] > 0


def test_native_4bit_bytes(tiny_path):
    from qbert_edge.runtime.memory import native_4bit_bytes

    # the 3-bit [16, 32] and 2-bit [2, 16] QMatMuls at 4 bits; the 8-bit embedding is not counted
    assert native_4bit_bytes(load_graph(tiny_path)) == (INNER * HIDDEN + 2 * INNER) // 2


def test_model_dims_and_activation_formula(tiny_path):
    dims = model_dims(load_graph(tiny_path))
    assert (dims.hidden, dims.intermediate) == (HIDDEN, INNER)
    # BERT-base, batch 1 x 128: the FFN phase dominates: 4 * (2*128*768 + 3*128*3072) bytes
    base = ModelDims(hidden=768, intermediate=3072, heads=12, layers=12)
    assert activation_bytes(base, 1, 128) == 4 * (2 * 128 * 768 + 3 * 128 * 3072)
    # long sequences: the attention scores take over (2 * B*A*S*S)
    assert activation_bytes(base, 1, 2048) == 4 * (5 * 2048 * 768 + 2 * 12 * 2048 * 2048)
    assert activation_bytes(ModelDims(None, None, None, 0), 1, 8) == 0


def test_percentile_and_proc_status():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10.0] * 3, 90) == 10.0
    status = proc_status()
    assert status["VmHWM"] >= status["VmRSS"] > 0


def test_config_validation():
    with pytest.raises(QbertEdgeError, match="batch"):
        MeasureConfig(model="m.onnx", batch=0)
    with pytest.raises(QbertEdgeError, match="engine"):
        MeasureConfig(model="m.onnx", engine="tensorrt")


@pytest.mark.parametrize("backend", ["ort", "ort-custom"])
def test_measure_in_a_fresh_process(tiny_path, backend):
    r = measure(tiny_path, backend=backend, batch=2, seq_len=8, runs=3, warmup=1)
    assert r["format"] == FORMAT and r["version"] == 1 and r["backend"] == backend
    rss = r["rss_mb"]
    assert rss["peak"] >= rss["after_load"] >= rss["baseline"] > 0
    assert rss["model_share"] == pytest.approx(rss["peak"] - rss["baseline"], abs=0.02)
    assert r["latency_ms"]["p90"] >= r["latency_ms"]["p50"] > 0
    assert r["static_mb"]["total"] > 0
    # a 5 KB model costs the runtime's own overhead and nothing more (item 4 of the budget)
    assert rss["model_share"] < budget.MAX_RUNTIME_MB


def test_measure_series_loads_once_and_reports_each_batch(tiny_path):
    config = MeasureConfig(tiny_path, backend="ort", seq_len=8, warmup=1)
    small, big = measure_series(config, [(1, 3), (16, 2)])
    assert (small["batch"], small["runs"], small["preceded_by"]) == (1, 3, [])
    assert (big["batch"], big["runs"], big["preceded_by"]) == (16, 2, [1])
    assert big["activations_mb"] > small["activations_mb"]
    assert small["load_s"] == big["load_s"]  # one process, one load
    assert small["rss_mb"]["baseline"] == big["rss_mb"]["baseline"]
    assert big["rss_mb"]["peak"] >= small["rss_mb"]["peak"]  # the high-water mark covers the steps before
    with pytest.raises(QbertEdgeError, match="runs"):
        measure_series(config, [(1, 0)])
    assert [r["batch"] for r in measure_series(config, ((b, 1) for b in (1, 2)))] == [1, 2]  # any iterable


def test_measure_series_checks_what_the_child_ran(tiny_path, monkeypatch):
    from qbert_edge.runtime import memory

    real = memory._run_child

    def one_step_short(config, steps):  # a child that ignored its last step
        result = real(config, steps)
        result["steps"] = result["steps"][:-1]
        return result

    config = MeasureConfig(tiny_path, backend="ort", seq_len=8, warmup=0)
    real_steps = real(MeasureConfig(**{**config.__dict__, "backend": "ort"}), [(1, 2), (3, 1)])["steps"]
    assert [(s["batch"], len(s["latency_ms"])) for s in real_steps] == [(1, 2), (3, 1)]  # the child ran each step
    monkeypatch.setattr(memory, "_run_child", one_step_short)
    with pytest.raises(QbertEdgeError, match="not the steps asked for"):
        measure_series(config, [(1, 2), (3, 1)])
    with pytest.raises(QbertEdgeError, match="no"):
        measure_series(config, [])


def test_measure_reports_child_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" * 10)
    with pytest.raises(QbertEdgeError, match="not an ONNX model"):
        measure(str(bad), backend="ort", runs=1)


def test_measure_command_json(tiny_path, tmp_path, capsys):
    out = tmp_path / "m.json"
    main(["measure", tiny_path, "--backend", "ort", "--seq-len", "8", "--runs", "2", "--json", "-o", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text())["rss_mb"].keys() == printed["rss_mb"].keys()
    assert printed["seq_len"] == 8 and printed["runs"] == 2


def test_budget_formula_and_check():
    assert budget.budget_mb("ort", 48.0, 5.0, 20.0, native_4bit_mb=40.0) == pytest.approx(budget.FILE_FACTOR * 48 + 5 + 20 + 40)
    assert budget.budget_mb("reference", 48.0, 5.0, 20.0, native_4bit_mb=40.0) == pytest.approx(budget.FILE_FACTOR * 48 + 5 + 20)
    assert 5 < budget.backend_extra_mb("ort-custom") < 10  # one 2**18-value tile of the NumPy kernel
    report = {"backend": "ort", "static_mb": {"total": 10.0}, "activations_mb": 1.0, "native_4bit_mb": 2.0,
              "rss_mb": {"model_share": 40.0}}
    assert budget.check(report, 25.0)[0] and not budget.check(report, 20.0)[0]
    assert "model share 40.0 MB > budget 38.0 MB" in budget.check(report, 20.0)[1]
