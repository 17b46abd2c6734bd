"""How much weight error do MSE-clipped group ranges save over min/max? (the ``clip`` of a plan)

    python benchmarks/clip_error.py                  # minilm-rt (fine-tuned), 2/3/4 bits
    python benchmarks/clip_error.py --model minilm   # the pretrained encoder

For every encoder-layer Linear (128 groups of output rows, as the plans of ``peers.py``) and the
word embedding (one group per row) of the model, at each width: the relative squared error
``|w_hat - w|^2 / |w|^2`` with min/max ranges and with :func:`qbert_edge.quant.mse_shrink`'s
ranges, and the median shrink factor chosen. The error is summed over the matrices of a kind
(query, key, ..., word table). It measures the quantizer alone, before any QAT; accuracy after QAT
is ``benchmarks/distill.py``'s. Writes ``clip_error.json`` (``qbert-edge/benchmark-clip-error`` v1)
and ``clip_error.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FORMAT = "qbert-edge/benchmark-clip-error"
VERSION = 1
ROOT = Path(__file__).resolve().parent.parent


def kind_of(name: str) -> str:
    """``"encoder.layer.3.attention.self.query" -> "attention.self.query"``; tables keep their name."""
    return name.split(".", 3)[3] if name.startswith("encoder.layer.") else name


def clip_errors(weights: dict, bits: int) -> dict[str, dict]:
    """Per kind of matrix: relative squared error with min/max and with MSE ranges, and the median shrink."""
    import torch

    from qbert_edge.plan import ModuleQuant, groups_for
    from qbert_edge.quant import mse_shrink, quantize

    sums: dict[str, list] = {}
    for name, w in weights.items():
        rows = w.shape[0]
        groups = rows if name.startswith("embeddings.") else groups_for(rows, 128)
        spec = ModuleQuant(bits=bits, groups=groups, shape=tuple(w.shape))
        shrink = mse_shrink(w, spec)
        s = sums.setdefault(kind_of(name), [0.0, 0.0, 0.0, []])
        s[0] += float((quantize(w, spec).dequantize() - w).square().sum())
        s[1] += float((quantize(w, spec, shrink).dequantize() - w).square().sum())
        s[2] += float(w.square().sum())
        s[3].append(shrink)
    return {k: {"minmax": a / n, "mse": b / n, "ratio": a / b, "median_shrink": float(torch.cat(sh).median())}
            for k, (a, b, n, sh) in sums.items()}


def markdown(data: dict) -> str:
    lines = ["# MSE-clipped group ranges vs min/max: weight error before QAT", "",
             f"Command: `{data['command']}` ({data['date']}, {data['seconds']:.0f} s; {data['machine']}).  ",
             f"Model: `{data['model']}`. Relative squared error |w_hat - w|^2 / |w|^2 summed over the six layers' "
             "matrices of a kind (128 groups of output rows) and over the word table (one group per row); "
             "`shrink` is the median factor `mse_shrink` chose (1.0: the full min/max range).", "",
             "| bits | matrix | min/max | mse | min/max / mse | shrink |", "|---|---|---|---|---|---|"]
    for bits, kinds in data["bits"].items():
        for kind, r in kinds.items():
            lines.append(f"| {bits} | {kind} | {r['minmax']:.4f} | {r['mse']:.4f} | {r['ratio']:.2f}x | {r['median_shrink']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-rt", help="minilm-rt (default), minilm, or a model directory.")
    parser.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    from qbert_edge.fileio import atomic_path, write_json
    from qbert_edge.loading import load_model
    from qbert_edge.qmodel import module_paths

    started = time.time()
    model = load_model(args.model).model
    weights = {name: model.get_submodule(path).weight.detach() for name, path in module_paths(model).items()
               if name.startswith("encoder.layer.") or name == "embeddings.word_embeddings"}
    data = {"format": FORMAT, "version": VERSION, "model": args.model,
            "command": "python benchmarks/clip_error.py " + " ".join(shlex.quote(a) for a in argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "bits": {str(b): clip_errors(weights, b) for b in args.bits}}
    data["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "clip_error.json", data)
    with atomic_path(args.out / "clip_error.md") as tmp:
        tmp.write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
