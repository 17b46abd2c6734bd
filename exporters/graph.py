"""BERT's ONNX graph, built node by node with ``onnx.helper`` from NumPy arrays (no torch).

:func:`build_bert_graph` turns a :class:`BertWeights` (config + fp32 tensors + packed-to-be
codes + activation ranges, all NumPy) into an ``onnx.GraphProto``:

- inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[batch, sequence]``;
- embeddings (word + token type, then + position, as transformers adds them) and LayerNorm;
- per layer: Q/K/V projections, scaled dot-product attention with transformers' additive mask
  (``(1 - mask) * finfo(float32).min``), output projection + residual + LayerNorm, FFN with
  exact (Erf) GELU + residual + LayerNorm;
- pooler (first token, dense, tanh) and, for a classifier, ``logits``; a bare encoder outputs
  ``last_hidden_state`` and ``pooler_output``.

Each Linear is ``MatMul`` + ``Add`` on a pre-transposed fp32 weight, or, when quantized, one
``qbert_edge::QMatMul`` on the packed codes, preceded by ``QuantizeLinear``/``DequantizeLinear``
(uint8, per-tensor) when the plan quantizes activations. Quantized embeddings are
``qbert_edge::QGather``. Names are the plan's module names, so the same input builds the same
bytes. This module builds the portable graph only; :mod:`qbert_edge.runtime.native` rewrites it
for onnxruntime's own low-bit kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import EMBEDDINGS
from qbert_edge.runtime.kernels import DOMAIN, LAYOUT, OP_VERSION, OPSET
from qbert_edge.runtime.packing import WIDTHS, pack

MIN_OPSET = 17  # LayerNormalization
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class QWeight:
    """A quantized weight: codes ``uint8 [rows, cols]``, ``scale float32 [G]``, ``zero uint8 [G]``."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int

    @property
    def groups(self) -> int:
        return int(self.scale.size)

    def check(self, name: str) -> None:
        if self.bits not in WIDTHS:
            raise QbertEdgeError(f"{name}: a {self.bits}-bit width cannot be packed (the ONNX ops hold 2..8 bits)")
        if self.codes.ndim != 2 or self.codes.dtype != np.uint8:
            raise QbertEdgeError(f"{name}: codes must be a uint8 matrix, got {self.codes.dtype} {list(self.codes.shape)}")
        rows = self.codes.shape[0]
        if self.groups < 1 or rows % self.groups or self.zero.size != self.groups:
            raise QbertEdgeError(f"{name}: {self.groups} scales / {self.zero.size} zero points for {rows} rows")
        top = 1 << self.bits
        if self.codes.size and int(self.codes.max()) >= top or int(self.zero.max()) >= top:
            raise QbertEdgeError(f"{name}: codes or zero points do not fit in {self.bits} bits")


@dataclass(frozen=True)
class BertWeights:
    """Everything the graph needs, as NumPy: see :func:`qbert_edge.exporters.onnx_export.bert_weights`.

    ``fp32`` is keyed like ``model.pt`` (``embeddings.LayerNorm.weight``, ``classifier.bias``, ...);
    ``weights`` by plan name; ``activations`` maps a plan name to its input's ``(scale, zero)``.
    """

    architecture: str
    config: Mapping[str, object]
    fp32: Mapping[str, np.ndarray]
    weights: Mapping[str, QWeight] = field(default_factory=dict)
    activations: Mapping[str, tuple[float, int]] = field(default_factory=dict)


