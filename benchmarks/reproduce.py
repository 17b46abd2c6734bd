"""Reproduce the Q-BERT paper's tables on the reference model (minilm-rt on rt:dev).

    python benchmarks/reproduce.py                       # every row; resumes where it stopped
    python benchmarks/reproduce.py --only directq-w4 qbert-w4-g128
    python benchmarks/reproduce.py --qat-steps 120       # a shorter QAT budget per row

Rows (activations 8 bits throughout; encoder Linears at 128 groups unless the row says otherwise;
embeddings 8 bits, one group per row; pooler and classifier 8 bits):

- fp32 baseline; DirectQ w8/w4/w3/w2; Q-BERT (QAT) w8/w4/w3/w2 (Tables 1-2);
- Q-BERT MP 2/3 and 2/4 from the Hessian plan (``models/minilm-rt/sensitivity.json``);
- groups at w4: 1, 12, 128 and one per row (Table 3);
- word/position embedding bits 8/8, 4/8, 8/4, 4/4 at w4 (Table 4a);
- attention vs feed-forward, one bit less on either, from w4 (Table 4b);
- the control: the same 2/3 budget with the 3-bit layers chosen at random or by the lowest Omega.

Each row's result is appended to ``benchmarks/results/reproduce.json`` as soon as it is done, so a
long sweep can stop and resume; ``docs/results.md`` is rewritten from the JSON after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reproduce.json"
REPORT = ROOT / "docs" / "results.md"
SENSITIVITY = ROOT / "models" / "minilm-rt" / "sensitivity.json"
FORMAT = "qbert-edge/reproduce"


@dataclass(frozen=True)
class Row:
    """One experiment: a plan (bits, groups, per-layer / per-kind / embedding overrides) and a method."""

    key: str
    table: str
    label: str
    method: str  # fp32 | directq | qat
    bits: int = 8
    groups: int = 128
    layer_bits: dict = field(default_factory=dict)
    module_bits: dict = field(default_factory=dict)
    embedding_bits: tuple = (8, 8)  # word, position (token type follows position)


def mp_layers(omega: dict[int, float], high: int, order: str, seed: int = 0) -> list[int]:
    """The ``high`` layers that get the higher width: by Omega (``hessian``), lowest first, or random."""
    layers = sorted(omega)
    if order == "hessian":
        return sorted(sorted(layers, key=lambda i: -omega[i])[:high])
    if order == "reversed":
        return sorted(sorted(layers, key=lambda i: omega[i])[:high])
    return sorted(random.Random(seed).sample(layers, high))


def rows(omega: dict[int, float] | None, high: int) -> list[Row]:
    """Every row, most telling first (a sweep cut short still answers the main questions)."""
    attention = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    ffn = ("intermediate.dense", "output.dense")
    out = [Row("fp32", "bits", "fp32 baseline", "fp32")]
    out += [Row(f"directq-w{b}", "bits", f"DirectQ w{b}", "directq", bits=b) for b in (8, 4, 3, 2)]
    out += [Row(f"qbert-w{b}", "bits", f"Q-BERT w{b}", "qat", bits=b) for b in (4, 2, 3)]
    if omega:
        for lo, hi in ((2, 3), (2, 4)):
            layers = mp_layers(omega, high, "hessian")
            out.append(Row(f"qbert-mp{lo}{hi}", "bits", f"Q-BERT MP {lo}/{hi} (Hessian: {hi}-bit layers {layers})",
                           "qat", bits=lo, layer_bits={i: hi for i in layers}))
        for order in ("random", "reversed"):
            layers = mp_layers(omega, high, order, seed=0)
            out.append(Row(f"control-mp23-{order}", "control", f"MP 2/3, 3-bit layers {order} {layers}", "qat",
                           bits=2, layer_bits={i: 3 for i in layers}))
    for g in (1, 12, 384):
        name = "one per row" if g == 384 else str(g)
        out.append(Row(f"qbert-w4-g{g}", "groups", f"Q-BERT w4, groups {name}", "qat", bits=4, groups=g))
    for word, pos in ((4, 8), (8, 4), (4, 4)):
        out.append(Row(f"qbert-w4-emb{word}{pos}", "embeddings", f"Q-BERT w4, word/position embeddings {word}/{pos}",
                       "qat", bits=4, embedding_bits=(word, pos)))
    out.append(Row("qbert-w4-attn3", "attention-ffn", "Q-BERT w4, attention 3 bits", "qat", bits=4,
                   module_bits={s: 3 for s in attention}))
    out.append(Row("qbert-w4-ffn3", "attention-ffn", "Q-BERT w4, feed-forward 3 bits", "qat", bits=4,
                   module_bits={s: 3 for s in ffn}))
    out.append(Row("qbert-w8", "bits", "Q-BERT w8", "qat", bits=8))
    return out


def load_omega() -> dict[int, float] | None:
    if not SENSITIVITY.is_file():
        return None
    data = json.loads(SENSITIVITY.read_text())
    return {int(layer["layer"]): float(layer["omega"]) for layer in data["layers"]}


def sizes(plan, shapes) -> dict:
    """Bytes of the encoder Linears (packed) and of every weight of the model (packed or fp32)."""
    enc_fp32 = enc = total = 0
    for name, (r, c) in shapes.items():
        q = plan.modules.get(name) if plan else None
        nbytes = q.packed_bytes if q else 4 * r * c
        total += nbytes
        if name.startswith("encoder."):
            enc += nbytes
            enc_fp32 += 4 * r * c
    return {"encoder_mb": enc / 1e6, "encoder_fp32_mb": enc_fp32 / 1e6, "weights_mb": total / 1e6,
            "encoder_compression": enc_fp32 / enc}


def run_row(row: Row, args) -> dict:
    from qbert_edge.data import load_data, subsets, torch_batches
    from qbert_edge.loading import load_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes
    from qbert_edge.quantize import direct_quantize, qat_quantize
    from qbert_edge.train import evaluate_torch

    loaded = load_model("minilm-rt")
    shapes = quantizable_shapes(loaded.model)
    train = load_data("rt:train", labels=loaded.labels)
    dev = load_data("rt:dev", labels=loaded.labels)
    plan = None
    start = time.perf_counter()
    if row.method != "fp32":
        word, pos = row.embedding_bits
        plan = uniform_plan(shapes, row.bits, row.groups, layer_bits=row.layer_bits, module_bits=row.module_bits,
                            embedding_bits={"word": word, "position": pos, "token_type": pos})
        if row.method == "directq":
            calib = subsets(train, 1, 256 / len(train), seed=args.seed)[0]
            loaded = direct_quantize(loaded, plan, torch_batches(calib, loaded.tokenizer, 32, args.max_length))
        else:
            loaded = qat_quantize(loaded, plan, train, epochs=1, lr=args.lr, batch_size=32, max_length=args.max_length,
                                  seed=args.seed, max_steps=args.qat_steps, progress=not args.quiet,
                                  group_by_length=args.group_by_length)
    metrics, _ = evaluate_torch(loaded.model, dev, loaded.tokenizer, batch_size=64, max_length=args.max_length)
    return {
        "key": row.key, "table": row.table, "label": row.label, "method": row.method,
        "accuracy": metrics.accuracy, "macro_f1": metrics.macro_f1, "examples": metrics.examples,
        "avg_encoder_bits": plan.weight_bits(shapes) if plan else 32.0,
        **sizes(plan, shapes), "seconds": round(time.perf_counter() - start, 1),
        "qat_steps": args.qat_steps if row.method == "qat" else None,
        "group_by_length": args.group_by_length if row.method == "qat" else None,
    }


#: Per table, the row its variations start from (repeated at its top).
REFERENCE_ROWS = {"groups": "qbert-w4", "embeddings": "qbert-w4", "attention-ffn": "qbert-w4", "control": "qbert-mp23"}


def target_checks(done: dict[str, dict]) -> list[str]:
    """The reproduction's targets, each judged from the rows present (absent rows: no line)."""
    def acc(key):
        return 100 * done[key]["accuracy"] if key in done else None

    def verdict(ok):
        return "met" if ok else "NOT met"

    out, base = [], acc("fp32")
    if base is None:
        return out
    if acc("qbert-w4") is not None:
        drop = base - acc("qbert-w4")
        out.append(f"Q-BERT w4 (128 groups): drop {drop:.2f} points (target <= 0.5): {verdict(drop <= 0.5)}")
    for key in sorted(k for k in done if k.startswith("qbert-mp23")):
        r = done[key]
        drop, comp = base - acc(key), r["encoder_compression"]
        out.append(f"{r['label']}: drop {drop:.2f} points at {comp:.1f}x encoder compression "
                   f"(target <= 2.5 at >= 10x): {verdict(drop <= 2.5 and comp >= 10)}")
    for b in (4, 3, 2):
        q, d = acc(f"qbert-w{b}"), acc(f"directq-w{b}")
        if q is not None and d is not None:
            out.append(f"w{b}: Q-BERT {q:.2f} vs DirectQ {d:.2f} (target: Q-BERT better): {verdict(q > d)}")
    groups = [acc(k) for k in ("qbert-w4-g1", "qbert-w4-g12", "qbert-w4")]
    if None not in groups:
        out.append(f"groups at w4: 1 -> {groups[0]:.2f}, 12 -> {groups[1]:.2f}, 128 -> {groups[2]:.2f} "
                   f"(target 1 < 12 < 128): {verdict(groups[0] < groups[1] < groups[2])}")
    for suffix in ("", *sorted({k[k.index("@"):] for k in done if "@" in k})):
        h = acc(f"qbert-mp23{suffix}")
        for order in ("random", "reversed"):
            c = acc(f"control-mp23-{order}{suffix}")
            if h is not None and c is not None:
                budget = f" ({suffix[1:]} QAT steps)" if suffix else ""
                out.append(f"Hessian MP 2/3 {h:.2f} vs {order} layers {c:.2f}{budget} (target: Hessian better): "
                           f"{verdict(h > c)}")
    return out


