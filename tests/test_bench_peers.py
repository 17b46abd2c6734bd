"""benchmarks/peers.py: the pure parts (plans of ours, Pareto front, spread, target checks, slower-by);
no model is built."""

import json

import pytest
from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def peers():
    return load_script(ROOT / "benchmarks" / "peers.py", "bench_peers")


def _row(peers, key, family, acc, file_mb, share_mb, engine="ort", p50=1.0):
    fig = {k: peers.spread([v]) for k, v in (("file_mb", file_mb), ("share_mb", share_mb), ("latency_p50", p50), ("peak_mb", 1.0))}
    return {"model": "minilm", "key": key, "label": key, "family": family, "engine": engine, "accuracy": acc,
            "figures": {"b1": fig, "b8": fig}, "loadavg": [0.5]}


def _with_correct(rows: list[dict], n: int = 100) -> list[dict]:
    """``rows`` with ``correct`` strings of ``n`` sentences, the first ``accuracy * n`` right: two
    rows differ only on the sentences between their counts (all discordant one way)."""
    return [{**r, "correct": "1" * round(r["accuracy"] * n) + "0" * (n - round(r["accuracy"] * n))} for r in rows]


def _shapes(layers: int, hidden: int = 32, vocab: int = 100) -> dict:
    from qbert_edge.plan import EMBEDDINGS, LAYER_LINEARS

    shapes = {EMBEDDINGS["word"]: (vocab, hidden), EMBEDDINGS["position"]: (64, hidden), EMBEDDINGS["token_type"]: (2, hidden),
              "pooler.dense": (hidden, hidden), "classifier": (2, hidden)}
    for i in range(layers):
        for name in LAYER_LINEARS:
            shape = {"intermediate.dense": (4 * hidden, hidden), "output.dense": (hidden, 4 * hidden)}.get(name, (hidden, hidden))
            shapes[f"encoder.layer.{i}.{name}"] = shape
    return shapes


def _sensitivity(omegas: list[float], shapes: dict):
    from qbert_edge.sensitivity import LayerSensitivity, Sensitivity

    layers = [LayerSensitivity(i, (w, w), (True, True), (3, 3)) for i, w in enumerate(omegas)]
    return Sensitivity(model="tiny", data="rt:train", num_layers=len(omegas), layers=layers, shapes=shapes)


def _layer_bits(plan) -> dict:
    return {int(n.split(".")[2]): q.bits for n, q in plan.modules.items() if n.startswith("encoder.layer.")}


def test_mp_plan_follows_the_hessian_ranking(peers):
    shapes = _shapes(4)
    sens = _sensitivity([1.0, 9.0, 2.0, 5.0], shapes)  # ranking 1, 3, 2, 0: not the first layers
    plan, note = peers.ours_plan(peers.OURS["ours-mp24"], shapes, 4, sens, high_layers=2)
    assert _layer_bits(plan) == {0: 2, 1: 4, 2: 2, 3: 4}
    assert "L1,3" in note and "Hessian" in note
    assert plan.modules["embeddings.word_embeddings"].bits == 8


def test_mp_plan_without_hessian_is_the_first_half(peers):
    shapes = _shapes(4)
    plan, note = peers.ours_plan(peers.OURS["ours-mp23"], shapes, 4, None)
    assert _layer_bits(plan) == {0: 3, 1: 3, 2: 2, 3: 2}
    assert "first half" in note


def test_low_bit_word_embedding_variants(peers):
    shapes = _shapes(4)
    sens = _sensitivity([1.0, 9.0, 2.0, 5.0], shapes)
    plan, note = peers.ours_plan(peers.Ours("mp23 e2", 2, 3, word_bits=2), shapes, 4, sens, high_layers=1)
    assert plan.modules["embeddings.word_embeddings"].bits == 2
    assert plan.modules["embeddings.position_embeddings"].bits == 8
    assert plan.modules["pooler.dense"].bits == 8
    assert _layer_bits(plan) == {0: 2, 1: 3, 2: 2, 3: 2}
    assert "2-bit word" in note and "position" not in note
    uniform, _ = peers.ours_plan(peers.OURS["ours-w4"], shapes, 4, sens)
    assert set(_layer_bits(uniform).values()) == {4}


