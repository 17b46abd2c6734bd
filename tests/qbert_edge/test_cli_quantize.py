import csv

import pytest
import torch

from conftest import TINY_TEXTS, make_tiny_bert
from qbert_edge.checkpoint import load_quantized
from qbert_edge.cli import main


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny"
    model = make_tiny_bert()
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(path)
    tiny_tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def data_csv(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for text, label in TINY_TEXTS * 2:
            w.writerow([text, ["negative", "positive"][label]])
    return path


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def test_direct_quantize_from_a_directory(tmp_path, model_dir, data_csv, capsys):
    out = tmp_path / "model.pt"
    main(["quantize", str(model_dir), "--bits", "3", "--groups", "4", "--direct", "--data", str(data_csv), "-o", str(out)])
    loaded = load_quantized(out)
    assert loaded.labels == ["negative", "positive"]
    assert loaded.plan.modules["encoder.layer.0.attention.self.query"].bits == 3
    assert loaded.meta["method"] == "directq"
    assert "wrote" in capsys.readouterr().out


def test_direct_quantize_with_mse_clipped_ranges(tmp_path, model_dir, data_csv):
    out = tmp_path / "model.pt"
    main(["quantize", str(model_dir), "--bits", "2", "--groups", "4", "--clip", "mse", "--direct", "--data", str(data_csv),
          "-o", str(out)])
    loaded = load_quantized(out)
    assert loaded.plan.modules["encoder.layer.0.attention.self.query"].clip == "mse"
    assert loaded.meta["method"] == "directq"


def test_qat_from_a_directory(tmp_path, model_dir, data_csv):
    out = tmp_path / "model.pt"
    main(["quantize", str(model_dir), "--bits", "2", "--groups", "2", "--data", str(data_csv), "--batch-size", "4",
          "--epochs", "1", "--lr", "1e-3", "-o", str(out)])
    loaded = load_quantized(out)
    assert loaded.meta["method"] == "qat"
    assert len(loaded.meta["training"]["epoch_losses"]) == 1
    assert loaded.meta["training"]["config"]["group_by_length"]  # the default
    plain = tmp_path / "plain.pt"
    main(["quantize", str(model_dir), "--bits", "2", "--groups", "2", "--data", str(data_csv), "--batch-size", "4",
          "--epochs", "1", "--lr", "1e-3", "--no-group-by-length", "--max-steps", "1", "-o", str(plain)])
    assert load_quantized(plain).meta["training"]["config"]["group_by_length"] is False
    w = torch.load(out, weights_only=True)["weights"]["encoder.layer.1.output.dense"]["codes"]
    assert int(w.max()) <= 3


def test_errors_are_one_line_and_write_nothing(tmp_path, model_dir, data_csv, capsys):
    code, err = run(["quantize", str(model_dir), "--direct", "-o", str(tmp_path / "a.pt")], capsys)
    assert code == 2 and "exactly one of --plan" in err
    code, err = run(["quantize", str(model_dir), "--bits", "4", "--direct", "-o", str(tmp_path / "nope" / "a.pt")], capsys)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, err = run(["quantize", str(tmp_path / "missing"), "--bits", "4", "--direct", "-o", str(tmp_path / "b.pt")], capsys)
    assert code == 2 and "missing: no such file" in err
    bad_plan = tmp_path / "plan.json"
    bad_plan.write_text('{"format": "qbert-edge/plan", "version": 1, "modules": {"encoder.layer.0.output.dense": '
                        '{"bits": 9, "groups": 4, "shape": [32, 64]}}}')
    code, err = run(["quantize", str(model_dir), "--plan", str(bad_plan), "--direct", "--data", str(data_csv),
                     "-o", str(tmp_path / "c.pt")], capsys)
    assert code == 2 and "encoder.layer.0.output.dense: bits=9" in err
    code, err = run(["quantize", str(model_dir), "--plan", str(bad_plan), "--clip", "mse", "-o", str(tmp_path / "d.pt")], capsys)
    assert code == 2 and "a plan.json carries its own" in err
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*.tmp"))
