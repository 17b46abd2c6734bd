"""Prove the runtime on aarch64: the same model, the same texts, x86 vs an emulated Raspberry Pi.

    python tools/arm/check.py                        # 2/3 MP DirectQ minilm, emulated Pi 4 (cortex-a72)
    python tools/arm/check.py --cpu cortex-a76       # the Pi 5's core
    python tools/arm/check.py --model model.onnx     # your own export
    python tools/arm/check.py --json report.json     # also write the report (qbert-edge/arm-check v1)

On a real board (docs/arm.md): ``--prepare DIR`` writes the models, texts.json and device.py to
copy to the Pi; there ``python3 device.py *.onnx --texts texts.json --out-dir results``; back on
x86 ``--model DIR/mp23-a8.onnx --model DIR/mp23-fp32act.onnx --device-results results`` compares.

What it does, in order:
  1. builds (or reuses) the aarch64 environment of :mod:`build_env` (qemu-aarch64-static, Debian
     bookworm arm64 python3.11, the runtime's aarch64 wheels, qbert_edge from this tree);
  2. unless ``--model`` is given, makes the reference models on the x86 side: ``qbert-edge quantize
     minilm --plan P --direct`` with a fixed 2/3 mixed plan (encoder layers 0-1 at 3 bits, 2-5 at
     2 bits, 128 groups; 8-bit embeddings and pooler) and ``qbert-edge export``, twice: with 8-bit
     activations (the real 2/3 MP model) and with fp32 activations (the same packed weights: an
     exact test of the kernels);
  3. runs :mod:`device` on the host and under qemu with every backend, and compares each backend's
     outputs on ARM with the same backend's outputs on x86;
  4. runs ``qbert-edge measure`` under emulation (the fresh-process path) unless ``--no-measure``;
  5. prints a table and the predictions; exits 0 when every backend is within tolerance, 1 when
     one is not, 2 when the host cannot emulate (the message says what to install).

Tolerance (see docs/arm.md for the measurements behind it):
  * ``exact`` (no activation quantization in the graph): for every output,
    ``max|arm - x86| <= ATOL + RTOL * max|x86|`` with ATOL = RTOL = 1e-4. fp32 sums in another
    order differ by ~1e-5 here; a wrong bit order, alignment or group index is off by > 1e-2.
  * ``quantized-activations`` (QuantizeLinear in the graph): a value that lands within float
    rounding of an 8-bit step boundary rounds to the neighbouring code on one CPU and not on the
    other, and the 2-bit layers amplify that. So the criterion is per text: the mean-pooled
    embedding (``last_hidden_state``) or the probabilities (``logits``) of every text have cosine
    >= MIN_COSINE with x86's, and a classifier gives the same label to every text whose x86
    probability margin is at least LABEL_MARGIN. The number of texts that match exactly is printed.

This script does not time anything meant as a benchmark (see ``bench.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_env as armenv  # tools/arm is a folder of scripts, not a package

FORMAT = "qbert-edge/arm-check"
VERSION = 1
ATOL = 1e-4
RTOL = 1e-4
MIN_COSINE = 0.95
LABEL_MARGIN = 0.1
DEVICE = Path(__file__).resolve().parent / "device.py"
BACKENDS = ("ort", "ort-custom", "reference")
#: The texts of the check: short and long, plain and odd (an accent, digits, a long word). Few
#: and short on purpose: under emulation every token costs (see docs/arm.md for the timings).
TEXTS = (
    "a gripping, funny film",
    "the plot is thin and the acting is worse.",
    "Café owners in 1970s Marseille: an unhurried, self-congratulatory portrait.",
    "ok",
)
#: The 2/3 mixed plan of the check: which encoder layers get 3 bits (the others get 2).
HIGH_LAYERS = (0, 1)

logger = logging.getLogger("qbert_edge.arm")


# --------------------------------------------------------------------------- comparison (pure)

@dataclass(frozen=True)
class OutputDiff:
    """One output of one backend, ARM vs x86."""

    name: str
    max_abs: float
    max_ref: float
    allowed: float | None       # exact mode only
    min_cosine: float | None    # per text (mean-pooled hidden state, or softmax of logits)
    texts_exact: int            # texts whose rows are within the exact tolerance
    ok: bool


@dataclass(frozen=True)
class BackendResult:
    backend: str
    mode: str                   # "exact" or "quantized-activations"
    ok: bool
    outputs: tuple[OutputDiff, ...] = ()
    labels_x86: tuple[str, ...] | None = None
    labels_arm: tuple[str, ...] | None = None
    error: str | None = None
    arm_run_s: float | None = None
    x86_run_s: float | None = None


def _per_text(name: str, arr: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """One vector per text: mean-pooled hidden states, softmax of logits, the output itself otherwise."""
    a = arr.astype(np.float64)
    if a.ndim == 3:  # [batch, length, hidden]
        m = mask[..., None].astype(np.float64)
        return (a * m).sum(1) / np.maximum(m.sum(1), 1.0)
    if name == "logits":
        z = np.exp(a - a.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)
    return a.reshape(a.shape[0], -1)


def _cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise cosine: ``_cosine(np.eye(2), np.eye(2)) -> [1., 1.]``."""
    num = (x * y).sum(-1)
    den = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def compare_output(name: str, x86: np.ndarray, arm: np.ndarray, mask: np.ndarray, exact: bool) -> OutputDiff:
    """ARM vs x86 for one output (see the module docstring for the two criteria)."""
    if x86.shape != arm.shape:
        return OutputDiff(name, float("inf"), float(np.abs(x86).max()), None, None, 0, False)
    diff = np.abs(x86.astype(np.float64) - arm.astype(np.float64))
    max_ref = float(np.abs(x86).max())
    allowed = ATOL + RTOL * max_ref
    if diff.ndim == 3:  # padding positions are not the model's answer for that text
        diff = np.where(mask[..., None].astype(bool), diff, 0.0)
    per_text_max = diff.reshape(diff.shape[0], -1).max(1)
    cos = _cosine(_per_text(name, x86, mask), _per_text(name, arm, mask))
    ok = bool(per_text_max.max() <= allowed) if exact else bool(cos.min() >= MIN_COSINE)
    return OutputDiff(name, float(per_text_max.max()), max_ref, allowed if exact else None,
                      float(cos.min()), int((per_text_max <= allowed).sum()), ok)


