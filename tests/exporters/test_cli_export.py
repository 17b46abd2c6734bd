"""``qbert-edge export``: files, default names, and every bad input -> one line, exit 2, nothing written."""

from __future__ import annotations

import re

import pytest
import torch
from _export_fixtures import quantized_checkpoint

from qbert_edge.cli import main
from qbert_edge.exporters.metadata import model_info


@pytest.fixture(scope="module")
def ckpt_data():
    return quantized_checkpoint(3)


@pytest.fixture
def model_pt(tmp_path, ckpt_data):
    path = tmp_path / "model.pt"
    torch.save(ckpt_data, path)
    return path


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_export_writes_a_validated_model_and_prints_sizes(model_pt, capsys):
    import onnx

    code, out, err = run(["export", str(model_pt)], capsys)
    assert code == 0, err
    target = model_pt.with_suffix(".onnx")
    assert target.is_file()
    assert "packed weights" in out and "validation passed: reference vs torch" in out
    assert f"wrote {target}" in out
    model = onnx.load(target)
    assert model_info(model).target == "portable"
    assert files(model_pt.parent) == ["model.onnx", "model.pt"]  # no temporary file left behind


def test_export_ort_target_and_same_bytes_twice(model_pt, tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run(["export", str(model_pt), "--target", "ort", "-o", str(a), "--no-validate"], capsys)[0] == 0
    code, out, _ = run(["export", str(model_pt), "--target", "ort", "-o", str(b)], capsys)
    assert code == 0 and "validation passed: onnxruntime vs torch" in out
    assert a.read_bytes() == b.read_bytes()
    code, out, _ = run(["export", str(model_pt), "--target", "ort"], capsys)
    assert code == 0 and (tmp_path / "model.ort.onnx").is_file()


def test_fp32_baseline_from_a_transformers_directory(tmp_path, capsys, tiny_tokenizer):
    from conftest import make_tiny_bert

    model_dir = tmp_path / "tiny-fp32"
    make_tiny_bert(2, init_range=0.3).save_pretrained(model_dir)
    tiny_tokenizer.save(str(model_dir / "tokenizer.json"))
    code, out, err = run(["export", str(model_dir), "-o", str(tmp_path / "fp32.onnx")], capsys)
    assert code == 0, err
    assert "validation passed" in out and re.search(r"packed weights\s+0\s", out)


def expect_error(argv, capsys, directory, match):
    before = files(directory)
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qbert-edge: error: "), err
    assert match in lines[0], lines[0]
    assert files(directory) == before  # nothing written
    return lines[0]


def test_not_ours(tmp_path, capsys):
    bad = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    expect_error(["export", str(bad)], capsys, tmp_path, "not a qbert-edge file")


def test_truncated(tmp_path, capsys, model_pt):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(model_pt.read_bytes()[:5000])
    expect_error(["export", str(cut)], capsys, tmp_path, "not a readable qbert-edge model.pt")


def test_newer_version(tmp_path, capsys, ckpt_data):
    newer = tmp_path / "newer.pt"
    torch.save({**ckpt_data, "version": 99}, newer)
    expect_error(["export", str(newer)], capsys, tmp_path, "version 99 is newer")


def test_width_the_target_cannot_hold(tmp_path, capsys, ckpt_data):
    """A 1-bit width in model.pt (no plan allows it): refused before anything is written."""
    bad = dict(ckpt_data)
    name = "encoder.layer.0.attention.self.query"
    bad["weights"] = {**ckpt_data["weights"], name: {**ckpt_data["weights"][name], "bits": 1}}
    plan = dict(ckpt_data["plan"])
    plan["modules"] = {**plan["modules"], name: {**plan["modules"][name], "bits": 1}}
    bad["plan"] = plan
    path = tmp_path / "w1.pt"
    torch.save(bad, path)
    line = expect_error(["export", str(path), "--no-validate"], capsys, tmp_path, "1-bit width cannot be packed")
    assert name in line
    expect_error(["export", str(path)], capsys, tmp_path, "1-bit width cannot be packed")


def test_shape_the_ort_target_cannot_hold(tmp_path, capsys):
    path = tmp_path / "h40.pt"
    torch.save(quantized_checkpoint(4, hidden=40), path)
    expect_error(["export", str(path), "--target", "ort"], capsys, tmp_path, "not a multiple of 16")


def test_missing_output_directory(tmp_path, capsys, model_pt):
    expect_error(["export", str(model_pt), "-o", str(tmp_path / "nope" / "m.onnx")], capsys, tmp_path, "does not exist")


def test_refuses_to_overwrite_the_input(tmp_path, capsys, model_pt):
    before = model_pt.read_bytes()
    expect_error(["export", str(model_pt), "-o", str(model_pt)], capsys, tmp_path, "refusing to overwrite the input")
    assert model_pt.read_bytes() == before


def test_bad_opset(tmp_path, capsys, model_pt):
    expect_error(["export", str(model_pt), "--opset", "13"], capsys, tmp_path, "supported opsets are 17")


def test_missing_input(tmp_path, capsys):
    expect_error(["export", str(tmp_path / "absent.pt")], capsys, tmp_path, "no such file")


def test_failed_validation_writes_nothing(tmp_path, capsys, model_pt, monkeypatch):
    from qbert_edge.exporters import validate

    real = validate.validate_export
    monkeypatch.setattr(validate, "validate_export", lambda *a, **k: real(*a, **{**k, "atol": -1.0}))  # nothing can pass
    expect_error(["export", str(model_pt)], capsys, tmp_path, "validation failed, nothing written")
