"""Recipe of the reference classifier ``minilm-rt``: all-MiniLM-L6-v2 fine-tuned on ``rt:train``.

    python models/minilm-rt/recipe.py                  # the reference (~10 min on 2 cores)
    python models/minilm-rt/recipe.py --max-steps 20   # a quick check (-> minilm-rt-quick)

Writes the model to ``${QBERT_EDGE_CACHE:-~/.cache/qbert-edge}/minilm-rt/`` and, for the full
run, ``models/minilm-rt/results.json`` next to this script. The work is done by
``qbert_edge.reference.train_reference``; this script only parses options and saves results.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from qbert_edge.errors import QbertEdgeError
from qbert_edge.fileio import write_json
from qbert_edge.reference import ReferenceRecipe, train_reference

HERE = Path(__file__).resolve().parent
RESULTS_FORMAT = "qbert-edge-reference-results"
RESULTS_VERSION = 1


def main(argv: list[str] | None = None) -> int:
    d = ReferenceRecipe()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="batches in a plain shuffle (default: texts of similar length together, ~1.8x faster)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (quick run)")
    p.add_argument("--limit", type=int, default=None, help="train on a seeded sample of N rt:train examples (quick run)")
    p.add_argument("--out", type=Path, default=None, help="model directory (default: the cache dir)")
    p.add_argument("--results", type=Path, default=None,
                   help="results JSON (default: models/minilm-rt/results.json for a full run, none for a quick one)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    recipe = ReferenceRecipe(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, warmup=args.warmup, weight_decay=args.weight_decay,
        group_by_length=args.group_by_length, max_steps=args.max_steps, limit=args.limit,
    )
    try:
        info = train_reference(recipe, out_dir=args.out, progress=not args.no_progress)
    except QbertEdgeError as exc:
        print(f"recipe: error: {exc}", file=sys.stderr)
        return 2
    results = args.results or (None if recipe.quick else HERE / "results.json")
    if results is not None:
        command = "python models/minilm-rt/recipe.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        body = {k: v for k, v in info.items() if k not in ("format", "version")}
        write_json(results, {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "command": command.strip(), **body})
    dev = info["dev"]
    print(f"{info['name']}: dev accuracy {100 * dev['accuracy']:.2f}%  macro-F1 {100 * dev['macro_f1']:.2f}%  "
          f"({dev['examples']} examples); fine-tuning took {info['train_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
