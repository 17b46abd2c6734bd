"""Run one exported model through runtime backends and save every output: the device side of the check.

    python tools/arm/device.py model.onnx [more.onnx ...] --texts texts.json --out-dir DIR [--backends ort,reference]

The same script runs on the x86 host and on the emulated (or a real) aarch64 board, so both
sides tokenize, batch and call the runtime the same way; ``check.py`` compares the two files.
It needs only NumPy and ``qbert_edge.runtime`` (no torch), and it writes one ``DIR/<model stem>.npz``
per model (several models share one process: under emulation, starting Python and importing
onnxruntime costs seconds):

* ``input/<name>``: the token arrays the tokenizer made from the texts (checked equal across sides);
* ``<backend>/<output>``: each graph output of each backend;
* ``meta``: JSON (format ``qbert-edge/arm-device`` v1): machine, emulated CPU, package versions,
  the CPU features the kernels can see (aarch64 ``HWCAP``), and per backend the load time, the
  time of each run and any error, one line.

It does not compare anything, and its timings are only as faithful as the machine it runs on
(under qemu they measure the emulator).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

FORMAT = "qbert-edge/arm-device"
VERSION = 1
BACKENDS = ("ort", "ort-custom", "reference")

# aarch64 HWCAP / HWCAP2 bits (linux/arch/arm64/include/uapi/asm/hwcap.h).
_HWCAP = {"asimd": (16, 1), "fphp": (16, 9), "asimddp": (16, 20), "sve": (16, 22)}
_HWCAP2 = {"i8mm": (26, 13), "bf16": (26, 14)}


def cpu_features() -> dict[str, bool]:
    """On aarch64 Linux, the instruction-set features the kernel (or qemu) advertises; else {}.

    ``asimddp`` is the dot-product extension: the Pi 5's Cortex-A76 has it, the Pi 4's A72 not.
    """
    if platform.machine() not in ("aarch64", "arm64") or not sys.platform.startswith("linux"):
        return {}
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    words = {16: libc.getauxval(16), 26: libc.getauxval(26)}
    return {name: bool(words[w] & (1 << bit)) for name, (w, bit) in {**_HWCAP, **_HWCAP2}.items()}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("numpy", "onnx", "onnxruntime", "onnxruntime-extensions", "tokenizers", "qbert-edge"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def run_backends(model: Path, texts: list[str], backends: list[str], runs: int = 1,
                 threads: int | None = None, accuracy_level: int | None = None) -> tuple[dict, dict]:
    """Arrays (inputs and outputs by backend) and per-backend facts for ``texts`` on ``model``."""
    import numpy as np
    from qbert_edge.runtime.backends import RuntimeOptions
    from qbert_edge.runtime.session import Session

    from qbert_edge.errors import QbertEdgeError

    arrays: dict[str, np.ndarray] = {}
    facts: dict[str, dict] = {}
    feeds = None
    for backend in backends:
        fact: dict = {"backend": backend}
        facts[backend] = fact
        try:
            t0 = time.perf_counter()
            session = Session(model, backend=backend, options=RuntimeOptions(**_options(threads, accuracy_level)))
            fact["load_s"] = time.perf_counter() - t0
            if feeds is None:
                feeds = session.encode(texts)
                arrays.update({f"input/{k}": v for k, v in feeds.items()})
            times = []
            for _ in range(max(1, runs)):
                t0 = time.perf_counter()
                outputs = session.run(feeds)
                times.append(time.perf_counter() - t0)
            fact["run_s"] = times
            fact["outputs"] = sorted(outputs)
            arrays.update({f"{backend}/{k}": np.asarray(v) for k, v in outputs.items()})
            if session.labels:
                fact["labels_all"] = list(session.labels)
            del session
        except (QbertEdgeError, ImportError, RuntimeError, ValueError) as exc:
            fact["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return arrays, facts


def _options(threads: int | None, accuracy_level: int | None) -> dict:
    given = {"threads": threads, "accuracy_level": accuracy_level}
    return {k: v for k, v in given.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--texts", type=Path, required=True, help="a JSON list of strings")
    parser.add_argument("--out-dir", type=Path, required=True, help="where to write <model stem>.npz")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--runs", type=int, default=1, help="runs per backend (timed; outputs of the last)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits compute type (ort backend)")
    ns = parser.parse_args(argv)

    import numpy as np

    texts = json.loads(ns.texts.read_text())
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    for model in ns.models:
        arrays, facts = run_backends(model, texts, [b for b in ns.backends.split(",") if b], ns.runs, ns.threads,
                                     ns.accuracy_level)
        meta = {
            "format": FORMAT, "version": VERSION, "model": str(model),
            "machine": platform.machine(), "emulated": os.environ.get("QBERT_EDGE_EMULATED") or None,
            "cpu_features": cpu_features(), "versions": versions(),
            "threads": ns.threads, "accuracy_level": ns.accuracy_level, "texts": texts, "backends": facts,
        }
        out = ns.out_dir / f"{model.stem}.npz"
        tmp = out.with_name(out.stem + ".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, out)
        for b, fact in facts.items():
            if "error" in fact:
                print(f"device.py: {model.name}: backend {b}: {fact['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
