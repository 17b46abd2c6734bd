"""The device-side commands: ``qbert-edge run`` and ``qbert-edge eval`` (``measure``: test_memory.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from _tiny_onnx import save, tiny_classifier
from qbert_edge.cli import main
from qbert_edge.runtime.session import Session

TEXTS = ["a brilliant and moving film", "the worst movie ever", "a boring , dull mess"]


@pytest.fixture
def tiny_path(tmp_path, tiny_tokenizer):
    return save(tiny_classifier(tiny_tokenizer)[0], tmp_path / "tiny.onnx")


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from qbert_edge.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_run_texts_and_file(tiny_path, tmp_path, capsys):
    main(["run", tiny_path, "--text", TEXTS[0], "--text", TEXTS[1], "--json", "--backend", "ort-custom"])
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "qbert-edge/predictions" and out["backend"] == "ort-custom"
    with Session(tiny_path, backend="reference") as s:
        expected = [p.label for p in s.predict(TEXTS[:2])]
    assert [p["label"] for p in out["predictions"]] == expected
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    main(["run", tiny_path, "--file", str(texts)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].split("\t")[2] == TEXTS[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "a"], None),  # fine
        ([], "give --text T"),
        (["--text", "a", "--file", "x.txt"], "not both"),
        (["--file", "missing.txt"], "missing.txt: no such file"),
        (["--text", "a", "--backend", "gpu"], "unknown backend 'gpu'"),
        (["--text", " "], "text 1 is empty"),
    ],
)
def test_run_errors_are_one_line(tiny_path, args, message):
    proc = _cli("run", tiny_path, *args)
    if message is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_bad_model_files(tmp_path):
    notonnx = tmp_path / "notes.onnx"
    notonnx.write_text("hello")
    proc = _cli("run", str(notonnx), "--text", "a film")
    assert proc.returncode == 2 and "not an ONNX model" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_onnx_model(tiny_path, tmp_path, capsys):
    data = tmp_path / "dev.csv"
    with open(data, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([(TEXTS[0], "positive"), (TEXTS[1], "negative"), (TEXTS[2], "negative")])
    main(["eval", tiny_path, "--data", str(data), "--json", "-o", str(tmp_path / "eval.json")])
    out = json.loads(capsys.readouterr().out)
    with Session(tiny_path) as s:
        preds = [p.label for p in s.predict(TEXTS)]
    expected = sum(p == y for p, y in zip(preds, ["positive", "negative", "negative"])) / 3
    assert out["format"] == "qbert-edge/eval" and out["metrics"]["examples"] == 3
    assert out["metrics"]["accuracy"] == pytest.approx(expected)
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == out["metrics"]
    proc = _cli("eval", tiny_path, "--data", str(tmp_path / "nope.csv"))
    assert proc.returncode == 2 and "no such data file" in proc.stderr


def test_eval_torch_model_matches_training_metrics(tmp_path, tiny_bert, tiny_tokenizer, capsys):
    from qbert_edge.data import load_data
    from qbert_edge.train import evaluate_torch

    tiny_bert.save_pretrained(tmp_path / "tiny-hf")
    tiny_tokenizer.save(str(tmp_path / "tiny-hf" / "tokenizer.json"))
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    main(["eval", str(tmp_path / "tiny-hf"), "--data", str(data), "--json"])
    out = json.loads(capsys.readouterr().out)
    expected, _ = evaluate_torch(tiny_bert, load_data(str(data), labels=["label0", "label1"]), tiny_tokenizer)
    assert out["backend"] == "torch"
    assert out["metrics"] == expected.to_dict()
