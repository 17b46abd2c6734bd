"""benchmarks/matmul8.py: every kernel it times computes the same product (the exact ones to float rounding)."""

import numpy as np
from conftest import ROOT, load_script


def test_the_kernels_agree_and_u8_x_u8_is_exact():
    module = load_script(ROOT / "benchmarks" / "matmul8.py", "bench_matmul8")
    rows = {r["way"]: r for r in module.one_shape(256, 32, np.random.default_rng(1))}
    assert set(rows) == {"MatMulNBits 8-bit, accuracy_level 0", "MatMulNBits 8-bit, accuracy_level 4",
                         "MatMulIntegerToFloat u8 x u8", "fp32 MatMul (dequantized weight)"}
    for way, row in rows.items():
        assert row["ms"] > 0 and row["rel_err"] < (1e-2 if "level 4" in way else 1e-5), way