def test_target_variants_spend_the_budget_on_more_high_layers(peers):
    """The int8 target's rows: 4-bit position embeddings and head make room for more high layers
    (the variant's own ``high_layers`` wins over the command line's)."""
    shapes = _shapes(6)
    sens = _sensitivity([1.0, 9.0, 2.0, 5.0, 3.0, 4.0], shapes)  # ranking 1, 3, 5, 4, 2, 0
    plan, note = peers.ours_plan(peers.OURS["ours-mp24-e2"], shapes, 6, sens, high_layers=2)
    assert _layer_bits(plan) == {0: 2, 1: 4, 2: 2, 3: 4, 4: 2, 5: 4}
    assert {n: plan.modules[n].bits for n in ("embeddings.word_embeddings", "embeddings.position_embeddings",
                                              "embeddings.token_type_embeddings", "pooler.dense", "classifier")} == \
        {"embeddings.word_embeddings": 2, "embeddings.position_embeddings": 4, "embeddings.token_type_embeddings": 8,
         "pooler.dense": 4, "classifier": 4}
    assert "L1,3,5" in note and "4-bit position emb." in note and "4-bit pooler" in note
    bert_base, _ = peers.ours_plan(peers.OURS["ours-mp23-e2"], shapes, 6, None)  # no Hessian: first half
    assert _layer_bits(bert_base) == {0: 3, 1: 3, 2: 3, 3: 2, 4: 2, 5: 2}
    assert bert_base.modules["pooler.dense"].bits == 4
    with pytest.raises(ValueError, match="position bits 1"):
        peers.Ours("bad", 2, 4, position_bits=1)


def test_mp_plan_refuses_a_sensitivity_of_another_model(peers):
    from qbert_edge.errors import QbertEdgeError

    sens = _sensitivity([1.0, 2.0], _shapes(2, hidden=64))
    with pytest.raises(QbertEdgeError, match="different model"):
        peers.ours_plan(peers.OURS["ours-mp23"], _shapes(2), 2, sens)


def test_plan_digest_names_plan_and_method(peers):
    from peer_models import plan_digest

    shapes = _shapes(2)
    sens = _sensitivity([1.0, 2.0], shapes)
    a, _ = peers.ours_plan(peers.OURS["ours-mp23"], shapes, 2, sens, high_layers=1)
    b, _ = peers.ours_plan(peers.OURS["ours-mp23"], shapes, 2, None)  # 3-bit L0 instead of L1
    assert plan_digest(a) == plan_digest(a, 0, 1e-3)  # lr means nothing without QAT
    assert len({plan_digest(a), plan_digest(b), plan_digest(a, 80, 5e-5), plan_digest(a, 80, 2e-5)}) == 4


def test_plan_digests_are_pinned(peers):
    """A changed digest renames every cached file: DirectQ names must stay, QAT ones changed on
    purpose when batches became length-grouped (before: bb1477e7)."""
    from peer_models import plan_digest

    a, _ = peers.ours_plan(peers.OURS["ours-w4"], _shapes(2), 2, None)
    assert (plan_digest(a), plan_digest(a, 80, 5e-5)) == ("a2db9902", "bebb9af5")


def test_pareto_and_spread(peers):
    assert peers.pareto([(1, 0.5), (2, 0.9), (3, 0.8)]) == [0, 1]
    assert peers.pareto([(1, 0.9), (2, 0.5)]) == [0]
    assert peers.spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}


def test_targets_met_and_not_met(peers):
    rows = [
        _row(peers, "ort-int8", "peer", 0.80, 30.0, 40.0, "plain-ort"),
        _row(peers, "ort-4b32", "peer", 0.79, 20.0, 30.0, "plain-ort"),
        _row(peers, "ours-mp23", "ours", 0.81, 9.0, 19.0),  # 3.33x file, 2.1x share, +1 pt: met
        _row(peers, "ours-mp24", "ours", 0.78, 9.0, 19.0),  # less accurate: not met
        _row(peers, "ours-mp24-e2", "ours", 0.78, 11.0, 19.0),  # 2.7x file, less accurate: not met
    ]
    lines = peers.targets(rows)
    assert "MET" in lines[0] and "NOT" not in lines[0]
    assert "NOT met (accuracy)" in lines[1]
    assert lines[2] == "- ours-mp23-e2: not measured"
    assert "NOT met (accuracy, file)" in lines[3]
    assert lines[4] == "- size/DRAM/accuracy target: MET by ours-mp23"
    assert "dominated by ours-mp23" in lines[5]
    assert len(lines) == 6 and not any("paired" in line or "resolution" in line for line in lines)
    rows[2]["accuracy"] = 0.70
    lines = peers.targets(rows)
    assert lines[4] == "- size/DRAM/accuracy target: NOT met by any MP variant of ours"
    assert lines[5] == "- ort-4b32 (20.0 MB, acc 0.790): NOT dominated by any of ours"


