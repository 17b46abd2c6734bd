"""What an exported ``model.onnx`` says about itself: format ``qbert-edge/onnx`` v1 in ``metadata_props``.

Everything the runtime needs besides the graph travels in the ONNX file's ``metadata_props``
(string key -> string value), so a device needs no other file::

    qbert_edge.format          "qbert-edge/onnx"
    qbert_edge.format_version  "1"
    qbert_edge.architecture    "BertForSequenceClassification" | "BertModel"
    qbert_edge.target          "portable" (qbert_edge custom ops) | "ort" (com.microsoft low-bit ops)
    qbert_edge.outputs         JSON list: ["logits"] or ["last_hidden_state", "pooler_output"]
    qbert_edge.labels          JSON list of class names (index = class id; [] for a bare encoder)
    qbert_edge.max_length      the sequence length the model was trained/evaluated with, e.g. "64"
    qbert_edge.tokenizer       the tokenizer.json text, zlib-compressed then base64-encoded (a BERT
                               vocabulary is ~460 KB of JSON, ~3% of a 2-bit MiniLM; compressed ~240 KB)
    qbert_edge.tokenizer_encoding  "zlib+base64" (or "json": the plain text)
    qbert_edge.plan            JSON plan summary: {"activation_bits": 8 | null,
                               "modules": {name: {"bits": b, "groups": g}}}; null for an fp32 model
    qbert_edge.source          JSON: {"method": ..., "source": ..., "qbert_edge_version": ...}

:func:`metadata_props` builds the dict (sorted keys, deterministic JSON); :func:`model_info`
reads and checks it back (from an ``onnx.ModelProto`` or a key -> value dict) and decodes the
tokenizer, so ``ModelInfo.tokenizer`` is always the plain JSON text. This module imports neither
torch nor onnx (the runtime may use it on a device).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from qbert_edge.errors import QbertEdgeError

FORMAT = "qbert-edge/onnx"
VERSION = 1
PREFIX = "qbert_edge."
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
TARGETS = ("portable", "ort")
TOKENIZER_ENCODINGS = ("zlib+base64", "json")


@dataclass(frozen=True)
class ModelInfo:
    """The metadata of an exported model (see the module docstring for each field)."""

    architecture: str
    target: str
    outputs: tuple[str, ...]
    labels: tuple[str, ...]
    max_length: int
    tokenizer: str
    plan: Mapping[str, Any] | None = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise QbertEdgeError(f"model.onnx: unknown target {self.target!r} (expected one of {', '.join(TARGETS)})")
        if not self.outputs:
            raise QbertEdgeError("model.onnx: metadata lists no outputs")
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "labels", tuple(self.labels))


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def encode_tokenizer(text: str) -> str:
    """Compress tokenizer JSON for ``metadata_props`` (deterministic: zlib level 9, no header time)."""
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")


def decode_tokenizer(value: str, encoding: str) -> str:
    """Inverse of :func:`encode_tokenizer` (``encoding == "json"``: the value is the text)."""
    if encoding == "json":
        return value
    if encoding != "zlib+base64":
        raise ValueError(f"unknown tokenizer encoding {encoding!r}")
    return zlib.decompress(base64.b64decode(value.encode("ascii"), validate=True)).decode("utf-8")


def metadata_props(info: ModelInfo) -> dict[str, str]:
    """The ``metadata_props`` entries of ``info``, in a fixed order."""
    return {
        PREFIX + "format": FORMAT,
        PREFIX + "format_version": str(VERSION),
        PREFIX + "architecture": info.architecture,
        PREFIX + "target": info.target,
        PREFIX + "outputs": _json(list(info.outputs)),
        PREFIX + "labels": _json(list(info.labels)),
        PREFIX + "max_length": str(int(info.max_length)),
        PREFIX + "plan": _json(None if info.plan is None else dict(info.plan)),
        PREFIX + "source": _json(dict(info.source)),
        PREFIX + "tokenizer_encoding": "zlib+base64",
        PREFIX + "tokenizer": encode_tokenizer(info.tokenizer),
    }


def model_info(model, name: str = "model.onnx") -> ModelInfo:
    """Read and check the qbert-edge metadata of an ``onnx.ModelProto`` or a ``{key: value}`` dict."""
    props = dict(model) if isinstance(model, Mapping) else {p.key: p.value for p in model.metadata_props}
    fmt = props.get(PREFIX + "format")
    if fmt is None:
        raise QbertEdgeError(f"{name}: not a qbert-edge ONNX model (no {PREFIX}format metadata)")
    if fmt != FORMAT:
        raise QbertEdgeError(f"{name}: is a {fmt!r} model, expected {FORMAT!r}")
    try:
        version = int(props.get(PREFIX + "format_version", ""))
    except ValueError:
        raise QbertEdgeError(f"{name}: {FORMAT} model has no valid format version") from None
    if version > VERSION:
        raise QbertEdgeError(
            f"{name}: {FORMAT} version {version} is newer than this qbert-edge reads (up to {VERSION}); upgrade qbert-edge"
        )
    try:
        return ModelInfo(
            architecture=props[PREFIX + "architecture"],
            target=props[PREFIX + "target"],
            outputs=tuple(json.loads(props[PREFIX + "outputs"])),
            labels=tuple(json.loads(props[PREFIX + "labels"])),
            max_length=int(props[PREFIX + "max_length"]),
            tokenizer=decode_tokenizer(props[PREFIX + "tokenizer"], props.get(PREFIX + "tokenizer_encoding", "json")),
            plan=json.loads(props[PREFIX + "plan"]),
            source=json.loads(props.get(PREFIX + "source", "{}")),
        )
    except KeyError as exc:
        raise QbertEdgeError(f"{name}: qbert-edge metadata is missing {exc.args[0]!r}") from None
    except (ValueError, TypeError, zlib.error) as exc:
        raise QbertEdgeError(f"{name}: malformed qbert-edge metadata ({exc})") from None