def _labels(logits: np.ndarray, labels: list[str] | None) -> tuple[str, ...]:
    ids = logits.argmax(-1)
    return tuple(labels[i] if labels and i < len(labels) else str(i) for i in ids)


def compare_backend(backend: str, x86: dict, arm: dict, x86_meta: dict, arm_meta: dict, exact: bool) -> BackendResult:
    """Every output of ``backend`` (arrays keyed ``backend/output``; metas from device.py)."""
    mode = "exact" if exact else "quantized-activations"
    fx, fa = x86_meta["backends"].get(backend, {}), arm_meta["backends"].get(backend, {})
    for side, fact in (("x86", fx), ("arm", fa)):
        if not fact:
            return BackendResult(backend, mode, False, error=f"{side}: not run")
        if "error" in fact:
            return BackendResult(backend, mode, False, error=f"{side}: {fact['error']}")
    mask = x86["input/attention_mask"]
    outputs = tuple(compare_output(name, x86[f"{backend}/{name}"], arm[f"{backend}/{name}"], mask, exact)
                    for name in fx["outputs"])
    ok = all(o.ok for o in outputs)
    labels_x86 = labels_arm = None
    if f"{backend}/logits" in x86:
        names = fx.get("labels_all")
        lx, la = x86[f"{backend}/logits"], arm[f"{backend}/logits"]
        labels_x86, labels_arm = _labels(lx, names), _labels(la, names)
        p = np.sort(_per_text("logits", lx, mask), axis=-1)
        margin = p[:, -1] - p[:, -2] if p.shape[1] > 1 else np.ones(len(p))
        ok = ok and all(a == b for a, b, m in zip(labels_x86, labels_arm, margin) if m >= LABEL_MARGIN)
    return BackendResult(backend, mode, ok, outputs, labels_x86, labels_arm,
                         arm_run_s=min(fa["run_s"]), x86_run_s=min(fx["run_s"]))


