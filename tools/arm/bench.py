"""Which backend for a Pi 4 (Cortex-A72) and a Pi 5 (Cortex-A76): measured under qemu, per CPU model.

    python tools/arm/bench.py                                   # writes benchmarks/results/arm.{json,md}
    python tools/arm/bench.py --cpus cortex-a72 --runs 2 --out /tmp/arm

For each emulated CPU (``cortex-a72``: no dot product, ``cortex-a76``: dot product + fp16,
``max``: also i8mm and SVE) and each configuration (``ort`` as exported, ``ort`` with
``MatMulNBits`` accuracy_level 4 = int8 compute, ``ort-custom``), it runs the runtime's own
``measure`` (fresh process, static bytes, RSS, latency) inside the emulated environment, and the
same on the x86 host for scale. It also runs :mod:`device` on a few texts per CPU and compares the
outputs across CPU models: onnxruntime picks its kernels from the CPU's features, so *different
numbers on different CPUs mean a different kernel ran* -- the one thing emulation shows exactly.

What it does not show: how fast a real board is. qemu translates every instruction (SIMD ones
through helper calls), so the emulated milliseconds rank qemu's costs, not the cores'; and RSS
under emulation includes qemu's translated code and its own heap. docs/arm.md says what these
numbers do and do not support.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qbert_edge.runtime.memory import cpu_name  # noqa: E402

import build_env as armenv  # tools/arm is a folder of scripts, not a package
import check as armcheck

FORMAT = "qbert-edge/arm-bench"
VERSION = 1
CPUS = ("cortex-a72", "cortex-a76", "max")
#: (label, backend, MatMulNBits accuracy_level or None for "as exported")
CONFIGS = (("ort", "ort", None), ("ort acc4", "ort", 4), ("ort-custom", "ort-custom", None))
REPO = Path(__file__).resolve().parents[2]
MEASURE = (
    "import json, sys; from qbert_edge.runtime.memory import measure; "
    "print(json.dumps(measure(**json.loads(sys.argv[1]))))"
)

logger = logging.getLogger("qbert_edge.arm")


def _measure(arm: armenv.ArmEnv | None, cpu: str | None, kwargs: dict) -> dict:
    args = ["-c", MEASURE, json.dumps(kwargs)]
    if arm is None:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    else:
        proc = arm.run(args, cpu=cpu, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": armcheck.quiet(proc.stderr).strip()[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(cpu: str, label: str, backend: str, level: int | None, m: dict) -> dict:
    if "error" in m:
        return {"cpu": cpu, "config": label, "backend": backend, "accuracy_level": level, "error": m["error"]}
    return {
        "cpu": cpu, "config": label, "backend": backend, "accuracy_level": level,
        "latency_ms_p50": m["latency_ms"]["p50"], "load_s": m.get("load_s"),
        "rss_peak_mb": m["rss_mb"]["peak"], "model_share_mb": m["rss_mb"]["model_share"],
        "static_mb": m["static_mb"]["total"], "threads": m.get("threads"),
    }


def kernel_paths(arm: armenv.ArmEnv, model: Path, cpus: list[str], work: Path) -> list[dict]:
    """Which kernels ran: outputs of each ort configuration compared across CPU models and, on each
    CPU, across configurations (max|diff| of the first output; 0 means the same kernels ran)."""
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(list(armcheck.TEXTS)))
    configs = [(label, level) for label, backend, level in CONFIGS if backend == "ort"]
    outputs: dict[tuple[str, str], np.ndarray | None] = {}
    for label, level in configs:
        for cpu in cpus:
            d = work / f"paths-{cpu}-{level}"
            d.mkdir(parents=True, exist_ok=True)
            args = [str(armcheck.DEVICE), str(model), "--texts", str(texts_file), "--out-dir", str(d),
                    "--backends", "ort"]
            if level is not None:
                args += ["--accuracy-level", str(level)]
            proc = arm.run(args, cpu=cpu, capture_output=True, text=True)
            outputs[label, cpu] = None
            if proc.returncode == 0:
                with np.load(d / f"{model.stem}.npz") as data:
                    first = sorted(k for k in data.files if k.startswith("ort/"))
                    outputs[label, cpu] = data[first[0]] if first else None
    pairs = [((label, cpus[0]), (label, cpu)) for label, _ in configs for cpu in cpus[1:]]
    pairs += [((configs[0][0], cpu), (label, cpu)) for cpu in cpus for label, _ in configs[1:]]
    out = []
    for a, b in pairs:
        x, y = outputs.get(a), outputs.get(b)
        diff = None if x is None or y is None else float(np.abs(x.astype(np.float64) - y).max())
        out.append({"a": f"{a[0]} @ {a[1]}", "b": f"{b[0]} @ {b[1]}", "max_abs_diff": diff,
                    "same_kernels": None if diff is None else diff == 0.0})
    return out


def format_markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [
        "# aarch64 under qemu: backends per CPU model",
        "",
        f"Command: `{report['command']}`  ",
        (f"Date: {report['date']}; host: {report['host']['cpu']} ({report['host']['cores']} cores, shared; "
         f"load average {report['host']['loadavg_1m']:.1f} at the end), "
        f"qemu {report['qemu_version']}, onnxruntime {report['onnxruntime']}.  "),
        (f"Model: {report['model']['name']} ({report['model']['mb']:.1f} MB file), batch 1 x {report['seq_len']} "
        f"tokens, {report['runs']} timed runs after 1 warm-up, fresh process per row (`qbert-edge measure`)."),
        "",
        ("**Emulated figures rank qemu's costs, not a board's.** RSS under emulation includes qemu "
        "(translated code, its heap). Use them to compare rows of one CPU, and the kernel-path table "
        "below to see which code ran; docs/arm.md has the reading."),
        "",
        "| CPU | config | p50 latency ms | load s | peak RSS MB | model share MB | static MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cpu']} | {r['config']} | error: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['cpu']} | {r['config']} | {r['latency_ms_p50']:.0f} | {r['load_s']:.1f} | "
                     f"{r['rss_peak_mb']:.1f} | {r['model_share_mb']:.1f} | {r['static_mb']:.1f} |")
    if report.get("paths"):
        lines += ["", ("Kernel paths: `device.py` outputs (`last_hidden_state`, 4 texts) of two runs; "
                       "0 means the same kernels ran, anything else that another kernel did:"), "",
                  "| run a | run b | max abs diff | same kernels |", "|---|---|---:|---|"]
        for p in report["paths"]:
            diff = "n/a" if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.3g}"
            lines.append(f"| {p['a']} | {p['b']} | {diff} | {p['same_kernels']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", default=",".join(CPUS))
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", type=Path, default=None, help="an exported model (default: the check's 2/3 MP minilm)")
    parser.add_argument("--no-paths", action="store_true", help="skip the kernel-path comparison")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "arm",
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--cache", type=Path, default=None)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cpus = [c for c in ns.cpus.split(",") if c]
    try:
        arm = armenv.build(ns.cache)
        for cpu in cpus:
            armenv.check_cpu(arm.qemu, cpu)
    except armenv.ArmEnvError as exc:
        print(f"tools/arm/bench.py: error: {exc}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qbert-edge-arm-bench.") as tmp:
        work = Path(tmp)
        model = ns.model.resolve() if ns.model else armcheck.make_models(work, variants=("mp23-a8",))["mp23-a8"]
        rows = []
        for cpu in [None, *cpus]:
            for label, backend, level in CONFIGS:
                kwargs = {"config": str(model), "backend": backend, "batch": 1, "seq_len": ns.seq_len,
                          "runs": ns.runs, "warmup": 1, "threads": ns.threads, "accuracy_level": level}
                t1 = time.monotonic()
                m = _measure(None if cpu is None else arm, cpu, kwargs)
                row = _row(cpu or f"x86 native ({platform.machine()})", label, backend, level, m)
                logger.info("%s %s: %s (%.0f s)", row["cpu"], label,
                            row.get("error") or f"p50 {row['latency_ms_p50']:.0f} ms, peak {row['rss_peak_mb']:.0f} MB",
                            time.monotonic() - t1)
                rows.append(row)
        paths = [] if ns.no_paths else kernel_paths(arm, model, cpus, work)
        model_info = {"name": model.name if ns.model else "minilm 2/3 MP DirectQ (check.py's mp23-a8)",
                      "mb": model.stat().st_size / 1e6}
    import onnxruntime

    qemu_version = subprocess.run([arm.qemu, "--version"], capture_output=True, text=True,
                                  check=False).stdout.split("\n")[0].split("version")[-1].strip()
    command = "python tools/arm/bench.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None and len(sys.argv) > 1:
        command += " " + " ".join(sys.argv[1:])
    report = {
        "format": FORMAT, "version": VERSION, "command": command,
        "date": _dt.date.today().isoformat(), "seconds": round(time.monotonic() - t0),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]},
        "qemu_version": qemu_version, "onnxruntime": onnxruntime.__version__,
        "model": model_info, "seq_len": ns.seq_len, "runs": ns.runs, "threads": ns.threads,
        "rows": rows, "paths": paths,
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", format_markdown(report))):
        target = ns.out.with_name(ns.out.name + suffix)
        tmp_path = target.with_name(target.name + ".tmp")
        tmp_path.write_text(text)
        os.replace(tmp_path, target)
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