def render(results: dict) -> str:
    done = {r["key"]: r for r in results["rows"]}
    base = done.get("fp32")
    lines = [
        "# Q-BERT reproduced on the reference model",
        "",
        f"Made by `{results['command']}` on {results['machine']}. Model: `minilm-rt` (all-MiniLM-L6-v2 fine-tuned on",
        "Rotten Tomatoes), scored on `rt:dev`. Activations 8 bits; encoder Linears 128 groups unless said;",
        "embeddings 8 bits (one group per row); pooler and classifier 8 bits. QAT budget per row: "
        f"{results['settings']['qat_steps'] or 'one epoch'} steps of batch 32, lr {results['settings']['lr']}.",
        "Sizes: encoder = the 36 encoder Linears, packed codes + fp32 scale + uint8 zero point per group;",
        "weights = every weight matrix of the model (embeddings, pooler, classifier included) as stored.",
        "",
    ]
    titles = {"bits": "Bits (paper Tables 1-2)", "groups": "Groups at w4 (paper Table 3)",
              "embeddings": "Embedding bits at w4 (paper Table 4a)", "attention-ffn": "Attention vs feed-forward (paper Table 4b)",
              "control": "Is the Hessian worth it? MP 2/3 with other layer choices",
              "budget": "QAT budget: the same rows with more QAT steps"}
    order = {key: i for i, key in enumerate(results.get("planned", []))}
    for table, title in titles.items():
        rows_ = sorted((r for r in results["rows"] if r["table"] == table), key=lambda r: order.get(r["key"], 99))
        if not rows_:
            continue
        ref = done.get(REFERENCE_ROWS.get(table, ""))
        if ref is not None:  # the row every row of this table differs from, repeated for reading
            rows_ = [{**ref, "label": f"{ref['label']} (the reference of this table)"}, *rows_]
        lines += [f"## {title}", "", "| row | accuracy % | drop (points) | macro-F1 % | encoder MB | compression | weights MB | bits/weight |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows_:
            drop = f"{100 * (base['accuracy'] - r['accuracy']):+.2f}" if base else "n/a"
            lines.append(f"| {r['label']} | {100 * r['accuracy']:.2f} | {drop} | {100 * r['macro_f1']:.2f} | "
                         f"{r['encoder_mb']:.2f} | {r['encoder_compression']:.1f}x | {r['weights_mb']:.2f} | {r['avg_encoder_bits']:.2f} |")
        lines.append("")
    checks = target_checks(done)
    if checks:
        lines += ["## Issue targets (computed from the rows above)", ""] + [f"- {c}" for c in checks] + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    missing = [k for k in results.get("planned", []) if k not in done]
    if missing:
        lines += ["## Not run yet", "", ", ".join(missing), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="Run only these row keys.")
    p.add_argument("--qat-steps", type=int, default=None, help="QAT steps per row (default: one epoch).")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--high-layers", type=int, default=2, help="Layers at the higher width in the MP rows.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-by-length", action="store_true",
                   help="QAT batches of texts of similar length (faster; the committed rows used plain shuffled batches).")
    p.add_argument("--fresh", action="store_true", help="Forget earlier results.")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--budget-rows", nargs="*", default=[],
                   help="Also run these QAT rows with --budget-steps steps (table 'QAT budget'; keys KEY@STEPS).")
    p.add_argument("--budget-steps", type=int, default=None, help="QAT steps of the --budget-rows runs.")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from qbert_edge.fileio import write_json

    omega = load_omega()
    if omega is None:
        print(f"note: {SENSITIVITY} missing: the Hessian MP rows and the controls are left out", file=sys.stderr)
    plan_rows = rows(omega, args.high_layers)
    results = {"format": FORMAT, "version": 1, "rows": []}
    if RESULTS.is_file() and not args.fresh:
        results = json.loads(RESULTS.read_text())
    results["command"] = "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    results["settings"] = {"qat_steps": args.qat_steps, "lr": args.lr, "max_length": args.max_length,
                           "high_layers": args.high_layers, "seed": args.seed, "group_by_length": args.group_by_length}
    results["planned"] = [r.key for r in plan_rows]
    done = {r["key"] for r in results["rows"]}
    for row in plan_rows:
        if row.key in done or (args.only and row.key not in args.only):
            continue
        print(f"== {row.key}: {row.label}", flush=True)
        result = run_row(row, args)
        print(f"   accuracy {100 * result['accuracy']:.2f}%  encoder {result['encoder_mb']:.2f} MB  "
              f"({result['seconds']:.0f} s)", flush=True)
        results["rows"].append(result)
        write_json(RESULTS, results)
        REPORT.write_text(render(results))
    if args.budget_rows:
        if not args.budget_steps:
            p.error("--budget-rows needs --budget-steps")
        by_key = {r.key: r for r in plan_rows}
        unknown = [k for k in args.budget_rows if k not in by_key or by_key[k].method != "qat"]
        if unknown:
            p.error(f"not QAT rows of this sweep: {', '.join(unknown)}")
        budget_args = argparse.Namespace(**{**vars(args), "qat_steps": args.budget_steps})
        done = {r["key"] for r in results["rows"]}
        for key in args.budget_rows:
            row = by_key[key]
            extra = replace(row, key=f"{key}@{args.budget_steps}", table="budget",
                            label=f"{row.label}, {args.budget_steps} QAT steps")
            if extra.key in done:
                continue
            print(f"== {extra.key}: {extra.label}", flush=True)
            result = run_row(extra, budget_args)
            print(f"   accuracy {100 * result['accuracy']:.2f}%  ({result['seconds']:.0f} s)", flush=True)
            results["rows"].append(result)
            write_json(RESULTS, results)
            REPORT.write_text(render(results))
    write_json(RESULTS, results)
    REPORT.write_text(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
