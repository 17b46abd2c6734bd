"""``qbert-edge measure``: latency and DRAM footprint of a model.onnx, in a fresh process."""

from __future__ import annotations

import json

import click

from qbert_edge.cli.run import accuracy_level_option, int8_matmul_option, runtime_options


def format_report(r: dict) -> str:
    """A human-readable summary of a ``qbert-edge/measure`` report."""
    rss, static, lat = r["rss_mb"], r["static_mb"], r["latency_ms"]

    def mb(value):
        return "n/a" if value is None else f"{value:.1f} MB"

    lines = [
        f"{r['model']}  backend {r['backend']}  batch {r['batch']} x {r['seq_len']} tokens  "
        f"{r['threads']} threads  {r['runs']} runs after {r['warmup']} warm-up",
        f"  file          {static['total']:.2f} MB  (packed codes {static['packed_codes']:.2f}, scales "
        f"{static['scales'] + static['zero_points']:.2f}, fp32 {static['fp32']:.2f}, int8 {static['int8']:.2f}, "
        f"graph+metadata {static['graph']:.2f})",
        f"  activations   ~{r['activations_mb']:.2f} MB (estimate)",
        f"  RSS           baseline {mb(rss['baseline'])}, after load {mb(rss['after_load'])}, peak {mb(rss['peak'])}",
        f"  model share   {mb(rss['model_share'])} of peak RSS (peak - baseline)",
        f"  latency       p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms  (load {r['load_s']:.2f} s)",
    ]
    emulated = r.get("host", {}).get("emulated")
    if emulated:
        lines.append(f"  note          emulated CPU ({emulated}): every RSS figure includes the emulator itself")
    return "\n".join(lines)


@click.command(name="measure")
@click.argument("model", type=click.Path(dir_okay=False))
@runtime_options
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True)
@click.option("--seq-len", type=click.IntRange(1), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=20, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=3, show_default=True)
@click.option("--arena/--no-arena", default=None, help="onnxruntime's CPU memory arena. [default: off]")
@click.option("--prepacking/--no-prepacking", default=None, help="Let kernels keep re-laid-out weight copies. [default: on]")
@click.option("--optimization", type=click.Choice(["disabled", "basic", "extended", "all"]), default=None,
              help="onnxruntime graph optimization level. [default: all]")
@accuracy_level_option
@int8_matmul_option
@click.option("--random-tables/--no-random-tables", default=None,
              help="Advise the embedding tables random-access after loading (no fault-around; Linux). [default: on]")
@click.option("--plain-ort", is_flag=True, help="Measure onnxruntime.InferenceSession(MODEL) with its defaults instead (a baseline).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (qbert-edge/measure v1).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also write the JSON here.")
def command(model, backend, threads, batch, seq_len, runs, warmup, arena, prepacking, optimization, accuracy_level,
            int8_matmul, random_tables, plain_ort, as_json, output) -> None:
    """Latency and DRAM of MODEL on random tokens, measured in a fresh process.

    The model's share of DRAM is the peak RSS (VmHWM) minus the RSS of a process that only
    imported the runtime.

    \b
    Examples:
      qbert-edge measure model.onnx
      qbert-edge measure model.onnx --backend ort-custom --batch 1 --seq-len 128 --runs 20 --json
    """
    from qbert_edge.runtime.memory import MeasureConfig, measure

    config = MeasureConfig(model=model, backend=backend, batch=batch, seq_len=seq_len, runs=runs, warmup=warmup,
                           threads=threads, arena=arena, prepacking=prepacking, optimization=optimization,
                           accuracy_level=accuracy_level, random_tables=random_tables,
                           int8_matmul=True if int8_matmul else None,
                           engine="plain-ort" if plain_ort else "qbert-edge")
    report = measure(config)
    if output:
        from qbert_edge.fileio import write_json

        write_json(output, report)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