class _Builder:
    """Accumulates nodes and initializers; every name is derived from the module it belongs to."""

    def __init__(self, w: BertWeights) -> None:
        self.w = w
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self.custom_ops = False

    def init(self, name: str, array: np.ndarray) -> str:
        if name in self._names:
            raise AssertionError(f"duplicate initializer {name}")
        self._names.add(name)
        array = np.asarray(array)  # np.ascontiguousarray would turn a scalar into shape [1]
        self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def const(self, name: str, value, dtype) -> str:
        return name if name in self._names else self.init(name, np.asarray(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        out = name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, domain=domain, **attrs))
        return out

    def param(self, key: str) -> np.ndarray:
        if key not in self.w.fp32:
            raise QbertEdgeError(f"model.pt: parameter {key!r} is missing")
        return np.asarray(self.w.fp32[key], dtype=np.float32)

    # -- layers -----------------------------------------------------------------------------
    def linear(self, name: str, x: str) -> str:
        bias_key = name + ".bias"
        has_bias = bias_key in self.w.fp32
        q = self.w.weights.get(name)
        if q is None:
            weight = self.param(name + ".weight")
            wt = self.init(name + ".weight_t", weight.T)
            y = self.op("MatMul", [x, wt], name + "/MatMul")
            if has_bias:
                y = self.op("Add", [y, self.init(bias_key, self.param(bias_key))], name + "/Add")
            return y
        q.check(name)
        if name in self.w.activations:
            scale, zero = self.w.activations[name]
            s = self.init(name + ".input_scale", np.float32(scale))
            z = self.init(name + ".input_zero", np.uint8(zero))
            x = self.op("QuantizeLinear", [x, s, z], name + "/QuantizeLinear")
            x = self.op("DequantizeLinear", [x, s, z], name + "/DequantizeLinear")
        rows, cols = q.codes.shape
        inputs = [
            x,
            self.init(name + ".weight_packed", pack(q.codes, q.bits)),
            self.init(name + ".weight_scale", q.scale.astype(np.float32)),
            self.init(name + ".weight_zero", q.zero.astype(np.uint8)),
        ]
        if has_bias:
            inputs.append(self.init(bias_key, self.param(bias_key)))
        self.custom_ops = True
        return self.op(
            "QMatMul", inputs, name + "/QMatMul", domain=DOMAIN,
            bits=q.bits, N=rows, K=cols, groups=q.groups, layout=LAYOUT, version=OP_VERSION,
        )

    def embedding(self, name: str, ids: str) -> str:
        q = self.w.weights.get(name)
        if q is None:
            table = self.init(name + ".weight", self.param(name + ".weight"))
            return self.op("Gather", [table, ids], name + "/Gather")
        q.check(name)
        rows, cols = q.codes.shape
        self.custom_ops = True
        return self.op(
            "QGather",
            [
                self.init(name + ".weight_packed", pack(q.codes, q.bits)),
                self.init(name + ".weight_scale", q.scale.astype(np.float32)),
                self.init(name + ".weight_zero", q.zero.astype(np.uint8)),
                ids,
            ],
            name + "/QGather", domain=DOMAIN,
            bits=q.bits, rows=rows, cols=cols, groups=q.groups, layout=LAYOUT, version=OP_VERSION,
        )

    def layer_norm(self, name: str, x: str) -> str:
        eps = float(self.w.config.get("layer_norm_eps", 1e-12))
        gamma = self.init(name + ".weight", self.param(name + ".weight"))
        beta = self.init(name + ".bias", self.param(name + ".bias"))
        return self.op("LayerNormalization", [x, gamma, beta], name + "/LayerNormalization", axis=-1, epsilon=eps)

    def activation(self, name: str, x: str) -> str:
        act = self.w.config.get("hidden_act", "gelu")
        if act == "relu":
            return self.op("Relu", [x], name + "/Relu")
        half = self.const("const.half", 0.5, np.float32)
        one = self.const("const.one", 1.0, np.float32)
        if act == "gelu":  # exact: 0.5 * x * (1 + erf(x / sqrt(2)))
            inner = self.op("Div", [x, self.const("const.sqrt2", math.sqrt(2.0), np.float32)], name + "/Div")
            curve = self.op("Erf", [inner], name + "/Erf")
        else:  # tanh approximation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
            cube = self.op("Mul", [self.op("Mul", [x, x], name + "/Square"), x], name + "/Cube")
            cube = self.op("Mul", [cube, self.const("const.gelu_c", 0.044715, np.float32)], name + "/CubeScaled")
            inner = self.op("Add", [x, cube], name + "/Inner")
            inner = self.op("Mul", [inner, self.const("const.gelu_k", math.sqrt(2.0 / math.pi), np.float32)], name + "/InnerScaled")
            curve = self.op("Tanh", [inner], name + "/Tanh")
        halfx = self.op("Mul", [x, half], name + "/Half")
        return self.op("Mul", [halfx, self.op("Add", [curve, one], name + "/OnePlus")], name + "/Gelu")

    def attention(self, i: int, x: str, mask: str) -> str:
        cfg = self.w.config
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        d = hidden // heads
        p = f"encoder.layer.{i}.attention"
        split = self.const("const.split_heads", [0, 0, heads, d], np.int64)
        merge = self.const("const.merge_heads", [0, 0, hidden], np.int64)

        def heads_of(kind: str, perm: list[int]) -> str:
            y = self.linear(f"{p}.self.{kind}", x)
            y = self.op("Reshape", [y, split], f"{p}.self.{kind}/Reshape")
            return self.op("Transpose", [y], f"{p}.self.{kind}/Transpose", perm=perm)

        q = heads_of("query", [0, 2, 1, 3])
        k = heads_of("key", [0, 2, 3, 1])
        v = heads_of("value", [0, 2, 1, 3])
        scores = self.op("MatMul", [q, k], f"{p}.self/Scores")
        scores = self.op("Mul", [scores, self.const(f"const.scaling_{d}", d ** -0.5, np.float32)], f"{p}.self/Scale")
        scores = self.op("Add", [scores, mask], f"{p}.self/Mask")
        probs = self.op("Softmax", [scores], f"{p}.self/Softmax", axis=-1)
        ctx = self.op("MatMul", [probs, v], f"{p}.self/Context")
        ctx = self.op("Transpose", [ctx], f"{p}.self/MergeTranspose", perm=[0, 2, 1, 3])
        ctx = self.op("Reshape", [ctx, merge], f"{p}.self/MergeReshape")
        out = self.linear(f"{p}.output.dense", ctx)
        out = self.op("Add", [out, x], f"{p}.output/Residual")
        return self.layer_norm(f"{p}.output.LayerNorm", out)

    def ffn(self, i: int, x: str) -> str:
        p = f"encoder.layer.{i}"
        h = self.activation(f"{p}.intermediate", self.linear(f"{p}.intermediate.dense", x))
        out = self.linear(f"{p}.output.dense", h)
        out = self.op("Add", [out, x], f"{p}.output/Residual")
        return self.layer_norm(f"{p}.output.LayerNorm", out)


