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
import shutil
import sys
import time
from pathlib import Path

FORMAT = "qbert-edge/benchmark-runtime"
VERSION = 1
MB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
HIGH_LAYERS = range(6)  # 2/3 MP: these layers get 3 bits, the rest 2

log = logging.getLogger("benchmarks.runtime")


# --------------------------------------------------------------------------- models


def build_bert_base(workdir: Path) -> Path:
    """A random-weight BERT-base directory with the BERT-uncased tokenizer of all-MiniLM-L6-v2."""
    out = workdir / "bert-base-random"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import BertConfig, BertModel

    from qbert_edge.reference import base_model_path as minilm_path

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    tmp = workdir / "bert-base-random.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, tmp / name)
    tmp.rename(out)
    return out


def build_models(workdir: Path) -> dict[str, Path]:
    """Every model file of the benchmark, built once and reused from ``workdir``."""
    from qbert_edge.exporters.onnx_export import export_file

    base = build_bert_base(workdir)
    paths = {k: workdir / f"bert-base-{k}.onnx" for k in ("fp32", "fp32+opt", "int8", "nbits4", "ours")}
    if not paths["fp32"].exists():
        log.info("exporting fp32")
        export_file(str(base), paths["fp32"], validate=False)
    if not paths["fp32+opt"].exists():
        from onnxruntime.transformers.optimizer import optimize_model

        log.info("onnxruntime.transformers.optimizer")
        opt = optimize_model(str(paths["fp32"]), model_type="bert", num_heads=12, hidden_size=768)
        log.info("fusions: %s", opt.get_fused_operator_statistics())
        opt.save_model_to_file(str(paths["fp32+opt"]))
    if not paths["int8"].exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        log.info("quantize_dynamic")
        quantize_dynamic(str(paths["fp32"]), str(paths["int8"]), weight_type=QuantType.QInt8)
    if not paths["nbits4"].exists():
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        log.info("MatMulNBitsQuantizer 4-bit block 32")
        q = MatMulNBitsQuantizer(onnx.load(str(paths["fp32"])), bits=4, block_size=32, is_symmetric=False,
                                 op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)))
        q.process()
        q.model.save_model_to_file(str(paths["nbits4"]), use_external_data_format=False)
    if not paths["ours"].exists():
        pt = workdir / "bert-base-ours.pt"
        if not pt.exists():
            quantize_ours(base, pt)
        log.info("exporting ours")
        export_file(str(pt), paths["ours"], validate=False)
    return paths


def quantize_ours(base: Path, out: Path) -> None:
    """DirectQ at 2/3 MP with 8-bit embeddings, calibrated on 64 Rotten Tomatoes sentences."""
    from qbert_edge.checkpoint import save_quantized
    from qbert_edge.data import load_data, subsets, torch_batches
    from qbert_edge.loading import load_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes
    from qbert_edge.quantize import direct_quantize

    log.info("DirectQ 2/3 MP")
    loaded = load_model(str(base))
    plan = uniform_plan(quantizable_shapes(loaded.model), 2, 128, layer_bits={i: 3 for i in HIGH_LAYERS},
                        meta={"scheme": "2/3 MP", "high_layers": list(HIGH_LAYERS)})
    train = load_data("rt:train")
    calib = subsets(train, 1, 64 / len(train), 0)[0]
    save_quantized(direct_quantize(loaded, plan, torch_batches(calib, loaded.tokenizer, 32, 128)), out)


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
