"""The distribution maps exporters/ and runtime/ into qbert_edge.*: nothing generic at the top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_installed_package_maps_the_folders(tmp_path):
    code = (
        "import importlib.util, qbert_edge.runtime, qbert_edge.exporters, qbert_edge.runtime.packing;"
        "print(importlib.util.find_spec('runtime') is None, importlib.util.find_spec('exporters') is None)"
    )
    assert run_python(code, tmp_path) == "True True"


@pytest.mark.slow
def test_wheel_holds_only_the_qbert_edge_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("qbert_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"qbert_edge"}
    for module in ("runtime/packing.py", "exporters/__init__.py", "cli/__init__.py", "runtime/ops/QMatMul.md"):
        assert f"qbert_edge/{module}" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "import qbert_edge.runtime.packing as p, qbert_edge.exporters as e; print(p.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout
    assert out.strip().startswith(str(target))
