"""Do QAT recipes (distillation, MSE-clipped ranges) lift our variants past onnxruntime's 4-bit and int8 rows? (issue 8)

    python benchmarks/distill.py ours-w4-e4:240 ours-w4-e4:240:kd ours-mp24-e2:240:kd
    python benchmarks/distill.py ours-mp24-e2:240:kd --clip mse --seed 1
    python benchmarks/distill.py --report-only

Each run spec is ``KEY:STEPS`` (plain QAT) or ``KEY:STEPS:kd`` (QAT distilled from the fp32
classifier with ``--distill-alpha``/``--distill-temperature``), KEY one of ``benchmarks/peers.py``'s
variants of ours; ``--clip mse`` narrows the plan's group ranges, ``--seed`` changes the QAT seed. The model is built exactly as ``peers.py`` builds it (same plan, file name and
work directory, so ``peers.py`` with the matching flags reuses the file and its accuracy), exported
portable and scored on ``rt:dev`` on the ``ort`` backend. The ORT rows it must beat (int8, 4-bit
b32/b128 + GatherBlockQuantized) are scored the same way. Results accumulate in
``benchmarks/results/distill.json`` (``qbert-edge/benchmark-distill`` v1, one row per run spec and
settings, each with the command that made it) and ``distill.md``. It measures accuracy and file
size only, not speed or memory (``peers.py`` does), and one seed per row: differences of a few
tenths of a point are within seed noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from qbert_edge.errors import QbertEdgeError  # noqa: E402
from qbert_edge.plan import CLIPS  # noqa: E402

FORMAT = "qbert-edge/benchmark-distill"
VERSION = 1
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
#: the ORT rows of issue 8's targets: int8 (the 3x-smaller target) and the 4-bit + GatherBQ files
REFERENCES = ("ort-int8", "ort-4b32-g", "ort-4b128-g", "ort-fp32")

log = logging.getLogger("benchmarks.distill")


def parse_spec(text: str) -> tuple[str, int, bool]:
    """``"ours-w4-e4:240:kd" -> ("ours-w4-e4", 240, True)``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in peers.OURS or not parts[1].isdigit() or int(parts[1]) < 1 \
            or (len(parts) == 3 and parts[2] != "kd"):
        raise QbertEdgeError(f"run spec {text}: expected KEY:STEPS or KEY:STEPS:kd with KEY one of {', '.join(peers.OURS)}")
    return parts[0], int(parts[1]), len(parts) == 3


