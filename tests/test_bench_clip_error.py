"""benchmarks/clip_error.py on hand-made weights: MSE ranges never lose, and win at 2 bits."""

import torch
from conftest import ROOT, load_script


def _module():
    return load_script(ROOT / "benchmarks" / "clip_error.py", "bench_clip_error")


def test_errors_per_kind_of_matrix():
    clip_error = _module()
    torch.manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 1.0)
    weights = {f"encoder.layer.{i}.attention.self.query": laplace.sample((256, 32)) for i in range(2)}
    weights["embeddings.word_embeddings"] = laplace.sample((50, 32))
    two = clip_error.clip_errors(weights, 2)
    assert set(two) == {"attention.self.query", "embeddings.word_embeddings"}
    for r in two.values():
        assert r["mse"] < r["minmax"] and r["ratio"] > 1.2 and 0.25 <= r["median_shrink"] < 1.0
    eight = clip_error.clip_errors(weights, 8)
    assert all(r["mse"] <= r["minmax"] * (1 + 1e-6) for r in eight.values())
    assert "| 2 | attention.self.query |" in clip_error.markdown(
        {"command": "c", "date": "d", "seconds": 1.0, "machine": "m", "model": "x", "bits": {"2": two}})
