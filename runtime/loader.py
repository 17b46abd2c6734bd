"""Load an ONNX model with one file-backed copy of its weights (NumPy + onnx only).

>>> graph = load_graph("model.onnx")   # doctest: +SKIP
>>> graph.model          # the ModelProto without its large initializers (a few hundred KB)
>>> graph.weights["w"]   # a read-only NumPy view into the memory-mapped file

``onnx.load`` parses the whole file: the protobuf holds every weight once, and every backend then
copies each weight again into its own tensors, so loading peaks at two to three times the file
size. :func:`load_graph` instead walks the protobuf wire format itself, reading only the bytes
around each field key (``os.pread``, so the weights are never read or mapped by the scan), and
splits the file into

- the graph, parsed by ``onnx`` with the large initializers cut out, and
- the weights: each initializer stored as ``raw_data`` (or as external data beside the model)
  becomes a zero-copy ``np.ndarray`` view of a read-only memory map of the file, and
  :meth:`LoadedGraph.file_location` says where its bytes are, so onnxruntime can map the same
  bytes itself (external data) instead of receiving a copy.

Mapped pages are read on demand and are clean, file-backed memory: they count in RSS once per
mapping that touches them, and the kernel can drop them under pressure. Arrays a backend makes
while loading (the ``ort`` backend's widened codes) can go the same way:
:class:`~qbert_edge.runtime.spill.Spill` writes each
to a temporary file beside the model as it is made and hands back a mapped view, so onnxruntime
reads them as external data too, and frees each once its kernel has prepacked it. Views of misaligned
multi-byte data (fp32 scales, biases, LayerNorm weights) are copied to aligned arrays; packed
uint8 codes, the bulk of a quantized model, never are. Initializers of at most
:data:`SMALL_BYTES` stay in the graph. This module does not run models and does not know the
``qbert_edge`` ops.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qbert_edge.errors import QbertEdgeError

log = logging.getLogger(__name__)

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
    _maps: list = field(default_factory=list, repr=False)  # (file, mmap, offset of the map in the file)
    #: name -> (onnx data type, dims) of weights whose view is not their declared type (4-bit types)
    declared: dict = field(default_factory=dict)

    def add_map(self, file: Path, m: mmap.mmap, offset: int) -> None:
        """Declare ``m`` (mapping ``file`` from ``offset``): :meth:`file_location` finds views of it."""
        self._maps.append((Path(file), m, offset))

    def forget_maps(self, file: Path) -> None:
        """Stop declaring the maps of ``file`` (views of them stay readable)."""
        self._maps[:] = [entry for entry in self._maps if entry[0] != Path(file)]

    def file_location(self, arr: np.ndarray) -> tuple[Path, int] | None:
        """``(file, byte offset)`` of ``arr``'s bytes if it is a contiguous view of a mapped file."""
        region = self._region(arr)
        return None if region is None else (region[0], region[2] + region[3])

    def _region(self, arr: np.ndarray):
        """``(file, mmap, offset of the map in the file, offset of arr in the map)``, or None."""
        if not arr.flags.c_contiguous or arr.flags.owndata or not arr.nbytes:
            return None
        start = arr.ctypes.data
        for file, m, offset in self._maps:
            base = np.frombuffer(m, np.uint8, count=1).ctypes.data
            if base <= start and start + arr.nbytes <= base + len(m):
                return file, m, offset, start - base
        return None

    def forget(self, arrays) -> int:
        """Drop the mapped pages under ``arrays`` from this process (``MADV_DONTNEED``); returns bytes.

        For weights a backend has consumed and copied (widened codes): their file pages were read
        once and would otherwise stay resident, counted in RSS, until the mapping goes away. The
        bytes stay in the page cache and remain readable; only whole pages inside each array go.
        """
        import mmap as _mmap

        if not hasattr(_mmap, "MADV_DONTNEED"):
            return 0
        page = _mmap.PAGESIZE
        dropped = 0
        for arr in arrays:
            region = self._region(arr)
            if region is None:
                continue
            m, at = region[1], region[3]
            start = -(-at // page) * page
            stop = (at + arr.nbytes) // page * page
            if stop > start:
                m.madvise(_mmap.MADV_DONTNEED, start, stop - start)
                dropped += stop - start
        return dropped

    def initializer_names(self) -> set[str]:
        return set(self.weights) | {t.name for t in self.model.graph.initializer}

    def metadata(self) -> dict[str, str]:
        return {p.key: p.value for p in self.model.metadata_props}


def placeholder(name: str, arr: np.ndarray, location: str = "qbert-edge-user-memory", offset: int | None = None,
                declared: tuple[int, tuple[int, ...]] | None = None):
    """A TensorProto declaring ``name`` with ``arr``'s type and shape, its data external.

    With ``offset``, the data is ``arr.nbytes`` bytes at ``offset`` of the file ``location``
    (relative to the model's folder); without, the location is a dummy that
    ``SessionOptions.add_external_initializers`` replaces before anything reads it.
    """
    from onnx import TensorProto, helper

    t = TensorProto()
    t.name = name
    if declared is None:
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
    else:
        t.data_type = declared[0]
        t.dims.extend(declared[1])
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries += [("offset", str(offset)), ("length", str(arr.nbytes))]
    for key, value in entries:
        entry = t.external_data.add()
        entry.key, entry.value = key, value
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
        reader = _Reader(fh, size)
        try:
            stripped, tensors = _split_model(reader)
        except _Malformed as exc:
            raise QbertEdgeError(f"{path}: not an ONNX model, or truncated ({exc})") from None
        small = {i: reader.read(t.span[0], t.span[0] + t.span[1]) for i, t in enumerate(tensors)
                 if t.span is not None and t.span[1] <= SMALL_BYTES}
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(stripped)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise QbertEdgeError(f"{path}: not an ONNX model, or truncated ({type(exc).__name__})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise QbertEdgeError(f"{path}: not an ONNX model (no graph)")
    maps = [(path, mapped, 0)]
    external: dict[Path, object] = {}
    weights: dict[str, np.ndarray] = {}
    declared: dict[str, tuple[int, tuple[int, ...]]] = {}
    total = size
    for i, raw in enumerate(tensors):
        tensor = onnx.TensorProto()
        tensor.ParseFromString(raw.header)
        if i in small:
            tensor.raw_data = small[i]
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
        if tensor.data_type in SUB_BYTE:
            declared[tensor.name] = (int(tensor.data_type), tuple(int(d) for d in tensor.dims))
    return LoadedGraph(path, model, weights, total, maps + [(p, m, 0) for p, m in external.items()], declared)


@dataclass(frozen=True)
class _RawTensor:
    header: bytes  # the TensorProto without its raw_data field
    span: tuple[int, int] | None  # (offset, length) of raw_data in the file, if any


class _Reader:
    """Random access to a file's bytes by ``os.pread`` of 64 KiB blocks (nothing is mapped)."""

    BLOCK = 1 << 16

    def __init__(self, fh, size: int) -> None:
        self.fd = fh.fileno()
        self.size = size
        self.start = 0
        self.block = b""

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, pos: int) -> int:
        if not self.start <= pos < self.start + len(self.block):
            self.start = pos
            self.block = os.pread(self.fd, self.BLOCK, pos)
            if not self.block:
                raise _Malformed(f"read past the end at byte {pos}")
        return self.block[pos - self.start]

    def read(self, start: int, end: int) -> bytes:
        data = os.pread(self.fd, end - start, start)
        if len(data) != end - start:
            raise _Malformed(f"short read at byte {start}")
        return data


def _split_model(buf: _Reader) -> tuple[bytes, list[_RawTensor]]:
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
                    graph += buf.read(g_start, g_end)
            out += _key(_MODEL_GRAPH, _LEN) + _varint(len(graph)) + graph
        else:
            out += buf.read(start, end)
    if not seen_graph:
        raise _Malformed("no graph")
    return bytes(out), tensors


def _split_tensor(buf: _Reader, start: int, end: int) -> _RawTensor:
    header = bytearray()
    span = None
    for number, wire, f_start, value_start, f_end in _fields(buf, start, end):
        if number == _T_RAW and wire == _LEN:
            span = (value_start, f_end - value_start)
        else:
            header += buf.read(f_start, f_end)
    return _RawTensor(bytes(header), span)


def _fields(buf: _Reader, pos: int, end: int):
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


def _read_varint(buf: _Reader, pos: int, end: int) -> tuple[int, int]:
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


#: onnx data types stored several values per byte, by bits per value (INT4, UINT4, FLOAT4E2M1,
#: UINT2, INT2): their views are the packed bytes, flat uint8, with the declared type kept aside.
SUB_BYTE = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2}


def _view(buffer, tensor, span: tuple[int, int], path: Path) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset, length = span
    if tensor.data_type in SUB_BYTE:
        need = (count * SUB_BYTE[tensor.data_type] + 7) // 8
        if need != length:
            raise QbertEdgeError(f"{path}: initializer {tensor.name!r} holds {length} bytes, its shape {list(shape)} needs {need}")
        return np.frombuffer(buffer, dtype=np.uint8, count=length, offset=offset)
    dtype = _dtype(tensor, path)
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
