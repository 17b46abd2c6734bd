"""benchmarks/matmul8.py: every kernel it times computes the same product (the exact ones to float rounding)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_the_kernels_agree_and_u8_x_u8_is_exact():
    spec = importlib.util.spec_from_file_location("bench_matmul8", ROOT / "benchmarks" / "matmul8.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = {r["way"]: r for r in module.one_shape(256, 32, np.random.default_rng(1))}
    assert set(rows) == {"MatMulNBits 8-bit, accuracy_level 0", "MatMulNBits 8-bit, accuracy_level 4",
                         "MatMulIntegerToFloat u8 x u8", "fp32 MatMul (dequantized weight)"}
    for way, row in rows.items():
        assert row["ms"] > 0 and row["rel_err"] < (1e-2 if "level 4" in way else 1e-5), way
