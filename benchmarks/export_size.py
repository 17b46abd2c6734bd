"""Export benchmark: file size against the theoretical packed size, export time, and the 3-bit decision.

    python benchmarks/export_size.py                        # everything (~10 min on 2 shared cores)
    python benchmarks/export_size.py --skip-bert-base --skip-latency --out /tmp/x

Models (DirectQ: ``quantize_model`` + ``calibrate`` on the validation sentences + ``freeze``;
128 groups per matrix, 8-bit embeddings (one group per row), 8-bit pooler, 8-bit activations):

- ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (6 x 384), a ``BertModel``;
- ``bert-base``: ``BertModel(BertConfig())`` with random weights (12 x 768, vocab 30522; seed 0)
  and the MiniLM package's BERT-uncased tokenizer;

each at w8, w4, w3, w2 and 2/3 MP (3 bits for the first half of the layers, 2 for the rest), plus
the fp32 baseline. For each: ``model.pt`` is written, then exported exactly as ``qbert-edge
export`` does (:func:`qbert_edge.exporters.onnx_export.export_file`, validation on); the file size
is compared with :func:`~qbert_edge.exporters.sizes.theoretical_size` (codes + scales/zero points +
fp32 remainder; target: within 3%) and with the paper's BERT-base sizes, which are MiB of codes
alone (8-bit embeddings, no pooler): 103.9 (w8), 63.4 (w4), 53.2 (w3), 43.1 (w2), 48.1 (2/3 MP),
fp32 415.4. The ``--target ort`` file is exported too (validated with onnxruntime).

The 3-bit decision (``--target ort``: widen 3-bit layers to 4-bit MatMulNBits, or keep QMatMul as a
custom op): latency of a MiniLM w3 model on three onnxruntime setups built by the runtime's own
backends: all native (3 -> 4 widened), hybrid (native 2/4/8 + the 3-bit QMatMul as a Python custom
op) and all custom ops, with and without onnxruntime's weight prepacking; medians of ``--runs``.
The CPU is shared: latency is comparable within one run only. Writes ``export_size.json``
(``qbert-edge/benchmark-export-size`` v1) and ``export_size.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMAT = "qbert-edge/benchmark-export-size"
VERSION = 1
MB, MIB = 1e6, 2**20
ROOT = Path(__file__).resolve().parent.parent
PAPER_MIB = {"w8": 103.9, "w4": 63.4, "w3": 53.2, "w2": 43.1, "2/3 MP": 48.1, "fp32": 415.4}
ORT_QUANTIZER_4BIT_MB = 70.7  # onnxruntime's MatMulNBits (block 32) + GatherBlockQuantized, from the issue
CONFIGS = ("w8", "w4", "w3", "w2", "2/3 MP")

log = logging.getLogger("benchmarks.export_size")


def plan_for(model, config: str):
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes

    shapes = quantizable_shapes(model)
    layers = model.config.num_hidden_layers
    if config == "2/3 MP":
        return uniform_plan(shapes, 2, 128, layer_bits={i: 3 for i in range(layers // 2)})
    return uniform_plan(shapes, int(config[1:]), 128)


def load(kind: str):
    """A fresh fp32 LoadedModel: ``minilm`` or the random ``bert-base``."""
    from qbert_edge.loading import load_model

    if kind == "minilm":
        return load_model("minilm")
    import torch
    from transformers import BertConfig, BertModel

    from qbert_edge.checkpoint import LoadedModel

    tokenizer = load_model("minilm").tokenizer
    torch.manual_seed(0)
    return LoadedModel(BertModel(BertConfig()).eval(), tokenizer, [], "bert-base-random", max_length=128)


def quantize(kind: str, config: str, path: Path) -> float:
    import torch

    from qbert_edge.checkpoint import save_quantized
    from qbert_edge.exporters.validate import SENTENCES
    from qbert_edge.quantize import direct_quantize
    from qbert_edge.runtime.text import encode

    t = time.perf_counter()
    loaded = load(kind)
    enc = encode(loaded.tokenizer, list(SENTENCES), max_length=64)
    result = direct_quantize(loaded, plan_for(loaded.model, config), [{k: torch.from_numpy(v) for k, v in enc.arrays.items()}])
    save_quantized(result, path)
    return time.perf_counter() - t


def export_one(source, out: Path, target: str) -> dict:
    from qbert_edge.exporters.onnx_export import export_file

    t = time.perf_counter()
    r = export_file(str(source), out, target=target)
    wall = time.perf_counter() - t
    v = r.validation
    return {
        "bytes": r.bytes,
        "file_bytes": out.stat().st_size,
        "parts": r.sizes.to_dict(),
        "seconds_total": round(wall, 2),
        "seconds_export": round(r.seconds_export, 2),
        "seconds_validate": round(r.seconds_validate, 2),
        "validation": None if v is None else {
            "ok": v.ok, "backend": v.backend, "flipped": v.flipped, "summary": v.summary(),
            "max_abs_diff": {c.name: c.max_abs_diff for c in v.checks},
        },
    }


def measure_model(kind: str, workdir: Path, configs) -> list[dict]:
    import torch

    from qbert_edge.exporters.sizes import theoretical_size

    rows = []
    for config in configs:
        pt = workdir / f"{kind}-{config.replace('/', '-').replace(' ', '')}.pt"
        row = {"model": kind, "config": config}
        if config == "fp32":
            source = "minilm" if kind == "minilm" else save_fp32_dir(kind, workdir)
            from qbert_edge.exporters.onnx_export import read_source

            data, _ = read_source(source)
        else:
            row["seconds_quantize"] = round(quantize(kind, config, pt), 2)
            source = pt
            data = torch.load(pt, weights_only=True)
        theory = theoretical_size(data)
        del data
        row["theoretical"] = theory.to_dict()
        for target in ("portable", "ort"):
            out = workdir / f"{Path(str(source)).stem}.{target}.onnx"
            log.info("exporting %s %s (%s)", kind, config, target)
            row[target] = export_one(source, out, target)
            out.unlink()
        size = row["portable"]["file_bytes"]
        row["overhead_vs_theory"] = size / theory.total - 1
        row["paper_mib"] = PAPER_MIB.get(config) if kind == "bert-base" else None
        rows.append(row)
        log.info("%s %s: %.2f MB (theory %.2f MB, %+.2f%%)", kind, config, size / MB, theory.total / MB,
                 100 * row["overhead_vs_theory"])
        if pt.exists():
            pt.unlink()
    return rows


def save_fp32_dir(kind: str, workdir: Path) -> Path:
    """The random BERT-base as a transformers directory (what ``qbert-edge export DIR`` reads)."""
    out = workdir / "bert-base-fp32"
    if not (out / "config.json").is_file():
        loaded = load(kind)
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save(str(out / "tokenizer.json"))
    return out


def cli_export_time(workdir: Path) -> dict:
    """Wall time of the real command on MiniLM w2 (fresh process: imports included)."""
    pt = workdir / "minilm-w2-cli.pt"
    quantize("minilm", "w2", pt)
    out = workdir / "minilm-w2-cli.onnx"
    cmd = [sys.executable, "-c", "from qbert_edge.cli import main; main()", "export", str(pt), "-o", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    result = {"command": "qbert-edge export minilm-w2.pt -o minilm-w2.onnx", "seconds": round(wall, 2),
              "exit_code": proc.returncode, "stdout_tail": proc.stdout.strip().splitlines()[-1:]}
    result["onnx"] = str(out)
    return result


def latency(onnx_path: Path, runs: int, threads: int) -> list[dict]:
    """Median latency of the three ways onnxruntime can run a 3-bit model."""
    import numpy as np

    from qbert_edge.runtime import backends, native
    from qbert_edge.runtime.backends import RuntimeOptions
    from qbert_edge.runtime.loader import load_graph

    rng = np.random.default_rng(0)

    def feeds(batch, seq):
        return {"input_ids": rng.integers(1000, 29000, (batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), np.int64), "token_type_ids": np.zeros((batch, seq), np.int64)}

    def timed(backend, f, n):
        backend.run(f)
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            backend.run(f)
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1e3)

    rows = []
    for prepacking in (False, True):
        options = RuntimeOptions(threads=threads, prepacking=prepacking)
        graph = load_graph(onnx_path)
        variants = {"native (3-bit widened to 4)": backends.create("ort", graph, options)}
        model, weights = native.native_rewrite(backends._copy(graph.model), dict(graph.weights), widen=False)
        variants["hybrid (3-bit QMatMul custom op)"] = backends.OrtCustomBackend(model, weights, options, graph)
        variants["all custom ops (ort-custom)"] = backends.create("ort-custom", graph, options)
        for name, backend in variants.items():
            rows.append({
                "setup": name, "prepacking": prepacking, "threads": threads,
                "ms_batch1_len16": round(timed(backend, feeds(1, 16), runs), 1),
                "ms_batch8_len64": round(timed(backend, feeds(8, 64), max(3, runs // 4)), 1),
            })
            backend.close()
            log.info("latency %s", rows[-1])
    return rows


def markdown(result: dict) -> str:
    lines = [
        "# Export size benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; onnxruntime {result['versions']['onnxruntime']}, onnx {result['versions']['onnx']}, torch {result['versions']['torch']}.",
        "",
        "File size of the portable export against the theoretical packed size (codes + scales/zero points +",
        "fp32 remainder) and, for BERT-base, the paper's sizes (MiB of codes, 8-bit embeddings, no pooler).",
        "DirectQ, 128 groups, 8-bit embeddings/pooler/activations; 2/3 MP = first half of the layers at 3 bits.",
        "",
        "| model | config | file MB | file MiB | theory MB | file vs theory | paper MiB | file vs paper | `--target ort` MB | export s (incl. validation) | validation |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["sizes"]:
        size = r["portable"]["file_bytes"]
        paper = r["paper_mib"]
        v = r["portable"]["validation"]
        status = "n/a" if v is None else ("ok" + (f" ({v['flipped']} flip)" if v["flipped"] else "") if v["ok"] else "FAILED")
        lines.append(
            f"| {r['model']} | {r['config']} | {size / MB:.2f} | {size / MIB:.2f} | {r['theoretical']['total'] / MB:.2f} | "
            f"{100 * r['overhead_vs_theory']:+.2f}% | {'' if paper is None else paper} | "
            f"{'' if paper is None else f'{100 * (size / MIB / paper - 1):+.1f}%'} | {r['ort']['file_bytes'] / MB:.2f} | "
            f"{r['portable']['seconds_total']:.1f} | {status} |"
        )
    lines += ["", "Parts of each portable file (bytes):", "",
              "| model | config | packed | scales/zero points | fp32 | metadata | graph |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["sizes"]:
        p = r["portable"]["parts"]
        lines.append(f"| {r['model']} | {r['config']} | {p['packed']:,} | {p['quant_params']:,} | {p['fp32']:,} | {p['metadata']:,} | {p['graph']:,} |")
    lines += ["", f"onnxruntime's own 4-bit quantizer on the BERT-base shape (from the issue): {ORT_QUANTIZER_4BIT_MB} MB.", ""]
    if result.get("cli"):
        c = result["cli"]
        lines += [f"Real command, fresh process, MiniLM w2 (`{c['command']}`): {c['seconds']:.1f} s wall, exit {c['exit_code']}.", ""]
    if result.get("latency"):
        lines += ["3-bit decision, MiniLM w3 `--target ort` candidates (median ms; shared CPU, compare within this table):", "",
                  "| setup | prepacking | threads | batch 1 x 16 | batch 8 x 64 |", "|---|---|---:|---:|---:|"]
        for r in result["latency"]:
            lines.append(f"| {r['setup']} | {r['prepacking']} | {r['threads']} | {r['ms_batch1_len16']} | {r['ms_batch8_len64']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch directory (default: a temporary one).")
    parser.add_argument("--skip-bert-base", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnx
    import onnxruntime
    import torch

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        result = {
            "format": FORMAT, "version": VERSION,
            "command": "python benchmarks/export_size.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
            "paper_mib": PAPER_MIB,
            "ort_quantizer_4bit_mb": ORT_QUANTIZER_4BIT_MB,
            "sizes": measure_model("minilm", workdir, CONFIGS + ("fp32",)),
        }
        result["cli"] = cli_export_time(workdir)
        if not args.skip_latency:
            w3 = workdir / "minilm-w3.pt"
            quantize("minilm", "w3", w3)
            from qbert_edge.exporters.onnx_export import export_file

            export_file(str(w3), workdir / "minilm-w3.onnx", validate=False)
            result["latency"] = latency(workdir / "minilm-w3.onnx", args.runs, args.threads)
        if not args.skip_bert_base:
            result["sizes"] += measure_model("bert-base", workdir, CONFIGS + ("fp32",))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_size.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "export_size.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
