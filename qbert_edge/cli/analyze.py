"""``qbert-edge analyze``: Hessian sensitivity of each encoder layer -> sensitivity.json (+ PNGs)."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from qbert_edge.errors import QbertEdgeError


def _parse_landscape(text: str | None) -> int | str | None:
    if text is None or text == "top":
        return text
    try:
        layer = int(text)
    except ValueError:
        raise QbertEdgeError(f"--landscape {text!r}: expected a layer number or 'top'") from None
    if layer < 0:
        raise QbertEdgeError(f"--landscape {layer}: layer numbers start at 0")
    return layer


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise QbertEdgeError(f"--layers {text!r}: expected comma-separated layer numbers, e.g. 0,3,5") from None


@click.command(name="analyze")
@click.argument("model")
@click.option("--data", required=True, help="Training data: a CSV/TSV/JSONL file (text, label[, text_pair]) or rt:train.")
@click.option("--subsets", "k", type=click.IntRange(1), default=10, show_default=True, help="Number of random data subsets.")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True, help="Fraction of the data in each subset.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(2), default=64, show_default=True, help="Tokens per text (longer texts are cut).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the subsets and the eigen-solver's start vectors.")
@click.option("--method", type=click.Choice(["lanczos", "power"]), default="lanczos", show_default=True,
              help="Eigen-solver: Lanczos (stops when the relative residual |Hv - λv|/|λ| <= sqrt(tol)) or power "
                   "iteration (also needs the eigenvalue to move by <= tol; about one HVP pass more per subset).")
@click.option("--max-iter", type=click.IntRange(1), default=50, show_default=True, help="Hessian-vector products per layer and subset, at most.")
@click.option("--tol", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Relative eigenvalue accuracy aimed at (the residual must be <= sqrt(tol)).")
@click.option("--layers", "layers_text", default=None, help="Analyse only these layers (e.g. 0,5); allocate needs all.")
@click.option("--warm-start/--no-warm-start", default=True, show_default=True,
              help="Start each subset from the previous subset's eigenvectors (fewer iterations; each subset still converges on its own).")
@click.option("--fresh-head", is_flag=True, help="For a bare encoder (e.g. minilm): add an untrained classifier head. Only for benchmarking: the numbers then describe an untrained task.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads [default: torch's choice].")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write sensitivity.json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="PNG of the eigenvalue spread per layer.")
@click.option("--landscape", "landscape_layer", default=None, help="Also compute the loss landscape of this layer (a number, or 'top' for the most sensitive) along its top two eigenvectors.")
@click.option("--landscape-plot", "landscape_path", type=click.Path(dir_okay=False), default=None,
              help="PNG of the landscape [default: <output stem>.landscape-L<LAYER>.png].")
@click.option("--landscape-grid", type=click.IntRange(3), default=15, show_default=True, help="Grid points per axis.")
@click.option("--landscape-radius", type=click.FloatRange(0, min_open=True), default=None, help="Half-width of the grid along each unit eigenvector [default: sqrt(2/|λ1|)].")
@click.option("--landscape-examples", type=click.IntRange(1), default=256, show_default=True, help="Examples (from the first subset) for the landscape.")
def command(model, data, k, fraction, batch_size, max_length, seed, method, max_iter, tol, layers_text, warm_start, fresh_head,
            threads, output, plot_path, landscape_layer, landscape_path, landscape_grid, landscape_radius,
            landscape_examples) -> None:
    """Top Hessian eigenvalue of each encoder layer of MODEL over data subsets -> sensitivity.json.

    MODEL is minilm-rt, a transformers directory or a state dict of a fine-tuned
    BertForSequenceClassification. Writes nothing until everything is computed (Ctrl-C leaves
    no partial output).

    \b
    Example:
      qbert-edge analyze minilm-rt --data rt:train -o sensitivity.json --plot sensitivity.png
    """
    layers = _parse_layers(layers_text)
    landscape_layer = _parse_landscape(landscape_layer)
    output = Path(output)
    targets = [output] + [Path(p) for p in (plot_path,) if p]
    if landscape_layer is not None:
        landscape_path = Path(landscape_path) if landscape_path else output.with_name(f"{output.stem}.landscape.png")
        targets.append(landscape_path)
    for t in targets:
        if not t.parent.is_dir():
            raise QbertEdgeError(f"{t}: directory {t.parent} does not exist")

    import torch
    from tqdm import tqdm

    from qbert_edge import hessian
    from qbert_edge.data import load_data, subsets
    from qbert_edge.fileio import atomic_path
    from qbert_edge.loading import load_model
    from qbert_edge.plots import plot_landscape, plot_spread
    from qbert_edge.qmodel import quantizable_shapes

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model)
    net = loaded.model
    if fresh_head and not loaded.labels:
        dataset = load_data(data)
        loaded = load_model(model, num_labels=len(dataset.labels))
        net = loaded.model
    else:
        dataset = load_data(data, labels=loaded.labels or None)
    n_layers = hessian.encoder_layers(net)  # also: a clear error for a model without a classifier
    if isinstance(landscape_layer, int) and landscape_layer >= n_layers:
        raise QbertEdgeError(f"--landscape {landscape_layer}: the model has {n_layers} encoder layers (0..{n_layers - 1})")
    subs = subsets(dataset, k, fraction, seed)
    batches = [hessian.sorted_batches(s, loaded.tokenizer, batch_size, max_length) for s in subs]
    info = {
        "command": shlex.join(["qbert-edge", *sys.argv[1:]]) if sys.argv[0].endswith("qbert-edge") else None,
        "model": loaded.name,
        "data": data,
        "shapes": quantizable_shapes(net),
        "settings": {
            "fraction": fraction,
            "batch_size": batch_size,
            "max_length": max_length,
            "data_examples": len(dataset),
            "subset_examples": len(subs[0]),
            "fresh_head": bool(fresh_head),
            "loss": "mean cross-entropy over the subset",
        },
    }

    bar = tqdm(total=k, desc="subsets", unit="subset", dynamic_ncols=True)
    state = {"subset": 0}

    def progress(s: int, it: int, running: list) -> None:
        if s != state["subset"]:
            bar.update(s - state["subset"])
            state["subset"] = s
        bar.set_postfix_str(f"subset {s + 1}/{k} iteration {it}, layers running {len(running)}")

    with bar:
        sens, last = hessian.analyze(
            net, batches, layers, max_iter=max_iter, tol=tol, seed=seed, method=method, warm_start=warm_start,
            progress=progress, info=info,
        )
        bar.update(k - state["subset"])

    land = None
    if landscape_layer is not None:
        t0 = time.perf_counter()
        if landscape_layer == "top":
            landscape_layer = sens.ranking()[0]
        sample = subs[0]
        sample = type(sample)(sample.name, sample.examples[:landscape_examples], sample.labels)
        lb = hessian.sorted_batches(sample, loaded.tokenizer, batch_size, max_length)
        click.echo(f"landscape of layer {landscape_layer}: top two eigenvectors on {len(sample)} examples ...", err=True)
        start = last[landscape_layer].vector if landscape_layer in last else None
        pairs = hessian.top_eigenvectors(net, lb, landscape_layer, k=2, max_iter=max_iter, tol=tol, seed=seed,
                                         method=method, start=start)
        land = hessian.loss_landscape(net, lb, landscape_layer, pairs, radius=landscape_radius, grid=landscape_grid)
        sens = replace(sens.with_landscape(land), timings={**sens.timings, "landscape_s": round(time.perf_counter() - t0, 3)})

    with contextlib.ExitStack() as stack:
        tmp_json = stack.enter_context(atomic_path(output))
        sens.save(tmp_json)
        if plot_path:
            plot_spread(sens, stack.enter_context(atomic_path(plot_path)))
        if land is not None:
            plot_landscape(land, stack.enter_context(atomic_path(landscape_path)), model=sens.model)

    click.echo(_summary(sens))
    click.echo(f"wrote {', '.join(str(t) for t in targets)}")


def _summary(sens) -> str:
    lines = [f"{'layer':>5} {'mean':>10} {'std':>9} {'omega':>10} {'rank':>4}  converged"]
    for l in sens.layers:
        lines.append(
            f"{l.layer:>5} {l.mean:>10.4g} {l.std:>9.3g} {l.omega:>10.4g} {sens.rank(l.layer):>4}  "
            f"{sum(l.converged)}/{len(l.converged)}"
        )
    t = sens.timings
    lines.append(f"{t.get('hvp_passes')} HVP passes in {t.get('total_s')} s")
    return "\n".join(lines)
