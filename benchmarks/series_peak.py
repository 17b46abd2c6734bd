"""How much higher is a batch-8 peak measured after batch 1 in the same process? (peers.py's scheme)

    python benchmarks/series_peak.py        # the files of peers.py's work directory

``benchmarks/peers.py`` measures batch 1 and then batch 8 in one fresh process
(:func:`qbert_edge.runtime.memory.measure_series`). Peak RSS never falls, so the batch-1 figures
are a fresh process's; this script measures what the batch-8 peak carries over from batch 1: for
each model, the model share at batch 8 after batch 1 against that of a fresh process that runs
batch 8 alone. Writes ``benchmarks/results/peers/series_peak.json`` and ``.md``. Memory only; the
latency of so few runs is not compared.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

OUT = peers.ROOT / "benchmarks" / "results" / "peers"
#: (file name stem in peers' work directory, engine or backend): int8 and ours at both sizes, and ort-custom
CASES = (("minilm-int8pc", "plain-ort"), ("minilm-ours-mp24-e2", "ort"), ("minilm-ours-mp24-e2", "ort-custom"),
         ("bert-base-int8pc", "plain-ort"), ("bert-base-ours-mp24-e2", "ort"))


def find(workdir: Path, stem: str) -> Path:
    """The newest ``<stem>*.onnx`` under ``workdir`` (MiniLM's sit in a folder per classifier)."""
    hits = sorted(workdir.rglob(f"{stem}*.onnx"), key=lambda p: p.stat().st_mtime)
    if not hits:
        raise SystemExit(f"series_peak: no {stem}*.onnx under {workdir}; run python benchmarks/peers.py first")
    return hits[-1]


def main() -> None:
    from qbert_edge.fileio import atomic_path, write_json
    from qbert_edge.reference import cache_root
    from qbert_edge.runtime.memory import MeasureConfig, measure_series

    workdir = cache_root() / "bench-peers"
    rows = []
    for stem, engine in CASES:
        path = find(workdir, stem)
        kw = {"engine": "plain-ort"} if engine == "plain-ort" else {"backend": engine}
        config = MeasureConfig(str(path), seq_len=peers.SEQ_LEN, warmup=1, threads=2, **kw)
        b1, after = measure_series(config, [(1, 3), (8, 2)])
        (alone,) = measure_series(config, [(8, 2)])
        rows.append({"file": path.name, "engine": engine, "share_b1": b1["rss_mb"]["model_share"],
                     "share_b8_after_b1": after["rss_mb"]["model_share"], "share_b8_alone": alone["rss_mb"]["model_share"],
                     "excess_mb": round(after["rss_mb"]["model_share"] - alone["rss_mb"]["model_share"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    data = {"format": "qbert-edge/benchmark-series-peak", "version": 1, "command": "python benchmarks/series_peak.py",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    write_json(OUT / "series_peak.json", data)
    lines = ["# Batch-8 peak after batch 1 in one process vs batch 8 alone", "",
             f"Command: `{data['command']}` ({data['date']}). Model share in MB (peak RSS minus RSS after imports).", "",
             "| file | engine | share b1 | share b8 after b1 | share b8 alone | excess MB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['engine']} | {r['share_b1']} | {r['share_b8_after_b1']} | {r['share_b8_alone']} | "
              f"{r['excess_mb']:+.2f} |" for r in rows]
    with atomic_path(OUT / "series_peak.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
