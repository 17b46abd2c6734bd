"""A loaded ``model.onnx`` that classifies texts: the device-side API of qbert-edge.

>>> with Session("model.onnx") as s:                      # doctest: +SKIP
...     s.predict(["a gripping, funny film"])[0].label
'positive'

:class:`Session` maps the model file (:mod:`~qbert_edge.runtime.loader`), reads the tokenizer,
labels and maximum length that the exporter stored in ``metadata_props``
(:mod:`qbert_edge.exporters.metadata`), checks the ``qbert_edge`` ops against this runtime, and
builds one of the three backends (:mod:`~qbert_edge.runtime.backends`). ``predict(texts)`` gives
labels and probabilities; ``logits(texts)`` the raw scores; ``run(feeds)`` the graph's outputs for
arrays the caller built. A model without qbert-edge metadata (an ONNX file from elsewhere) loads
with ``require_metadata=False`` and then only answers ``run``.

Texts longer than the model's ``max_length`` are truncated with a warning; an empty text is an
error. Every user-caused problem is a one-line :class:`~qbert_edge.errors.QbertEdgeError`.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from qbert_edge.errors import QbertEdgeError
from qbert_edge.runtime import backends as _backends
from qbert_edge.runtime.backends import RuntimeOptions

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Prediction:
    """One text's class: ``label`` (name), ``label_id`` and the softmax ``probabilities`` by name."""

    text: str
    label: str
    label_id: int
    probabilities: Mapping[str, float]

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "label_id": self.label_id,
                "probabilities": dict(self.probabilities)}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64: ``softmax(np.zeros((1, 2))) -> [[0.5, 0.5]]``."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Session:
    """``model.onnx`` on one backend (``auto``, ``ort``, ``ort-custom`` or ``reference``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        backend: str | None = "auto",
        options: RuntimeOptions | None = None,
        *,
        require_metadata: bool = True,
        max_length: int | None = None,
    ) -> None:
        from qbert_edge.runtime.loader import load_graph

        self.path = Path(path)
        self.backend_name = _backends.resolve(backend)
        self.options = options or RuntimeOptions()
        graph = load_graph(self.path)
        self.info = self._read_info(graph, require_metadata)
        if self.info is not None and self.info.target == "ort" and self.backend_name == "reference":
            raise QbertEdgeError(
                f"{self.path}: was exported with --target ort (onnxruntime's own ops); use --backend ort"
            )
        self.static_bytes = graph.file_bytes
        self._tokenizer = None
        self.max_length = max_length or (self.info.max_length if self.info else None)
        self._limits = _backends.index_limits(graph.model, graph.weights)
        self._backend = _backends.create(self.backend_name, graph, self.options)
        del graph  # the backend holds what it needs: mapped weights, no parsed copy

    def _read_info(self, graph, require: bool):
        from qbert_edge.exporters.metadata import PREFIX, model_info

        if not require and PREFIX + "format" not in graph.metadata():
            return None
        return model_info(graph.model, str(self.path))

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        return self.backend_name

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels if self.info else ()

    @property
    def input_names(self) -> list[str]:
        return list(self._backend.input_names)

    @property
    def output_names(self) -> list[str]:
        return list(self._backend.output_names)

    @property
    def tokenizer(self):
        if self.info is None:
            raise QbertEdgeError(f"{self.path}: has no qbert-edge metadata (tokenizer, labels); export it with qbert-edge export")
        if self._tokenizer is None:
            from qbert_edge.runtime.text import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.info.tokenizer)
            except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
                raise QbertEdgeError(f"{self.path}: the stored tokenizer cannot be read ({exc})") from None
        return self._tokenizer

    # ------------------------------------------------------------------ running

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's outputs for ``feeds`` (int64 ``[batch, length]`` arrays by input name)."""
        checked = self._check_feeds(feeds)
        try:
            return self._backend.run(checked)
        except QbertEdgeError:
            raise
        except Exception as exc:
            raise QbertEdgeError(f"{self.path}: backend {self.backend_name} failed: {_backends._first_line(exc)}") from None

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise QbertEdgeError(f"{self.path}: missing input(s) {', '.join(missing)} (the model takes {', '.join(self.input_names)})")
        out = {}
        shape = None
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            if arr.dtype.kind not in "iu":
                raise QbertEdgeError(f"{self.path}: input {name} must be integers, got {arr.dtype}")
            if arr.ndim != 2 or 0 in arr.shape:
                raise QbertEdgeError(f"{self.path}: input {name} must be a non-empty [batch, length] array, got shape {list(arr.shape)}")
            if shape is not None and arr.shape != shape:
                raise QbertEdgeError(f"{self.path}: input {name} has shape {list(arr.shape)}, others {list(shape)}")
            shape = arr.shape
            limit = self._limits.get(name)
            if limit is not None and (arr.min() < 0 or arr.max() >= limit):
                bad = int(arr.max()) if arr.max() >= limit else int(arr.min())
                raise QbertEdgeError(f"{self.path}: {name} holds {bad}, outside the model's table of {limit} rows")
            out[name] = np.ascontiguousarray(arr, dtype=np.int64)
        return out

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Token arrays for ``texts``; warns about texts cut to ``max_length`` tokens."""
        from qbert_edge.runtime.text import encode

        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise QbertEdgeError(f"text {i + 1} is not a string")
            if not text.strip():
                raise QbertEdgeError(f"text {i + 1} is empty")
        enc = encode(self.tokenizer, texts, pairs, max_length=self.max_length or 512)
        if enc.truncated:
            log.warning("%d text(s) longer than %d tokens were truncated", enc.truncated, self.max_length)
        return {k: v for k, v in enc.arrays.items() if k in self.input_names}

    def _batched(self, output: str, texts: Sequence[str], pairs: Sequence[str] | None, batch_size: int,
                 missing: str, verb: str):
        """``(feeds, outputs[output])`` for ``batch_size`` texts at a time; ``missing`` explains an absent output."""
        if self.info is None:
            raise QbertEdgeError(f"{self.path}: has no qbert-edge metadata (tokenizer, labels); export it with qbert-edge export")
        if output not in self.output_names:
            raise QbertEdgeError(f"{self.path}: {missing}")
        texts = list(texts)
        pairs = None if pairs is None else list(pairs)
        if not texts:
            raise QbertEdgeError(f"no texts to {verb}")
        for start in range(0, len(texts), batch_size):
            chunk_pairs = None if pairs is None else pairs[start:start + batch_size]
            feeds = self.encode(texts[start:start + batch_size], chunk_pairs)
            yield feeds, self.run(feeds)[output]

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 ``[len(texts), classes]`` logits, computed ``batch_size`` texts at a time."""
        out = [logits for _, logits in self._batched(
            "logits", texts, pairs, batch_size,
            "is a bare encoder (no logits output); use embed() for sentence vectors", "classify")]
        return np.concatenate(out, axis=0).astype(np.float32, copy=False)

    @property
    def is_classifier(self) -> bool:
        return "logits" in self.output_names

    def embed(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """float32 ``[len(texts), hidden]`` unit-length sentence vectors of a bare encoder.

        The mean of ``last_hidden_state`` over each text's tokens (padding excluded), L2-normalised:
        the pooling all-MiniLM-L6-v2 (sentence-transformers) was trained with, so cosine similarity
        is a dot product.
        """
        out = []
        for feeds, hidden in self._batched("last_hidden_state", texts, pairs, batch_size,
                                           "has no last_hidden_state output to pool", "embed"):
            mask = feeds["attention_mask"][..., None].astype(np.float64)
            mean = (hidden.astype(np.float64) * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
            out.append(mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out, axis=0).astype(np.float32)

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE) -> list[Prediction]:
        """The label and class probabilities of each text."""
        texts = list(texts)
        probs = softmax(self.logits(texts, pairs, batch_size))
        labels = self.labels or tuple(str(i) for i in range(probs.shape[1]))
        if len(labels) != probs.shape[1]:
            raise QbertEdgeError(f"{self.path}: {len(labels)} labels in the metadata but {probs.shape[1]} logits")
        out = []
        for text, p in zip(texts, probs):
            i = int(p.argmax())
            out.append(Prediction(text, labels[i], i, {name: float(v) for name, v in zip(labels, p)}))
        return out

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if getattr(self, "_backend", None) is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
