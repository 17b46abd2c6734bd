"""``qbert-edge eval``: accuracy and macro-F1 of a model on labelled data.

An exported ``model.onnx`` runs on the edge runtime (``--backend``; no torch needed); any other
model (``minilm-rt``, a transformers directory, a state dict, a quantized ``model.pt``) runs in
torch through :func:`qbert_edge.train.evaluate_torch`. Both score with
:mod:`qbert_edge.runtime.metrics`, so the numbers are comparable.
"""

from __future__ import annotations

import json
import time

import click

from qbert_edge.cli.run import accuracy_level_option, int8_matmul_option, open_session, runtime_options
from qbert_edge.errors import QbertEdgeError

EVAL_FORMAT = "qbert-edge/eval"
EVAL_VERSION = 1


def evaluate_onnx(model: str, data: str, backend: str, threads: int | None, batch_size: int,
                  max_length: int | None, accuracy_level: int | None = None,
                  int8_matmul: bool = False) -> tuple[dict, str]:
    """Metrics of an exported model on ``data``; returns (metrics dict, backend used)."""
    from qbert_edge.data import load_data
    from qbert_edge.runtime.metrics import score_logits

    with open_session(model, backend, threads, accuracy_level, int8_matmul, max_length=max_length) as session:
        if not session.labels:
            raise QbertEdgeError(f"{model}: is a bare encoder without labels; eval needs a classifier")
        dataset = load_data(data, labels=session.labels)
        logits = session.logits(dataset.texts, dataset.text_pairs, batch_size=batch_size)
        return score_logits(dataset.label_ids, logits).to_dict(), session.backend


def evaluate_torch_model(model: str, data: str, batch_size: int, max_length: int | None) -> dict:
    """Metrics of a torch model (imports torch and transformers)."""
    from qbert_edge.data import load_data
    from qbert_edge.loading import load_model
    from qbert_edge.train import evaluate_torch

    loaded = load_model(model)
    dataset = load_data(data, labels=loaded.labels)
    metrics, _ = evaluate_torch(loaded.model, dataset, loaded.tokenizer, batch_size=batch_size,
                                max_length=max_length or loaded.max_length)
    return metrics.to_dict()


@click.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="rt:dev, rt:train, rt or a CSV/TSV/JSONL file with text and label.")
@runtime_options
@accuracy_level_option
@int8_matmul_option
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=None,
              help="Tokens per text. [default: the model's own (from its metadata or model.pt)]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qbert-edge/eval v1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
def command(model, data, backend, threads, accuracy_level, int8_matmul, batch_size, max_length, as_json, output) -> None:
    """Accuracy and macro-F1 of MODEL on DATA.

    \b
    Examples:
      qbert-edge eval model.onnx --data rt:dev
      qbert-edge eval model.onnx --data rt:dev --backend ort-custom --json
      qbert-edge eval minilm-rt --data rt:dev          (torch)
    """
    start = time.perf_counter()
    if model.endswith(".onnx"):
        metrics, used = evaluate_onnx(model, data, backend, threads, batch_size, max_length, accuracy_level,
                                      int8_matmul)
    else:
        if backend not in ("auto", "torch"):
            raise QbertEdgeError(f"{model}: --backend applies to an exported .onnx model; this one runs in torch")
        metrics, used = evaluate_torch_model(model, data, batch_size, max_length), "torch"
    result = {"format": EVAL_FORMAT, "version": EVAL_VERSION, "model": model, "data": data, "backend": used,
              "metrics": metrics, "seconds": round(time.perf_counter() - start, 2)}
    if output:
        from qbert_edge.fileio import write_json

        write_json(output, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from qbert_edge.runtime.metrics import Metrics

        click.echo(f"{model} on {data} ({used}): {Metrics(**metrics)}")