def run_one(key: str, steps: int, kd: bool, args) -> tuple[dict, dict]:
    """Build (or reuse) one variant as ``peers.py`` does, score it on ``rt:dev`` (``ort``); its row
    and the ORT reference rows (accuracy, file MB)."""
    from qbert_edge.distill import DistillConfig
    from qbert_edge.loading import load_model

    distill = DistillConfig(args.distill_alpha, args.distill_temperature, args.distill_hidden) if kd else None
    t0 = time.time()
    paths, notes = peers.build("minilm", args.workdir, {key}, qat_steps=steps, lr=args.lr,
                               high_layers=args.high_layers, distill=distill, clip=args.clip, seed=args.seed)
    built = time.time() - t0
    batches = peers.dev_batches(load_model("minilm-rt").tokenizer)
    cache = peers.accuracy_cache(paths[key])
    variants = {v.key: v for v in peers.ALL_VARIANTS}
    acc = peers.cached_accuracy(variants[key], paths[key], batches, args.threads, cache)["accuracy"]
    refs = {r: {"accuracy": peers.cached_accuracy(variants[r], paths[r], batches, args.threads, cache)["accuracy"],
                "file_mb": round(paths[r].stat().st_size / 1e6, 2)} for r in REFERENCES}
    pt = paths[key].with_suffix(".pt")
    training = _training_meta(pt)
    if training and training.get("steps") not in (None, steps):
        raise SystemExit(f"{pt.name}: asked for {steps} QAT steps, the file says {training['steps']} were run")
    row = {"key": key, "label": peers.OURS[key].label, "plan": notes.get(key), "qat_steps": steps, "lr": args.lr,
           "clip": args.clip, "seed": args.seed, "group_by_length": True,  # peers' QAT (peer_models.quantize_ours)
           "distill": distill.to_dict() if distill else None, "accuracy": acc,
           "file_mb": round(paths[key].stat().st_size / 1e6, 2), "file": paths[key].name,
           "build_s": round(built), "build_and_score_s": round(time.time() - t0), "training": training,
           "command": "python benchmarks/distill.py " + " ".join(args.argv_for(key, steps, kd)),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log.info("%s %d steps%s: accuracy %.4f, %.2f MB", key, steps, " kd" if kd else "", acc, row["file_mb"])
    return row, refs


def _training_meta(pt: Path) -> dict | None:
    """Loss and time of the QAT run, from the model.pt's metadata (None if not readable)."""
    try:
        from qbert_edge.checkpoint import load_quantized

        meta = load_quantized(pt).meta.get("training") or {}
    except (QbertEdgeError, OSError):
        return None
    return {k: meta.get(k) for k in ("steps", "first_loss", "last_loss", "seconds")}


def peers_flags(row: dict) -> str:
    """The ``peers.py`` flags that build the same file as ``row`` (QAT budget, lr, distillation for this key only)."""
    key, kd = row["key"], row["distill"]
    flags = [f"--steps-for {key}={row['qat_steps']}", f"--lr-for {key}={row['lr']:g}"]
    if row.get("clip", "minmax") != "minmax":
        flags.append(f"--clip {row['clip']}")
    if row.get("seed"):
        flags.append(f"--seed {row['seed']}")
    if kd:
        flags.append(f"--distill {key} --distill-alpha {kd['alpha']:g} --distill-temperature {kd['temperature']:g}"
                     + (f" --distill-hidden {kd['hidden']:g}" if kd.get("hidden") else ""))
    return " ".join(flags)


def targets(rows: list[dict], refs: dict) -> list[str]:
    """Issue 8's two accuracy targets against the ORT rows, per row of ours."""
    out = []
    for r in rows:
        own = r.get("references", refs)  # the ORT rows scored with the same fp32 classifier as this row
        int8 = own.get("ort-int8")
        checks = []
        for ref in ("ort-4b32-g", "ort-4b128-g"):
            o = own.get(ref)
            if o and r["key"].startswith("ours-w4"):
                ok = r["file_mb"] < o["file_mb"] and r["accuracy"] >= o["accuracy"]
                checks.append(f"dominates {ref} ({o['file_mb']:.1f} MB, {o['accuracy']:.3f}): {'yes' if ok else 'no'}")
        if int8 and peers.OURS[r["key"]].high_bits is not None:
            ratio = int8["file_mb"] / r["file_mb"]
            ok = ratio >= 3 and r["accuracy"] >= int8["accuracy"]
            checks.append(f"vs ORT int8 ({int8['file_mb']:.1f} MB, {int8['accuracy']:.3f}): {ratio:.2f}x smaller, "
                          f"{(r['accuracy'] - int8['accuracy']) * 100:+.1f} pt -> {'MET' if ok else 'not met'}")
        kd = f"distilled ({_kd(r['distill'])})" if r["distill"] else "plain QAT"
        out.append(f"- {r['label']}{_ranges(r)}, {r['qat_steps']} steps, {kd}: " + ("; ".join(checks) or "no target applies"))
    return out


def _kd(distill: dict) -> str:
    """``"alpha 0.5, T 2"`` (and ``", hidden 1"``) of a row's distillation settings (``peer_models.distill_note``)."""
    from peer_models import distill_note

    from qbert_edge.distill import DistillConfig

    return distill_note(DistillConfig(**distill))


def _ranges(row: dict) -> str:
    """What the label adds for the group ranges and the QAT seed: nothing for min/max and seed 0 (rows from before they existed)."""
    seed = f", seed {row['seed']}" if row.get("seed") else ""
    return (f", {row['clip']} ranges" if row.get("clip", "minmax") != "minmax" else "") + seed


def markdown(data: dict) -> str:
    rows, refs = data["rows"], data["references"]
    lines = ["# QAT recipes (distillation, MSE-clipped ranges, seeds) vs onnxruntime's rows (issue 8)", "",
             f"Machine: {data['machine']}. Accuracy on `rt:dev` ({data.get('dev_examples', '?')} sentences, 128 tokens) on the `ort` backend "
             "(ours) or plain onnxruntime (peers), one pass" + (f" (one sentence = {100 / data['dev_examples']:.3f} pt)"
                                                   if isinstance(data.get("dev_examples"), int) else "")
             + "; one seed per row, so a few tenths of a point are noise. "
             "QAT: batch 32, max length 64, on `rt:train`; plans as `benchmarks/peers.py` made them when the row ran "
             "(the plan column; 128 groups, activations 8-bit): a row whose plan the variant no longer has was made "
             "before its spec changed, and its command now builds the new plan. Files in the `peers.py` work directory. Last loss: the "
             "training loss of the last step (with distillation it includes the KL term, so it is not comparable "
             "across the distillation column). The ORT rows on top are the latest run's; `fp32 / int8 acc` is ORT fp32's "
             "and ORT int8's accuracy scored with the same fp32 classifier as that row (a new machine fine-tunes its own "
             "`minilm-rt`, which lands a few tenths of a point apart), and each row's targets use those.", "",
             "| variant | plan | QAT steps | lr | distillation (alpha, T) | acc rt:dev | fp32 / int8 acc | file MB | last loss | QAT s | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in refs.items():
        label = next(v.label for v in peers.ALL_VARIANTS if v.key == key)
        lines.append(f"| {label} | - | - | - | - | {r['accuracy']:.3f} | - | {r['file_mb']:.1f} | - | - | (peers.py) |")
    for r in rows:
        kd = _kd(r["distill"]).replace("alpha ", "").replace("T ", "") if r["distill"] else "none"
        tr = r.get("training") or {}
        last = f"{tr['last_loss']:.3f}" if tr.get("last_loss") is not None else "-"
        secs = f"{tr['seconds']:.0f}" if tr.get("seconds") is not None else "-"
        own = r.get("references", refs)
        base = "/".join(f"{own[k]['accuracy']:.3f}" if k in own else "?" for k in ("ort-fp32", "ort-int8"))
        plan = (r.get("plan") or "-").split(";")[0].replace(", mse ranges", "")
        lines.append(f"| {r['label']}{_ranges(r)} | {plan} | {r['qat_steps']} | {r['lr']:g} | {kd} | {r['accuracy']:.3f} | {base} | "
                     f"{r['file_mb']:.2f} | {last} | {secs} | `{r['command']}` |")
    lines += ["", "## Targets (computed from the rows above)", ""] + targets(rows, refs)
    lines += ["", "## Reproduce in peers.py", "",
              "Each row's `peers.py` flags build the same file (same name, reused from the work directory):", ""]
    lines += [f"- {r['label']}{_ranges(r)} ({r['qat_steps']} steps, {'distilled' if r['distill'] else 'plain QAT'}): "
              f"`python benchmarks/peers.py {peers_flags(r)}`" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from qbert_edge.reference import cache_root

    cache = cache_root()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="KEY:STEPS or KEY:STEPS:kd")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--distill-alpha", type=float, default=0.5)
    parser.add_argument("--distill-hidden", type=float, default=0.0, help="Weight of the hidden-state term.")
    parser.add_argument("--distill-temperature", type=float, default=2.0)
    parser.add_argument("--high-layers", type=int, default=2)
    parser.add_argument("--clip", choices=CLIPS, default="minmax", help="Group ranges of the plan.")
    parser.add_argument("--seed", type=int, default=0, help="QAT seed (data order, dropout): for seed-to-seed spread.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=cache / "bench-peers")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    specs = [parse_spec(s) for s in args.runs]
    if not specs and not args.report_only:
        parser.error("give at least one run spec (or --report-only)")
    if specs:
        from peer_models import check_installed

        check_installed()

    def argv_for(key, steps, kd):
        extra = [f"--lr {args.lr:g}"] + ([f"--clip {args.clip}"] if args.clip != "minmax" else [])
        extra += [f"--seed {args.seed}"] if args.seed else []
        if kd:
            extra += [f"--distill-alpha {args.distill_alpha:g}", f"--distill-temperature {args.distill_temperature:g}"]
            extra += [f"--distill-hidden {args.distill_hidden:g}"] if args.distill_hidden else []
        return [f"{key}:{steps}" + (":kd" if kd else "")] + extra

    args.argv_for = argv_for
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = args.out / "distill.json"
    data = json.loads(path.read_text()) if path.is_file() else {"format": FORMAT, "version": VERSION, "rows": [],
                                                                 "references": {}}
    if data.get("format") != FORMAT or data.get("version", 0) > VERSION:
        raise QbertEdgeError(f"{path}: not a {FORMAT} v{VERSION} file")
    for r in data["rows"]:
        r.pop("peers_flags", None)  # v1 files of the first runs stored it; computed now (peers_flags)
    data["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    if specs:
        from qbert_edge.data import load_data

        data["dev_examples"] = len(load_data("rt:dev"))
    for r in data["rows"]:  # rows from before each row kept its references were scored against the file's
        r.setdefault("references", data["references"])
    for key, steps, kd in specs:
        row, refs = run_one(key, steps, kd, args)
        row["references"] = refs
        data["rows"] = [r for r in data["rows"] if r["file"] != row["file"]] + [row]
        data["references"] = refs
        _write(data, args.out)
    _write(data, args.out)
    print(markdown(data))


def _write(data: dict, out: Path) -> None:
    from qbert_edge.fileio import atomic_path, write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "distill.json", data)
    with atomic_path(out / "distill.md") as tmp:
        tmp.write_text(markdown(data))


if __name__ == "__main__":
    main()
