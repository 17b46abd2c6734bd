"""Bit allocation from Omega: top-K layers, average-bits and size targets, module-level choices."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_edge.allocate import (
    MB,
    Scheme,
    allocate_bits,
    encoder_avg_bits,
    encoder_bytes,
    module_bytes,
)
from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import (
    ATTENTION_LINEARS,
    FFN_LINEARS,
    LAYER_LINEARS,
    ModuleQuant,
    Plan,
)
from qbert_edge.sensitivity import LayerSensitivity, Sensitivity

# Omega by layer (|mean| + std): layer 3 is the most sensitive, then 0, 5, 1, 4, 2.
EIGS = {0: (8.0, 10.0), 1: (3.0, 3.0), 2: (-0.5, -0.7), 3: (20.0, 24.0), 4: (1.0, 1.5), 5: (-6.0, -5.0)}
ORDER = [3, 0, 5, 1, 4, 2]


def minilm_shapes(layers: int = 6, hidden: int = 384, inter: int = 1536) -> dict:
    shapes = {
        "embeddings.word_embeddings": (30522, hidden),
        "embeddings.position_embeddings": (512, hidden),
        "embeddings.token_type_embeddings": (2, hidden),
        "pooler.dense": (hidden, hidden),
        "classifier": (2, hidden),
    }
    for i in range(layers):
        for s in LAYER_LINEARS:
            shapes[f"encoder.layer.{i}.{s}"] = {
                "intermediate.dense": (inter, hidden), "output.dense": (hidden, inter)
            }.get(s, (hidden, hidden))
    return shapes


def make_sens(eigs=EIGS, shapes=None) -> Sensitivity:
    layers = tuple(LayerSensitivity(i, e, (True,) * len(e), (4,) * len(e)) for i, e in eigs.items())
    return Sensitivity("m", "rt:train", len(eigs), layers, shapes or minilm_shapes(len(eigs)))


def layer_bits(plan: Plan) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for name, q in plan.modules.items():
        if name.startswith("encoder.layer."):
            out.setdefault(int(name.split(".")[2]), set()).add(q.bits)
    return out


def test_ranking_follows_omega():
    assert make_sens().ranking() == ORDER


@pytest.mark.parametrize("k", range(7))
def test_top_k_layers_get_the_high_width(k):
    plan = allocate_bits(make_sens(), "2/3", high_layers=k)
    bits = layer_bits(plan)
    assert {i for i, b in bits.items() if b == {3}} == set(ORDER[:k])
    assert {i for i, b in bits.items() if b == {2}} == set(ORDER[k:])
    assert plan.meta["high_layers"] == k and plan.meta["scheme"] == "2/3"


def test_reasons_name_omega_and_rank():
    sens = make_sens()
    plan = allocate_bits(sens, "2/4", high_layers=2)
    why = plan.modules["encoder.layer.3.attention.self.key"].reason
    assert "rank 1 of 6" in why and f"omega={sens.layer(3).omega:.4g}" in why and "top 2 layers get 4 bits" in why
    assert "rank 6 of 6" in plan.modules["encoder.layer.2.output.dense"].reason


def test_groups_embeddings_and_head():
    plan = allocate_bits(make_sens(), "2/3", high_layers=1, groups=128, word_bits=4, position_bits=None)
    assert plan.modules["encoder.layer.0.attention.self.query"].groups == 128
    assert plan.modules["encoder.layer.0.intermediate.dense"].groups == 128
    assert plan.modules["embeddings.word_embeddings"].bits == 4
    assert "embeddings.position_embeddings" not in plan.modules  # fp32
    assert plan.modules["classifier"].bits == 8 and plan.modules["classifier"].groups == 2
    assert plan.modules["embeddings.token_type_embeddings"].bits == 8


def test_module_bytes_counts_packed_codes_scales_and_zeros():
    q = ModuleQuant(bits=3, groups=128, shape=(384, 384))
    assert module_bytes(q) == 384 * 384 * 3 // 8 + 128 * (4 + 1)
    assert module_bytes(ModuleQuant(bits=3, groups=1, shape=(1, 3))) == 2 + 5  # 9 bits -> 2 bytes


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=1.0, max_value=12.0))
def test_budget_is_met_never_exceeded_and_maximal(budget):
    sens = make_sens()
    smallest = encoder_bytes(allocate_bits(sens, "2/4", high_layers=0))
    if smallest > budget * MB:
        with pytest.raises(QbertEdgeError, match="too small"):
            allocate_bits(sens, "2/4", budget_mb=budget)
        return
    plan = allocate_bits(sens, "2/4", budget_mb=budget)
    k = plan.meta["high_layers"]
    assert encoder_bytes(plan) <= budget * MB
    if k < 6:  # one more high layer would not fit
        assert encoder_bytes(allocate_bits(sens, "2/4", high_layers=k + 1)) > budget * MB
    assert {i for i, b in layer_bits(plan).items() if b == {4}} == set(ORDER[:k])


def test_avg_bits_target():
    sens = make_sens()
    plan = allocate_bits(sens, "2/3", avg_bits=2.5)
    assert plan.meta["high_layers"] == 3 and encoder_avg_bits(plan) == pytest.approx(2.5)
    plan = allocate_bits(sens, "2/3", avg_bits=2.4)
    assert plan.meta["high_layers"] == 2 and encoder_avg_bits(plan) <= 2.4
    assert allocate_bits(sens, "2/3", avg_bits=8).meta["high_layers"] == 6
    with pytest.raises(QbertEdgeError, match="average of 2.5 bits is impossible with scheme 3/4"):
        allocate_bits(sens, "3/4", avg_bits=2.5)


def test_impossible_budget_fails_clearly():
    sens = make_sens()
    with pytest.raises(QbertEdgeError, match=r"budget of 0.5 MB is too small for scheme 2/3: .* 2.6\d* MB"):
        allocate_bits(sens, "2/3", budget_mb=0.5)
    with pytest.raises(QbertEdgeError, match="too small for scheme 4"):
        allocate_bits(sens, "4", budget_mb=3.0)
    assert allocate_bits(sens, "4", budget_mb=6.0).meta["encoder_bytes"] <= 6.0 * MB


def test_attention_and_ffn_bits():
    sens = make_sens()
    plan = allocate_bits(sens, "2/4", high_layers=2, attention_bits=8)
    for i in range(6):
        for s in ATTENTION_LINEARS:
            assert plan.modules[f"encoder.layer.{i}.{s}"].bits == 8
        for s in FFN_LINEARS:
            assert plan.modules[f"encoder.layer.{i}.{s}"].bits == (4 if i in ORDER[:2] else 2)
    assert "attention bits fixed at 8" in plan.modules["encoder.layer.0.attention.self.query"].reason
    plan = allocate_bits(sens, "4", attention_bits=2, ffn_bits=4)  # Table 4b style
    assert plan.modules["encoder.layer.1.attention.output.dense"].bits == 2
    assert plan.modules["encoder.layer.1.output.dense"].bits == 4
    with pytest.raises(QbertEdgeError, match="nothing left to decide"):
        allocate_bits(sens, "2/3", high_layers=1, attention_bits=2, ffn_bits=3)


@pytest.mark.parametrize(
    "scheme,match",
    [("3/2", "lower width first"), ("1", "2..8"), ("2/2", "are equal"), ("two", "expected bits"), ("2/9", "2..8")],
)
def test_bad_schemes(scheme, match):
    with pytest.raises(QbertEdgeError, match=match):
        Scheme.parse(scheme)


def test_bad_requests():
    sens = make_sens()
    with pytest.raises(QbertEdgeError, match="say how many layers"):
        allocate_bits(sens, "2/3")
    with pytest.raises(QbertEdgeError, match="at most one"):
        allocate_bits(sens, "2/3", high_layers=2, budget_mb=5)
    with pytest.raises(QbertEdgeError, match="out of range 0..6"):
        allocate_bits(sens, "2/3", high_layers=7)
    partial = make_sens({i: EIGS[i] for i in range(3)}, shapes=minilm_shapes(6))
    partial = Sensitivity("m", "d", 6, partial.layers, minilm_shapes(6))
    with pytest.raises(QbertEdgeError, match=r"layers \[3, 4, 5\] were not analysed"):
        allocate_bits(partial, "2/3", high_layers=1)


def test_cli_allocate(tmp_path, capsys):
    from qbert_edge.cli import main

    sens_path = tmp_path / "sens.json"
    make_sens().save(sens_path)
    out = tmp_path / "plan.json"
    main(["allocate", str(sens_path), "--scheme", "2/3", "--budget-mb", "3.2", "--word-bits", "4",
          "--position-bits", "fp32", "-o", str(out)])
    plan = Plan.load(out)
    assert encoder_bytes(plan) <= 3.2 * MB
    assert plan.modules["embeddings.word_embeddings"].bits == 4
    assert json.loads(out.read_text())["meta"]["sensitivity"] == str(sens_path)
    assert "L3:3" in capsys.readouterr().out
    assert {q.clip for q in plan.modules.values()} == {"minmax"}
    main(["allocate", str(sens_path), "--scheme", "2/4", "--high-layers", "1", "--clip", "mse", "-o", str(out)])
    assert {q.clip for q in Plan.load(out).modules.values()} == {"mse"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["allocate", str(sens_path), "--scheme", "2/3", "--budget-mb", "1", "-o", str(tmp_path / "p2.json")])
    assert exc.value.code == 2
    assert "budget of 1 MB is too small" in capsys.readouterr().err
    assert not (tmp_path / "p2.json").exists()
