"""The ARM check (tools/arm): the comparison rules, fast; the whole check under qemu, slow.

The slow test runs ``tools/arm/check.py`` end to end: it builds the aarch64 environment (cached
in ``${QBERT_EDGE_CACHE:-~/.cache/qbert-edge}/arm64``), exports the 2/3 MP DirectQ minilm pair on
x86, runs every backend on an emulated Cortex-A72 (the Raspberry Pi 4's core) and compares.
It is skipped, with the reason shown by ``-ra``, only where the host cannot emulate: no
qemu-aarch64-static and no way to install it (CI, as root, installs it with apt-get), or not a
Debian-style host (no apt-get/dpkg-deb to build the arm64 root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

ARM = Path(__file__).resolve().parents[1] / "tools" / "arm"


def _load(name: str, filename: str):
    """Import a script of tools/arm (a folder of scripts, not a package) under ``name``."""
    return load_script(ARM / filename, name)


build_env = _load("build_env", "build_env.py")  # check.py imports it by this name
check = _load("qbert_edge_arm_check", "check.py")

# --------------------------------------------------------------------------- comparison rules


def _hidden(seed: int = 0, batch: int = 3, length: int = 5, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, length, width)).astype(np.float32)


MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_exact_mode_passes_float_noise_and_fails_a_wrong_value():
    x86 = _hidden()
    noisy = x86 + np.float32(1e-6)
    assert check.compare_output("last_hidden_state", x86, noisy, MASK, exact=True).ok
    wrong = x86.copy()
    wrong[1, 0, 3] += 0.01  # one dequantized weight off by a code would do more than this
    out = check.compare_output("last_hidden_state", x86, wrong, MASK, exact=True)
    assert not out.ok and out.texts_exact == 2 and out.max_abs == pytest.approx(0.01, rel=1e-3)


def test_exact_mode_ignores_padding_positions():
    x86 = _hidden()
    arm = x86.copy()
    arm[2, 4] += 5.0  # text 3 has 2 real tokens: position 4 is padding
    assert check.compare_output("last_hidden_state", x86, arm, MASK, exact=True).ok


def test_quantized_activation_mode_takes_a_flip_but_not_a_different_answer():
    x86 = _hidden()
    flipped = x86.copy()
    flipped[0, 2, :2] += 0.3  # a few activations one 8-bit step away
    out = check.compare_output("last_hidden_state", x86, flipped, MASK, exact=False)
    assert out.ok and out.min_cosine > check.MIN_COSINE and out.texts_exact == 2
    other = x86.copy()
    other[1] = _hidden(seed=1)[1]  # text 2 answered by another model
    assert not check.compare_output("last_hidden_state", x86, other, MASK, exact=False).ok


def test_shape_mismatch_fails():
    assert not check.compare_output("pooler_output", np.zeros((2, 4)), np.zeros((2, 5)), MASK[:2], exact=True).ok


def _device_meta(labels=("negative", "positive")) -> dict:
    return {"backends": {"ort": {"outputs": ["logits"], "run_s": [0.1], "labels_all": list(labels)}}}


def test_confident_label_flip_fails_and_borderline_flip_passes():
    mask = np.ones((2, 4), dtype=np.int64)
    x86 = {"input/attention_mask": mask, "ort/logits": np.array([[3.0, -3.0], [0.01, -0.01]], np.float32)}
    borderline = {"ort/logits": np.array([[3.0, -3.0], [-0.01, 0.01]], np.float32)}
    res = check.compare_backend("ort", x86, borderline, _device_meta(), _device_meta(), exact=False)
    assert res.ok and res.labels_x86 == ("negative", "negative") and res.labels_arm == ("negative", "positive")
    confident = {"ort/logits": np.array([[-0.2, 0.2], [0.01, -0.01]], np.float32)}
    # probabilities of text 1 still have a cosine near 0.75 with x86's: fails on both counts
    assert not check.compare_backend("ort", x86, confident, _device_meta(), _device_meta(), exact=False).ok


def test_predictions_show_labels_for_a_classifier_and_neighbours_for_an_encoder():
    mask = np.ones((2, 3), dtype=np.int64)
    logits = {"input/attention_mask": mask, "ort/logits": np.array([[2.0, -1.0], [-1.0, 1.5]], np.float32)}
    text = check.format_predictions(["good", "bad"], logits, logits, "ort", ["negative", "positive"])
    assert "arm: negative" in text.splitlines()[0] and "x86: positive" in text.splitlines()[1]
    hidden = {"input/attention_mask": mask, "ort/last_hidden_state": _hidden(batch=2, length=3)}
    text = check.format_predictions(["good", "bad"], hidden, hidden, "ort", None)
    assert "cos 1.00000" in text and "nearest arm: #2" in text


def test_a_backend_error_on_either_side_fails_with_its_message():
    x86 = {"input/attention_mask": np.ones((1, 2))}
    arm_meta = {"backends": {"ort": {"error": "QbertEdgeError: backend ort needs onnxruntime"}}}
    res = check.compare_backend("ort", x86, {}, _device_meta(), arm_meta, exact=True)
    assert not res.ok and res.error == "arm: QbertEdgeError: backend ort needs onnxruntime"


def test_device_results_from_a_board_are_checked_for_format_and_presence(tmp_path):
    models = {"m": tmp_path / "m.onnx"}
    with pytest.raises(RuntimeError, match="no results for m.onnx"):
        check.load_device_results(models, tmp_path)
    np.savez(tmp_path / "m.npz", meta=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(RuntimeError, match="not a device.py result"):
        check.load_device_results(models, tmp_path)
    meta = {"format": check.device_format(), "machine": "aarch64", "emulated": None,
            "cpu_features": {"asimddp": False}, "texts": ["a"]}
    np.savez(tmp_path / "m.npz", meta=np.array(json.dumps(meta)), **{"input/input_ids": np.ones((1, 3))})
    results = check.load_device_results(models, tmp_path)
    assert results["m"][1]["texts"] == ["a"] and "input/input_ids" in results["m"][0]
    assert check._board(results) == "aarch64 without dotprod (board)"


# --------------------------------------------------------------------------- environment pieces


def test_missing_qemu_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(build_env.shutil, "which", lambda name: None)
    with pytest.raises(build_env.ArmEnvError, match="qemu-user-static"):
        build_env.find_qemu(install=False)


def test_runtime_requirements_are_the_device_install_without_extras():
    names = build_env.runtime_requirements()
    assert {"numpy", "onnx", "onnxruntime", "tokenizers"} <= set(names)
    assert "torch" not in names and "transformers" not in names


def test_emulated_environment_is_isolated_from_the_host_python(tmp_path):
    env = build_env.ArmEnv(home=tmp_path, root=tmp_path / "root", site=tmp_path / "site",
                           project=tmp_path / "project", qemu="/usr/bin/qemu-aarch64-static")
    e = env.environ("cortex-a76", base={"PYTHONPATH": "/host", "PATH": "/usr/bin", "QEMU_CPU": "max"})
    assert e["QEMU_CPU"] == e["QBERT_EDGE_EMULATED"] == "cortex-a76"
    assert e["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "project"), str(tmp_path / "site")]
    assert e["QEMU_LD_PREFIX"] == str(tmp_path / "root") and e["PATH"] == "/usr/bin"
    script = build_env.wrapper_script(env.qemu, env.root)
    assert script.startswith("#!/bin/sh") and '-0 "$0"' in script and str(env.root / "usr/bin/python3.11") in script


# --------------------------------------------------------------------------- the whole check


def _cannot_emulate() -> str | None:
    """Why this host cannot run the check, or None. CI (CI=true, root) installs qemu first."""
    in_ci = os.environ.get("CI") == "true"
    try:
        build_env.find_qemu(install=in_ci)
    except build_env.ArmEnvError as exc:
        return str(exc)
    for tool, package in (("apt-get", "apt"), ("dpkg-deb", "dpkg")):
        if not shutil.which(tool):
            return f"{tool} not found: building the Debian arm64 root needs {package} (a Debian-style host)"
    return None


@pytest.mark.slow
def test_runtime_on_emulated_cortex_a72_matches_x86(tmp_path):
    reason = _cannot_emulate()
    if reason:
        pytest.skip(f"cannot emulate aarch64 here: {reason}")
    report_path = tmp_path / "arm.json"
    proc = subprocess.run(
        [sys.executable, str(ARM / "check.py"), "--cpu", "cortex-a72", "--work", str(tmp_path / "work"),
         "--json", str(report_path)],
        capture_output=True, text=True, timeout=1500, check=False,
    )
    detail = f"\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"tools/arm/check.py exited {proc.returncode}{detail}"
    report = json.loads(report_path.read_text())
    assert report["format"] == check.FORMAT and report["ok"], detail
    assert set(report["models"]) == {"mp23-a8", "mp23-fp32act"}
    exact = report["models"]["mp23-fp32act"]
    assert exact["mode"] == "exact" and report["models"]["mp23-a8"]["mode"] == "quantized-activations"
    for model in report["models"].values():
        assert model["same_token_ids"], "the aarch64 tokenizer gave other token ids"
        arm = model["arm"]
        assert arm["machine"] == "aarch64" and arm["emulated"] == "cortex-a72"
        # the Pi 4's core has no dot-product instructions, and the kernels must see that
        assert arm["cpu_features"]["asimd"] and not arm["cpu_features"]["asimddp"]
        assert [b["backend"] for b in model["backends"]] == list(check.BACKENDS)
        assert all(b["ok"] and not b["error"] for b in model["backends"]), detail
    for backend in exact["backends"]:
        for out in backend["outputs"]:
            assert out["max_abs"] <= out["allowed"] and out["texts_exact"] == len(check.TEXTS)
    measure = report["measure"]
    assert "error" not in measure, measure.get("error")
    assert measure["host"]["machine"] == "aarch64" and measure["rss_mb"]["peak"] > 0
    assert measure["static_mb"]["total"] > 0
