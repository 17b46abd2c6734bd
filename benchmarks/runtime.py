"""Runtime benchmark at BERT-base shape: qbert-edge's backends against onnxruntime's own tools.

    python benchmarks/runtime.py                      # builds the models once, then measures
    python benchmarks/runtime.py --runs 20 --threads 2 --out benchmarks/results/runtime

A randomly initialised BERT-base encoder (12 x 768, 3072, vocab 30522; the MiniLM package's
BERT-uncased tokenizer) is built in ``--workdir`` and lowered five ways:

- ``fp32``: qbert-edge's fp32 export (the same graph as ours, weights fp32);
- ``fp32+opt``: that file through ``onnxruntime.transformers.optimizer`` (BERT fusions);
- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` of ``fp32`` (its defaults);
- ``nbits4``: ``MatMulNBitsQuantizer`` 4-bit, block 32, MatMul and Gather (GatherBlockQuantized);
- ``ours``: DirectQ at 2/3 MP (layers 0-5 at 3 bits, 6-11 at 2 bits, 128 groups, 8-bit
  embeddings, 8-bit activations), exported portable, run by each qbert-edge backend.

Each figure is one fresh process (:func:`qbert_edge.runtime.memory.measure`): batch 1 x 128
tokens, ``--threads`` threads, ``--warmup`` untimed runs, then ``--runs`` timed ones. Peers run as
``onnxruntime.InferenceSession(path)`` with onnxruntime's defaults (``plain-ort``). The load average
is recorded before each figure: the CPU is shared, so latency is only comparable within a run.
Writes ``runtime.json`` (``qbert-edge/benchmark-runtime`` v1) and ``runtime.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

FORMAT = "qbert-edge/benchmark-runtime"
VERSION = 1
MB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
HIGH_LAYERS = range(6)  # 2/3 MP: these layers get 3 bits, the rest 2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_models import (
    build_bert_base,
    export_onnx,
    ort_int8,
    ort_nbits,
    ort_optimized,
    quantize_ours,
)

log = logging.getLogger("benchmarks.runtime")


# --------------------------------------------------------------------------- models


def build_models(workdir: Path) -> dict[str, Path]:
    """Every model file of the benchmark, built once and reused from ``workdir``."""
    base = build_bert_base(workdir)
    paths = {k: workdir / f"bert-base-{k}.onnx" for k in ("fp32", "fp32+opt", "int8", "nbits4", "ours")}
    export_onnx(base, paths["fp32"])
    ort_optimized(paths["fp32"], paths["fp32+opt"], num_heads=12, hidden_size=768)
    ort_int8(paths["fp32"], paths["int8"])
    ort_nbits(paths["fp32"], paths["nbits4"], block_size=32, gather=True)
    pt = quantize_ours(base, workdir / "bert-base-ours.pt", bits=2, high_bits=3, high_layers=HIGH_LAYERS)
    export_onnx(pt, paths["ours"])
    return paths


# --------------------------------------------------------------------------- measuring

#: (row label, model key, measure kwargs); ``plain-ort`` rows are onnxruntime with its defaults.
FIGURES = [
    ("ORT fp32", "fp32", {"engine": "plain-ort"}),
    ("ORT fp32 + transformers optimizer", "fp32+opt", {"engine": "plain-ort"}),
    ("ORT dynamic int8 (quantize_dynamic)", "int8", {"engine": "plain-ort"}),
    ("ORT MatMulNBits 4-bit b32 + GatherBlockQuantized", "nbits4", {"engine": "plain-ort"}),
    ("ours 2/3 MP, backend ort", "ours", {"backend": "ort"}),
    ("ours 2/3 MP, backend ort, accuracy_level 4", "ours", {"backend": "ort", "accuracy_level": 4}),
    ("ours 2/3 MP, backend ort-custom", "ours", {"backend": "ort-custom"}),
    ("ours 2/3 MP, backend reference (correctness only)", "ours", {"backend": "reference"}),
]


def measure_all(paths: dict[str, Path], args) -> list[dict]:
    from qbert_edge.runtime.memory import measure

    rows = []
    for label, key, kwargs in FIGURES:
        if args.only and not any(s in label for s in args.only):
            continue
        runs = args.runs
        if kwargs.get("backend") == "reference":
            if args.skip_reference:
                continue
            runs = 1
        elif kwargs.get("backend") == "ort-custom":
            runs = max(3, args.runs // 4)
        load = os.getloadavg()[0]
        log.info("measuring %s", label)
        started = time.time()
        report = measure(str(paths[key]), batch=1, seq_len=128, runs=runs, warmup=1 if runs < 3 else args.warmup,
                         threads=args.threads, **kwargs)
        rows.append({"label": label, "model": key, "loadavg_before": round(load, 2),
                     "seconds": round(time.time() - started, 1), "report": report})
        log.info("  share %.1f MB, p50 %.1f ms", report["rss_mb"]["model_share"] or -1, report["latency_ms"]["p50"])
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One flat dict per row, with ratios against the ORT fp32 row."""
    ref = next((r for r in rows if r["model"] == "fp32" and r["report"]["engine"] == "plain-ort"), None)
    out = []
    for r in rows:
        rep = r["report"]
        row = {
            "variant": r["label"],
            "file_mb": round(rep["static_mb"]["total"], 1),
            "p50_ms": rep["latency_ms"]["p50"],
            "p90_ms": rep["latency_ms"]["p90"],
            "peak_rss_mb": rep["rss_mb"]["peak"],
            "model_share_mb": rep["rss_mb"]["model_share"],
            "activations_mb": rep["activations_mb"],
            "loadavg": r["loadavg_before"],
        }
        if ref is not None:
            base = ref["report"]
            row["file_ratio"] = round(row["file_mb"] / base["static_mb"]["total"], 3)
            row["latency_ratio"] = round(row["p50_ms"] / base["latency_ms"]["p50"], 3)
            if row["model_share_mb"] and base["rss_mb"]["model_share"]:
                row["share_ratio"] = round(row["model_share_mb"] / base["rss_mb"]["model_share"], 3)
        out.append(row)
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        "# Runtime benchmark: BERT-base shape (12 x 768, random weights), batch 1 x 128 tokens",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, {meta['threads']} threads; onnxruntime {meta['onnxruntime']}; "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end (the CPU is shared).  ",
        "Every figure is a fresh process. Model share = peak RSS (VmHWM) - RSS after importing the runtime. "
        "Ratios are against ORT fp32 of the same model in this run.",
        "",
        "| variant | file MB | p50 ms | p90 ms | peak RSS MB | model share MB | file x | latency x | share x | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | {r['file_mb']:.1f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['model_share_mb']:.0f} | {r.get('file_ratio', float('nan')):.2f} | {r.get('latency_ratio', float('nan')):.2f} | "
            f"{r.get('share_ratio', float('nan')):.2f} | {r['loadavg']} |"
        )
    ours = next((r for r in summary if r["variant"].startswith("ours") and "ort," in r["variant"] + ","), None)
    if ours:
        lines += ["", f"Issue target for ours: model share <= 1.5 x file + activations = "
                      f"{1.5 * ours['file_mb'] + ours['activations_mb']:.1f} MB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("QBERT_EDGE_CACHE", Path.home() / ".cache" / "qbert-edge")) / "bench-runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--only", nargs="*", help="Measure only the rows whose label contains one of these.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = build_models(args.workdir)
    start_load = os.getloadavg()[0]
    rows = measure_all(paths, args)
    from qbert_edge.runtime.memory import _version

    meta = {
        "command": "python benchmarks/runtime.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
        "onnxruntime": _version("onnxruntime"), "loadavg_start": round(start_load, 2),
        "loadavg_end": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    summary = summarize(rows)
    from qbert_edge.fileio import write_json

    write_json(args.out / "runtime.json", {"format": FORMAT, "version": VERSION, "meta": meta, "summary": summary, "rows": rows})
    with open(args.out / "runtime.md.tmp", "w") as fh:
        fh.write(markdown(summary, meta))
    os.replace(args.out / "runtime.md.tmp", args.out / "runtime.md")
    print(markdown(summary, meta))


if __name__ == "__main__":
    main()
