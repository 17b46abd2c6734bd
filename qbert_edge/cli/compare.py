"""``qbert-edge compare A B --data DATA``: per-head attention KL divergence between two models."""

from __future__ import annotations

import json

import click


@click.command(name="compare")
@click.argument("model_a")
@click.argument("model_b")
@click.option("--data", required=True, help="A CSV/TSV/JSONL file or a built-in name such as rt:dev.")
@click.option("--limit", type=click.IntRange(1), default=256, show_default=True, help="Compare on this many examples.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=64, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a heat map PNG (layers x heads).")
@click.option("--json", "as_json", is_flag=True, help="Print the KL matrix as JSON.")
def command(model_a, model_b, data, limit, batch_size, max_length, plot_path, as_json) -> None:
    """KL(A || B) of the attention distributions, per layer and head (the paper's Fig. 4).

    A and B are any models `qbert-edge quantize` accepts, or quantized model.pt files; both see
    the same tokenized inputs (A's tokenizer).

    \b
    Example:
      qbert-edge compare minilm-rt w2.pt --data rt:dev --plot kl.png
    """
    from qbert_edge.attention import attention_kl, plot_attention_kl
    from qbert_edge.data import load_data, subsets, torch_batches
    from qbert_edge.loading import load_model

    a, b = load_model(model_a), load_model(model_b)
    dataset = load_data(data, labels=a.labels or None)
    if len(dataset) > limit:
        dataset = subsets(dataset, 1, limit / len(dataset), seed=0)[0]
    kl = attention_kl(a.model, b.model, torch_batches(dataset, a.tokenizer, batch_size, max_length))
    if plot_path:
        plot_attention_kl(kl, plot_path, f"KL({model_a} || {model_b}) on {data}")
    if as_json:
        click.echo(json.dumps({"format": "qbert-edge/attention-kl", "version": 1, "a": model_a, "b": model_b,
                               "data": data, "kl": kl.round(6).tolist()}))
        return
    click.echo(f"KL({model_a} || {model_b}) per head on {len(dataset)} examples of {data}; mean {kl.mean():.4f}")
    for layer, row in enumerate(kl):
        click.echo(f"  layer {layer}: " + " ".join(f"{v:.3f}" for v in row) + f"   (max {row.max():.3f})")
    if plot_path:
        click.echo(f"wrote {plot_path}")
