"""Quantized tiny BERT checkpoints (``model.pt`` dicts), built in-process for the exporter tests."""

from __future__ import annotations

from conftest import TINY_TEXTS, make_tiny_bert, make_tokenizer

from qbert_edge.plan import ModuleQuant, Plan, uniform_plan

MAX_LENGTH = 32


def calibration_batch(tokenizer):
    import torch

    from qbert_edge.runtime.text import encode

    enc = encode(tokenizer, [t for t, _ in TINY_TEXTS], max_length=MAX_LENGTH)
    return {k: torch.from_numpy(v) for k, v in enc.arrays.items()}


def quantized_checkpoint(bits=4, groups=4, *, num_labels=2, plan=None, activation_bits=8, hidden=32, seed=0, **plan_kw) -> dict:
    """The ``model.pt`` dict of a DirectQ-quantized tiny BERT (random weights, init_range 0.3)."""
    from qbert_edge.checkpoint import LoadedModel, to_checkpoint
    from qbert_edge.qmodel import calibrate, freeze, quantizable_shapes, quantize_model

    model = make_tiny_bert(num_labels, hidden=hidden, heads=4, seed=seed, init_range=0.3)
    tokenizer = make_tokenizer()
    if plan is None:
        plan = uniform_plan(quantizable_shapes(model), bits, groups, activation_bits=activation_bits, **plan_kw)
    quantize_model(model, plan)
    if plan.activation_bits:
        calibrate(model, [calibration_batch(tokenizer)])
    freeze(model)
    labels = [f"label{i}" for i in range(num_labels)] if num_labels else []
    loaded = LoadedModel(model, tokenizer, labels, "tiny", plan, MAX_LENGTH, {"method": "directq", "source": "tiny"})
    return to_checkpoint(loaded)


def mixed_plan() -> Plan:
    """Every width 2..8 somewhere, different groups, an fp32 Linear, an fp32 table, a 3-bit embedding."""
    model = make_tiny_bert(2, init_range=0.3)
    from qbert_edge.qmodel import quantizable_shapes

    shapes = quantizable_shapes(model)
    widths = {
        "encoder.layer.0.attention.self.query": (2, 32),
        "encoder.layer.0.attention.self.key": (3, 4),
        "encoder.layer.0.attention.self.value": (5, 1),
        "encoder.layer.0.attention.output.dense": (6, 8),
        "encoder.layer.0.intermediate.dense": (7, 16),
        "encoder.layer.0.output.dense": (3, 32),
        "encoder.layer.1.attention.self.query": (4, 4),
        "encoder.layer.1.attention.self.value": (8, 2),
        "encoder.layer.1.intermediate.dense": (2, 64),
        "encoder.layer.1.output.dense": (3, 2),
        "embeddings.word_embeddings": (3, shapes["embeddings.word_embeddings"][0]),
        "embeddings.position_embeddings": (8, shapes["embeddings.position_embeddings"][0]),
        "pooler.dense": (8, 32),
    }  # layer 1 key, attention.output.dense, token type table and classifier stay fp32
    modules = {n: ModuleQuant(bits=b, groups=g, shape=shapes[n]) for n, (b, g) in widths.items()}
    return Plan(modules=modules, activation_bits=8)
