import json

import pytest

from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import ModuleQuant, Plan, groups_for, uniform_plan

SHAPES = {
    "embeddings.word_embeddings": (100, 32),
    "embeddings.position_embeddings": (64, 32),
    "embeddings.token_type_embeddings": (2, 32),
    "encoder.layer.0.attention.self.query": (32, 32),
    "encoder.layer.0.intermediate.dense": (64, 32),
    "encoder.layer.1.output.dense": (32, 64),
    "pooler.dense": (32, 32),
    "classifier": (2, 32),
}


def test_round_trips_through_json(tmp_path):
    plan = uniform_plan(SHAPES, 3, groups=8, embedding_bits={"word": 4, "position": 8, "token_type": None})
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "qbert-edge/plan" and data["version"] == 2
    assert Plan.load(path) == plan
    assert "embeddings.token_type_embeddings" not in plan.modules
    assert plan.modules["embeddings.word_embeddings"].bits == 4
    assert plan.modules["embeddings.word_embeddings"].groups == 100  # one group per row
    assert plan.modules["classifier"].groups == 2  # at most one group per row
    assert plan.modules["encoder.layer.0.attention.self.query"].rows_per_group == 4


def test_mixed_bits_by_layer_and_module_kind():
    plan = uniform_plan(SHAPES, 2, layer_bits={1: 3}, module_bits={"intermediate.dense": 4})
    assert plan.modules["encoder.layer.0.attention.self.query"].bits == 2
    assert plan.modules["encoder.layer.0.intermediate.dense"].bits == 4
    assert plan.modules["encoder.layer.1.output.dense"].bits == 3


@pytest.mark.parametrize("bits", [1, 9, 0, 3.5])
def test_bits_out_of_range_names_the_module(bits):
    with pytest.raises(QbertEdgeError, match=r"encoder\.layer\.0\.attention\.self\.query: bits"):
        Plan({"encoder.layer.0.attention.self.query": ModuleQuant(bits=bits, groups=4, shape=(32, 32))})


def test_groups_must_divide_rows():
    with pytest.raises(QbertEdgeError, match=r"encoder\.layer\.0\.output\.dense: groups=5 does not divide its 32 rows"):
        Plan({"encoder.layer.0.output.dense": ModuleQuant(bits=4, groups=5, shape=(32, 64))})


def test_unknown_module_name():
    with pytest.raises(QbertEdgeError, match="unknown module name 'encoder.layer.0.attention.self.qkv'"):
        Plan({"encoder.layer.0.attention.self.qkv": ModuleQuant(bits=4, groups=4, shape=(32, 32))})


def test_check_model_names_missing_module_and_shape():
    plan = uniform_plan({"encoder.layer.5.output.dense": (32, 64)}, 4)
    with pytest.raises(QbertEdgeError, match="encoder.layer.5.output.dense' does not exist"):
        plan.check_model(SHAPES)
    plan = uniform_plan({"encoder.layer.1.output.dense": (32, 32)}, 4)
    with pytest.raises(QbertEdgeError, match="shape"):
        plan.check_model(SHAPES)


def test_only_8_bit_activations():
    with pytest.raises(QbertEdgeError, match="activation_bits"):
        uniform_plan(SHAPES, 4, activation_bits=4)


def test_load_rejects_other_format_and_newer_version(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "qbert-edge/sensitivity", "version": 1}))
    with pytest.raises(QbertEdgeError, match="expected 'qbert-edge/plan'"):
        Plan.load(path)
    path.write_text(json.dumps({"format": "qbert-edge/plan", "version": 99, "modules": {}}))
    with pytest.raises(QbertEdgeError, match="newer"):
        Plan.load(path)
    path.write_text("{not json")
    with pytest.raises(QbertEdgeError, match="not valid JSON"):
        Plan.load(path)


def test_average_bits():
    plan = uniform_plan({"encoder.layer.0.attention.self.query": (32, 32), "encoder.layer.0.output.dense": (32, 32)}, 2,
                        layer_bits=None, module_bits={"output.dense": 4})
    assert plan.weight_bits({"encoder.layer.0.attention.self.query": (32, 32), "encoder.layer.0.output.dense": (32, 32)}) == 3


def test_groups_for():
    assert groups_for(768, 128) == 128
    assert groups_for(2, 128) == 2
    assert groups_for(30, 128) == 30
    assert groups_for(30, 8) == 6


def test_packed_bytes_counts_codes_scales_and_zero_points():
    q = ModuleQuant(bits=3, groups=128, shape=(768, 768))
    assert q.packed_bytes == 768 * 768 * 3 // 8 + 128 * 5


def test_clip_round_trips_and_a_version_1_plan_reads_as_minmax(tmp_path):
    plan = uniform_plan(SHAPES, 2, clip="mse")
    assert {q.clip for q in plan.modules.values()} == {"mse"}
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    data = json.loads(path.read_text())
    data["version"] = 1
    for q in data["modules"].values():
        del q["clip"]
    path.write_text(json.dumps(data))
    assert {q.clip for q in Plan.load(path).modules.values()} == {"minmax"}


def test_unknown_clip_names_the_module():
    with pytest.raises(QbertEdgeError, match=r"encoder\.layer\.0\.output\.dense: clip='percentile' is not one of minmax, mse"):
        Plan({"encoder.layer.0.output.dense": ModuleQuant(bits=4, groups=4, shape=(32, 64), clip="percentile")})
