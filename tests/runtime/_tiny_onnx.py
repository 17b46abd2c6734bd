"""Tiny qbert-edge ONNX classifiers built inline with ``onnx.helper`` (no exporter, no torch).

``tiny_classifier(tokenizer)`` -> a ModelProto with the real op contract: an 8-bit ``QGather``
word embedding, an fp32 token-type ``Gather``, masked mean pooling, a 3-bit ``QMatMul`` (rows
crossing byte boundaries) + Relu and a 2-bit ``QMatMul`` to two logits, plus the qbert-edge
metadata the runtime reads. ``numpy_logits`` computes the same function in plain NumPy.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qbert_edge.exporters.metadata import ModelInfo, metadata_props
from qbert_edge.runtime.packing import pack
from qbert_edge.runtime.text import tokenizer_json

HIDDEN, INNER, LABELS = 32, 16, ("negative", "positive")


def _quant(rng, rows, cols, bits, groups):
    codes = rng.integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    scales = rng.uniform(0.05, 0.2, size=groups).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, size=groups, dtype=np.uint8)
    return codes, scales, zeros


def dequant(codes, scales, zeros):
    g = np.arange(codes.shape[0]) // (codes.shape[0] // scales.size)
    return (codes.astype(np.float32) - zeros[g].astype(np.float32)[:, None]) * scales[g][:, None]


def tiny_weights(vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "emb": _quant(rng, vocab, HIDDEN, 8, vocab),
        "types": rng.normal(0, 0.5, size=(2, HIDDEN)).astype(np.float32),
        "fc1": _quant(rng, INNER, HIDDEN, 3, 4),
        "fc1_b": rng.normal(0, 0.1, size=INNER).astype(np.float32),
        "fc2": _quant(rng, len(LABELS), INNER, 2, 2),
        "fc2_b": rng.normal(0, 0.1, size=len(LABELS)).astype(np.float32),
    }


def numpy_logits(w: dict, feeds: dict) -> np.ndarray:
    emb = dequant(*w["emb"])[feeds["input_ids"]] + w["types"][feeds["token_type_ids"]]
    mask = feeds["attention_mask"].astype(np.float32)[..., None]
    pooled = (emb * mask).sum(1) / mask.sum(1)
    h = np.maximum(pooled @ dequant(*w["fc1"]).T + w["fc1_b"], 0)
    return h @ dequant(*w["fc2"]).T + w["fc2_b"]


def tiny_classifier(tokenizer, seed: int = 0, op_version: int = 1, max_length: int = 16, metadata: bool = True):
    vocab = tokenizer.get_vocab_size()
    w = tiny_weights(vocab, seed)
    inits = []

    def qinit(name, q, bits):
        codes, scales, zeros = q
        inits.extend([
            numpy_helper.from_array(pack(codes, bits), f"{name}.packed"),
            numpy_helper.from_array(scales, f"{name}.scales"),
            numpy_helper.from_array(zeros, f"{name}.zero_points"),
        ])
        return [f"{name}.packed", f"{name}.scales", f"{name}.zero_points"]

    common = dict(domain="qbert_edge", layout="dense-le-v1", version=op_version)
    inits.append(numpy_helper.from_array(w["types"], "types"))
    inits.append(numpy_helper.from_array(w["fc1_b"], "fc1.bias"))
    inits.append(numpy_helper.from_array(w["fc2_b"], "fc2.bias"))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes = [
        helper.make_node("QGather", qinit("emb", w["emb"], 8) + ["input_ids"], ["e"], bits=8, rows=vocab,
                         cols=HIDDEN, groups=vocab, **common),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "minus1"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis1"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis1"], ["n"], keepdims=0),
        helper.make_node("Div", ["s", "n"], ["pooled"]),
        helper.make_node("QMatMul", ["pooled"] + qinit("fc1", w["fc1"], 3) + ["fc1.bias"], ["z"], bits=3, N=INNER,
                         K=HIDDEN, groups=4, **common),
        helper.make_node("Relu", ["z"], ["a"]),
        helper.make_node("QMatMul", ["a"] + qinit("fc2", w["fc2"], 2) + ["fc2.bias"], ["logits"], bits=2,
                         N=len(LABELS), K=INNER, groups=2, **common),
    ]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus1"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "length"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qbert_edge", 1)])
    model.ir_version = 8
    if metadata:
        info = ModelInfo(architecture="BertForSequenceClassification", target="portable", outputs=("logits",),
                         labels=LABELS, max_length=max_length, tokenizer=tokenizer_json(tokenizer))
        helper.set_model_props(model, metadata_props(info))
    return model, w


def save(model, path) -> str:
    onnx.save(model, str(path))
    return str(path)
