"""Load an ONNX model with one file-backed copy of its weights (NumPy + onnx only).

>>> graph = load_graph("model.onnx")   # doctest: +SKIP
>>> graph.model          # the ModelProto without its large initializers (a few hundred KB)
>>> graph.weights["w"]   # a read-only NumPy view into the memory-mapped file

``onnx.load`` parses the whole file: the protobuf holds every weight once, and every backend then
copies each weight again into its own tensors, so loading peaks at two to three times the file
size. :func:`load_graph` instead maps the file into memory and walks the protobuf wire format
itself: each initializer stored as ``raw_data`` (or as external data beside the model) becomes a
zero-copy ``np.ndarray`` view of the mapped pages, and the graph is parsed by ``onnx`` with those
initializers cut out. Pages are read on demand and are clean file-backed memory: they count in the
process's RSS once, and the kernel can drop them under pressure. Backends hand the views to
onnxruntime (``SessionOptions.add_external_initializers``) or to the reference evaluator.

Views of misaligned multi-byte data (fp32 scales, biases, LayerNorm weights) are copied to
aligned arrays; packed uint8 codes, the bulk of a quantized model, never are. This module does not run models and does not know
about the ``qbert_edge`` ops.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qbert_edge.errors import QbertEdgeError

#: Initializers up to this many bytes stay in the graph (shape constants, epsilons): graph
#: optimizers and constant folding read them, and copying them costs nothing.
SMALL_BYTES = 1024

# Protobuf field numbers (onnx.proto3) and wire types used by the scanner.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_T_DIMS, _T_DATA_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class LoadedGraph:
    """A model split into its graph (``model``, small) and its weights (``weights``, mapped views).

    ``model`` keeps every initializer that is not raw data (small typed constants); the others
    are gone from ``model.graph.initializer`` and live in ``weights`` by name. ``file_bytes`` is the
    size of the file (plus external data files).
    """

    path: Path
    model: object  # onnx.ModelProto
    weights: dict[str, np.ndarray]
    file_bytes: int
    _maps: list = field(default_factory=list, repr=False)

    def initializer_names(self) -> set[str]:
        return set(self.weights) | {t.name for t in self.model.graph.initializer}

    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.model.metadata_props}

    def placeholder_model(self):
        """A copy of ``model`` whose cut-out initializers are placeholders (name, type, dims only).

        onnxruntime needs each initializer declared in the graph before
        ``add_external_initializers`` replaces it; the placeholder says "external data" so nothing
        tries to read it.
        """
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for name, arr in self.weights.items():
            model.graph.initializer.append(placeholder(name, arr))
        return model


def placeholder(name: str, arr: np.ndarray):
    """A TensorProto that declares ``name`` with ``arr``'s type and shape but holds no data."""
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "qbert-edge-user-memory"
    return t


