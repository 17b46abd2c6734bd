"""Why are our 8-bit layers slow on the ``ort`` backend, and what would be faster? (issue 8 follow-up)

    python benchmarks/matmul8.py

One 8-bit weight ``[N, K]`` (per-row scale and zero point, as our groups), applied to ``M = 128``
rows of 8-bit activations (per-tensor scale and zero point, as our QuantizeLinear gives them), at
MiniLM's and BERT-base's feed-forward shapes, 2 threads, four ways:

- ``MatMulNBits`` 8-bit at ``accuracy_level`` 0 (what the ``ort`` backend runs today) and 4;
- ``MatMulIntegerToFloat`` on the uint8 activation codes and a uint8 ``[K, N]`` weight with
  per-column zero points: u8 x u8 products summed exactly in int32, then scaled;
- fp32 ``MatMul`` on the dequantized weight (the baseline).

Each: median of 20 runs after 3 warm-ups (ms), and the largest error relative to the largest
output of an fp64 reference. Writes ``benchmarks/results/matmul8.json`` and ``.md``. It does not
measure memory (onnxruntime prepacks the weights of some of these kernels).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
SHAPES = ((384, 1536), (1536, 384), (768, 3072), (3072, 768))  # (K, N): MiniLM and BERT-base FFN
M, BLOCK, THREADS = 128, 128, 2


def session(nodes, inputs, initializers, opsets=(("", 17), ("com.microsoft", 1))):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed(sess, feeds: dict, runs: int = 20) -> tuple[float, np.ndarray]:
    """Median ms of ``runs`` runs after 3 warm-ups, and the output."""
    for _ in range(3):
        y = sess.run(None, feeds)[0]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), y


def one_shape(k: int, n: int, rng) -> list[dict]:
    from onnx import TensorProto, helper
    from onnx.numpy_helper import from_array

    codes = rng.integers(0, 256, (n, k), dtype=np.uint8)
    zero = rng.integers(100, 156, n).astype(np.uint8)
    scale = (rng.random(n) * 0.01).astype(np.float32)
    a_codes = rng.integers(0, 256, (M, k), dtype=np.uint8)
    a_scale, a_zero = np.float32(0.02), np.uint8(128)
    weight = (codes.astype(np.float64) - zero[:, None]) * scale[:, None]
    a = (a_codes.astype(np.float32) - np.float32(a_zero)) * a_scale
    reference = a.astype(np.float64) @ weight.T
    fp32_in = [helper.make_tensor_value_info("A", TensorProto.FLOAT, [M, k])]
    blocks = k // BLOCK
    ways = {}
    for level in (0, 4):
        ways[f"MatMulNBits 8-bit, accuracy_level {level}"] = (session(
            [helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n, bits=8,
                              block_size=BLOCK, accuracy_level=level)], fp32_in,
            [from_array(codes.reshape(n, blocks, BLOCK), "B"), from_array(np.repeat(scale, blocks), "S"),
             from_array(np.repeat(zero, blocks), "Z")]), {"A": a})
    ways["MatMulIntegerToFloat u8 x u8"] = (session(
        [helper.make_node("MatMulIntegerToFloat", ["Aq", "B", "as", "bs", "az", "bz"], ["Y"], domain="com.microsoft")],
        [helper.make_tensor_value_info("Aq", TensorProto.UINT8, [M, k])],
        [from_array(np.ascontiguousarray(codes.T), "B"), from_array(np.array(a_scale), "as"), from_array(scale, "bs"),
         from_array(np.array(a_zero), "az"), from_array(zero, "bz")]), {"Aq": a_codes})
    ways["fp32 MatMul (dequantized weight)"] = (session(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], fp32_in,
        [from_array(np.ascontiguousarray(weight.T.astype(np.float32)), "W")], opsets=(("", 17),)), {"A": a})
    rows = []
    for way, (sess, feeds) in ways.items():
        ms, y = timed(sess, feeds)
        rows.append({"k": k, "n": n, "way": way, "ms": round(ms, 3),
                     "rel_err": float(np.abs(y - reference).max() / np.abs(reference).max())})
    fp32 = next(r["ms"] for r in rows if r["way"].startswith("fp32"))
    for r in rows:
        r["x_fp32"] = round(r["ms"] / fp32, 2)
    return rows


def main() -> None:
    import onnxruntime as ort

    from qbert_edge.fileio import atomic_path, write_json
    from qbert_edge.runtime.memory import cpu_name

    rng = np.random.default_rng(0)
    rows = [r for k, n in SHAPES for r in one_shape(k, n, rng)]
    meta = {"command": "python benchmarks/matmul8.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} CPUs, {THREADS} threads",
            "onnxruntime": ort.__version__, "loadavg_start": round(os.getloadavg()[0], 2)}
    write_json(OUT / "matmul8.json", {"format": "qbert-edge/benchmark-matmul8", "version": 1, "meta": meta, "rows": rows})
    lines = ["# 8-bit weight x 8-bit activations: onnxruntime kernels", "",
             f"Command: `{meta['command'].strip()}` ({meta['date']}); {meta['machine']}; onnxruntime "
             f"{meta['onnxruntime']}; load {meta['loadavg_start']}. M = {M} rows; median of 20 runs.", "",
             "| K x N | kernel | ms | x fp32 | rel. error |", "|---|---|---|---|---|"]
    lines += [f"| {r['k']} x {r['n']} | {r['way']} | {r['ms']:.2f} | {r['x_fp32']:.2f} | {r['rel_err']:.1e} |" for r in rows]
    with atomic_path(OUT / "matmul8.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