def check_config(config: Mapping[str, object], architecture: str) -> None:
    """Refuse a config this graph does not implement (one line naming what is unsupported)."""
    if config.get("model_type", "bert") != "bert":
        raise QbertEdgeError(f"model_type={config.get('model_type')!r} is not BERT")
    if architecture not in ("BertModel", "BertForSequenceClassification"):
        raise QbertEdgeError(f"architecture {architecture!r} is not supported (BertModel, BertForSequenceClassification)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise QbertEdgeError(f"position_embedding_type={config['position_embedding_type']!r} is not supported (absolute only)")
    if config.get("is_decoder"):
        raise QbertEdgeError("decoder BERT models are not supported")
    if config.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise QbertEdgeError(f"hidden_act={config['hidden_act']!r} is not supported ({', '.join(ACTIVATIONS)})")
    if int(config["hidden_size"]) % int(config["num_attention_heads"]):
        raise QbertEdgeError("hidden_size is not a multiple of num_attention_heads")


def build_bert_graph(w: BertWeights, name: str = "qbert_edge_bert") -> tuple[onnx.GraphProto, bool]:
    """The graph of ``w`` and whether it uses ``qbert_edge`` custom ops."""
    check_config(w.config, w.architecture)
    b = _Builder(w)
    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in INPUT_NAMES]

    # embeddings: (word + token_type) + position, then LayerNorm
    word = b.embedding(EMBEDDINGS["word"], "input_ids")
    types = b.embedding(EMBEDDINGS["token_type"], "token_type_ids")
    shape = b.op("Shape", ["input_ids"], "embeddings/Shape")
    seq = b.op("Gather", [shape, b.const("const.i1", 1, np.int64)], "embeddings/SeqLen", axis=0)
    positions = b.op(
        "Range", [b.const("const.i0", 0, np.int64), seq, b.const("const.i1", 1, np.int64)], "embeddings/PositionIds"
    )
    pos = b.embedding(EMBEDDINGS["position"], positions)
    x = b.op("Add", [word, types], "embeddings/AddTokenType")
    x = b.op("Add", [x, pos], "embeddings/AddPosition")
    x = b.layer_norm("embeddings.LayerNorm", x)

    # additive attention mask [batch, 1, 1, sequence]: 0 where attended, finfo.min where padded
    m = b.op("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.FLOAT)
    m = b.op("Unsqueeze", [m, b.const("const.axes_1_2", [1, 2], np.int64)], "mask/Unsqueeze")
    m = b.op("Sub", [b.const("const.one", 1.0, np.float32), m], "mask/Invert")
    mask = b.op("Mul", [m, b.const("const.finfo_min", np.finfo(np.float32).min, np.float32)], "mask/Additive")

    for i in range(int(w.config["num_hidden_layers"])):
        x = b.ffn(i, b.attention(i, x, mask))

    outputs = []
    pooled = None
    if "pooler.dense.bias" in w.fp32 or "pooler.dense.weight" in w.fp32 or "pooler.dense" in w.weights:
        first = b.op("Gather", [x, b.const("const.i0", 0, np.int64)], "pooler/FirstToken", axis=1)
        pooled = b.op("Tanh", [b.linear("pooler.dense", first)], "pooler/Tanh")
    if w.architecture == "BertForSequenceClassification":
        if pooled is None:
            raise QbertEdgeError("model.pt: a classifier without a pooler is not supported")
        logits = b.linear("classifier", pooled)
        b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output/logits"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", int(w.config.get("num_labels", 2))]))
    else:
        hidden = int(w.config["hidden_size"])
        b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output/last_hidden_state"))
        outputs.append(helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden]))
        if pooled is not None:
            b.nodes.append(helper.make_node("Identity", [pooled], ["pooler_output"], name="output/pooler_output"))
            outputs.append(helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", hidden]))
    unused = sorted(set(w.weights) - {n.name.split("/")[0] for n in b.nodes})
    if unused:
        raise QbertEdgeError(f"model.pt: quantized weights {unused[:3]} are not part of the BERT graph")
    graph = helper.make_graph(b.nodes, name, inputs, outputs, b.inits)
    return graph, b.custom_ops


def opset_imports(opset: int, custom_ops: bool, extra: Mapping[str, int] | None = None) -> list:
    """``opset_import`` entries: the default domain, plus ``qbert_edge`` when custom ops are used."""
    ops = [helper.make_opsetid("", opset)]
    if custom_ops:
        ops.append(helper.make_opsetid(DOMAIN, OPSET))
    for domain, version in sorted((extra or {}).items()):
        ops.append(helper.make_opsetid(domain, version))
    return ops