def test_targets_add_the_paired_comparison(peers):
    rows = _with_correct([
        _row(peers, "ort-int8", "peer", 0.80, 30.0, 40.0, "plain-ort"),
        _row(peers, "ort-4b32", "peer", 0.79, 20.0, 30.0, "plain-ort"),
        _row(peers, "ours-mp23", "ours", 0.81, 9.0, 19.0),  # 1 vs 0 discordant: p = 2 / 2**1
        _row(peers, "ours-mp24", "ours", 0.70, 9.0, 19.0),  # 0 vs 10: p = 2 / 2**10
    ])
    lines = peers.targets(rows)
    # Wald: -0.10 +- 1.96 * sqrt(10 - 10**2 / 100) / 100 = -0.10 +- 0.0588
    assert lines[1] == ("- ours-mp24 vs ORT int8: accuracy -10.0 pt (paired: 0 vs 10 discordant, McNemar p 0.002, "
                        "95% CI -15.9..-4.1 pt), 3.33x smaller file, 2.11x smaller model share -> NOT met (accuracy) "
                        "(needs >= 0 pt, >= 3x, >= 2x)")
    assert lines[0].startswith("- ours-mp23 vs ORT int8: accuracy +1.0 pt (paired: 1 vs 0 discordant, McNemar p 1, "
                               "95% CI -1.0..+3.0 pt), ") and lines[0].endswith("-> MET (needs >= 0 pt, >= 3x, >= 2x)")
    assert lines[4] == "- size/DRAM/accuracy target: MET by ours-mp23"
    assert lines[5] == ("- rt:dev resolution, MP variants of ours vs ORT int8: not distinguishable on rt:dev "
                        "(McNemar p >= 0.05): ours-mp23; distinguishable (p < 0.05): ours-mp24")
    assert lines[6].startswith("- ort-4b32 (20.0 MB, acc 0.790): dominated by ours-mp23 (+2.0 pt, paired: 2 vs 0 "
                               "discordant, McNemar p 0.5, 95% CI ")
    assert lines[7] == ("- rt:dev resolution, ours vs ORT 4-bit: not distinguishable on rt:dev (McNemar p >= 0.05): "
                        "ours-mp23 vs ort-4b32")
    rows[2] = {**rows[2], "accuracy": 0.75, "correct": "1" * 75 + "0" * 25}
    lines = peers.targets(rows)
    assert lines[6].startswith("- ort-4b32 (20.0 MB, acc 0.790): NOT dominated by any of ours; most accurate smaller "
                               "one: ours-mp23 (-4.0 pt, paired: 0 vs 4 discordant, McNemar p 0.12, 95% CI ")


def test_accuracy_cache_keeps_the_sentences_and_rebuilds_a_v1_cache(peers, tmp_path, monkeypatch):
    import json

    import numpy as np

    model, cache = tmp_path / "m.onnx", tmp_path / "accuracy.json"
    model.write_bytes(b"x")
    stamp = f"m.onnx:1:{int(model.stat().st_mtime)}"
    cache.write_text(json.dumps({"format": peers.FORMAT + "-accuracy", "version": 1, "files": {stamp: 0.5}}))
    monkeypatch.setattr(peers, "correctness", lambda *a: np.array([True, False, True, True]))
    variant = peers.ALL_VARIANTS[0]
    assert peers.cached_accuracy(variant, model, [], 1, cache) == {"accuracy": 0.75, "correct": "1011"}
    data = json.loads(cache.read_text())
    assert data["version"] == 2 and data["files"] == {stamp: {"accuracy": 0.75, "correct": "1011"}}
    monkeypatch.setattr(peers, "correctness", lambda *a: pytest.fail("cached: not run again"))
    assert peers.cached_accuracy(variant, model, [], 1, cache)["correct"] == "1011"


