"""``qbert-edge run``: classify texts with an exported model.onnx (no torch, no transformers).

Also holds the runtime options shared by ``run``, ``eval`` and ``measure`` (:func:`runtime_options`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from qbert_edge.errors import QbertEdgeError

PREDICTIONS_FORMAT = "qbert-edge/predictions"
PREDICTIONS_VERSION = 1
EMBEDDINGS_FORMAT = "qbert-edge/embeddings"
EMBEDDINGS_VERSION = 1


def runtime_options(func):
    """``--backend`` and ``--threads`` (a backend name is checked by the runtime, in one line)."""
    func = click.option("--threads", type=click.IntRange(1), default=None,
                        help="onnxruntime intra-op threads. [default: physical cores, at most 4]")(func)
    func = click.option("--backend", default="auto", show_default=True,
                        help="auto, ort (onnxruntime low-bit kernels), ort-custom (our kernels, leanest) "
                             "or reference (NumPy, for checking).")(func)
    return func


def _accuracy_level_help() -> str:
    from qbert_edge.runtime.native import DEFAULT_ACCURACY_LEVEL

    return ("MatMulNBits compute type for backend ort: 0 exact fp32 (2-bit layers run widened to 4 bits), "
            "4 int8 activations per block (faster; 2-bit layers run on onnxruntime's 2-bit kernel; not "
            f"bit-exact, see docs/runtime.md). [default: {DEFAULT_ACCURACY_LEVEL}]")


accuracy_level_option = click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
                                     help=_accuracy_level_help())
int8_matmul_option = click.option(
    "--int8-matmul", is_flag=True,
    help="Backend ort: run the matmuls with 8-bit activations as onnxruntime's integer GEMM on int8 "
         "weights (same numbers up to float rounding; several times faster on CPUs with int8 dot products; "
         "the weights take 1 byte each instead of 0.5: more DRAM, see docs/runtime.md).")


def open_session(model: str, backend: str, threads: int | None, accuracy_level: int | None = None,
                 int8_matmul: bool = False, **kwargs):
    """A :class:`~qbert_edge.runtime.session.Session`; QbertEdgeErrors pass through as one line."""
    from qbert_edge.runtime.backends import RuntimeOptions
    from qbert_edge.runtime.session import Session

    level = {} if accuracy_level is None else {"accuracy_level": accuracy_level}  # None: the runtime's default
    options = RuntimeOptions(threads=threads, int8_matmul=bool(int8_matmul), **level)
    return Session(model, backend=backend, options=options, **kwargs)


def read_texts(texts: tuple[str, ...], file: str | None) -> list[str]:
    """The texts of ``--text`` or of ``--file`` (one text per non-empty line)."""
    if bool(texts) == bool(file):
        raise QbertEdgeError("give --text T (one or more) or --file F, not both")
    if texts:
        return list(texts)
    path = Path(file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise QbertEdgeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QbertEdgeError(f"{path}: is a directory") from None
    except UnicodeDecodeError as exc:
        raise QbertEdgeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    out = [line for line in lines if line.strip()]
    if not out:
        raise QbertEdgeError(f"{path}: no texts (every line is empty)")
    return out


@click.command(name="run")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--text", "texts", multiple=True, help="A text to classify (repeat for more).")
@click.option("--file", "file", type=click.Path(dir_okay=False), help="A UTF-8 file with one text per line.")
@runtime_options
@accuracy_level_option
@int8_matmul_option
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qbert-edge/predictions v1).")
def command(model, texts, file, backend, threads, accuracy_level, int8_matmul, batch_size, as_json) -> None:
    """Classify texts with MODEL (an exported model.onnx); a bare encoder gives sentence vectors.

    \b
    Examples:
      qbert-edge run model.onnx --text "a gripping, funny film" --text "a dull mess"
      qbert-edge run model.onnx --file reviews.txt --backend ort-custom --json
      qbert-edge run encoder.onnx --text "a film" --json     # mean-pooled, unit-length vectors
    """
    items = read_texts(texts, file)
    with open_session(model, backend, threads, accuracy_level, int8_matmul) as session:
        if not session.is_classifier:
            vectors = session.embed(items, batch_size=batch_size)
            _print_embeddings(model, session.backend, items, vectors, as_json)
            return
        preds = session.predict(items, batch_size=batch_size)
        used = session.backend
    if as_json:
        click.echo(json.dumps({
            "format": PREDICTIONS_FORMAT, "version": PREDICTIONS_VERSION, "model": str(model),
            "backend": used, "predictions": [p.to_dict() for p in preds],
        }, indent=2))
        return
    for p in preds:
        click.echo(f"{p.label}\t{p.probabilities[p.label]:.3f}\t{p.text}")


def _print_embeddings(model, backend: str, texts: list[str], vectors, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({
            "format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "model": str(model), "backend": backend,
            "pooling": "mean over tokens, L2-normalised",
            "embeddings": [{"text": t, "vector": [round(float(x), 6) for x in v]} for t, v in zip(texts, vectors)],
        }, indent=2))
        return
    click.echo(f"# {vectors.shape[1]}-dim unit sentence vectors (mean-pooled); first 4 values; --json for all")
    for text, v in zip(texts, vectors):
        click.echo(" ".join(f"{x:+.4f}" for x in v[:4]) + f" ...\t{text}")
    if len(texts) > 1:
        sims = vectors @ vectors.T
        click.echo("# cosine similarity to the first text: " + ", ".join(f"{s:.3f}" for s in sims[0, 1:]))
