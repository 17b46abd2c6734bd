"""The ``ort-custom`` backend's kernels: ``QMatMul``/``QGather`` as onnxruntime Python custom ops.

onnxruntime runs the portable graph; our two ops run as onnxruntime-extensions ``onnx_op``
kernels that call the NumPy reference kernels of :mod:`qbert_edge.runtime.kernels` (the same math
as every other backend). What this module adds is how the weights reach those kernels:

- **No weight goes through onnxruntime.** A Python custom op receives every input as a fresh
  NumPy copy on every call (onnxruntime-extensions copies each input tensor), which for an 8-bit
  word embedding is a 23 MB copy per inference. :func:`rewrite` instead cuts each op's weight
  inputs (packed codes, scales, zero points, bias) out of the node, keeps the arrays in a
  registry here (zero-copy views of the mapped model file, see :mod:`qbert_edge.runtime.loader`),
  and leaves the node one input (``X`` or the indices) and one attribute, ``key``. The kernels
  dequantize one tile of whole groups at a time, so no fp32 copy of a weight ever exists.
- **Domain.** onnxruntime-extensions registers Python ops in the ``ai.onnx.contrib`` domain, so
  the rewritten nodes move there (in memory; the file is unchanged).
- **Outputs.** onnxruntime-extensions' stock hook returns each output as ``tolist()``, a Python
  float per value (30 ms for one 128x3072 output); :func:`_invoke` hands NumPy arrays back
  instead, which its C++ side copies with one ``memcpy`` (0.8 ms). It is installed with the
  library's own ``PyCustomOpDef.install_hooker`` and behaves the same for every other Python op.

NumPy's matmul runs on NumPy's BLAS threads (``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS``,
read when NumPy is imported), not on onnxruntime's intra-op threads. Importing this module needs
onnxruntime-extensions; :mod:`qbert_edge.runtime.backends` says what to install when it is missing.
"""

from __future__ import annotations

import importlib.abc
import itertools
import sys
import threading
from dataclasses import dataclass

import numpy as np

from qbert_edge.runtime import kernels