# --------------------------------------------------------------------------- steps

def has_activation_quant(model: Path) -> bool:
    """True when the graph quantizes activations (QuantizeLinear nodes)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in graph.node)


VARIANTS = {"mp23-a8": 8, "mp23-fp32act": None}  # name -> activation bits


def make_models(work: Path, base: str = "minilm", calib_size: int = 64,
                variants: tuple[str, ...] = tuple(VARIANTS)) -> dict[str, Path]:
    """The 2/3 MP DirectQ exports of ``base``: ``{"mp23-a8": ..., "mp23-fp32act": ...}`` in ``work``."""
    from qbert_edge.loading import load_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes

    shapes = quantizable_shapes(load_model(base).model)
    layer_bits = {i: 3 for i in HIGH_LAYERS}
    out = {}
    for name in variants:
        act_bits = VARIANTS[name]
        plan = uniform_plan(shapes, bits=2, groups=128, layer_bits=layer_bits, activation_bits=act_bits,
                            meta={"made_by": "tools/arm/check.py", "scheme": "2/3 fixed"})
        plan_path, pt, onnx_path = work / f"{name}.plan.json", work / f"{name}.pt", work / f"{name}.onnx"
        plan.save(plan_path)
        _cli(["quantize", base, "--plan", str(plan_path), "--direct", "--calib-size", str(calib_size),
              "-o", str(pt)])
        # Export validation (torch vs ONNX) is the exporter's own test; this check compares CPUs.
        _cli(["export", str(pt), "-o", str(onnx_path), "--no-validate"])
        pt.unlink()
        out[name] = onnx_path
    return out


#: ``python -c CLI args...`` runs the ``qbert-edge`` command with any interpreter (the console
#: script that pip writes names the host's Python, useless under emulation).
CLI = "from qbert_edge.cli import main; main()"


def _cli(args: list[str]) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"qbert-edge {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
    logger.info("x86: qbert-edge %s (%.0f s)", " ".join(args[:2]), time.monotonic() - t0)


_NOISE = ("Error in cpuinfo:", "onnxruntime cpuid_info warning:", "onnxruntime warning: cpuinfo_initialize")


def quiet(stderr: str) -> str:
    """stderr without cpuinfo's complaints about the emptied sysfs (expected, see build_env.py)."""
    return "\n".join(line for line in stderr.splitlines() if not line.startswith(_NOISE))