def test_only_the_row_of_the_engine_that_scored_keeps_the_sentences(peers, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(peers, "wait_for_idle", lambda *a: 0.5)
    figures = {"latency_p50": 1.0, "file_mb": 1.0, "peak_mb": 1.0, "share_mb": 1.0}
    monkeypatch.setattr(peers, "measure_process", lambda *a: {b: figures for b in peers.BATCHES})
    variant = next(v for v in peers.ALL_VARIANTS if v.key == "ours-mp23")
    args = SimpleNamespace(deadline=None, repeats=1, bert_base_repeats=1, idle_cpu=1.0, max_wait=0)
    rows = []
    peers.measure_variants("minilm", [variant], {"ours-mp23": None}, args,
                           {"ours-mp23": {"accuracy": 0.5, "correct": "10"}}, rows)
    assert [(r["engine"], r["accuracy"], r.get("correct")) for r in rows] == [("ort", 0.5, "10"), ("ort-custom", 0.5, None)]


def test_one_process_per_repeat_measures_every_batch(peers, monkeypatch):
    from types import SimpleNamespace

    calls = []

    def fake(variant, engine, path, args):
        calls.append(engine)
        return {b: {"latency_p50": float(b * len(calls)), "file_mb": 1.0, "peak_mb": 2.0, "share_mb": 1.0} for b in peers.BATCHES}

    monkeypatch.setattr(peers, "wait_for_idle", lambda *a: 0.5)
    monkeypatch.setattr(peers, "measure_process", fake)
    variant = next(v for v in peers.ALL_VARIANTS if v.key == "ort-int8")
    args = SimpleNamespace(deadline=None, repeats=3, bert_base_repeats=2, idle_cpu=1.0, max_wait=0)
    for model, n in (("minilm", 3), ("bert-base", 2)):
        calls.clear()
        rows = []
        peers.measure_variants(model, [variant], {"ort-int8": None}, args, {}, rows)
        assert calls == ["plain-ort"] * n and len(rows[0]["loadavg"]) == n
        assert rows[0]["figures"]["b8"]["latency_p50"] == peers.spread([8.0 * (i + 1) for i in range(n)])


def test_runs_per_batch_and_engine(peers):
    assert [peers.runs_per_batch(e, b, 10) for e in ("ort", "ort-custom") for b in (1, 8)] == [10, 3, 2, 2]


def test_targets_without_int8(peers):
    assert peers.targets([]) == ["- not checked: no MiniLM ORT int8 row with accuracy in this run"]


def test_speed_lines_say_by_how_much_and_why(peers):
    rows = [_row(peers, "ort-int8", "peer", 0.8, 30.0, 40.0, "plain-ort", p50=40.0),
            _row(peers, "ours-mp23", "ours", 0.8, 9.0, 19.0, "ort", p50=100.0),
            _row(peers, "ours-w8", "ours", 0.8, 9.0, 19.0, "ort", p50=20.0),
            _row(peers, "ours-w4", "ours", 0.8, 9.0, 19.0, "ort-custom", p50=4000.0)]
    lines = peers.speed_lines(rows)
    mp23 = next(line for line in lines if line.startswith("| ours-mp23 "))
    assert "| 2.5x slower | 2.5x slower |" in mp23 and "3-bit codes widened to 4" in mp23 and "MatMulNBits 4-bit" in mp23
    w8 = next(line for line in lines if line.startswith("| ours-w8 "))
    assert "2.0x faster" in w8 and "widened" not in w8 and "MatMulNBits" not in w8 and "u8 x u8 MatMulIntegerToFloat" in w8
    assert "100.0x slower" in next(line for line in lines if line.startswith("| ours-w4 "))


def test_plan_digest_names_the_distillation(peers):
    from peer_models import plan_digest

    from qbert_edge.distill import DistillConfig

    a, _ = peers.ours_plan(peers.OURS["ours-w4-e4"], _shapes(2), 2, None)
    assert a.modules["embeddings.word_embeddings"].bits == 4 and a.modules["embeddings.position_embeddings"].bits == 8
    plain = plan_digest(a, 240, 5e-5)
    assert plan_digest(a, 240, 5e-5, None) == plain  # files made before distillation keep their names
    kd = {plan_digest(a, 240, 5e-5, DistillConfig(0.5, 2.0)), plan_digest(a, 240, 5e-5, DistillConfig(0.9, 2.0)),
          plan_digest(a, 240, 5e-5, DistillConfig(0.5, 4.0))}
    assert len(kd) == 3 and plain not in kd
    assert plan_digest(a, 0, 5e-5, DistillConfig()) == plan_digest(a)  # DirectQ does not distil


def test_steps_and_lr_per_key(peers):
    from qbert_edge.errors import QbertEdgeError

    assert peers.parse_per_key(["ours-w4-e4=240", "ours-w8=0"], "--steps-for") == {"ours-w4-e4": 240, "ours-w8": 0}
    assert peers.parse_per_key(["ours-mp24-e2=2e-4"], "--lr-for", float) == {"ours-mp24-e2": 2e-4}
    for bad in ("ours-w5=10", "ours-w4", "ours-w4=x", "ours-w4=-1", "ours-w4=1.5"):
        with pytest.raises(QbertEdgeError, match="--steps-for"):
            peers.parse_per_key([bad], "--steps-for")
    for bad in ("ours-w4=0", "ours-w4=-1e-4", "ours-w4=fast"):
        with pytest.raises(QbertEdgeError, match="--lr-for"):
            peers.parse_per_key([bad], "--lr-for", float)


def test_a_bad_per_key_flag_is_a_usage_error(peers, capsys):
    for flag in ("--steps-for", "--lr-for"):
        with pytest.raises(SystemExit) as exc:
            peers.main([flag, "ours-w4=x", "--report-only"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and err[-1].endswith(f"{flag} ours-w4=x: expected KEY={'N' if 'steps' in flag else 'LR'} "
                                                        f"with KEY one of {', '.join(peers.OURS)}")


def test_mse_ranges_change_the_plan_the_note_and_the_digest(peers):
    from peer_models import plan_digest

    plain, note = peers.ours_plan(peers.OURS["ours-mp24-e2"], _shapes(2), 2, None)
    clipped, clipped_note = peers.ours_plan(peers.OURS["ours-mp24-e2"], _shapes(2), 2, None, clip="mse")
    assert {q.clip for q in plain.modules.values()} == {"minmax"} and "mse" not in note
    assert {q.clip for q in clipped.modules.values()} == {"mse"} and clipped_note.endswith("mse ranges")
    assert plan_digest(plain, 240, 5e-5) != plan_digest(clipped, 240, 5e-5)


def test_labels_of_coinciding_points_are_stacked(peers):
    assert peers.label_offsets([(15.0, 0.820), (14.8, 0.820), (91.0, 0.826), (15.0, 0.820)]) == [0.0, -9.0, 0.0, -18.0]
    assert peers.label_offsets([(7.0, 0.77), (23.0, 0.82)]) == [0.0, 0.0]


def test_plan_digest_names_the_qat_seed(peers):
    from peer_models import plan_digest

    a, _ = peers.ours_plan(peers.OURS["ours-w4-e4"], _shapes(2), 2, None)
    assert plan_digest(a, 240, 5e-5, None, 0) == plan_digest(a, 240, 5e-5)  # seed 0 keeps the older files' names
    assert len({plan_digest(a, 240, 5e-5, None, s) for s in (0, 1, 2)}) == 3
    assert plan_digest(a, 0, 5e-5, None, 3) == plan_digest(a)  # DirectQ has no seed


def test_a_missing_builder_module_fails_at_once_naming_the_extra(peers, monkeypatch):
    import peer_models

    monkeypatch.setitem(peer_models.NEEDS, "surely_not_installed_qbert_module", "bench")
    with pytest.raises(SystemExit, match=r"missing surely_not_installed_qbert_module: pip install -e '\.\[bench\]'"):
        peer_models.check_installed()


@pytest.mark.parametrize("workers", [1, 2])
def test_quantize_many_builds_every_job_in_order_and_skips_late_ones(peers, tmp_path, tiny_tokenizer, workers):
    import time

    from conftest import make_tiny_bert
    from peer_models import quantize_many

    from qbert_edge.checkpoint import load_quantized
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes

    model = make_tiny_bert()
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save(str(tmp_path / "tiny" / "tokenizer.json"))
    plan = uniform_plan(quantizable_shapes(model), 2, 4, clip="mse")
    jobs = [{"out": tmp_path / f"m{i}.pt", "plan": plan, "qat_steps": steps, "lr": 1e-3, "distill": None, "seed": 0}
            for i, steps in enumerate((2, 0))]
    assert quantize_many(tmp_path / "tiny", jobs, workers) == [tmp_path / "m0.pt", tmp_path / "m1.pt"]
    assert load_quantized(tmp_path / "m0.pt").meta["method"] == "qat"
    assert load_quantized(tmp_path / "m1.pt").meta["method"] == "directq"
    late = [{**jobs[0], "out": tmp_path / "late.pt"}]
    assert quantize_many(tmp_path / "tiny", late, workers, until=time.time() - 1) == []


def test_wait_for_idle_returns_the_load_and_never_waits_past_max_wait(peers):
    import time

    t = time.time()
    load = peers.wait_for_idle(busy=0.0, max_wait=0)  # nothing is ever < 0% busy: one sample, then give up
    assert isinstance(load, float) and time.time() - t < 5


def test_markdown_header_names_the_idle_test_of_old_and_new_runs(peers):
    meta = {"partial": False, "command": "c", "date": "d", "seconds": 1.0, "machine": "x86_64", "cpus": 2, "threads": 2,
            "mem_gb": 1, "python": "3", "onnxruntime": "1", "torch": "2", "loadavg_start": 0.1, "loadavg_end": 0.2,
            "max_wait": 30.0, "idle_cpu": 0.25}
    assert "for the CPUs to be < 25% busy" in peers.markdown([], meta, [])
    old = {k: v for k, v in meta.items() if k != "idle_cpu"} | {"idle_load": 2.5}
    assert "for load < 2.5" in peers.markdown([], old, [])


def test_accuracy_plots_draw_95_percent_intervals_from_the_sentences(peers, tmp_path, monkeypatch):
    import matplotlib.axes

    bars = []
    real = matplotlib.axes.Axes.errorbar
    def errorbar(ax, x, y, yerr=None, **kw):
        if yerr is not None:  # the latency bars' xerr comes through here too
            bars.append((y, yerr))
        return real(ax, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    rows = _with_correct([_row(peers, "ort-int8", "peer", 0.8, 30.0, 40.0, "plain-ort"),
                          _row(peers, "ours-mp24-e2", "ours", 0.5, 10.0, 20.0)], n=400)
    rows.append(_row(peers, "ours-w4", "ours", 0.7, 12.0, 20.0))  # no sentences kept (an old peers.json): no bar
    assert peers.plot(rows, tmp_path)[:2] == ["peers_acc_size.png", "peers_acc_dram.png"]
    expected = [(0.8, 1.96 * (0.8 * 0.2 / 400) ** 0.5), (0.5, 1.96 * (0.25 / 400) ** 0.5)]
    assert bars == expected * 2  # both plots, one bar per row with sentences


def test_torch_child_measures_each_batch_in_one_process(peers, tmp_path, monkeypatch):
    import torch
    from conftest import make_tiny_bert

    monkeypatch.setattr(peers, "SEQ_LEN", 16)  # the tiny BERT's positions
    path = tmp_path / "tiny.pth"
    torch.save(make_tiny_bert(), path)
    small, big = peers.measure_torch(path, [(1, 2), (4, 2)], warmup=1, threads=1)
    assert small["file_mb"] == big["file_mb"] == path.stat().st_size / 1e6
    assert big["peak_mb"] >= small["peak_mb"] > small["share_mb"] > 0 and small["latency_p50"] > 0


def test_a_damaged_accuracy_cache_is_started_afresh(peers, tmp_path, monkeypatch):
    import numpy as np

    cache, model = tmp_path / "accuracy.json", tmp_path / "m.onnx"
    model.write_bytes(b"x")
    monkeypatch.setattr(peers, "correctness", lambda *a: np.array([True, False]))
    for damaged in ('{"format": ', "[1, 2]"):
        cache.write_text(damaged)
        assert peers.cached_accuracy(peers.ALL_VARIANTS[0], model, [], 1, cache) == {"accuracy": 0.5, "correct": "10"}
        assert json.loads(cache.read_text())["version"] == peers.ACCURACY_CACHE_VERSION


def test_minilm_files_live_in_a_folder_named_by_the_classifier(peers, tmp_path, monkeypatch):
    monkeypatch.setenv("QBERT_EDGE_CACHE", str(tmp_path))
    marker = tmp_path / "minilm-rt" / "reference.json"
    marker.parent.mkdir()
    marker.write_text('{"dev": {"accuracy": 0.81}}')
    first = peers.reference_folder()
    assert first.startswith("minilm-rt-") and first == peers.reference_folder()
    marker.write_text('{"dev": {"accuracy": 0.83}}')  # fine-tuned again
    assert peers.reference_folder() != first
