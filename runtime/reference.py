"""The ``qbert_edge`` ops for ONNX itself: checker schemas and ``onnx.reference`` evaluator ops.

- :func:`register_schemas` registers ``QMatMul`` and ``QGather`` (domain ``qbert_edge``,
  opset 1) with ``onnx.defs``, so ``onnx.checker.check_model(full_check=True)`` checks their
  inputs, types and required attributes instead of skipping an unknown domain;
- :class:`QMatMul` / :class:`QGather` are ``onnx.reference.op_run.OpRun`` adapters: they check
  ``layout``/``version`` and call :mod:`qbert_edge.runtime.kernels`, nothing more;
- :class:`QuantizeLinear` / :class:`DequantizeLinear`: per-tensor uint8 versions of the standard
  ops for every opset (onnx's evaluator lacks ``DequantizeLinear`` for opsets 13..18);
- :func:`reference_session` builds a ``ReferenceEvaluator`` that knows them, and
  :func:`run_reference` runs it.

The reference backend is for correctness (validation, tests): it is slow and must not be used
to measure speed or memory. This module imports onnx and NumPy, never torch.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qbert_edge.runtime import kernels
from qbert_edge.runtime.kernels import DOMAIN, LAYOUT, OP_VERSION, OPSET


def _check_node(op: str, layout, version) -> None:
    if isinstance(layout, bytes):
        layout = layout.decode()
    if layout != LAYOUT:
        raise ValueError(f"{op}: unknown packing layout {layout!r} (this runtime reads {LAYOUT!r})")
    if version != OP_VERSION:
        raise ValueError(f"{op}: op version {version} is not supported (this runtime implements {OP_VERSION})")


class QMatMul(OpRun):
    """``qbert_edge::QMatMul`` -> :func:`qbert_edge.runtime.kernels.qmatmul`."""

    op_domain = DOMAIN

    def _run(self, x, w, scales, zero_points, bias=None, bits=None, N=None, K=None, groups=None, layout=None, version=None):
        _check_node("QMatMul", layout, version)
        if bias is not None and bias.size == 0:
            bias = None
        y = kernels.qmatmul(x, w, scales, zero_points, bias, bits=int(bits), n=int(N), k=int(K), groups=int(groups))
        return (y,)


class QGather(OpRun):
    """``qbert_edge::QGather`` -> :func:`qbert_edge.runtime.kernels.qgather`."""

    op_domain = DOMAIN

    def _run(self, w, scales, zero_points, indices, bits=None, rows=None, cols=None, groups=None, layout=None, version=None):
        _check_node("QGather", layout, version)
        y = kernels.qgather(w, scales, zero_points, indices, bits=int(bits), rows=int(rows), cols=int(cols), groups=int(groups))
        return (y,)


class QuantizeLinear(OpRun):
    """Per-tensor uint8 ``QuantizeLinear`` (opset 13+ semantics), for every opset the exporter writes.

    ``y = saturate(rint(x / scale) + zero)`` (round half to even), what
    :func:`qbert_edge.quant.quantize_activation` computes. onnx's evaluator has no implementation
    registered for opsets 13..18 of ``DequantizeLinear``; these two replace both ops.
    """

    op_domain = ""

    def _run(self, x, scale, zero_point=None, axis=None, saturate=None, block_size=None, output_dtype=None, precision=None):
        if np.asarray(scale).size != 1:
            raise ValueError("QuantizeLinear: only per-tensor scales are implemented here")
        zero = np.asarray(0 if zero_point is None else zero_point)
        if zero.dtype != np.uint8:
            raise ValueError(f"QuantizeLinear: only uint8 is implemented here, got {zero.dtype}")
        q = np.rint(x / np.float32(np.asarray(scale).reshape(()))) + np.float32(zero.reshape(()))
        return (np.clip(q, 0, 255).astype(np.uint8),)


class DequantizeLinear(OpRun):
    """Per-tensor uint8 ``DequantizeLinear``: ``y = (float(x) - float(zero)) * scale`` in fp32."""

    op_domain = ""

    def _run(self, x, scale, zero_point=None, axis=None, block_size=None, output_dtype=None):
        if np.asarray(scale).size != 1 or x.dtype != np.uint8:
            raise ValueError("DequantizeLinear: only per-tensor uint8 is implemented here")
        zero = np.float32(0 if zero_point is None else np.asarray(zero_point).reshape(()))
        return ((x.astype(np.float32) - zero) * np.float32(np.asarray(scale).reshape(())),)


OPS = (QMatMul, QGather, QuantizeLinear, DequantizeLinear)


def _schemas() -> list:
    S = onnx.defs.OpSchema
    P = S.FormalParameter
    A = S.Attribute
    INT, STRING = S.AttrType.INT, S.AttrType.STRING
    common = [
        A("bits", INT, "code width, 2..8", required=True),
        A("groups", INT, "number of row groups (one scale and zero point each)", required=True),
        A("layout", STRING, 'packing layout, "dense-le-v1"', required=True),
        A("version", INT, "op version, 1", required=True),
    ]
    floats = [("T", ["tensor(float)"], "float32 activations, scales and bias")]
    qmatmul = S(
        "QMatMul", DOMAIN, OPSET,
        doc="Fused group-dequantize + MatMul: Y = X @ W_hat^T + bias (see runtime/ops/QMatMul.md).",
        inputs=[
            P("X", "T", "activations [..., K]"),
            P("W", "tensor(uint8)", "packed codes of the [N, K] weight"),
            P("scales", "T", "float32 [G]"),
            P("zero_points", "tensor(uint8)", "uint8 [G]"),
            P("bias", "T", "float32 [N]", param_option=S.FormalParameterOption.Optional),
        ],
        outputs=[P("Y", "T", "[..., N]")],
        type_constraints=floats,
        attributes=common + [A("N", INT, "output features", required=True), A("K", INT, "input features", required=True)],
    )
    qgather = S(
        "QGather", DOMAIN, OPSET,
        doc="Group-dequantize + Gather of a packed [rows, cols] table (see runtime/ops/QGather.md).",
        inputs=[
            P("W", "tensor(uint8)", "packed codes of the [R, C] table"),
            P("scales", "T", "float32 [G]"),
            P("zero_points", "tensor(uint8)", "uint8 [G]"),
            P("indices", "tensor(int64)", "row indices"),
        ],
        outputs=[P("Y", "T", "[..., C]")],
        type_constraints=floats,
        attributes=common + [A("rows", INT, "table rows", required=True), A("cols", INT, "row width", required=True)],
    )
    return [qmatmul, qgather]


def register_schemas() -> None:
    """Register the op schemas with ``onnx.defs`` (idempotent; process-wide)."""
    for schema in _schemas():
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def reference_session(model: onnx.ModelProto | str, **kwargs) -> ReferenceEvaluator:
    """A ``ReferenceEvaluator`` over ``model`` that runs the ``qbert_edge`` ops with the NumPy kernels."""
    return ReferenceEvaluator(model, new_ops=list(OPS), **kwargs)


def run_reference(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` on ``feeds`` with the reference backend; output name -> array."""
    session = reference_session(model)
    names = outputs or list(session.output_names)
    return dict(zip(names, session.run(names, dict(feeds))))