def run_device(models: list[Path], texts_file: Path, out_dir: Path, backends: list[str],
               arm: armenv.ArmEnv | None, cpu: str, runs: int = 1, threads: int | None = None) -> dict[str, tuple]:
    """device.py on the host (``arm=None``) or under emulation: ``{model stem: (arrays, meta)}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [str(DEVICE), *map(str, models), "--texts", str(texts_file), "--out-dir", str(out_dir),
            "--backends", ",".join(backends), "--runs", str(runs)]
    if threads:
        args += ["--threads", str(threads)]
    t0 = time.monotonic()
    if arm is None:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    else:
        proc = arm.run(args, cpu=cpu, capture_output=True, text=True)
    side = f"arm ({cpu})" if arm else "x86"
    err = quiet(proc.stderr).strip()
    missing = [m for m in models if not (out_dir / f"{m.stem}.npz").exists()]
    if proc.returncode != 0 or missing:
        raise RuntimeError(f"device.py on {side} failed (exit {proc.returncode}): {err[-1500:]}")
    if err:
        logger.info("%s: %s", side, err)
    logger.info("%s: %d model(s) x %d backend(s) in %.0f s", side, len(models), len(backends), time.monotonic() - t0)
    results = {}
    for model in models:
        with np.load(out_dir / f"{model.stem}.npz") as data:
            results[model.stem] = ({k: data[k] for k in data.files if k != "meta"}, json.loads(str(data["meta"])))
    return results


def run_measure(arm: armenv.ArmEnv, model: Path, cpu: str, backend: str = "ort") -> dict:
    """``qbert-edge measure`` under emulation (its fresh child process is emulated too)."""
    args = ["-c", CLI, "measure", str(model), "--backend", backend, "--batch", "1",
            "--seq-len", "16", "--runs", "2", "--warmup", "1", "--json"]
    proc = arm.run(args, cpu=cpu, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {quiet(proc.stderr).strip()[-800:]}"}
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return {"error": f"not JSON: {proc.stdout[:200]}"}


# --------------------------------------------------------------------------- report

def format_table(model: str, results: list[BackendResult]) -> str:
    lines = [f"{model}:", (f"  {'backend':<11} {'mode':<22} {'output':<18} {'max|d|':>9} {'allowed':>9} "
                          f"{'min cos':>8} {'exact':>6} {'x86 s':>6} {'arm s':>7}  result")]
    for r in results:
        if r.error:
            lines.append(f"  {r.backend:<11} {r.mode:<22} {'-':<18} {'':>9} {'':>9} {'':>8} {'':>6} {'':>6} {'':>7}"
                         f"  FAIL: {r.error}")
            continue
        for i, o in enumerate(r.outputs):
            allowed = f"{o.allowed:.2e}" if o.allowed is not None else "-"
            times = f"{r.x86_run_s:6.2f} {r.arm_run_s:7.1f}" if i == 0 else f"{'':>6} {'':>7}"
            n = len(r.labels_x86) if r.labels_x86 else None
            lines.append(f"  {r.backend if i == 0 else '':<11} {r.mode if i == 0 else '':<22} {o.name:<18} "
                         f"{o.max_abs:9.2e} {allowed:>9} {o.min_cosine:8.5f} {o.texts_exact:>6} {times}  "
                         f"{'ok' if o.ok else 'FAIL'}" + (f" (labels {n})" if n and i == 0 else ""))
    return "\n".join(lines)


def format_predictions(texts: list[str], x86: dict, arm: dict, backend: str, labels: list[str] | None) -> str:
    """What the ARM side answered for each text, next to x86."""
    mask = x86["input/attention_mask"]
    lines = []
    if f"{backend}/logits" in arm:
        px, pa = _per_text("logits", x86[f"{backend}/logits"], mask), _per_text("logits", arm[f"{backend}/logits"], mask)
        for t, a, x in zip(texts, pa, px):
            name = lambda p: labels[int(p.argmax())] if labels else str(int(p.argmax()))
            lines.append(f"  arm: {name(a):<10} p={a.max():.3f}   x86: {name(x):<10} p={x.max():.3f}   {t[:60]}")
    elif f"{backend}/last_hidden_state" in arm:
        ex = _per_text("h", x86[f"{backend}/last_hidden_state"], mask)
        ea = _per_text("h", arm[f"{backend}/last_hidden_state"], mask)
        cos = _cosine(ex, ea)
        na = ea / np.linalg.norm(ea, axis=-1, keepdims=True)
        nx = ex / np.linalg.norm(ex, axis=-1, keepdims=True)
        sa, sx = na @ na.T, nx @ nx.T
        np.fill_diagonal(sa, -2), np.fill_diagonal(sx, -2)
        lines.append("  (a bare encoder: its answer is a sentence embedding; shown: the nearest other text"
                     " on ARM and on x86, and the cosine of ARM's embedding to x86's)")
        for i, t in enumerate(texts):
            lines.append(f"  cos {cos[i]:.5f}  nearest arm: #{int(sa[i].argmax()) + 1} ({sa[i].max():.3f})"
                         f"  x86: #{int(sx[i].argmax()) + 1} ({sx[i].max():.3f})   #{i + 1} {t[:50]}")
    return "\n".join(lines)


def load_device_results(models: dict[str, Path], folder: Path) -> dict[str, tuple]:
    """device.py's ``<stem>.npz`` files from a real board: ``{stem: (arrays, meta)}``."""
    out = {}
    for model in models.values():
        path = folder / f"{model.stem}.npz"
        if not path.exists():
            raise RuntimeError(f"{path}: no results for {model.name} (run device.py on the board first)")
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != device_format():
                raise RuntimeError(f"{path}: not a device.py result ({meta.get('format')!r})")
            out[model.stem] = ({k: data[k] for k in data.files if k != "meta"}, meta)
    return out


