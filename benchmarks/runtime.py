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
    pt = workdir / "bert-base-ours.pt"
    quantize_ours(base, pt, None if pt.exists() else ours_plan(base))  # a cached file is reused as it is
    export_onnx(pt, paths["ours"])
    return paths


def ours_plan(source: Path):
    """2/3 MP: layers :data:`HIGH_LAYERS` at 3 bits, the rest at 2; 128 groups; 8-bit embeddings and activations."""
    from qbert_edge.loading import load_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes

    shapes = quantizable_shapes(load_model(str(source)).model)
    return uniform_plan(shapes, 2, 128, layer_bits={i: 3 for i in HIGH_LAYERS},
                        meta={"scheme": "2/3 MP", "high_layers": list(HIGH_LAYERS)})


# --------------------------------------------------------------------------- measuring

def _figures() -> list[tuple[str, str, dict]]:
    """(row label, model key, measure kwargs); ``plain-ort`` rows are onnxruntime with its defaults.

    ``ours`` on ``ort`` runs at the backend's default ``accuracy_level``, then at the other of
    0/4, then at level 4 with 2-bit layers widened to 4 bits (what the backend did before its
    2-bit rule, :func:`qbert_edge.runtime.native.keeps_2bit`), then with the opt-in
    ``RuntimeOptions(int8_matmul=True)`` (integer GEMM on int8 weights), then at the default level without
    the spill (``RuntimeOptions(spill=False)``: widened codes handed to onnxruntime from memory, as
    before issue #6's load-peak fix), then without the embedding tables' random-access advice
    (``RuntimeOptions(random_tables=False)``: a gather's page faults map their cached neighbours).
    """
    from qbert_edge.runtime.native import DEFAULT_ACCURACY_LEVEL as level

    other = 0 if level == 4 else 4
    return [
        ("ORT fp32", "fp32", {"engine": "plain-ort"}),
        ("ORT fp32 + transformers optimizer", "fp32+opt", {"engine": "plain-ort"}),
        ("ORT dynamic int8 (quantize_dynamic)", "int8", {"engine": "plain-ort"}),
        ("ORT MatMulNBits 4-bit b32 + GatherBlockQuantized", "nbits4", {"engine": "plain-ort"}),
        (f"ours 2/3 MP, backend ort (default: accuracy_level {level})", "ours", {"backend": "ort"}),
        (f"ours 2/3 MP, backend ort, accuracy_level {other}", "ours", {"backend": "ort", "accuracy_level": other}),
        ("ours 2/3 MP, backend ort, accuracy_level 4, 2-bit widened to 4", "ours",
         {"backend": "ort", "accuracy_level": 4, "widen_2bit": True}),
        ("ours 2/3 MP, backend ort, int8_matmul (opt-in: int8 weights, integer GEMM)", "ours",
         {"backend": "ort", "int8_matmul": True}),
        (f"ours 2/3 MP, backend ort (accuracy_level {level}), spill off: widened codes handed over from memory", "ours",
         {"backend": "ort", "spill": False}),
        (f"ours 2/3 MP, backend ort (accuracy_level {level}), random_tables off: embedding pages faulted around",
         "ours", {"backend": "ort", "random_tables": False}),
        ("ours 2/3 MP, backend ort-custom", "ours", {"backend": "ort-custom"}),
        ("ours 2/3 MP, backend reference (correctness only)", "ours", {"backend": "reference"}),
    ]


