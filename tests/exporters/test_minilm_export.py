"""The real reference model: MiniLM (DirectQ, 2/3 MP) exports, validates, and stays within 3% of theory."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_minilm_2_3_mp_exports_within_3_percent(tmp_path):
    import torch

    from qbert_edge.checkpoint import save_quantized
    from qbert_edge.exporters.onnx_export import export_file
    from qbert_edge.exporters.sizes import theoretical_size
    from qbert_edge.exporters.validate import SENTENCES
    from qbert_edge.loading import load_model
    from qbert_edge.plan import uniform_plan
    from qbert_edge.qmodel import quantizable_shapes
    from qbert_edge.quantize import direct_quantize
    from qbert_edge.runtime.text import encode

    loaded = load_model("minilm")
    plan = uniform_plan(quantizable_shapes(loaded.model), 2, 128, layer_bits={0: 3, 1: 3, 2: 3})
    enc = encode(loaded.tokenizer, list(SENTENCES), max_length=64)
    result = direct_quantize(loaded, plan, [{k: torch.from_numpy(v) for k, v in enc.arrays.items()}])
    pt = tmp_path / "minilm.pt"
    save_quantized(result, pt)
    theory = theoretical_size(torch.load(pt, weights_only=True)).total

    portable = export_file(pt, tmp_path / "m.onnx")
    assert portable.validation.ok, portable.validation.summary()
    assert portable.validation.backend == "reference"
    size = (tmp_path / "m.onnx").stat().st_size
    assert size == portable.bytes and 1.0 <= size / theory <= 1.03, (size, theory)

    ort = export_file(pt, tmp_path / "m.ort.onnx", target="ort")
    assert ort.validation.ok and ort.validation.backend == "onnxruntime", ort.validation.summary()
    assert portable.seconds_export < 30
