"""``qbert-edge demo``: the whole pipeline on the reference model, command by command.

Each step is the user-facing command itself, printed before it runs, so the demo is also the
tutorial: analyze -> allocate -> quantize -> export -> run -> eval -> measure. The settings are
cut down to finish in minutes on 2 cores (3 Hessian subsets of 2%, a short QAT); the full-size
experiments live in ``benchmarks/``.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import click

SENTENCES = (
    "a gripping, funny and beautifully acted film",
    "the plot is a mess and the jokes fall flat",
)


def _step(args: list[str]) -> None:
    from qbert_edge.cli import cli

    click.secho("$ qbert-edge " + shlex.join(args), bold=True)
    start = time.perf_counter()
    cli.main(args=args, prog_name="qbert-edge", standalone_mode=False)
    click.echo(f"  ({time.perf_counter() - start:.1f} s)\n")


@click.command(name="demo")
@click.option("-o", "--out-dir", default="qbert-edge-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where every artifact goes.")
@click.option("--model", default="minilm-rt", show_default=True, help="The fine-tuned classifier to quantize.")
@click.option("--scheme", default="2/3", show_default=True, help="Mixed-precision scheme for allocate.")
@click.option("--qat-steps", type=click.IntRange(1), default=80, show_default=True, help="QAT steps (batch 32).")
@click.option("--backend", default="auto", show_default=True, help="Runtime backend for run/eval/measure (auto, ort, ort-custom, reference).")
def command(out_dir, model, scheme, qat_steps, backend) -> None:
    """Run analyze -> allocate -> quantize -> export -> run -> eval -> measure on the reference model.

    The first run on a machine fine-tunes the reference classifier minilm-rt (about 10 minutes on
    2 cores, cached under ~/.cache/qbert-edge); later runs take a few minutes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model == "minilm-rt":
        from qbert_edge.errors import QbertEdgeError
        from qbert_edge.reference import reference_dir

        try:
            reference_dir()
        except QbertEdgeError:
            click.secho("minilm-rt is not on this machine yet: fine-tuning it once (about 10 min on 2 cores)", bold=True)
            from qbert_edge.reference import train_reference

            train_reference()
    start = time.perf_counter()
    sens, plot, plan = out / "sensitivity.json", out / "sensitivity.png", out / "plan.json"
    model_pt, onnx = out / "model.pt", out / "model.onnx"
    measure = out / "measure.json"
    _step(["analyze", model, "--data", "rt:train", "--subsets", "3", "--fraction", "0.02", "-o", str(sens),
           "--plot", str(plot)])
    _step(["allocate", str(sens), "--scheme", scheme, "--high-layers", "2", "-o", str(plan)])
    _step(["quantize", model, "--plan", str(plan), "--data", "rt:train", "--max-steps", str(qat_steps), "-o", str(model_pt)])
    _step(["export", str(model_pt), "-o", str(onnx)])
    _step(["run", str(onnx), "--backend", backend, *[a for s in SENTENCES for a in ("--text", s)]])
    _step(["eval", str(onnx), "--data", "rt:dev", "--backend", backend])
    _step(["measure", str(onnx), "--backend", backend, "-o", str(measure)])  # a table here, JSON in the file
    click.secho(f"done in {time.perf_counter() - start:.0f} s. Artifacts:", bold=True)
    for path, what in ((sens, "per-layer Hessian sensitivity"), (plot, "eigenvalue spread per layer"),
                       (plan, "bits per module"), (model_pt, "quantized model (codes, scales, plan, tokenizer)"),
                       (onnx, "packed ONNX model for the device"), (measure, "latency and DRAM footprint")):
        size = f"{path.stat().st_size / 1e6:.2f} MB" if path.exists() else "missing"
        click.echo(f"  {path}  ({what}; {size})")
