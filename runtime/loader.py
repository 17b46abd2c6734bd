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
while loading (the ``ort`` backend's widened codes) can go the same way: :class:`Spill` writes each
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
import sys
import tempfile
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


def advise_random(ranges) -> int:
    """Tell Linux that the file bytes in ``ranges`` are read at random; returns the bytes advised.

    ``ranges``: ``(file, offset, length)`` of tables read a few rows per run anywhere (embedding
    tables under a gather). On a read fault in a file-backed mapping the kernel also maps every
    neighbouring page that is in the page cache (*fault-around*, 64 KiB by default) and, on a
    miss, reads ahead around the page: a gather of 128 token rows from a 23 MB table maps ~7 MB
    instead of ~0.5 MB. ``MADV_RANDOM`` stops the read-ahead but not the fault-around, which only
    maps pages already cached; so each range is also dropped from the page cache
    (``POSIX_FADV_DONTNEED``: clean pages no process maps; the next read of a row reads its page
    alone). The kernel drops a cached folio (up to a huge page, 2 MiB) only when it lies whole in
    the range, so the range is widened to whole huge pages: the neighbours' cached bytes go too,
    which costs at most a re-read from the file (dirty pages, of a file written seconds ago, stay). Every mapping of this process of each file (matched by device and inode in
    ``/proc/self/maps``, or by path) that overlaps a range gets ``madvise(MADV_RANDOM)`` on the overlap.
    Costs: the first read of each page is a small read from the file (4 KiB) instead of one
    read-ahead. Linux only: elsewhere (no ``/proc/self/maps``, no ``madvise``) a no-op; it never
    raises (an advice is a hint).
    """
    import ctypes
    import ctypes.util

    advice = getattr(mmap, "MADV_RANDOM", None)
    if not ranges or advice is None or not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        return 0
    try:
        wanted: dict[tuple[int, int, int], list[tuple[Path, int, int]]] = {}
        by_path: dict[str, list[tuple[Path, int, int]]] = {}
        for file, offset, length in ranges:
            st = os.stat(file)
            key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
            item = (Path(file), int(offset), int(length))
            wanted.setdefault(key, []).append(item)
            by_path.setdefault(str(Path(file).resolve()), []).append(item)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as fh:
            maps = fh.read().splitlines()
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("no random-access advice (%s)", exc)
        return 0
    page = mmap.PAGESIZE
    advised: set[tuple[Path, int, int]] = set()
    total = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        try:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            key, vma_offset = (major, minor, int(fields[4])), int(fields[2], 16)
        except ValueError:
            continue
        # by device and inode; by path where they differ from stat's (overlayfs, btrfs subvolumes)
        for item in wanted.get(key) or (by_path.get(fields[5].strip(), ()) if len(fields) > 5 else ()):
            _, offset, length = item
            start = max(lo, lo + offset - vma_offset) // page * page
            stop = min(hi, -(-(lo + offset + length - vma_offset) // page) * page)
            if stop > start and libc.madvise(start, stop - start, advice) == 0:
                advised.add(item)
                total += stop - start
    grain = _huge_page_bytes()
    for file, offset, length in advised:
        start, stop = offset // grain * grain, -(-(offset + length) // grain) * grain
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError as exc:
            log.debug("%s: cannot drop cached pages (%s)", file, exc)
    return total


def _huge_page_bytes() -> int:
    """The largest page-cache folio: the PMD huge page size (2 MiB on x86-64 and 4K-page ARM64)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as fh:
            return max(mmap.PAGESIZE, int(fh.read().strip()))
    except (OSError, ValueError):
        return 2 << 20


#: Filesystems whose files live in RAM: a spill there would only move bytes out of the process's
#: RSS into shared memory, not out of DRAM, so :meth:`Spill.beside` declines them.
RAM_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs", "hugetlbfs")


class Spill:
    """A temporary file beside the model for arrays made while loading (widened codes).

    :meth:`put` writes an array at a page-aligned offset and returns a read-only view of the
    file's bytes there, registered in the graph's maps so :meth:`LoadedGraph.file_location` finds
    it: a backend then declares it to onnxruntime as external data like any weight of the model
    file. The bytes leave the process at once (only the page cache holds them, reclaimable once
    written back; this process never touches the view's pages), and onnxruntime frees its own
    buffer of each initializer once its kernel has prepacked it, so the arrays of the whole model
    are never in this process's memory together. :meth:`close` (after the session is created)
    unlinks the file; mappings still open keep reading it.

    The file is made on the first :meth:`put` of at least :attr:`min_bytes`, with a hidden name
    that carries this process's id (``.qbert-edge-<pid>-*.spill``), in the model's folder
    (onnxruntime reads external data only from there). A process killed before :meth:`close`
    leaves its file behind; the next spill in that folder removes the files of processes that no
    longer run (:func:`remove_stale_spills`). Where it cannot be
    made (a read-only folder, a full disk, Windows) or would live in RAM (:data:`RAM_FILESYSTEMS`),
    ``put`` returns the array itself: the same result, held in memory as before.
    """

    def __init__(self, graph: LoadedGraph, min_bytes: int = 64 * 1024) -> None:
        self.graph = graph
        self.min_bytes = min_bytes
        self.path: Path | None = None
        self.bytes = 0  # array bytes written
        self._fd: int | None = None
        self._end = 0
        self._failed = "Windows (a mapped file cannot be unlinked)" if os.name == "nt" else ""
        self._failed = self._failed or _ram_filesystem(graph.path.parent)
        if self._failed:
            log.info("%s: no spill (%s): arrays made while loading stay in memory", graph.path.parent, self._failed)

    def put(self, arr: np.ndarray) -> np.ndarray:
        """``arr``'s bytes moved to the file: a read-only view with its dtype and shape (or ``arr``)."""
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < self.min_bytes or self._failed:
            return arr
        try:
            if self._fd is None:
                remove_stale_spills(self.graph.path.parent)
                self._fd, name = tempfile.mkstemp(prefix=f".qbert-edge-{os.getpid()}-", suffix=".spill",
                                                  dir=self.graph.path.parent)
                self.path = Path(name)
            offset = -(-self._end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
            data = memoryview(arr.reshape(-1).view(np.uint8))
            done = 0
            while done < len(data):
                done += os.pwrite(self._fd, data[done:], offset + done)
            m = mmap.mmap(self._fd, arr.nbytes, offset=offset, access=mmap.ACCESS_READ)
        except OSError as exc:
            log.info("cannot write arrays made while loading beside %s (%s): they stay in memory",
                     self.graph.path, exc.strerror or exc)
            self._failed = str(exc)
            return arr
        self._end = offset + arr.nbytes
        self.bytes += arr.nbytes
        self.graph._maps.append((self.path, m, offset))
        view = np.frombuffer(m, arr.dtype, count=arr.size).reshape(arr.shape)
        view.flags.writeable = False
        return view

    def owns(self, file: Path) -> bool:
        return self.path is not None and Path(file) == self.path

    def close(self) -> None:
        """Unlink the file and forget its maps (views still alive keep their mapping)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the temporary file %s (%s)", self.path, exc.strerror or exc)
        os.close(self._fd)
        self._fd = None
        self.graph._maps[:] = [entry for entry in self.graph._maps if entry[0] != self.path]


def remove_stale_spills(folder: Path) -> list[Path]:
    """Remove the :class:`Spill` files in ``folder`` whose process no longer runs; the removed paths.

    A file whose name carries no process id, or that of a running process (of any user), is kept.
    """
    removed = []
    for path in Path(folder).glob(".qbert-edge-*-*.spill"):
        pid = path.name.split("-")[2]
        if not pid.isdigit() or _running(int(pid)):
            continue
        try:
            path.unlink()
        except OSError as exc:
            log.warning("cannot remove the stale temporary file %s (%s)", path, exc.strerror or exc)
            continue
        log.info("removed %s, left by process %s, which no longer runs", path, pid)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _ram_filesystem(folder: Path) -> str:
    """The filesystem type of ``folder`` if it keeps files in RAM (Linux ``/proc/self/mountinfo``), else ''."""
    try:
        target = str(Path(folder).resolve())
        with open("/proc/self/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind if kind in RAM_FILESYSTEMS else ""


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
