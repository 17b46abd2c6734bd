"""Benchmark of the Hessian analysis on the reference classifier (a measurement, not a test).

Runs ``qbert-edge analyze`` on the reference model (10 subsets of 10% of rt:train, max length
64 by default) as a subprocess and times it, then measures in this process, on the same
machine: the cost of one Hessian-vector product against one plain backward pass on the same
batches, and how the HVP time scales with the number of layers and the sequence length.
Writes ``<out>/hessian-<model>.json`` and ``.md`` (with the command lines and load averages;
the CPU is shared, so record the load with the numbers).

    python benchmarks/hessian.py --model minilm-rt --sensitivity models/minilm-rt/sensitivity.json \\
        --plot models/minilm-rt/sensitivity.png --landscape 0
    python benchmarks/hessian.py --model minilm --fresh-head        # before minilm-rt exists
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from qbert_edge.runtime.memory import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def run_analysis(args, sens_path: Path, plot_path: Path | None) -> dict:
    cmd = ["qbert-edge", "analyze", args.model, "--data", args.data, "--subsets", str(args.subsets),
           "--fraction", str(args.fraction), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--seed", str(args.seed), "--method", args.method, "--max-iter", str(args.max_iter), "--tol", str(args.tol),
           "-o", str(sens_path)]
    if plot_path:
        cmd += ["--plot", str(plot_path)]
    if args.landscape is not None:
        cmd += ["--landscape", str(args.landscape)]
    if args.fresh_head:
        cmd += ["--fresh-head"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.warm_start:
        cmd += ["--no-warm-start"]
    print("$", shlex.join(cmd), flush=True)
    load_before = load_avg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    print(proc.stdout, flush=True)
    if proc.returncode:
        raise SystemExit(f"analyze failed with exit code {proc.returncode}")
    sens = json.loads(sens_path.read_text())
    return {
        "command": shlex.join(cmd),
        "wall_s": round(wall, 1),
        "load_average_before": load_before,
        "load_average_after": load_avg(),
        "timings": sens["timings"],
        "layers": [
            {k: l[k] for k in ("layer", "eigenvalues", "iterations", "converged", "residuals", "mean", "std", "omega", "rank")
             if k in l}
            for l in sens["layers"]
        ],
        "ranking": sens["ranking"],
        "warnings": sens["warnings"],
        "settings": sens["settings"],
        "landscape_radius": (sens.get("landscape") or {}).get("radius"),
    }


def compare(analysis: dict, other_path: Path) -> dict:
    """How far this analysis's eigenvalues are from an earlier sensitivity file's (same subsets)."""
    other = json.loads(other_path.read_text())
    theirs = {l["layer"]: l for l in other["layers"]}
    rows = []
    for l in analysis["layers"]:
        o = theirs[l["layer"]]
        rel = [abs(a - b) / abs(b) for a, b in zip(l["eigenvalues"], o["eigenvalues"])]
        rows.append({"layer": l["layer"], "max_rel_diff": max(rel), "omega": l["omega"], "other_omega": o["omega"],
                     "iterations": sum(l["iterations"]), "other_iterations": sum(o["iterations"])})
    return {
        "file": str(other_path.relative_to(ROOT) if other_path.is_relative_to(ROOT) else other_path),
        "method": other["settings"].get("method", "power"),
        "tol": other["settings"].get("tol"),
        "total_s": other.get("timings", {}).get("total_s"),
        "hvp_passes": other.get("timings", {}).get("hvp_passes"),
        "same_ranking": analysis["ranking"] == other["ranking"],
        "layers": rows,
    }


def _min_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs: on a shared CPU, other jobs only ever add time."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_costs(args) -> dict:
    """HVP vs plain backward on the same batches, and scaling with layers and sequence length."""
    import torch

    from qbert_edge import hessian
    from qbert_edge.data import load_data, subsets
    from qbert_edge.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, num_labels=2 if args.fresh_head else None)
    model = loaded.model
    data = load_data(args.data, labels=loaded.labels if not args.fresh_head else None)
    sample = subsets(data, 1, min(1.0, args.cost_examples / len(data)), args.seed + 99)[0]
    batches = hessian.sorted_batches(sample, loaded.tokenizer, args.batch_size, args.max_length)
    tokens = sum(int(b["attention_mask"].numel()) for b in batches)
    n_layers = hessian.encoder_layers(model)
    weights = {i: list(w.values()) for i, w in hessian.layer_weights(model).items()}
    vectors = {i: hessian.random_direction(w, i) for i, w in weights.items()}
    params = [p for w in weights.values() for p in w]
    r = args.repeats
    out: dict = {"examples": len(sample), "padded_tokens": tokens, "repeats": r, "load_average_before": load_avg()}
    with hessian.hessian_mode(model, params):
        hessian.gradients(model, batches, weights)  # warm-up
        t_grad = _min_time(lambda: hessian.gradients(model, batches, weights), r)
        t_all = _min_time(lambda: hessian.hvp(model, batches, weights, vectors), r)
        single = {}
        for i in range(n_layers):
            single[i] = _min_time(lambda i=i: hessian.hvp(model, batches, {i: weights[i]}, {i: vectors[i]}), r)
        flat_v = [v for i in weights for v in vectors[i]]

        def full_hvp():
            total = hessian.count_examples(batches)
            for b in batches:
                g = torch.autograd.grad(hessian.task_loss(model, b) / total, params, create_graph=True)
                torch.autograd.grad(sum((x * v).sum() for x, v in zip(g, flat_v)), params)

        t_full = _min_time(full_hvp, r)
        with torch.no_grad():
            t_fwd = _min_time(lambda: [hessian.task_loss(model, b) for b in batches], r)
    out.update(
        forward_s=round(t_fwd, 3),
        backward_s=round(t_grad, 3),
        hvp_all_layers_s=round(t_all, 3),
        hvp_single_layer_s={str(i): round(t, 3) for i, t in single.items()},
        full_hessian_hvp_s=round(t_full, 3),
        ratio_hvp_all_layers_to_backward=round(t_all / t_grad, 2),
        ratio_hvp_per_layer_to_backward=round(t_all / n_layers / t_grad, 2),
        ratio_single_layer_hvp_to_backward={str(i): round(t / t_grad, 2) for i, t in single.items()},
        ratio_full_hvp_to_backward=round(t_full / t_grad, 2),
    )
    # scaling with the number of layers analysed together (deepest first: the cheapest)
    by_layers = {}
    for k in sorted({1, max(1, n_layers // 2), n_layers}):
        chosen = list(range(n_layers - k, n_layers))
        by_layers[f"last {k}"] = round(_min_time(
            lambda c=chosen: _hvp_in_mode(model, batches, weights, vectors, c), r), 3)
        chosen = list(range(k))
        by_layers[f"first {k}"] = round(_min_time(
            lambda c=chosen: _hvp_in_mode(model, batches, weights, vectors, c), r), 3)
    out["hvp_s_by_layers"] = by_layers
    # scaling with sequence length: synthetic batches of fixed length, same example count
    gen = torch.Generator().manual_seed(0)
    by_len = {}
    n = args.length_examples
    for length in args.lengths:
        ids = torch.randint(1000, model.config.vocab_size, (n, length), generator=gen)
        synth = [{"input_ids": ids[s : s + args.batch_size], "attention_mask": torch.ones_like(ids[s : s + args.batch_size]),
                  "token_type_ids": torch.zeros_like(ids[s : s + args.batch_size]),
                  "labels": torch.randint(0, 2, (min(args.batch_size, n - s),), generator=gen)}
                 for s in range(0, n, args.batch_size)]
        t_h = _min_time(lambda b=synth: _hvp_in_mode(model, b, weights, vectors, list(range(n_layers))), r)
        t_g = _min_time(lambda b=synth: _grad_in_mode(model, b, weights), r)
        by_len[str(length)] = {"hvp_s": round(t_h, 3), "backward_s": round(t_g, 3), "ratio": round(t_h / t_g, 2),
                               "hvp_ms_per_token": round(1000 * t_h / (n * length), 3)}
    out["by_sequence_length"] = {"examples": n, "times": by_len}
    out["load_average_after"] = load_avg()
    return out


def _hvp_in_mode(model, batches, weights, vectors, chosen):
    from qbert_edge import hessian

    with hessian.hessian_mode(model, [p for i in chosen for p in weights[i]]):
        hessian.hvp(model, batches, {i: weights[i] for i in chosen}, {i: vectors[i] for i in chosen})


def _grad_in_mode(model, batches, weights):
    from qbert_edge import hessian

    with hessian.hessian_mode(model, [p for w in weights.values() for p in w]):
        hessian.gradients(model, batches, weights)


def markdown(result: dict) -> str:
    a, c, env = result.get("analysis"), result.get("costs"), result["environment"]
    lines = [f"# Hessian analysis benchmark: {result['model']}", ""]
    if result.get("label"):
        lines += [f"**{result['label']}**", ""]
    lines += [
        f"- machine: {env['cpu']}, {env['cpus']} CPUs, torch {env['torch']}, "
        f"{env['torch_threads']} threads; commit {env['commit']}",
        f"- benchmark command: `{result['command']}`",
        "",
    ]
    if a:
        t = a["timings"]
        lines += [
            "## Full analysis",
            "",
            f"`{a['command']}`",
            "",
            f"- wall time of the command: **{a['wall_s']} s ({a['wall_s'] / 60:.1f} min)**; analysis alone {t['total_s']} s",
            f"- load average (1, 5, 15 min) before {a['load_average_before']}, after {a['load_average_after']}",
            f"- {t['hvp_passes']} HVP passes over a subset, {t['layer_hvps']} layer-HVPs; "
            f"{t['seconds_per_hvp_pass']} s per pass; examples per subset {t['examples_per_subset'][0]}",
            f"- seconds per subset: {t['per_subset_s']}",
            "",
            "| layer | mean λ | std | Ω | rank | iterations per subset | converged |",
            "|---:|---:|---:|---:|---:|---|---:|",
        ]
        for l in a["layers"]:
            lines.append(f"| {l['layer']} | {l['mean']:.4g} | {l['std']:.3g} | {l['omega']:.4g} | {l['rank']} | "
                         f"{l['iterations']} | {sum(l['converged'])}/{len(l['converged'])} |")
        if a["warnings"]:
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in a["warnings"]]
        lines.append("")
    cmp_ = result.get("comparison")
    if cmp_:
        lines += [
            f"### Against the earlier analysis `{cmp_['file']}` ({cmp_['method']}, tol {cmp_['tol']})",
            "",
            f"Same subsets and seed. Earlier: {cmp_['total_s']} s, {cmp_['hvp_passes']} HVP passes. "
            f"Same ranking: **{'yes' if cmp_['same_ranking'] else 'NO'}**.",
            "",
            "| layer | max relative difference of an eigenvalue | Ω now | Ω earlier | layer-HVPs now | earlier |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in cmp_["layers"]:
            lines.append(f"| {r['layer']} | {r['max_rel_diff']:.2e} | {r['omega']:.4g} | {r['other_omega']:.4g} | "
                         f"{r['iterations']} | {r['other_iterations']} |")
        lines.append("")
    if c:
        lines += [
            "## HVP cost against a plain backward pass (same batches, same process)",
            "",
            f"{c['examples']} examples ({c['padded_tokens']} padded tokens), fastest of {c['repeats']}; "
            f"load average before {c['load_average_before']}, after {c['load_average_after']}.",
            "",
            "| pass | seconds | / backward |",
            "|---|---:|---:|",
            f"| forward only (no grad) | {c['forward_s']} | {c['forward_s'] / c['backward_s']:.2f} |",
            f"| plain backward (forward + gradient of the 6 layers' weights) | {c['backward_s']} | 1.00 |",
            f"| block HVP, all layers (H_ii v_i for every i) | {c['hvp_all_layers_s']} | {c['ratio_hvp_all_layers_to_backward']} |",
            f"| same, per layer | {c['hvp_all_layers_s'] / len(c['hvp_single_layer_s']):.3f} | {c['ratio_hvp_per_layer_to_backward']} |",
        ]
        for i, s in c["hvp_single_layer_s"].items():
            lines.append(f"| block HVP of layer {i} alone | {s} | {c['ratio_single_layer_hvp_to_backward'][i]} |")
        lines += [
            f"| full-Hessian HVP (H v, not block-diagonal; for comparison) | {c['full_hessian_hvp_s']} | {c['ratio_full_hvp_to_backward']} |",
            "",
            "### Scaling",
            "",
            "HVP pass time by the layers analysed together: " + ", ".join(f"{k}: {v} s" for k, v in c["hvp_s_by_layers"].items()),
            "",
            f"By sequence length ({c['by_sequence_length']['examples']} synthetic examples):",
            "",
            "| tokens | HVP s | backward s | ratio | HVP ms/token |",
            "|---:|---:|---:|---:|---:|",
        ]
        for length, v in c["by_sequence_length"]["times"].items():
            lines.append(f"| {length} | {v['hvp_s']} | {v['backward_s']} | {v['ratio']} | {v['hvp_ms_per_token']} |")
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-rt")
    p.add_argument("--fresh-head", action="store_true", help="bare encoder + untrained classifier head (label the results!)")
    p.add_argument("--data", default="rt:train")
    p.add_argument("--subsets", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--method", choices=["lanczos", "power"], default="lanczos")
    p.add_argument("--compare", type=Path, default=None,
                   help="an earlier sensitivity.json of the same model, data and seed: report how far the eigenvalues moved")
    p.add_argument("--no-warm-start", dest="warm_start", action="store_false")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--landscape", default=None, help="a layer number or top")
    p.add_argument("--sensitivity", type=Path, default=None, help="where the analysis writes sensitivity.json")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--skip-analysis", action="store_true")
    p.add_argument("--skip-costs", action="store_true")
    p.add_argument("--cost-examples", type=int, default=128)
    p.add_argument("--length-examples", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.model + ("-fresh-head" if args.fresh_head else "")
    result = {
        "format": "qbert-edge/benchmark-hessian",
        "version": 1,
        "model": args.model,
        "label": "bare all-MiniLM-L6-v2 with an UNTRAINED classifier head: timings only, eigenvalues are not the reference model's"
        if args.fresh_head else "",
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "environment": {
            "cpu": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "commit": git_commit(), "python": platform.python_version(),
        },
        "notes": args.note,
    }
    previous = args.out / f"hessian-{tag}.json"
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    for part, skipped in (("analysis", args.skip_analysis), ("costs", args.skip_costs)):
        if skipped and part in earlier:  # keep the earlier run's part next to the new one
            result[part] = earlier[part]
            kept = [n for n in earlier.get("notes", []) if n.startswith(part)]
            if not any(n.startswith(f"{part} from an earlier run") for n in kept):  # else: already says where from
                kept.insert(0, f"{part} from an earlier run (commit {earlier['environment'].get('commit')}, "
                               f"{earlier['environment'].get('torch_threads')} threads)")
            result["notes"] += kept
            if part == "analysis" and "comparison" in earlier:
                result["comparison"] = earlier["comparison"]
    if not args.skip_analysis:
        sens_path = args.sensitivity or (args.out / f"hessian-{tag}.sensitivity.json")
        result["analysis"] = run_analysis(args, sens_path, args.plot)
        if args.compare:
            result["comparison"] = compare(result["analysis"], args.compare)
    if not args.skip_costs:
        result["costs"] = measure_costs(args)
    (args.out / f"hessian-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"hessian-{tag}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