def device_format() -> str:
    spec = importlib.util.spec_from_file_location("qbert_edge_arm_device", DEVICE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FORMAT


def check(models: dict[str, Path], cpu: str, backends: list[str], work: Path, arm: armenv.ArmEnv | None,
          texts: list[str], measure: bool = True, threads: int | None = None,
          device_results: dict[str, tuple] | None = None) -> dict:
    """Run and compare every model; returns the report (JSON-able) and prints as it goes.

    ``device_results`` (from :func:`load_device_results`) replaces the emulated run: a real board.
    """
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    report = {"format": FORMAT, "version": VERSION, "cpu": cpu, "texts": texts,
              "tolerance": {"atol": ATOL, "rtol": RTOL, "min_cosine": MIN_COSINE, "label_margin": LABEL_MARGIN},
              "models": {}, "ok": True}
    x86_all = run_device(list(models.values()), texts_file, work / "x86", backends, None, cpu, threads=threads)
    if device_results is None:
        arm_all = run_device(list(models.values()), texts_file, work / "arm", backends, arm, cpu, threads=threads)
    else:
        arm_all = device_results
    for name, model in models.items():
        exact = not has_activation_quant(model)
        (x86, x86_meta), (arm_arrays, arm_meta) = x86_all[model.stem], arm_all[model.stem]
        same_inputs = all(np.array_equal(x86[k], arm_arrays.get(k)) for k in x86 if k.startswith("input/"))
        results = [compare_backend(b, x86, arm_arrays, x86_meta, arm_meta, exact) for b in backends]
        ok = same_inputs and all(r.ok for r in results)
        print(format_table(f"{model.name} ({model.stat().st_size / 1e6:.1f} MB) on {cpu}", results))
        if not same_inputs:
            print("  FAIL: the tokenizer gave different token ids on ARM")
        shown = next((r for r in results if not r.error), None)
        if shown:
            labels = next((f.get("labels_all") for f in x86_meta["backends"].values() if f.get("labels_all")), None)
            print(f"  predictions ({shown.backend}):")
            print(format_predictions(texts, x86, arm_arrays, shown.backend, labels))
        report["models"][name] = {
            "file": str(model), "bytes": model.stat().st_size, "mode": "exact" if exact else "quantized-activations",
            "same_token_ids": same_inputs, "ok": ok, "backends": [asdict(r) for r in results],
            "arm": {k: arm_meta[k] for k in ("machine", "emulated", "cpu_features", "versions")},
            "x86": {k: x86_meta[k] for k in ("machine", "versions")},
        }
        report["ok"] = report["ok"] and ok
    if measure and arm is not None:
        model = next(iter(models.values()))
        m = run_measure(arm, model, cpu)
        report["measure"] = m
        if "error" in m:
            print(f"measure under emulation: FAIL: {m['error']}")
            report["ok"] = False
        else:
            print(f"measure under emulation ({model.name}, ort, 1x16): ran; "
                  f"{json.dumps({k: m[k] for k in m if k in ('rss_mb', 'static_bytes', 'emulated', 'latency_ms')})}")
    return report


def _board(results: dict[str, tuple]) -> str:
    """How device.py described the machine: ``cortex-a76 (emulated)`` or ``aarch64 with dotprod``."""
    meta = next(iter(results.values()))[1]
    if meta.get("emulated"):
        return f"{meta['emulated']} (emulated)"
    feats = meta.get("cpu_features") or {}
    return f"{meta.get('machine')} {'with' if feats.get('asimddp') else 'without'} dotprod (board)"


def prepare(folder: Path, base: str) -> int:
    """Write what a real board needs for the check: the models, texts.json and device.py."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        models = make_models(folder, base)
    except RuntimeError as exc:
        print(f"tools/arm/check.py: error: {exc}", file=sys.stderr)
        return 1
    (folder / "texts.json").write_text(json.dumps(list(TEXTS)))
    shutil.copy2(DEVICE, folder / "device.py")
    names = " ".join(m.name for m in models.values())
    print(f"wrote {folder}: {names} texts.json device.py\n"
          f"on the board:  pip install qbert-edge && python3 device.py {names} --texts texts.json --out-dir results\n"
          f"then here:     python tools/arm/check.py "
          + " ".join(f"--model {m}" for m in models.values()) + " --device-results results")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append",
                        help="an exported model.onnx to check (repeatable); default: build the 2/3 MP minilm pair")
    parser.add_argument("--base", default="minilm", help="what to quantize when --model is not given")
    parser.add_argument("--cpu", default=armenv.DEFAULT_CPU,
                        help="emulated CPU: cortex-a72 (Pi 4), cortex-a76 (Pi 5), max")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-measure", action="store_true", help="skip `qbert-edge measure` under emulation")
    parser.add_argument("--install-qemu", action="store_true",
                        help=f"apt-get install {armenv.QEMU_PACKAGE} if it is missing (root; what CI does)")
    parser.add_argument("--cache", type=Path, default=None, help=f"environment cache (default {armenv.cache_dir()})")
    parser.add_argument("--work", type=Path, default=None, help="keep models and outputs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                        help="only write the models, texts.json and device.py to DIR (for a real board)")
    parser.add_argument("--device-results", type=Path, default=None, metavar="DIR",
                        help="compare with device.py results from a real board instead of emulating")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.monotonic()
    if ns.prepare:
        return prepare(ns.prepare, ns.base)
    arm = None
    device_results = None
    try:
        if ns.device_results:
            if not ns.model:
                raise RuntimeError("--device-results needs the --model files the board ran")
            models = {m.stem: m.resolve() for m in ns.model}
            device_results = load_device_results(models, ns.device_results)
            texts = next(iter(device_results.values()))[1]["texts"]
        else:
            texts = list(TEXTS)
            arm = armenv.build(ns.cache, install_qemu=ns.install_qemu)
            armenv.check_cpu(arm.qemu, ns.cpu)
    except armenv.ArmEnvError as exc:
        print(f"tools/arm/check.py: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"tools/arm/check.py: error: {exc}", file=sys.stderr)
        return 1
    cpu = ns.cpu if device_results is None else _board(device_results)
    work_ctx = tempfile.TemporaryDirectory(prefix="qbert-edge-arm.") if ns.work is None else None
    work = Path(work_ctx.name) if work_ctx else ns.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        if ns.model:
            models = {m.stem: m.resolve() for m in ns.model}
            if len(models) != len(ns.model):
                raise RuntimeError("two --model files have the same name; rename one")
        else:
            models = make_models(work, ns.base)
        report = check(models, cpu, [b for b in ns.backends.split(",") if b], work, arm, texts,
                       measure=not ns.no_measure, threads=ns.threads, device_results=device_results)
    except RuntimeError as exc:
        print(f"tools/arm/check.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if work_ctx:
            work_ctx.cleanup()
    report["seconds"] = round(time.monotonic() - t0, 1)
    if arm is not None:
        report["environment"] = {"home": str(arm.home), "qemu": arm.qemu, **arm.packages}
    if ns.json:
        tmp = ns.json.with_name(ns.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, ns.json)
    where = f"{cpu}, emulated" if arm is not None else f"{cpu}, from --device-results"
    print(f"{'PASS' if report['ok'] else 'FAIL'}: aarch64 ({where}) vs x86, "
          f"{len(report['models'])} model(s), {report['seconds']:.0f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