def load_graph(path: str | os.PathLike) -> LoadedGraph:
    """Map ``path`` and split it into graph and weights; one-line errors for bad files."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        size = path.stat().st_size
        fh = open(path, "rb")
    except FileNotFoundError:
        raise QbertEdgeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise QbertEdgeError(f"{path}: is a directory, not an ONNX model") from None
    except PermissionError:
        raise QbertEdgeError(f"{path}: permission denied") from None
    if size == 0:
        raise QbertEdgeError(f"{path}: empty file, not an ONNX model")
    with fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mapped)
    try:
        stripped, tensors = _split_model(buf)
    except _Malformed as exc:
        raise QbertEdgeError(f"{path}: not an ONNX model, or truncated ({exc})") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(stripped)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise QbertEdgeError(f"{path}: not an ONNX model, or truncated ({type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise QbertEdgeError(f"{path}: not an ONNX model (no graph)")
    maps = [mapped]
    external: dict[Path, object] = {}
    weights: dict[str, np.ndarray] = {}
    total = size
    for raw in tensors:
        tensor = onnx.TensorProto()
        tensor.ParseFromString(raw.header)
        if raw.span is not None and raw.span[1] <= SMALL_BYTES:
            tensor.raw_data = bytes(buf[raw.span[0]: raw.span[0] + raw.span[1]])
            model.graph.initializer.append(tensor)
            continue
        if raw.span is not None:
            arr = _view(mapped, tensor, raw.span, path)
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            arr, extra = _external(path, tensor, external)
            total += extra
            if arr.nbytes <= SMALL_BYTES:  # shape constants: onnxruntime reads them while loading
                model.graph.initializer.append(numpy_helper.from_array(np.array(arr), tensor.name))
                continue
        else:  # typed fields (float_data, int64_data, ...): small; keep it in the graph
            model.graph.initializer.append(tensor)
            continue
        weights[tensor.name] = arr
    return LoadedGraph(path, model, weights, total, maps + list(external.values()))


@dataclass(frozen=True)
class _RawTensor:
    header: bytes  # the TensorProto without its raw_data field
    span: tuple[int, int] | None  # (offset, length) of raw_data in the file, if any


def _split_model(buf: memoryview) -> tuple[bytes, list[_RawTensor]]:
    """ModelProto bytes without graph initializers, and those initializers."""
    out = bytearray()
    tensors: list[_RawTensor] = []
    seen_graph = False
    for number, wire, start, value_start, end in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == _LEN:
            seen_graph = True
            graph = bytearray()
            for g_number, g_wire, g_start, g_value, g_end in _fields(buf, value_start, end):
                if g_number == _GRAPH_INITIALIZER and g_wire == _LEN:
                    tensors.append(_split_tensor(buf, g_value, g_end))
                else:
                    graph += buf[g_start:g_end]
            out += _key(_MODEL_GRAPH, _LEN) + _varint(len(graph)) + graph
        else:
            out += buf[start:end]
    if not seen_graph:
        raise _Malformed("no graph")
    return bytes(out), tensors


def _split_tensor(buf: memoryview, start: int, end: int) -> _RawTensor:
    header = bytearray()
    span = None
    for number, wire, f_start, value_start, f_end in _fields(buf, start, end):
        if number == _T_RAW and wire == _LEN:
            span = (value_start, f_end - value_start)
        else:
            header += buf[f_start:f_end]
    return _RawTensor(bytes(header), span)


def _fields(buf: memoryview, pos: int, end: int):
    """Yield ``(field number, wire type, field start, value start, field end)`` of a message."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed(f"field number 0 at byte {start}")
        if wire == _VARINT:
            _, pos = _read_varint(buf, pos, end)
            value_start = pos
        elif wire == _I64:
            value_start, pos = pos, pos + 8
        elif wire == _I32:
            value_start, pos = pos, pos + 4
        elif wire == _LEN:
            length, value_start = _read_varint(buf, pos, end)
            pos = value_start + length
        else:
            raise _Malformed(f"unsupported wire type {wire} at byte {start}")
        if pos > end:
            raise _Malformed(f"field {number} runs past the end at byte {start}")
        yield number, wire, start, value_start, pos


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"bad varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _dtype(tensor, path: Path) -> np.dtype:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        raise QbertEdgeError(f"{path}: initializer {tensor.name!r} has unsupported data type {tensor.data_type}") from None


def _view(buffer, tensor, span: tuple[int, int], path: Path) -> np.ndarray:
    dtype = _dtype(tensor, path)
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset, length = span
    if count * dtype.itemsize != length:
        raise QbertEdgeError(
            f"{path}: initializer {tensor.name!r} holds {length} bytes, its shape {list(shape)} needs {count * dtype.itemsize}"
        )
    arr = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
    if arr.ctypes.data % dtype.itemsize:
        arr = arr.copy()
        arr.flags.writeable = False
    return arr


def _external(path: Path, tensor, maps: dict) -> tuple[np.ndarray, int]:
    """Map the external data file of ``tensor`` (location relative to the model's folder) once."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location")
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise QbertEdgeError(f"{path}: initializer {tensor.name!r} has a bad external data location {location!r}")
    data_path = path.parent / location
    if data_path not in maps:
        try:
            with open(data_path, "rb") as fh:
                maps[data_path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise QbertEdgeError(f"{path}: external data file {data_path} is missing") from None
        except ValueError:  # mmap of an empty file
            raise QbertEdgeError(f"{path}: external data file {data_path} is empty") from None
    mapped = maps[data_path]
    offset = int(info.get("offset", 0))
    dtype = _dtype(tensor, path)
    count = int(np.prod([int(d) for d in tensor.dims], dtype=np.int64))
    length = int(info.get("length", count * dtype.itemsize))
    if offset + length > len(mapped):
        raise QbertEdgeError(f"{path}: external data file {data_path} is truncated")
    return _view(mapped, tensor, (offset, length), path), length
