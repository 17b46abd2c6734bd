"""Validate an export: run the ONNX model and the torch model it came from on real sentences.

:func:`validate_export` encodes :data:`SENTENCES` (short movie-review sentences of different
lengths, so padding is exercised) with the model's own tokenizer, runs

- the torch model rebuilt from the ``model.pt`` dict (:func:`qbert_edge.checkpoint.from_checkpoint`,
  or the fp32 model for a baseline export), and
- the ONNX model: a portable graph with the reference backend (``onnx.reference`` + the NumPy
  kernels, :mod:`qbert_edge.runtime.reference`); an ``ort`` graph with onnxruntime (CPU), the
  runtime it is written for,

and compares every output. It passes when, for each output, ``max|onnx - torch| <= atol + rtol *
max|torch|`` (:data:`ATOL`, :data:`RTOL`) and, for ``logits``, every sentence gets the same class.
Why these numbers: the weights are bit-identical (``(code - zero) * scale`` in fp32 on both sides);
what differs is fp32 summation order (~1e-6 relative) and, with 8-bit activations, the rare input
that lands within that error of a rounding boundary and moves one activation step. Both stay far
below 1e-3 of the output range on every model measured (docs/export.md).

It also runs ``onnx.checker.check_model(full_check=True)`` with the ``qbert_edge`` schemas
registered. It does not write files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from qbert_edge.errors import QbertEdgeError

ATOL = 1e-3
RTOL = 1e-3

SENTENCES = (
    "a gripping, funny and beautifully acted film.",
    "the plot is a mess and the ending is worse.",
    "it's not a great movie, but it is never boring.",
    "one of the most moving stories i have seen in years, with a script that trusts its audience.",
    "dull.",
    "the actors do what they can with a thin, predictable screenplay that goes nowhere.",
    "a small, smart comedy about growing up.",
    "i wanted to love this, and i could not.",
    "visually stunning but emotionally empty, the film drags through its second half.",
    "brilliant!",
    "the director keeps the tension high from the first scene to the last.",
    "a forgettable sequel that adds nothing to the original.",
)


@dataclass(frozen=True)
class OutputCheck:
    """One output compared: largest absolute difference against the allowed one."""

    name: str
    max_abs_diff: float
    max_abs_ref: float
    allowed: float
    same_class: int | None = None  # logits only: sentences whose argmax agrees
    n: int = 0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed and (self.same_class is None or self.same_class == self.n)

    def summary(self) -> str:
        s = f"{self.name}: max|diff| {self.max_abs_diff:.3g} (allowed {self.allowed:.3g}, max|torch| {self.max_abs_ref:.3g})"
        if self.same_class is not None:
            s += f", same class {self.same_class}/{self.n}"
        return s


@dataclass(frozen=True)
class ValidationReport:
    backend: str
    texts: int
    tokens: int
    checks: tuple[OutputCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        return f"{self.backend} vs torch on {self.texts} sentences: " + "; ".join(c.summary() for c in self.checks)


def _feeds(data: Mapping, texts: Sequence[str]) -> dict[str, np.ndarray]:
    from qbert_edge.runtime.text import encode, load_tokenizer

    tokenizer = load_tokenizer(data["tokenizer"])
    return encode(tokenizer, list(texts), max_length=int(data.get("max_length", 128))).arrays


def torch_outputs(data: Mapping, feeds: Mapping[str, np.ndarray], name: str = "model.pt") -> dict[str, np.ndarray]:
    """Outputs of the torch model of a ``model.pt`` dict (quantized) or an fp32 dict."""
    import torch

    model = _torch_model(data, name)
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    if hasattr(out, "logits"):
        return {"logits": out.logits.numpy()}
    result = {"last_hidden_state": out.last_hidden_state.numpy()}
    if getattr(out, "pooler_output", None) is not None:
        result["pooler_output"] = out.pooler_output.numpy()
    return result


def _torch_model(data: Mapping, name: str):
    if data.get("plan"):
        from qbert_edge.checkpoint import from_checkpoint

        return from_checkpoint(dict(data), name=name).model.eval()
    import json

    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig.from_dict(json.loads(data["config"]))
    cls = BertForSequenceClassification if data["architecture"] == "BertForSequenceClassification" else BertModel
    model = cls(config).eval()
    prefix = "bert." if cls is BertForSequenceClassification else ""
    state = {(k if k.startswith("classifier.") else prefix + k): v for k, v in data["fp32"].items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "position_ids" not in k]:
        raise QbertEdgeError(f"{name}: parameters do not match the config")
    return model


def onnx_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
    """``(backend, outputs)``: the reference backend for a portable graph, onnxruntime for an ``ort`` one."""
    names = [o.name for o in model.graph.output]
    uses_custom = any(n.domain == "qbert_edge" for n in model.graph.node)
    uses_ms = any(n.domain == "com.microsoft" for n in model.graph.node)
    if uses_ms and not uses_custom:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return "onnxruntime", dict(zip(names, session.run(names, dict(feeds))))
    from qbert_edge.runtime.reference import run_reference

    return "reference", run_reference(model, feeds, names)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full checking, the ``qbert_edge`` op schemas registered."""
    from qbert_edge.runtime.reference import register_schemas

    register_schemas()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise QbertEdgeError(f"exported model fails onnx.checker: {first}") from None


def compare(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], atol: float = ATOL, rtol: float = RTOL) -> tuple[OutputCheck, ...]:
    checks = []
    for name, r in ref.items():
        if name not in got:
            raise QbertEdgeError(f"exported model has no output {name!r}")
        g = got[name]
        if g.shape != r.shape:
            raise QbertEdgeError(f"output {name!r}: shape {list(g.shape)} vs torch {list(r.shape)}")
        max_ref = float(np.abs(r).max()) if r.size else 0.0
        diff = float(np.abs(g.astype(np.float64) - r).max()) if r.size else 0.0
        same = n = None
        if name == "logits":
            n = r.shape[0]
            same = int((g.argmax(-1) == r.argmax(-1)).sum())
        checks.append(OutputCheck(name, diff, max_ref, atol + rtol * max_ref, same, n or 0))
    return tuple(checks)


def validate_export(
    model: onnx.ModelProto,
    data: Mapping,
    texts: Sequence[str] | None = None,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    name: str = "model.pt",
) -> ValidationReport:
    """Check ``model`` (full onnx.checker) and compare it with the torch model of ``data``."""
    check_model(model)
    texts = list(texts or SENTENCES)
    feeds = _feeds(data, texts)
    ref = torch_outputs(data, feeds, name)
    backend, got = onnx_outputs(model, feeds)
    return ValidationReport(backend, len(texts), int(feeds["attention_mask"].sum()), compare(got, ref, atol, rtol))
