"""Where the bytes of an exported model go, and what they should be in theory.

:func:`size_report` splits a model's bytes into parts by what consumes each initializer:

==================  ==========================================================================
packed weights      the uint8 codes of ``QMatMul``/``QGather`` (or ``MatMulNBits``/``GatherBlockQuantized``)
scales/zero points  their scales and zero points, and the activations' QuantizeLinear parameters
fp32 tensors        every other float initializer (LayerNorm, biases, unquantized weights)
metadata            ``metadata_props`` (tokenizer, labels, plan)
graph               the rest: nodes, names, small constants, tensor headers, alignment padding
==================  ==========================================================================

:func:`theoretical_size` is the floor a ``model.pt`` allows: ``ceil(n*bits/8)`` bytes of codes per
quantized weight, 4 + 1 bytes per group (scale, zero point) and per quantized activation, 4 bytes
per remaining fp32 parameter. This module only counts; it does not read or write files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from qbert_edge.runtime.packing import packed_size

#: (op type, index of the packed input, indices of its quantization parameters)
QUANT_INPUTS = {
    "QMatMul": (1, (2, 3)),
    "QGather": (0, (1, 2)),
    "MatMulNBits": (1, (2, 3)),
    "GatherBlockQuantized": (0, (2, 3)),
    "QuantizeLinear": (None, (1, 2)),
    "DequantizeLinear": (None, (1, 2)),
}
MB = 1e6


def _tensor_bytes(t: onnx.TensorProto) -> int:
    if t.raw_data:
        return len(t.raw_data)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class SizeReport:
    """Bytes per part of one model; ``total`` is the serialized size (the file size)."""

    packed: int
    quant_params: int
    fp32: int
    metadata: int
    graph: int
    total: int

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("packed weights", self.packed),
            ("scales/zero points", self.quant_params),
            ("fp32 tensors", self.fp32),
            ("metadata (tokenizer, labels, plan)", self.metadata),
            ("graph (nodes, constants, padding)", self.graph),
            ("total (file)", self.total),
        ]

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows())
        lines = [f"{'part':<{width}}  {'bytes':>12}  {'MB':>9}  {'share':>6}"]
        for label, n in self.rows():
            lines.append(f"{label:<{width}}  {n:>12,}  {n / MB:>9.3f}  {100 * n / max(self.total, 1):>5.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"packed": self.packed, "quant_params": self.quant_params, "fp32": self.fp32,
                "metadata": self.metadata, "graph": self.graph, "total": self.total}


def size_report(model: onnx.ModelProto, file_bytes: int | None = None) -> SizeReport:
    """Bytes per part of ``model`` (``file_bytes``: its serialized size, computed if not given)."""
    role: dict[str, str] = {}
    for node in model.graph.node:
        spec = QUANT_INPUTS.get(node.op_type)
        if spec is None:
            continue
        packed_i, param_is = spec
        if packed_i is not None and packed_i < len(node.input):
            role[node.input[packed_i]] = "packed"
        for i in param_is:
            if i < len(node.input) and node.input[i]:
                role.setdefault(node.input[i], "quant_params")
    parts = {"packed": 0, "quant_params": 0, "fp32": 0}
    for t in model.graph.initializer:
        r = role.get(t.name)
        if r is None:
            r = "fp32" if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1 else None
        if r is not None:
            parts[r] += _tensor_bytes(t)
    metadata = sum(len(p.key.encode()) + len(p.value.encode()) for p in model.metadata_props)
    total = model.ByteSize() if file_bytes is None else int(file_bytes)
    graph = total - sum(parts.values()) - metadata
    return SizeReport(parts["packed"], parts["quant_params"], parts["fp32"], metadata, graph, total)


@dataclass(frozen=True)
class TheoreticalSize:
    """The floor of a ``model.pt``'s export: codes + scales/zero points + fp32 remainder."""

    codes: int
    quant_params: int
    fp32: int

    @property
    def total(self) -> int:
        return self.codes + self.quant_params + self.fp32

    def to_dict(self) -> dict:
        return {"codes": self.codes, "quant_params": self.quant_params, "fp32": self.fp32, "total": self.total}


def theoretical_size(data: Mapping) -> TheoreticalSize:
    """:class:`TheoreticalSize` of a ``model.pt`` dict (tensors or arrays)."""
    codes = params = 0
    for w in data.get("weights", {}).values():
        n = int(np.prod(tuple(w["codes"].shape)))
        codes += packed_size(n, int(w["bits"]))
        params += 5 * int(np.prod(tuple(w["scale"].shape)))
    params += 5 * len(data.get("activations", {}))
    fp32 = 4 * sum(int(np.prod(tuple(v.shape))) for v in data["fp32"].values())
    return TheoreticalSize(codes, params, fp32)
