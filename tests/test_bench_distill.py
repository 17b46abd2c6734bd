"""benchmarks/distill.py: the pure parts (run specs, target checks, report); no model is built."""

import pytest
from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def distill():
    return load_script(ROOT / "benchmarks" / "distill.py", "bench_distill")


def test_run_specs(distill):
    from qbert_edge.errors import QbertEdgeError

    assert distill.parse_spec("ours-w4-e4:240:kd") == ("ours-w4-e4", 240, True)
    assert distill.parse_spec("ours-mp24-e2:80") == ("ours-mp24-e2", 80, False)
    for bad in ("ours-w4-e4", "ours-w5:10", "ours-w4:0", "ours-w4:10:xx", "ours-w4:ten"):
        with pytest.raises(QbertEdgeError, match="run spec"):
            distill.parse_spec(bad)


def _row(key, acc, mb, kd=True):
    return {"key": key, "label": key, "qat_steps": 240, "lr": 5e-5, "accuracy": acc, "file_mb": mb, "file": key,
            "distill": {"alpha": 0.5, "temperature": 2.0} if kd else None, "training": None, "command": "c"}


REFS = {"ort-int8": {"accuracy": 0.816, "file_mb": 23.3}, "ort-4b32-g": {"accuracy": 0.820, "file_mb": 15.0},
        "ort-4b128-g": {"accuracy": 0.811, "file_mb": 12.6}}


def test_targets(distill):
    lines = distill.targets([_row("ours-w4-e4", 0.815, 12.1), _row("ours-mp24-e2", 0.817, 7.4, kd=False),
                             _row("ours-mp23-e2", 0.817, 8.0)], REFS)
    assert "ort-4b32-g (15.0 MB, 0.820): no" in lines[0] and "ort-4b128-g (12.6 MB, 0.811): yes" in lines[0]
    assert "3.15x smaller" in lines[1] and "MET" in lines[1] and "plain QAT" in lines[1]
    assert "not met" in lines[2]  # accurate enough but 2.91x


def test_markdown_lists_rows_and_peers_flags(distill):
    text = distill.markdown({"rows": [_row("ours-w4-e4", 0.821, 12.1)], "references": REFS, "machine": "m",
                             "dev_examples": 854})
    assert "854 sentences" in text and "| ORT quantize_dynamic int8 per-channel |" in text
    assert "| ours-w4-e4 | - | 240 |" in text  # a row without a plan note
    row = {**_row("ours-mp24-e2", 0.8, 7.7), "plan": "4-bit L0-2: top 3 of 6 by Hessian Omega, mse ranges; distilled (alpha 0.5, T 2)"}
    assert "| ours-mp24-e2 | 4-bit L0-2: top 3 of 6 by Hessian Omega | 240 |" in distill.markdown({**{"rows": [row]}, "references": REFS,
                                                                                                   "machine": "m"})
    assert ("`python benchmarks/peers.py --steps-for ours-w4-e4=240 --lr-for ours-w4-e4=5e-05 --distill ours-w4-e4 "
            "--distill-alpha 0.5 --distill-temperature 2`") in text


def test_peers_flags_name_only_this_variant(distill):
    plain = {"key": "ours-w4-e4", "qat_steps": 240, "lr": 5e-5, "distill": None}
    kd = {"key": "ours-mp24-e2", "qat_steps": 240, "lr": 5e-5, "distill": {"alpha": 1.0, "temperature": 1.0}}
    assert distill.peers_flags(plain) == "--steps-for ours-w4-e4=240 --lr-for ours-w4-e4=5e-05"
    assert distill.peers_flags(kd) == (
        "--steps-for ours-mp24-e2=240 --lr-for ours-mp24-e2=5e-05 --distill ours-mp24-e2 --distill-alpha 1 --distill-temperature 1")


def test_rows_with_mse_ranges_or_a_seed_name_them_and_their_peers_flags(distill):
    row = {"key": "ours-mp24-e2", "qat_steps": 240, "lr": 5e-5, "distill": None, "clip": "mse", "seed": 2}
    assert distill._ranges(row) == ", mse ranges, seed 2"
    assert distill.peers_flags(row) == "--steps-for ours-mp24-e2=240 --lr-for ours-mp24-e2=5e-05 --clip mse --seed 2"
    old = {"key": "ours-mp24-e2", "qat_steps": 240, "lr": 5e-5, "distill": None}  # a row from before clip and seed
    assert distill._ranges(old) == "" and distill.peers_flags(old) == "--steps-for ours-mp24-e2=240 --lr-for ours-mp24-e2=5e-05"


def test_run_one_scores_from_the_accuracy_cache_beside_the_files(distill, tmp_path, monkeypatch):
    from types import SimpleNamespace

    folder = tmp_path / "minilm-rt-0123abcd"
    folder.mkdir()
    paths = {k: folder / f"{k}.onnx" for k in ("ours-w4-e4", *distill.REFERENCES)}
    for p in paths.values():
        p.write_bytes(b"x" * 1000)
    caches = []

    def scored(variant, path, batches, threads, cache):
        caches.append(cache)
        return {"accuracy": 0.8, "correct": "10"}

    monkeypatch.setattr(distill.peers, "build", lambda *a, **k: (paths, {"ours-w4-e4": "w4"}))
    monkeypatch.setattr(distill.peers, "dev_batches", lambda tokenizer: [])
    monkeypatch.setattr(distill.peers, "cached_accuracy", scored)
    monkeypatch.setattr("qbert_edge.loading.load_model", lambda name: SimpleNamespace(tokenizer=None))
    args = SimpleNamespace(workdir=tmp_path, lr=5e-5, high_layers=2, clip="minmax", seed=0, threads=1,
                           distill_alpha=0.5, distill_temperature=2.0, distill_hidden=0.0,
                           argv_for=lambda key, steps, kd: [f"{key}:{steps}"])
    row, refs = distill.run_one("ours-w4-e4", 80, False, args)
    assert row["accuracy"] == 0.8 and refs["ort-int8"] == {"accuracy": 0.8, "file_mb": 0.0}
    assert set(caches) == {folder / "accuracy.json"}
