"""``import qbert_edge.runtime`` and running a model never import torch or transformers.

Checked in a fresh interpreter whose import system refuses them (a meta-path finder that raises),
as on a device where they are not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from _tiny_onnx import save, tiny_classifier

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError("blocked: " + name)
            return None

    sys.meta_path.insert(0, Refuse())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_blocker_really_blocks():
    proc = _run("import torch")
    assert proc.returncode != 0 and "blocked: torch" in proc.stderr


def test_runtime_modules_import_without_torch():
    proc = _run(
        """
        import importlib, json, sys
        names = ["qbert_edge.runtime", "qbert_edge.runtime.session", "qbert_edge.runtime.backends",
                 "qbert_edge.runtime.loader", "qbert_edge.runtime.memory", "qbert_edge.runtime.kernels",
                 "qbert_edge.runtime.packing", "qbert_edge.runtime.text", "qbert_edge.runtime.metrics",
                 "qbert_edge.runtime.reference", "qbert_edge.runtime.native", "qbert_edge.runtime.ort_custom",
                 "qbert_edge.runtime.budget", "qbert_edge.exporters.metadata", "qbert_edge.data",
                 "qbert_edge.cli", "qbert_edge.cli.run", "qbert_edge.cli.eval", "qbert_edge.cli.measure"]
        for name in names:
            importlib.import_module(name)
        print(json.dumps([m for m in ("torch", "transformers") if m in sys.modules]))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_run_command_and_every_backend_without_torch(tmp_path, tiny_tokenizer):
    path = save(tiny_classifier(tiny_tokenizer)[0], tmp_path / "tiny.onnx")
    proc = _run(
        f"""
        import json, sys
        from qbert_edge.runtime.session import Session
        labels = {{}}
        for backend in ("reference", "ort-custom", "ort"):
            with Session({str(path)!r}, backend=backend) as s:
                labels[backend] = [p.label for p in s.predict(["a brilliant film", "the worst movie"])]
        from qbert_edge.cli import main
        try:
            main(["run", {str(path)!r}, "--text", "a brilliant film", "--json"])
        except SystemExit as exc:
            assert not exc.code, exc.code
        print(json.dumps({{"labels": labels, "leaked": [m for m in ("torch", "transformers") if m in sys.modules]}}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    assert len({tuple(v) for v in result["labels"].values()}) == 1
    assert '"format": "qbert-edge/predictions"' in proc.stdout