def measure_all(paths: dict[str, Path], args) -> list[dict]:
    from qbert_edge.runtime.memory import measure

    rows = []
    for label, key, kwargs in _figures():
        if args.only and not any(s in label for s in args.only):
            continue
        runs = args.runs
        if kwargs.get("backend") == "reference":
            if args.skip_reference:
                continue
            runs = 1
        elif kwargs.get("backend") == "ort-custom":
            runs = max(3, args.runs // 4)
        warm_page_cache(paths[key])
        load = os.getloadavg()[0]
        log.info("measuring %s", label)
        started = time.time()
        report = measure(str(paths[key]), batch=1, seq_len=128, runs=runs, warmup=1 if runs < 3 else args.warmup,
                         threads=args.threads, **kwargs)
        rows.append({"label": label, "model": key, "loadavg_before": round(load, 2),
                     "seconds": round(time.time() - started, 1), "report": report})
        log.info("  share %.1f MB, p50 %.1f ms", report["rss_mb"]["model_share"] or -1, report["latency_ms"]["p50"])
    return rows


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once, so every figure starts with the file in the page cache (as right after a copy).

    What a gather's page faults map depends on it (fault-around maps cached neighbours): without
    this, a figure would depend on what the one before it left cached.
    """
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


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
            "load_peak_share_mb": _minus(rep["rss_mb"].get("peak_load"), rep["rss_mb"]["baseline"]),
            "after_runs_share_mb": _minus(rep["rss_mb"].get("after_runs"), rep["rss_mb"]["baseline"]),
            "activations_mb": rep["activations_mb"],
            "loadavg": r["loadavg_before"],
            "native_4bit_mb": rep.get("native_4bit_mb", 0.0),
            "accuracy_level": rep["options"].get("accuracy_level") if isinstance(rep.get("options"), dict) else None,
        }
        if ref is not None:
            base = ref["report"]
            row["file_ratio"] = round(row["file_mb"] / base["static_mb"]["total"], 3)
            row["latency_ratio"] = round(row["p50_ms"] / base["latency_ms"]["p50"], 3)
            if row["model_share_mb"] and base["rss_mb"]["model_share"]:
                row["share_ratio"] = round(row["model_share_mb"] / base["rss_mb"]["model_share"], 3)
        out.append(row)
    return out


def _minus(a, b):
    return None if a is None or b is None else round(a - b, 2)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        "# Runtime benchmark: BERT-base shape (12 x 768, random weights), batch 1 x 128 tokens",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, {meta['cpus']} CPUs, {meta['threads']} threads; onnxruntime {meta['onnxruntime']}; "
        f"load average {meta['loadavg_start']} at start, {meta['loadavg_end']} at end (the CPU is shared).  ",
        ("Every figure is a fresh process. Model share = peak RSS (VmHWM) - RSS after importing the runtime; "
         "'at load' = VmHWM right after loading, 'after runs' = RSS after the runs (both minus the same "
         "baseline). Ratios are against ORT fp32 of the same model in this run."),
        "",
        ("| variant | file MB | p50 ms | p90 ms | peak RSS MB | model share MB | share: peak at load | "
         "share: after runs | file x | latency x | share x | load avg |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        lines.append(
            f"| {r['variant']} | {r['file_mb']:.1f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['model_share_mb']:.0f} | {_mb(r.get('load_peak_share_mb'))} | {_mb(r.get('after_runs_share_mb'))} | "
            f"{r.get('file_ratio', float('nan')):.2f} | {r.get('latency_ratio', float('nan')):.2f} | "
            f"{r.get('share_ratio', float('nan')):.2f} | {r['loadavg']} |"
        )
    ours = next((r for r in summary if r["variant"].startswith("ours") and "backend ort" in r["variant"]
                 and "ort-custom" not in r["variant"]), None)
    if ours:
        lines += ["", f"Issue target for ours: model share <= 1.5 x file + activations = "
                      f"{1.5 * ours['file_mb'] + ours['activations_mb']:.1f} MB."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- accuracy level


def agreement(model: Path, data: str, levels: tuple[int, ...], reference: int, threads: int, batch_size: int = 32) -> dict:
    """Accuracy of ``model`` on ``data`` with the ``ort`` backend at each ``accuracy_level``, and label agreement.

    Every level's labels are compared with the first level's (exact when it is 0) and, on the
    first ``reference`` sentences, with the ``reference`` backend's (``onnx.reference``, slow).
    """
    import numpy as np

    from qbert_edge.data import load_data
    from qbert_edge.runtime.backends import RuntimeOptions
    from qbert_edge.runtime.metrics import score_logits
    from qbert_edge.runtime.session import Session

    runs: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    dataset = None
    for level in levels:
        with Session(str(model), backend="ort", options=RuntimeOptions(accuracy_level=level, threads=threads)) as s:
            dataset = dataset or load_data(data, labels=s.labels)
            started = time.perf_counter()
            logits[f"ort-{level}"] = s.logits(dataset.texts, dataset.text_pairs, batch_size=batch_size)
            seconds = time.perf_counter() - started
        metrics = score_logits(dataset.label_ids, logits[f"ort-{level}"]).to_dict()
        runs[f"ort-{level}"] = {"backend": "ort", "accuracy_level": level, "seconds": round(seconds, 1),
                                "loadavg": round(os.getloadavg()[0], 2), "metrics": metrics}
        log.info("ort accuracy_level %d: %s in %.0f s", level, metrics, seconds)
    if reference:
        with Session(str(model), backend="reference") as s:
            logits["reference"] = s.logits(dataset.texts[:reference], None if dataset.text_pairs is None
                                           else dataset.text_pairs[:reference], batch_size=batch_size)
    base = f"ort-{levels[0]}"
    for name, run in runs.items():
        diff = np.abs(logits[name] - logits[base])
        run[f"same_labels_as_{base}"] = round(float((logits[name].argmax(1) == logits[base].argmax(1)).mean()), 4)
        run[f"max_logit_diff_vs_{base}"] = round(float(diff.max()), 4)
        run[f"median_logit_diff_vs_{base}"] = round(float(np.median(diff.max(1))), 5)
        if "reference" in logits:
            ref = logits["reference"]
            run["same_labels_as_reference"] = round(float((logits[name][: len(ref)].argmax(1) == ref.argmax(1)).mean()), 4)
            run["reference_sentences"] = len(ref)
    return {"model": str(model), "data": data, "sentences": len(dataset.texts), "levels": list(levels), "runs": runs}


def agreement_markdown(result: dict, meta: dict) -> str:
    base = f"ort-{result['levels'][0]}"
    lines = [
        f"# `ort` backend: accuracy_level on the reference classifier ({result['data']}, {result['sentences']} sentences)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: `{result['model']}`; {meta['machine']}, {meta['threads']} threads, onnxruntime {meta['onnxruntime']}; {meta['date']}.",
        "",
        f"| accuracy_level | accuracy | macro-F1 | labels = level {result['levels'][0]} | labels = reference (first n) | "
        f"max / median max logit diff vs level {result['levels'][0]} | seconds | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"].values():
        m = run["metrics"]
        ref = (f"{run['same_labels_as_reference']:.2%} (n={run['reference_sentences']})"
               if "same_labels_as_reference" in run else "-")
        lines.append(
            f"| {run['accuracy_level']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {run[f'same_labels_as_{base}']:.2%} | {ref} | "
            f"{run[f'max_logit_diff_vs_{base}']:.4f} / {run[f'median_logit_diff_vs_{base}']:.5f} | {run['seconds']} | {run['loadavg']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from qbert_edge.reference import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=cache_root() / "bench-runtime")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--only", nargs="*", help="Measure only the rows whose label contains one of these.")
    parser.add_argument("--agreement", type=Path, metavar="MODEL_ONNX",
                        help="Instead of the table: accuracy and label agreement of MODEL_ONNX on --data at "
                             "--levels (writes accuracy_level.json/.md).")
    parser.add_argument("--data", default="rt:dev")
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--reference", type=int, default=0, help="Also label the first N sentences with the reference backend.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.agreement:
        from qbert_edge.fileio import write_json
        from qbert_edge.runtime.memory import _version

        args.out.mkdir(parents=True, exist_ok=True)
        result = agreement(args.agreement, args.data, tuple(args.levels), args.reference, args.threads)
        meta = {"command": "python benchmarks/runtime.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": platform.machine(), "threads": args.threads, "onnxruntime": _version("onnxruntime"),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        write_json(args.out / "accuracy_level.json", {"format": FORMAT + "-accuracy-level", "version": VERSION,
                                                      "meta": meta, **result})
        text = agreement_markdown(result, meta)
        (args.out / "accuracy_level.md.tmp").write_text(text)
        os.replace(args.out / "accuracy_level.md.tmp", args.out / "accuracy_level.md")
        print(text)
        return
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
