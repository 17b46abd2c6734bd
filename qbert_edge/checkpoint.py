"""``model.pt``: a quantized model as plain tensors and strings (format ``qbert-edge/quantized-model`` v1).

It loads with ``torch.load(weights_only=True)``: nothing in it executes code. Layout::

    format, version        "qbert-edge/quantized-model", 1
    architecture           "BertForSequenceClassification" | "BertModel"
    config                 the transformers config, as a JSON string
    plan                   Plan.to_dict()
    weights                plan name -> {codes uint8 [rows, cols], scale float32 [groups],
                                         zero uint8 [groups], bits int}
    activations            plan name -> {scale float, zero int}   (uint8 input of each quantized Linear)
    fp32                   every other parameter, by its name without the "bert." prefix
    labels                 class names, index = class id ([] for a bare encoder)
    tokenizer              the tokenizer.json text (a ``tokenizers.Tokenizer``)
    max_length             the sequence length the model was trained/evaluated with
    meta                   {"method": "directq" | "qat", "source": ..., "qbert_edge_version": ...}

Codes are stored unpacked (one byte each): packing is the exporter's job. The reader
rebuilds the model from the config, quantizes it with the plan and installs the codes, so
``load_quantized(save_quantized(m))`` computes exactly what ``m`` computed.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qbert_edge import __version__
from qbert_edge.errors import QbertEdgeError
from qbert_edge.fileio import atomic_path, check_format
from qbert_edge.plan import Plan
from qbert_edge.qmodel import encoder_of, module_paths, quantize_model, quantized_modules
from qbert_edge.quant import QTensor

FORMAT = "qbert-edge/quantized-model"
VERSION = 1


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: its tokenizer and class names."""

    model: nn.Module
    tokenizer: object  # tokenizers.Tokenizer
    labels: list[str]
    name: str
    plan: Plan | None = None
    max_length: int = 128
    meta: dict = field(default_factory=dict)


def _param_name(model: nn.Module, full: str) -> str:
    return full[len("bert."):] if encoder_of(model) is not model and full.startswith("bert.") else full


def to_checkpoint(loaded: LoadedModel) -> dict:
    """The ``model.pt`` dict of a quantized, frozen model (pure: no file I/O)."""
    model, plan = loaded.model, loaded.plan
    if plan is None:
        raise QbertEdgeError(f"{loaded.name}: model is not quantized")
    paths = module_paths(model)
    weights, activations, quantized_params = {}, {}, set()
    for name, module in quantized_modules(model):
        if module.frozen is None:
            raise QbertEdgeError(f"{name}: codes are not frozen; call qmodel.freeze first")
        q = module.frozen
        weights[name] = {"codes": q.codes.contiguous(), "scale": q.scale, "zero": q.zero, "bits": q.bits}
        quantized_params.add(paths[name] + ".weight")
        observer = getattr(module, "input_quant", None)
        if observer is not None:
            if int(observer.seen) == 0:
                raise QbertEdgeError(f"{name}: activation range was never observed; calibrate the model first")
            scale, zero = observer.params()
            activations[name] = {"scale": scale, "zero": zero}
    fp32 = {
        _param_name(model, n): p.detach().float().contiguous()
        for n, p in model.named_parameters()
        if n not in quantized_params
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": type(model).__name__,
        "config": model.config.to_json_string(use_diff=False),
        "plan": plan.to_dict(),
        "weights": weights,
        "activations": activations,
        "fp32": fp32,
        "labels": list(loaded.labels),
        "tokenizer": loaded.tokenizer.to_str(),
        "max_length": int(loaded.max_length),
        "meta": {**loaded.meta, "qbert_edge_version": __version__},
    }


def save_quantized(loaded: LoadedModel, path: str | os.PathLike) -> None:
    """Write ``model.pt`` atomically."""
    data = to_checkpoint(loaded)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a ``model.pt`` dict (weights only, no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise QbertEdgeError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QbertEdgeError(f"{path}: not a readable qbert-edge model.pt ({first})") from None
    except Exception as exc:  # torch.load's weights_only unpickler raises pickle.UnpicklingError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QbertEdgeError(f"{path}: not a qbert-edge model.pt ({first[:200]})") from None
    check_format(data, path, FORMAT, VERSION)
    for key in ("architecture", "config", "plan", "weights", "fp32", "labels", "tokenizer"):
        if key not in data:
            raise QbertEdgeError(f"{path}: model.pt is missing {key!r}")
    return data


def from_checkpoint(data: dict, name: str = "model.pt") -> LoadedModel:
    """Rebuild the quantized model of a ``model.pt`` dict."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from qbert_edge.runtime.text import load_tokenizer

    classes = {"BertForSequenceClassification": BertForSequenceClassification, "BertModel": BertModel}
    if data["architecture"] not in classes:
        raise QbertEdgeError(f"{name}: unknown architecture {data['architecture']!r}")
    config = BertConfig.from_dict(json.loads(data["config"]))
    model = classes[data["architecture"]](config).eval()
    plan = Plan.from_dict(data["plan"], source=name)
    quantize_model(model, plan)
    prefix = "" if encoder_of(model) is model else "bert."
    state = {}
    for key, tensor in data["fp32"].items():
        state[key if key == "classifier.weight" or key.startswith("classifier.") else prefix + key] = tensor
    missing = model.load_state_dict(state, strict=False)
    paths = module_paths(model)
    expected_missing = {paths[n] + ".weight" for n in data["weights"]}
    real_missing = [k for k in missing.missing_keys if k not in expected_missing and "input_quant" not in k]
    if real_missing or missing.unexpected_keys:
        raise QbertEdgeError(
            f"{name}: parameters do not match the config (missing {real_missing[:3]}, unexpected {missing.unexpected_keys[:3]})"
        )
    modules = dict(quantized_modules(model))
    for qname, w in data["weights"].items():
        if qname not in modules:
            raise QbertEdgeError(f"{name}: codes for {qname!r}, which the plan does not quantize")
        modules[qname].load_frozen(QTensor(codes=w["codes"], scale=w["scale"], zero=w["zero"], bits=int(w["bits"])))
    for qname, a in data.get("activations", {}).items():
        observer = modules[qname].input_quant
        _set_range(observer, float(a["scale"]), int(a["zero"]))
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(data["tokenizer"]),
        labels=list(data["labels"]),
        name=name,
        plan=plan,
        max_length=int(data.get("max_length", 128)),
        meta=dict(data.get("meta", {})),
    )


def _set_range(observer, scale: float, zero: int) -> None:
    """Fix an observer's ``params()`` to the saved ``(scale, zero)``."""
    observer.lo.fill_(-zero * scale)
    observer.hi.fill_((2**observer.bits - 1 - zero) * scale)
    observer.seen.fill_(1)
    observer.fixed = (scale, zero)


def load_quantized(path: str | os.PathLike) -> LoadedModel:
    """Read ``model.pt`` and rebuild its quantized model."""
    return from_checkpoint(read_checkpoint(path), name=str(path))