class _Refuse(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` / ``import transformers`` fail while onnxruntime-extensions loads."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is not imported by the qbert-edge runtime")
        return None


def _import_extensions():
    """Import onnxruntime-extensions without the torch and transformers it would pull in.

    Its package ``__init__`` imports its converters, which import transformers and torch when
    they are installed (3.8 s and 230 MB here), each inside ``try/except ImportError``. The
    runtime needs neither, so they are refused for the duration of this import, which is exactly
    what happens on a device without them. Their tokenizer converters are then unavailable in
    this process.
    """
    if "onnxruntime_extensions" in sys.modules:
        return sys.modules["onnxruntime_extensions"]
    refuse = _Refuse(tuple(n for n in ("torch", "transformers") if n not in sys.modules))
    sys.meta_path.insert(0, refuse)
    try:
        import onnxruntime_extensions
    finally:
        sys.meta_path.remove(refuse)
    return onnxruntime_extensions


_ext = _import_extensions()
from onnxruntime_extensions import PyCustomOpDef, _ocos, onnx_op  # noqa: E402

CONTRIB_DOMAIN = "ai.onnx.contrib"
OPS = ("QMatMul", "QGather")


@dataclass(frozen=True)
class QWeight:
    """The weight of one rewritten node: packed ``[rows, cols]`` codes and their group ranges."""

    op: str
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bias: np.ndarray | None
    bits: int
    rows: int
    cols: int
    groups: int

    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.nbytes
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes + extra


_REGISTRY: dict[str, QWeight] = {}
_ERRORS: dict[str, str] = {}
_LOCK = threading.Lock()
_COUNTER = itertools.count()


def new_scope() -> str:
    """A fresh key prefix for one session's weights."""
    return f"s{next(_COUNTER)}"


def release(scope: str) -> None:
    """Forget every weight registered under ``scope`` (called when a session is closed)."""
    with _LOCK:
        for key in [k for k in _REGISTRY if k.startswith(scope + "/")]:
            del _REGISTRY[key]
        _ERRORS.pop(scope, None)


def registered(scope: str) -> dict[str, QWeight]:
    """The weights registered under ``scope``, by key."""
    return {k: v for k, v in _REGISTRY.items() if k.startswith(scope + "/")}


@onnx_op(
    op_type="QMatMul",
    domain=CONTRIB_DOMAIN,
    inputs=[PyCustomOpDef.dt_float],
    outputs=[PyCustomOpDef.dt_float],
    attrs={"key": PyCustomOpDef.dt_string},
)
def _qmatmul(x, key):
    w = _REGISTRY[key]
    try:
        return kernels.qmatmul(
            x, w.packed, w.scales, w.zero_points, w.bias, bits=w.bits, n=w.rows, k=w.cols, groups=w.groups
        )
    except Exception as exc:
        return _failed(key, exc, tuple(np.shape(x))[:-1] + (w.rows,))


@onnx_op(
    op_type="QGather",
    domain=CONTRIB_DOMAIN,
    inputs=[PyCustomOpDef.dt_int64],
    outputs=[PyCustomOpDef.dt_float],
    attrs={"key": PyCustomOpDef.dt_string},
)
def _qgather(indices, key):
    w = _REGISTRY[key]
    try:
        return kernels.qgather(
            w.packed, w.scales, w.zero_points, indices, bits=w.bits, rows=w.rows, cols=w.cols, groups=w.groups
        )
    except Exception as exc:
        return _failed(key, exc, tuple(np.shape(indices)) + (w.cols,))


def _failed(key: str, exc: Exception, shape: tuple[int, ...]) -> np.ndarray:
    """Record a kernel error and return zeros of the output's shape.

    An exception that leaves a Python custom op aborts the whole process (it crosses
    onnxruntime's C API), so the kernels never raise: the backend checks :func:`take_error`
    after each run and raises it as a one-line error.
    """
    scope = key.split("/", 1)[0]
    with _LOCK:
        _ERRORS.setdefault(scope, f"{w_op(key)}: {exc}")
    return np.zeros(shape, np.float32)


def w_op(key: str) -> str:
    w = _REGISTRY.get(key)
    return f"{w.op} node {key}" if w else key


def take_error(scope: str) -> str | None:
    """The first kernel error of ``scope`` since the last call, and forget it."""
    with _LOCK:
        return _ERRORS.pop(scope, None)


def _invoke(k_id, feed, attributes):
    """onnxruntime-extensions' op hook, returning NumPy arrays instead of Python lists."""
    op = _ocos.Opdef._odlist[k_id]
    result = op.body(*feed, **op.cast_attributes(attributes))
    out: list = [k_id]
    for r in result if isinstance(result, tuple) else (result,):
        r = np.ascontiguousarray(r)
        out += [r.shape, r.reshape(-1)]
    return tuple(out)


PyCustomOpDef.install_hooker(_invoke)


def library_path() -> str:
    """The onnxruntime-extensions shared library to register with ``SessionOptions``."""
    from onnxruntime_extensions import get_library_path

    return get_library_path()


def rewrite(model, weights: dict[str, np.ndarray], scope: str, name: str = "model.onnx") -> set[str]:
    """Move every ``qbert_edge`` node of ``model`` (in place) to a keyed ``ai.onnx.contrib`` node.

    Registers each node's weight under ``scope``; returns the names of the arrays of ``weights``
    (or small initializers of ``model``) that the graph no longer needs.
    """
    from onnx import helper, numpy_helper

    from qbert_edge.errors import QbertEdgeError

    small = {t.name: t for t in model.graph.initializer}

    def array(node, index: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        ref = node.input[index]
        if ref in weights:
            return weights[ref]
        if ref in small:
            return numpy_helper.to_array(small[ref])
        raise QbertEdgeError(f"{name}: {node.op_type} node {node.name!r}: input {ref!r} is not an initializer")

    used: set[str] = set()
    moved: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if node.domain != kernels.DOMAIN:
            used.update(node.input)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        key = f"{scope}/{i}"
        if node.op_type == "QMatMul":
            weight = QWeight("QMatMul", array(node, 1), array(node, 2), array(node, 3), array(node, 4),
                             int(attrs["bits"]), int(attrs["N"]), int(attrs["K"]), int(attrs["groups"]))
            data_input = node.input[0]
            moved.update(node.input[1:])
        elif node.op_type == "QGather":
            weight = QWeight("QGather", array(node, 0), array(node, 1), array(node, 2), None,
                             int(attrs["bits"]), int(attrs["rows"]), int(attrs["cols"]), int(attrs["groups"]))
            data_input = node.input[3]
            moved.update(node.input[:3])
        else:
            raise QbertEdgeError(f"{name}: unknown {kernels.DOMAIN} op {node.op_type!r}")
        with _LOCK:
            _REGISTRY[key] = weight
        new = helper.make_node(node.op_type, [data_input], list(node.output), name=node.name or key,
                               domain=CONTRIB_DOMAIN, key=key)
        model.graph.node[i].CopyFrom(new)
        used.add(data_input)
    model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    for opset in list(model.opset_import):
        if opset.domain == kernels.DOMAIN:
            model.opset_import.remove(opset)
    return moved - used
