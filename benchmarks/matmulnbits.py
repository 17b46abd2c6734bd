"""Micro-benchmark: onnxruntime's ``MatMulNBits`` at BERT-base shapes, 2 vs 4 bits, by accuracy level.

    python benchmarks/matmulnbits.py                          # every figure, fresh process each
    python benchmarks/matmulnbits.py --blocks 32 128 --repeats 20 --out benchmarks/results/matmulnbits

Answers one question for the ``ort`` backend: does this onnxruntime run a 2-bit ``MatMulNBits``
natively and fast, and at which ``accuracy_level`` and ``block_size``? (onnxruntime 1.32 has a
2-bit int8-compute kernel for block 32/64/128 on AVX2/AVX-512/ARM64; at ``accuracy_level`` 0
and for other blocks a 2-bit weight is dequantized to fp32 on every call.)

One figure = one graph of ``--copies`` independent nodes (different random weights, like the
layers of a model) of one BERT-base shape, M = 128 tokens: ``MatMulNBits`` (bits, block,
accuracy level) or an fp32 ``MatMul`` of the same dequantized numbers. Each figure runs in a
fresh process with the ``ort`` backend's session settings (:class:`RuntimeOptions`:
prepacking on, arena off, level ``all``), ``--threads`` threads: RSS after ``import onnxruntime``
(baseline), after creating the session, peak (VmHWM); ``--warmup`` untimed runs, then the median
of ``--repeats`` timed runs divided by ``--copies`` (ms per node); and the largest error of the
output against a NumPy dequantize-then-matmul of the same weights, relative to the output's
largest magnitude. The load average is recorded before each figure (the CPU is shared).
Writes ``matmulnbits.json`` (``qbert-edge/benchmark-matmulnbits`` v1) and ``matmulnbits.md``.
What this does not do: measure a whole model (``benchmarks/runtime.py`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FORMAT = "qbert-edge/benchmark-matmulnbits"
VERSION = 1
MB = 1e6
ROOT = Path(__file__).resolve().parent.parent
M = 128
#: (K, N) of BERT-base's linear layers: Q/K/V/output, FFN up, FFN down.
SHAPES = [(768, 768), (768, 3072), (3072, 768)]


# --------------------------------------------------------------------------- graphs


def weights(k: int, n: int, bits: int, block: int, seed: int) -> dict[str, np.ndarray]:
    """Random codes/scales/zero points of one ``[N, K]`` weight: the ``MatMulNBits`` inputs and the fp32 weight."""
    from qbert_edge.runtime.packing import pack

    rng = np.random.default_rng(seed)
    blocks = k // block
    codes = rng.integers(0, 1 << bits, (n, k), dtype=np.uint8)
    zeros = rng.integers(0, 1 << bits, (n, blocks), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.03, (n, blocks)).astype(np.float32)
    per_byte = 8 // bits
    zpad = np.zeros((n, -(-blocks // per_byte) * per_byte), np.uint8)
    zpad[:, :blocks] = zeros
    dense = (codes.astype(np.float32) - np.repeat(zeros, block, axis=1)) * np.repeat(scales, block, axis=1)
    return {
        "B": pack(codes, bits).reshape(n, blocks, block * bits // 8),
        "scales": scales.reshape(-1),
        "zero_points": pack(zpad, bits).reshape(n, -1),
        "dense": dense,  # [N, K]
    }


def build(kind: str, k: int, n: int, bits: int, block: int, level: int, copies: int, seed: int = 0):
    """``(model, dense weights)``: ``copies`` nodes of ``kind`` (``nbits`` or ``fp32``), all reading ``A``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs, dense = [], [], [], []
    for c in range(copies):
        w = weights(k, n, bits, block, seed + c)
        dense.append(w["dense"])
        y = f"Y{c}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, M, n]))
        if kind == "fp32":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w["dense"].T), f"W{c}"))
            nodes.append(helper.make_node("MatMul", ["A", f"W{c}"], [y]))
        else:
            names = [f"B{c}", f"S{c}", f"Z{c}"]
            inits += [numpy_helper.from_array(w[key], name) for key, name in zip(("B", "scales", "zero_points"), names)]
            nodes.append(helper.make_node("MatMulNBits", ["A", *names], [y], domain="com.microsoft",
                                          K=k, N=n, bits=bits, block_size=block, accuracy_level=level))
    graph = helper.make_graph(nodes, "matmulnbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, M, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model, dense


# --------------------------------------------------------------------------- child


def child(spec: dict) -> dict:
    """Run one figure in this (fresh) process; ``spec`` names the model file and the settings."""
    import onnxruntime as ort  # noqa: F401  (the baseline includes onnxruntime's libraries)

    from qbert_edge.runtime.backends import RuntimeOptions, release_free_memory, return_memory_to_os
    from qbert_edge.runtime.memory import proc_status

    return_memory_to_os()
    x = np.load(spec["input"])
    base = proc_status()
    so = RuntimeOptions(threads=spec["threads"]).session_options()
    t0 = time.perf_counter()
    session = ort.InferenceSession(spec["model"], so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    release_free_memory()
    loaded = proc_status()
    load_peak = loaded.get("VmHWM", 0)
    for _ in range(spec["warmup"]):
        out = session.run(None, {"A": x})
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        out = session.run(None, {"A": x})
        times.append((time.perf_counter() - t) * 1e3)
    end = proc_status()
    np.save(spec["output"], np.stack(out))
    return {
        "load_s": round(load_s, 3),
        "rss_baseline_mb": round(base.get("VmRSS", 0) / MB, 2),
        "rss_after_load_mb": round((loaded.get("VmRSS", 0) - base.get("VmRSS", 0)) / MB, 2),
        "load_peak_mb": round((load_peak - base.get("VmRSS", 0)) / MB, 2),
        "peak_mb": round((end.get("VmHWM", 0) - base.get("VmRSS", 0)) / MB, 2),
        "run_ms": [round(t, 3) for t in times],
    }


def run_figure(kind: str, k: int, n: int, bits: int, block: int, level: int, args, workdir: Path) -> dict:
    """Build the graph, run it in a fresh process, check its output against NumPy."""
    model, dense = build(kind, k, n, bits, block, level, args.copies)
    path = workdir / "model.onnx"
    import onnx

    onnx.save(model, str(path))
    x = np.random.default_rng(123).standard_normal((1, M, k)).astype(np.float32)
    np.save(workdir / "a.npy", x)
    spec = {"model": str(path), "input": str(workdir / "a.npy"), "output": str(workdir / "y.npy"),
            "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats}
    row = {"kind": kind, "K": k, "N": n, "bits": bits if kind == "nbits" else 32,
           "block": block if kind == "nbits" else None, "accuracy_level": level if kind == "nbits" else None,
           "copies": args.copies, "loadavg_before": round(os.getloadavg()[0], 2),
           "weight_bytes_mb": round(sum(t.ByteSize() for t in model.graph.initializer) / MB, 3)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]
        return row
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    y = np.load(workdir / "y.npy")
    ref = np.stack([x @ d.T for d in dense])
    row["rel_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
    row.update(result)
    row["ms_per_node"] = round(statistics.median(result["run_ms"]) / args.copies, 3)
    return row


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict], meta: dict) -> str:
    fp32 = {(r["K"], r["N"]): r for r in rows if r["kind"] == "fp32" and "ms_per_node" in r}
    four = {(r["K"], r["N"], r["block"], r["accuracy_level"]): r for r in rows
            if r["kind"] == "nbits" and r["bits"] == 4 and "ms_per_node" in r}
    lines = [
        "# MatMulNBits micro-benchmark: BERT-base shapes, M = 128 tokens",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} ({meta['cpu']}), {meta['cpus']} CPUs, {meta['threads']} threads; "
        f"onnxruntime {meta['onnxruntime']}; {meta['date']}; load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end (the CPU is shared: compare within the table).  ",
        f"Each row: a fresh process, one graph of {meta['copies']} independent nodes of the shape (different weights), "
        f"median of {meta['repeats']} runs / {meta['copies']} = ms per node. RSS MB: after creating the session minus "
        "after `import onnxruntime`, for all the nodes (prepacked weights, workspaces). rel err: max |y - y_ref| / "
        "max |y_ref| against NumPy dequantize-then-matmul. x 4-bit: time against 4-bit at the same block and level; "
        "x fp32: against the fp32 MatMul of the same shape.",
        "",
        "| K x N | bits | block | acc. level | ms / node | x 4-bit | x fp32 | RSS after load MB | weights MB | rel err | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = f"{r['K']} x {r['N']}"
        if "ms_per_node" not in r:
            lines.append(f"| {shape} | {r['bits']} | {r['block'] or '-'} | {r['accuracy_level'] if r['accuracy_level'] is not None else '-'} "
                         f"| error: {r.get('error', '?')} | | | | | | {r['loadavg_before']} |")
            continue
        ref4 = four.get((r["K"], r["N"], r["block"], r["accuracy_level"]))
        x4 = f"{r['ms_per_node'] / ref4['ms_per_node']:.2f}" if r["kind"] == "nbits" and ref4 else "-"
        f = fp32.get((r["K"], r["N"]))
        xf = f"{r['ms_per_node'] / f['ms_per_node']:.2f}" if f else "-"
        lines.append(
            f"| {shape} | {r['bits'] if r['kind'] == 'nbits' else 'fp32'} | {r['block'] or '-'} | "
            f"{r['accuracy_level'] if r['accuracy_level'] is not None else '-'} | {r['ms_per_node']:.2f} | {x4} | {xf} | "
            f"{r['rss_after_load_mb']:.1f} | {r['weight_bytes_mb']:.1f} | {r['rel_err']:.1e} | {r['loadavg_before']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "matmulnbits")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN, e.g. 768x3072")
    parser.add_argument("--copies", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from qbert_edge.runtime.memory import _version, cpu_name

    start_load = round(os.getloadavg()[0], 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="qbert-mmnb-") as tmp:
        for shape in args.shapes:
            k, n = (int(v) for v in shape.lower().split("x"))
            rows.append(run_figure("fp32", k, n, 4, 32, 0, args, Path(tmp)))  # the numbers of a 4-bit weight, in fp32
            print(json.dumps({key: v for key, v in rows[-1].items() if key != "run_ms"}), flush=True)
            for block in args.blocks:
                for level in args.levels:
                    for bits in args.bits:
                        rows.append(run_figure("nbits", k, n, bits, block, level, args, Path(tmp)))
                        print(json.dumps({key: v for key, v in rows[-1].items() if key != "run_ms"}), flush=True)
    meta = {
        "command": "python benchmarks/matmulnbits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(), "threads": args.threads,
        "copies": args.copies, "repeats": args.repeats, "onnxruntime": _version("onnxruntime"),
        "loadavg_start": start_load, "loadavg_end": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    from qbert_edge.fileio import write_json

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "matmulnbits.json", {"format": FORMAT, "version": VERSION, "meta": meta, "rows": rows})
    text = markdown(rows, meta)
    with open(args.out / "matmulnbits.md.tmp", "w") as fh:
        fh.write(text)
    os.replace(args.out / "matmulnbits.md.tmp", args.out / "matmulnbits.md")
    print(text)


if __name__ == "__main__":
    main()
