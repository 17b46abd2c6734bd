"""fp32 fine-tuning on a tiny BERT: the loss goes down, runs repeat, checkpoints land each epoch."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_TEXTS, make_tiny_bert, make_tokenizer

from qbert_edge.data import Dataset, Example
from qbert_edge.errors import QbertEdgeError
from qbert_edge.train import evaluate_torch, fine_tune, linear_schedule, load_checkpoint

TINY = Dataset("tiny", tuple(Example(t, y) for t, y in TINY_TEXTS), ("neg", "pos"))
ARGS = {"lr": 5e-3, "batch_size": 4, "max_length": 16, "progress": False}


def _run(seed=0, epochs=30, model_seed=0, **kw):
    model = make_tiny_bert(seed=model_seed)
    result = fine_tune(model, TINY, make_tokenizer(), epochs=epochs, seed=seed, **{**ARGS, **kw})
    return model, result


def test_fine_tune_lowers_loss_and_learns_tiny_set():
    model, result = _run()
    assert result.steps == 30 * 2 and len(result.losses) == 60 and len(result.epoch_losses) == 30
    assert result.epoch_losses[-1] < 0.5 * result.epoch_losses[0]
    assert not model.training
    metrics, logits = evaluate_torch(model, TINY, make_tokenizer(), batch_size=3, max_length=16)
    assert logits.shape == (8, 2)
    assert metrics.accuracy == 1.0 and metrics.examples == 8


def test_same_seed_repeats_and_other_seed_differs():
    m1, r1 = _run(epochs=3)
    m2, r2 = _run(epochs=3)
    _, r3 = _run(epochs=3, seed=1)
    assert r1.losses == r2.losses
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert r1.losses != r3.losses


def test_checkpoint_each_epoch_loads_back(tmp_path):
    model, result = _run(epochs=3, checkpoint_dir=tmp_path / "ckpt")
    assert [p.name for p in result.checkpoints] == ["epoch-1.safetensors", "epoch-2.safetensors", "epoch-3.safetensors"]
    assert all(p.is_file() for p in result.checkpoints)
    fresh = make_tiny_bert(seed=5)
    meta = load_checkpoint(fresh, result.checkpoints[-1])
    assert (meta["epoch"], meta["step"]) == ("3", "6")
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    other = make_tiny_bert(seed=5)
    load_checkpoint(other, result.checkpoints[0])
    assert not torch.equal(other.classifier.weight, fresh.classifier.weight)


def test_max_steps_stops_early():
    _, result = _run(epochs=5, max_steps=3)
    assert result.steps == 3 and len(result.epoch_losses) == 2


def test_generic_module_with_frozen_parameters():
    """Any module with a compatible forward trains; frozen parameters stay put."""
    model = make_tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    before = model.bert.embeddings.word_embeddings.weight.clone()
    result = fine_tune(model, TINY, make_tokenizer(), epochs=5, seed=0, **ARGS)
    assert torch.equal(before, model.bert.embeddings.word_embeddings.weight)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_bad_config_and_no_parameters():
    with pytest.raises(QbertEdgeError, match="learning rate"):
        _run(epochs=1, lr=0.0)
    model = make_tiny_bert()
    model.requires_grad_(False)
    with pytest.raises(QbertEdgeError, match="no trainable parameters"):
        fine_tune(model, TINY, make_tokenizer(), epochs=1, seed=0, **ARGS)


def test_linear_schedule_shape():
    values = [linear_schedule(s, 10, 2) for s in range(10)]
    assert values[0] > 0 and values[2] == 1.0 and values[-1] > 0
    assert values == sorted(values[:3]) + sorted(values[3:], reverse=True)
    assert linear_schedule(10, 10, 2) == 0.0


def test_length_grouped_batches_train_repeatably_and_are_recorded():
    _, plain = _run(epochs=2)
    m1, r1 = _run(epochs=2, group_by_length=True)
    m2, r2 = _run(epochs=2, group_by_length=True)
    assert r1.losses == r2.losses and r1.losses != plain.losses  # other batches, the same every time
    assert r1.config.to_dict()["group_by_length"] and not plain.config.to_dict()["group_by_length"]
    assert r1.steps == plain.steps
