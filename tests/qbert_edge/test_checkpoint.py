import pickle

import pytest
import torch

from conftest import TINY_TEXTS, make_tiny_bert
from qbert_edge.checkpoint import LoadedModel, load_quantized, read_checkpoint, save_quantized
from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import uniform_plan
from qbert_edge.qmodel import quantizable_shapes
from qbert_edge.quantize import direct_quantize
from qbert_edge.runtime.text import encode


def quantized(tokenizer, num_labels=2, bits=3):
    model = make_tiny_bert(num_labels=num_labels)
    enc = encode(tokenizer, [t for t, _ in TINY_TEXTS], max_length=16)
    batch = {k: torch.from_numpy(v) for k, v in enc.arrays.items()}
    labels = ["neg", "pos"] if num_labels else []
    loaded = LoadedModel(model=model, tokenizer=tokenizer, labels=labels, name="tiny")
    plan = uniform_plan(quantizable_shapes(model), bits, groups=4, layer_bits={1: 2})
    return direct_quantize(loaded, plan, [batch]), batch


@pytest.mark.parametrize("num_labels", [2, None])
def test_round_trip_gives_the_same_outputs(tmp_path, tiny_tokenizer, num_labels):
    loaded, batch = quantized(tiny_tokenizer, num_labels)
    path = tmp_path / "model.pt"
    save_quantized(loaded, path)
    again = load_quantized(path)
    with torch.no_grad():
        a, b = loaded.model(**batch), again.model(**batch)
    key = "logits" if num_labels else "last_hidden_state"
    assert torch.equal(a[key], b[key])
    assert again.labels == loaded.labels and again.plan == loaded.plan
    assert again.meta["method"] == "directq"
    assert again.tokenizer.encode("a good film").ids == tiny_tokenizer.encode("a good film").ids


def test_file_holds_only_plain_data(tmp_path, tiny_tokenizer):
    loaded, _ = quantized(tiny_tokenizer)
    path = tmp_path / "model.pt"
    save_quantized(loaded, path)
    data = torch.load(path, weights_only=True)  # nothing in it executes code
    w = data["weights"]["encoder.layer.0.attention.self.query"]
    assert w["codes"].dtype == torch.uint8 and int(w["codes"].max()) < 8 and w["bits"] == 3
    assert data["weights"]["encoder.layer.1.output.dense"]["bits"] == 2
    assert "bert.embeddings.LayerNorm.weight" not in data["fp32"] and "embeddings.LayerNorm.weight" in data["fp32"]
    assert "encoder.layer.0.attention.self.query.weight" not in data["fp32"]


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(QbertEdgeError, match="bad.pt: not a"):
        read_checkpoint(bad)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(object()))
    with pytest.raises(QbertEdgeError, match="evil.pt"):
        read_checkpoint(evil)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "version": 1}, other)
    with pytest.raises(QbertEdgeError, match="expected 'qbert-edge/quantized-model'"):
        read_checkpoint(other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "qbert-edge/quantized-model", "version": 2}, newer)
    with pytest.raises(QbertEdgeError, match="newer"):
        read_checkpoint(newer)
    with pytest.raises(QbertEdgeError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pt")


def test_truncated_file(tmp_path, tiny_tokenizer):
    loaded, _ = quantized(tiny_tokenizer)
    path = tmp_path / "model.pt"
    save_quantized(loaded, path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(QbertEdgeError, match="cut.pt"):
        read_checkpoint(cut)
