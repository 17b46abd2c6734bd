"""Text to model inputs with a ``tokenizers.Tokenizer`` (NumPy only; shared by training and the device).

>>> from tokenizers import Tokenizer  # doctest: +SKIP
>>> encode(tok, ["a good film"], max_length=8)["input_ids"].shape  # doctest: +SKIP
(1, 5)

Batches are padded to their longest member (not to ``max_length``) and truncated to
``max_length`` tokens; :func:`encode` reports how many texts it truncated so callers can warn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class Encoded:
    """``arrays``: int64 ``[batch, length]`` per input name; ``truncated``: texts cut to fit."""

    arrays: dict[str, np.ndarray]
    truncated: int

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def load_tokenizer(tokenizer_json: str):
    """A ``tokenizers.Tokenizer`` from the text of a ``tokenizer.json`` file."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def encode(
    tokenizer,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    max_length: int = 128,
    pad_id: int | None = None,
) -> Encoded:
    """Tokenize ``texts`` (and optional second segments ``pairs``) into padded int64 arrays."""
    inputs = _inputs(tokenizer, texts, pairs)
    encs = tokenizer.encode_batch(inputs)
    truncated = sum(len(e.ids) > max_length for e in encs)
    if truncated:
        tokenizer.enable_truncation(max_length=max_length)
        encs = tokenizer.encode_batch(inputs)
        tokenizer.no_truncation()
    length = max((len(e.ids) for e in encs), default=1)
    if pad_id is None:
        pad_id = _pad_id(tokenizer)
    ids = np.full((len(encs), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(encs), length), dtype=np.int64)
    types = np.zeros((len(encs), length), dtype=np.int64)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = 1
        types[i, :n] = e.type_ids
    return Encoded({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, truncated)


def token_counts(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, max_length: int = 128) -> list[int]:
    """The number of tokens :func:`encode` gives each text (pair), without padding anything."""
    return [min(len(e.ids), max_length) for e in tokenizer.encode_batch(_inputs(tokenizer, texts, pairs))]


def _inputs(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None) -> list:
    """``encode_batch`` inputs (texts or ``(text, pair)`` tuples); padding and truncation switched off."""
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(pairs)} text pairs")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return list(texts) if pairs is None else list(zip(texts, pairs))


def _pad_id(tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        idx = tokenizer.token_to_id(token)
        if idx is not None:
            return idx
    return 0


def tokenizer_json(tokenizer) -> str:
    """The canonical JSON text of a tokenizer (padding/truncation switched off)."""
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return json.dumps(json.loads(tokenizer.to_str()), sort_keys=True)
