"""Lower a quantized ``model.pt`` (or an fp32 BERT) to ONNX: pure core + file wrapper.

>>> model = export_model(read_checkpoint("model.pt"))          # doctest: +SKIP
>>> export_file("model.pt", "model.onnx", target="ort")          # doctest: +SKIP

:func:`export_model` (pure: ``model.pt`` dict -> ``onnx.ModelProto``) builds the BERT graph of
:mod:`qbert_edge.exporters.graph` with packed low-bit initializers and ``qbert_edge`` ops
(target ``portable``), or rewrites it to onnxruntime's own ``MatMulNBits`` /
``GatherBlockQuantized`` (target ``ort``, :mod:`qbert_edge.runtime.native`), and stores the
tokenizer, labels and plan in ``metadata_props`` (:mod:`qbert_edge.exporters.metadata`). The
same dict gives the same bytes. Large initializers are aligned to :data:`ALIGN` bytes in the
file so a runtime can map them without copying.

:func:`export_file` reads the source (a ``model.pt``, or an fp32 model for the baseline: a
transformers directory, ``minilm``, ``minilm-rt``), exports, validates (on by default,
:mod:`qbert_edge.exporters.validate`) and writes atomically; it refuses to overwrite its input
and writes nothing when anything fails. This module does not define the ops' math
(:mod:`qbert_edge.runtime.kernels`) and does not tokenize.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper

from qbert_edge import __version__
from qbert_edge.errors import QbertEdgeError
from qbert_edge.exporters.graph import MIN_OPSET, BertWeights, QWeight, build_bert_graph, opset_imports
from qbert_edge.exporters.metadata import ModelInfo, TARGETS, metadata_props

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
#: Newest default-domain opset accepted: onnxruntime 1.32 runs every op of the graph up to 27
#: (measured; at 28 it has no QuantizeLinear kernel).
MAX_OPSET = 27
#: Initializers of at least this many bytes start at a multiple of ALIGN bytes in the file.
ALIGN = 64
ALIGN_MIN_BYTES = 1024


def _np(value) -> np.ndarray:
    """A NumPy array from a torch tensor or array-like (the only place torch types are touched)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def bert_weights(data: Mapping[str, Any], name: str = "model.pt") -> BertWeights:
    """The NumPy view of a ``model.pt`` dict (:mod:`qbert_edge.checkpoint` layout)."""
    try:
        config = json.loads(data["config"]) if isinstance(data["config"], str) else dict(data["config"])
        weights = {}
        for module, w in data.get("weights", {}).items():
            bits = int(w["bits"])
            weights[module] = QWeight(
                codes=_np(w["codes"]).astype(np.uint8, copy=False),
                scale=_np(w["scale"]).astype(np.float32, copy=False).reshape(-1),
                zero=_np(w["zero"]).astype(np.uint8, copy=False).reshape(-1),
                bits=bits,
            )
        activations = {m: (float(a["scale"]), int(a["zero"])) for m, a in data.get("activations", {}).items()}
        fp32 = {k: _np(v).astype(np.float32, copy=False) for k, v in data["fp32"].items()}
        return BertWeights(
            architecture=str(data["architecture"]), config=config, fp32=fp32, weights=weights, activations=activations
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise QbertEdgeError(f"{name}: malformed model.pt ({type(exc).__name__}: {exc})") from None


def plan_summary(data: Mapping[str, Any]) -> dict | None:
    """``{"activation_bits", "modules": {name: {"bits", "groups"}}}`` of a model.pt's plan (None: fp32)."""
    plan = data.get("plan")
    if not plan:
        return None
    modules = {n: {"bits": int(q["bits"]), "groups": int(q["groups"])} for n, q in plan.get("modules", {}).items()}
    return {"activation_bits": plan.get("activation_bits"), "modules": modules}


def _check_plan(data: Mapping[str, Any], w: BertWeights, name: str) -> None:
    """The stored codes must be what the plan says (bits, groups), and every width must fit 2..8."""
    plan = (data.get("plan") or {}).get("modules", {})
    for module, q in w.weights.items():
        q.check(module)
        spec = plan.get(module)
        if spec is None:
            raise QbertEdgeError(f"{name}: codes for {module!r}, which the plan does not quantize")
        if int(spec["bits"]) != q.bits or int(spec["groups"]) != q.groups or list(spec["shape"]) != list(q.codes.shape):
            raise QbertEdgeError(f"{name}: {module}: stored codes {list(q.codes.shape)}/{q.bits}b/{q.groups}g do not match the plan")
    missing = sorted(set(plan) - set(w.weights))
    if missing:
        raise QbertEdgeError(f"{name}: the plan quantizes {missing[:3]} but model.pt has no codes for them")


def export_model(
    data: Mapping[str, Any],
    *,
    target: str = "portable",
    opset: int = DEFAULT_OPSET,
    name: str = "model.pt",
    align: bool = True,
) -> onnx.ModelProto:
    """The ONNX model of a ``model.pt`` dict (or of :func:`fp32_checkpoint`); deterministic."""
    if target not in TARGETS:
        raise QbertEdgeError(f"unknown target {target!r} (expected one of {', '.join(TARGETS)})")
    max_opset = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= max_opset:
        raise QbertEdgeError(f"--opset {opset}: supported opsets are {MIN_OPSET}..{max_opset} (LayerNormalization needs {MIN_OPSET})")
    w = bert_weights(data, name)
    _check_plan(data, w, name)
    graph, custom = build_bert_graph(w)
    imports = opset_imports(opset, custom)
    model = helper.make_model(
        graph,
        opset_imports=imports,
        producer_name="qbert-edge",
        producer_version=__version__,
        ir_version=helper.find_min_ir_version_for(imports, ignore_unknown=True),
    )
    model.model_version = 1
    model.doc_string = "qbert-edge BERT export (format qbert-edge/onnx v1)"
    if target == "ort":
        from qbert_edge.runtime.native import DEFAULT_ACCURACY_LEVEL, to_native

        # the runtime's rule: 2-bit matmuls stay 2-bit only where onnxruntime has a native kernel
        # for them at the written accuracy_level (runtime/native.py, keeps_2bit)
        model = to_native(model, accuracy_level=DEFAULT_ACCURACY_LEVEL, widen_2bit=None)
    info = ModelInfo(
        architecture=w.architecture,
        target=target,
        outputs=tuple(o.name for o in model.graph.output),
        labels=tuple(str(x) for x in data.get("labels", [])),
        max_length=int(data.get("max_length", 128)),
        tokenizer=_canonical_tokenizer(data["tokenizer"]),
        plan=plan_summary(data),
        source={k: v for k, v in sorted(dict(data.get("meta", {})).items()) if isinstance(v, (str, int, float, bool))},
    )
    helper.set_model_props(model, metadata_props(info))
    if align:
        align_initializers(model)
    return model


def _canonical_tokenizer(text: str) -> str:
    """Tokenizer JSON with padding/truncation off and keys sorted, compact (same tokenizer -> same text)."""
    data = json.loads(text)
    data["padding"] = None
    data["truncation"] = None
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fp32_checkpoint(loaded) -> dict:
    """A ``model.pt``-shaped dict of an fp32 :class:`~qbert_edge.checkpoint.LoadedModel` (no plan, no codes)."""
    from qbert_edge.qmodel import encoder_of

    model = loaded.model
    if loaded.plan is not None:
        raise QbertEdgeError(f"{loaded.name}: is quantized; export its model.pt instead")
    encoder = encoder_of(model)
    strip = encoder is not model
    fp32 = {
        (n[len("bert."):] if strip and n.startswith("bert.") else n): p.detach().float().contiguous()
        for n, p in model.named_parameters()
    }
    return {
        "format": "qbert-edge/fp32-model",
        "version": 1,
        "architecture": type(model).__name__,
        "config": model.config.to_json_string(use_diff=False),
        "plan": None,
        "weights": {},
        "activations": {},
        "fp32": fp32,
        "labels": list(loaded.labels),
        "tokenizer": loaded.tokenizer.to_str(),
        "max_length": int(loaded.max_length),
        "meta": {**loaded.meta, "method": "fp32", "source": loaded.name, "qbert_edge_version": __version__},
    }


# -- alignment ---------------------------------------------------------------------------------
def _raw_offsets(blob: bytes) -> list[tuple[str, int, int]]:
    """``(name, raw_data offset, length)`` of each graph initializer in a serialized ModelProto."""
    def fields(pos: int, end: int):
        while pos < end:
            key, pos = _varint(blob, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(blob, pos)
                yield number, wire, None, None
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(blob, pos)
                yield number, wire, pos, length
                pos += length
            else:
                raise ValueError(f"wire type {wire}")

    out = []
    for number, wire, start, length in fields(0, len(blob)):
        if number == 7 and wire == 2:  # ModelProto.graph
            for g_number, g_wire, g_start, g_length in fields(start, start + length):
                if g_number == 5 and g_wire == 2:  # GraphProto.initializer
                    name, raw = "", None
                    for t_number, t_wire, t_start, t_length in fields(g_start, g_start + g_length):
                        if t_number == 8 and t_wire == 2:
                            name = blob[t_start:t_start + t_length].decode()
                        elif t_number == 9 and t_wire == 2:
                            raw = (t_start, t_length)
                    if raw is not None:
                        out.append((name, raw[0], raw[1]))
    return out


def _varint(blob: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = blob[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _entry_size(message) -> int:
    """Bytes of a repeated sub-message field (key, length varint, body) with a field number < 16."""
    n = message.ByteSize()
    return 1 + len(_varint_bytes(n)) + n


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def align_initializers(model: onnx.ModelProto, align: int = ALIGN, min_bytes: int = ALIGN_MIN_BYTES) -> int:
    """Pad ``doc_string``s so every large initializer's ``raw_data`` starts at a multiple of ``align``.

    Protobuf writes fields in number order: a TensorProto's ``doc_string`` (12) comes after its
    ``raw_data`` (9), and a graph's nodes (1) come before its initializers (5). So padding the
    ``doc_string`` of the message just before a large tensor (the previous initializer, or the
    last node for the first one) shifts that tensor's data without touching anything else. A pass
    computes each shift from one serialization; a second pass fixes the rare varint that grew.
    Returns the padding bytes added. Deterministic: the padding depends only on the model.
    """
    inits = list(model.graph.initializer)
    if not inits or not model.graph.node:
        return 0
    before = [model.graph.node[len(model.graph.node) - 1]] + inits[:-1]
    for message in before:
        message.doc_string = ""
    for _ in range(4):
        offsets = {name: (offset, length) for name, offset, length in _raw_offsets(model.SerializeToString())}
        delta = 0
        moved = False
        for tensor, prev in zip(inits, before):
            if tensor.name not in offsets:
                continue
            offset, length = offsets[tensor.name]
            offset += delta
            if length < min_bytes or offset % align == 0:
                continue
            shift = -offset % align
            old = _entry_size(prev)
            old_doc = prev.doc_string
            for pad in range(0, 4 * align):
                prev.doc_string = " " * pad
                grow = _entry_size(prev) - old
                if grow >= 0 and (grow - shift) % align == 0:
                    break
            else:  # pragma: no cover - a pad always exists within 4*align
                prev.doc_string = old_doc
                continue
            delta += grow
            moved = True
        if not moved:
            break
    bad = [n for n, (o, l) in offsets.items() if l >= min_bytes and o % align]
    if bad:
        log.warning("could not align initializers %s", bad[:3])
    return sum(len(m.doc_string) for m in before)


# -- files ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_file` did: where, which target, sizes, validation and timings."""

    output: Path
    target: str
    bytes: int
    sizes: object  # qbert_edge.exporters.sizes.SizeReport
    validation: object | None  # qbert_edge.exporters.validate.ValidationReport
    seconds_export: float
    seconds_validate: float


def read_source(source: str | os.PathLike) -> tuple[dict, str]:
    """``(model.pt dict, kind)`` for a qbert-edge ``model.pt`` (kind "quantized") or any fp32 model
    :func:`qbert_edge.loading.load_model` reads (kind "fp32")."""
    from qbert_edge.checkpoint import read_checkpoint

    path = Path(source)
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        try:
            return read_checkpoint(path), "quantized"
        except QbertEdgeError:
            if not (path.parent / "config.json").is_file():
                raise  # not ours, and not a state dict with a config beside it
    from qbert_edge.loading import load_model

    return fp32_checkpoint(load_model(str(source))), "fp32"


def default_output(source: str | os.PathLike, target: str) -> Path:
    """``model.pt -> model.onnx`` beside it (``model.ort.onnx`` for ``--target ort``); ``minilm -> ./minilm.onnx``."""
    path = Path(source)
    suffix = ".ort.onnx" if target == "ort" else ".onnx"
    if path.exists():
        base = path if path.is_dir() else path.with_suffix("")
        return base.parent / (base.name + suffix)
    return Path(path.name + suffix)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def export_file(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    target: str = "portable",
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    texts: list[str] | None = None,
) -> ExportResult:
    """Read ``source``, export, validate, then write ``output`` atomically (nothing on failure)."""
    from qbert_edge.exporters.sizes import size_report
    from qbert_edge.fileio import atomic_path

    if target not in TARGETS:
        raise QbertEdgeError(f"unknown target {target!r} (expected one of {', '.join(TARGETS)})")
    out = Path(output) if output is not None else default_output(source, target)
    src = Path(source)
    if src.exists() and _same_file(src, out):
        raise QbertEdgeError(f"{out}: refusing to overwrite the input {src}")
    if not out.parent.is_dir():
        raise QbertEdgeError(f"{out}: directory {out.parent} does not exist")
    if out.is_dir():
        raise QbertEdgeError(f"{out}: is a directory")
    t0 = time.perf_counter()
    data, kind = read_source(source)
    model = export_model(data, target=target, opset=opset, name=str(source))
    blob = model.SerializeToString()
    t1 = time.perf_counter()
    from qbert_edge.exporters.validate import check_model, validate_export

    check_model(model)
    report = None
    if validate:
        report = validate_export(model, data, texts=texts, name=str(source), check=False)
        if not report.ok:
            raise QbertEdgeError(f"{out}: validation failed, nothing written: {report.summary()}")
    t2 = time.perf_counter()
    with atomic_path(out) as tmp:
        tmp.write_bytes(blob)
    return ExportResult(
        output=out,
        target=target,
        bytes=len(blob),
        sizes=size_report(model, file_bytes=len(blob)),
        validation=report,
        seconds_export=t1 - t0,
        seconds_validate=t2 - t1,
    )
