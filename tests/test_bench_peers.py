"""benchmarks/peers.py: the pure parts (Pareto front, spread, target checks); no model is built."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(peers, key, family, acc, file_mb, share_mb, engine="ort"):
    fig = {k: peers.spread([v]) for k, v in (("file_mb", file_mb), ("share_mb", share_mb), ("latency_p50", 1.0), ("peak_mb", 1.0))}
    return {"model": "minilm", "key": key, "label": key, "family": family, "engine": engine, "accuracy": acc,
            "figures": {"b1": fig, "b8": fig}, "loadavg": [0.5]}


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
    ]
    lines = peers.targets(rows)
    assert "MET" in lines[0] and "NOT" not in lines[0]
    assert "NOT met" in lines[1]
    assert "dominated by ours-mp23" in lines[2]
    rows[2]["accuracy"] = 0.70
    assert "NOT dominated" in peers.targets(rows)[2]


def test_targets_without_int8(peers):
    assert peers.targets([]) == ["- not checked: no MiniLM ORT int8 row with accuracy in this run"]
