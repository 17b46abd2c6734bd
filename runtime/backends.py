"""The three backends that run an exported graph, and the onnxruntime settings they share.

============  ==================================================================================
backend       what runs the graph
============  ==================================================================================
ort           onnxruntime with its own low-bit kernels (``com.microsoft`` ``MatMulNBits`` /
              ``GatherBlockQuantized``): a model exported with ``--target ort`` as it is, a
              portable model rewritten at load time by :mod:`qbert_edge.runtime.native`.
ort-custom    onnxruntime runs the portable graph; ``QMatMul``/``QGather`` run as Python custom
              ops (:mod:`qbert_edge.runtime.ort_custom`) over the NumPy kernels, a tile at a time.
reference     ``onnx.reference.ReferenceEvaluator`` with the NumPy op classes of
              :mod:`qbert_edge.runtime.reference`: for correctness, not for speed or memory.
============  ==================================================================================

:func:`create` builds one from a :class:`~qbert_edge.runtime.loader.LoadedGraph`. Weights are
not copied into onnxruntime: each is declared as external data at its offset in the model file,
which onnxruntime maps itself (see :class:`OrtBackend`); arrays the ``ort`` backend makes while
loading (widened codes) are written one at a time to a temporary file beside the model
(:class:`~qbert_edge.runtime.spill.Spill`) and declared the same way, so they are never all in
memory at once. The onnxruntime settings that
change memory are in :class:`RuntimeOptions`; docs/runtime.md has the measurements behind the
defaults. This module does not tokenize and does not read metadata (see ``session``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np

from qbert_edge.errors import QbertEdgeError
from qbert_edge.runtime.native import DEFAULT_ACCURACY_LEVEL, set_accuracy_level, widen_2bit_matmuls

log = logging.getLogger(__name__)

#: name -> (python modules it needs, pip requirement to install them, one-line description)
BACKENDS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "ort": (("onnxruntime",), "onnxruntime", "onnxruntime's own low-bit kernels (fastest)"),
    "ort-custom": (
        ("onnxruntime", "onnxruntime_extensions"),
        "onnxruntime onnxruntime-extensions",
        "onnxruntime + our ops as Python custom ops (leanest)",
    ),
    "reference": (("onnx",), "onnx", "onnx.reference with NumPy kernels (correctness only)"),
}
#: ``auto`` picks the first of these whose packages are installed (a 32-bit Raspberry Pi OS has
#: no onnxruntime wheel: it gets ``reference``).
AUTO_ORDER = ("ort", "ort-custom", "reference")
#: Intra-op threads by default: the physical cores, at most this many (a Pi 4/5 has 4).
MAX_DEFAULT_THREADS = 4
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")

OP_DOMAIN = "qbert_edge"
OP_VERSION = 1
OP_LAYOUT = "dense-le-v1"
KNOWN_OPS = ("QMatMul", "QGather")


def default_threads() -> int:
    """Physical cores, capped at :data:`MAX_DEFAULT_THREADS` (``psutil``; logical cores if unknown)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    cores = cores or os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_THREADS, cores))


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime settings (ignored by ``reference``). See docs/runtime.md for what each costs.

    ``threads``: intra-op threads (None: :func:`default_threads`). ``arena``: onnxruntime's CPU
    memory arena (keeps freed activation blocks; off saves DRAM). ``prepacking``: let kernels keep a
    re-laid-out copy of constant weights (``MatMulNBits`` without it dequantizes B on every call:
    3-4x slower, and more DRAM during the run; an fp32 ``MatMul`` with it keeps a packed fp32 copy). ``optimization``:
    graph optimization level. ``mem_pattern``: plan activation buffers per input shape.
    ``accuracy_level``: ``MatMulNBits``' compute type (default
    :data:`~qbert_edge.runtime.native.DEFAULT_ACCURACY_LEVEL`; None: as exported; 0/1: fp32, exact;
    4: int8 activations per block, faster, not bit-exact). ``widen_2bit``: run a 2-bit
    ``MatMulNBits`` as 4-bit (exact; +0.25 byte per weight). None (default): where onnxruntime has
    no native 2-bit kernel for it (:func:`~qbert_edge.runtime.native.keeps_2bit`: at every level
    but 4, and for blocks above 128), where it dequantizes the 2-bit weight to fp32 on every call;
    True: always; False: never. ``return_memory``: on glibc,
    serve allocations >= 128 KiB with mmap so freed activations go back to the OS at once
    (``mallopt(M_MMAP_THRESHOLD)``, process-wide; lowers the peak RSS, costs page faults).
    ``spill``: ``ort`` writes the arrays it makes while loading (widened codes, repeated scales)
    to a temporary file beside the model, one matrix at a time, and onnxruntime reads them as
    external data and frees each after prepacking it (off: they are handed over from memory and
    all of them are alive while onnxruntime prepacks; the load-time peak is higher by about
    their size). Skipped, with the same result, where the folder is read-only or in RAM.
    ``random_tables``: after the session is created, tell the kernel the gathered tables
    (embeddings) are read at random (:func:`~qbert_edge.runtime.pages.advise_random`: no
    fault-around, no read-ahead; Linux only), so a run maps the pages of the rows it reads and
    not 64 KiB around each.
    ``int8_matmul`` (opt-in, the "fast" option; ``ort`` only): matmuls whose activations the plan
    quantizes to 8 bits run as onnxruntime's integer GEMM (``MatMulIntegerToFloat``) on int8
    copies of their weights (:mod:`~qbert_edge.runtime.native`: same numbers up to float
    rounding). Several times faster on CPUs with int8 dot products, but those weights are held
    at 1 byte each instead of 0.5 (BERT-base: +42 MB, docs/runtime.md).
    ``uint8_matmul`` (on; ``ort`` only): matmuls with 8-bit activations and 7- or 8-bit weights run
    as ``MatMulIntegerToFloat`` on their uint8 codes (exact; 2-3x faster than an 8-bit
    ``MatMulNBits``, same bytes: :mod:`~qbert_edge.runtime.native`). Off: ``MatMulNBits``.
    """

    threads: int | None = None
    arena: bool = False
    prepacking: bool = True
    optimization: str = "all"
    mem_pattern: bool = True
    accuracy_level: int | None = DEFAULT_ACCURACY_LEVEL
    widen_2bit: bool | None = None
    return_memory: bool = True
    spill: bool = True
    random_tables: bool = True
    int8_matmul: bool = False
    uint8_matmul: bool = True

    def __post_init__(self) -> None:
        for name in ("random_tables", "int8_matmul", "uint8_matmul"):
            if not isinstance(getattr(self, name), bool):
                raise QbertEdgeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise QbertEdgeError(f"threads must be a positive integer, got {self.threads!r}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise QbertEdgeError(f"accuracy_level must be 0..4, got {self.accuracy_level!r}")
        if self.widen_2bit not in (None, True, False):
            raise QbertEdgeError(f"widen_2bit must be None, True or False, got {self.widen_2bit!r}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise QbertEdgeError(
                f"unknown optimization level {self.optimization!r} (use {', '.join(OPTIMIZATION_LEVELS)})"
            )

    @property
    def resolved_threads(self) -> int:
        return self.threads or default_threads()

    def session_options(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.resolved_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = self.arena
        so.enable_mem_pattern = self.mem_pattern
        so.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.optimization]
        if not self.prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.log_severity_level = 3  # errors only: warnings become our one-line messages
        return so


def missing_packages(backend: str) -> list[str]:
    """Python modules ``backend`` needs that are not installed."""
    return [m for m in BACKENDS[backend][0] if importlib.util.find_spec(m) is None]


def resolve(backend: str | None) -> str:
    """A backend name from ``backend`` (``None``/``"auto"``: the first installed of AUTO_ORDER)."""
    if backend in (None, "auto"):
        for name in AUTO_ORDER:
            if not missing_packages(name):
                if name != AUTO_ORDER[0]:
                    log.warning("backend %s is not installed; using %s", AUTO_ORDER[0], name)
                return name
        raise QbertEdgeError("no backend is installed: pip install onnxruntime (or onnx for the reference backend)")
    if backend not in BACKENDS:
        raise QbertEdgeError(f"unknown backend {backend!r} (choose one of: auto, {', '.join(BACKENDS)})")
    missing = missing_packages(backend)
    if missing:
        raise QbertEdgeError(
            f"backend {backend} needs {', '.join(missing)}: pip install {BACKENDS[backend][1]}"
        )
    return backend


def check_ops(model, name: str = "model.onnx") -> bool:
    """Check every ``qbert_edge`` node against what this runtime implements; True if there are any."""
    from onnx import helper

    for opset in model.opset_import:
        if opset.domain == OP_DOMAIN and opset.version > OP_VERSION:
            raise QbertEdgeError(
                f"{name}: uses {OP_DOMAIN} opset {opset.version}; this runtime reads up to {OP_VERSION}: upgrade qbert-edge"
            )
    found = False
    for node in model.graph.node:
        if node.domain != OP_DOMAIN:
            continue
        found = True
        if node.op_type not in KNOWN_OPS:
            raise QbertEdgeError(f"{name}: unknown {OP_DOMAIN} op {node.op_type!r}: upgrade qbert-edge")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        version = int(attrs.get("version", 1))
        if version > OP_VERSION:
            raise QbertEdgeError(
                f"{name}: {node.op_type} version {version} is newer than this runtime (up to {OP_VERSION}): upgrade qbert-edge"
            )
        layout = attrs.get("layout", OP_LAYOUT.encode())
        layout = layout.decode() if isinstance(layout, bytes) else layout
        if layout != OP_LAYOUT:
            raise QbertEdgeError(f"{name}: {node.op_type} uses packing layout {layout!r}; this runtime reads {OP_LAYOUT!r}")
    return found


def gathered_tables(model) -> set[str]:
    """Names of the tensors ``model`` reads by token id (embedding tables, their scales and zero points).

    A run reads a few rows of each, anywhere: the ranges :func:`pages.advise_random` is for.
    """
    out: set[str] = set()
    for node in model.graph.node:
        if node.domain == OP_DOMAIN and node.op_type == "QGather":
            out.update(node.input[:3])
        elif node.op_type == "GatherBlockQuantized":
            out.update(node.input[i] for i in (0, 2, 3) if i < len(node.input))
        elif node.domain in ("", "ai.onnx") and node.op_type == "Gather":
            if next((a.i for a in node.attribute if a.name == "axis"), 0) == 0:
                out.add(node.input[0])
    out.discard("")
    return out


def table_ranges(model, weights: dict[str, np.ndarray], graph) -> list[tuple]:
    """``(file, offset, bytes)`` of every gathered table of ``model`` that is a view of a mapped file."""
    out = []
    for name in sorted(gathered_tables(model)):
        arr = weights.get(name)
        where = None if arr is None else graph.file_location(arr)
        if where is not None:
            out.append((where[0], where[1], int(arr.nbytes)))
    return out


def index_limits(model, weights: dict[str, np.ndarray]) -> dict[str, int]:
    """Graph inputs used as table indices -> the table's row count (``input_ids`` -> vocabulary).

    onnxruntime's ``GatherBlockQuantized`` does not check its indices, so the session checks
    them before running any backend.
    """
    from onnx import helper

    inputs = {i.name for i in model.graph.input}
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes.update({k: v.shape for k, v in weights.items()})
    limits: dict[str, int] = {}
    for node in model.graph.node:
        rows, index = None, None
        if node.domain == OP_DOMAIN and node.op_type == "QGather" and len(node.input) > 3:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            rows, index = attrs.get("rows"), node.input[3]
        elif node.domain in ("", "ai.onnx") and node.op_type == "Gather" and len(node.input) > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis == 0 and shapes.get(node.input[0]):
                rows, index = shapes[node.input[0]][0], node.input[1]
        elif node.op_type == "GatherBlockQuantized" and len(node.input) > 1 and shapes.get(node.input[0]):
            rows, index = shapes[node.input[0]][0], node.input[1]
        if rows and index in inputs:
            limits[index] = min(int(rows), limits.get(index, int(rows)))
    return limits


class Backend:
    """Runs a graph: ``run(feeds) -> {output name: array}``."""

    name = ""

    def __init__(self, input_names: list[str], output_names: list[str]) -> None:
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds outside itself (custom-op weights)."""


def _graph_io(model, initializers: set[str]) -> tuple[list[str], list[str]]:
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return inputs, [o.name for o in model.graph.output]


class OrtBackend(Backend):
    """An onnxruntime session over ``model``; ``weights`` reach it without a copy where possible.

    A weight that is a view of the mapped model file (or its external data file, or the
    :class:`~qbert_edge.runtime.spill.Spill` file of arrays made while loading) is declared as
    external data at its offset in that file: onnxruntime reads the bytes itself, and frees its
    buffer of a weight once a kernel has prepacked it. Any other array goes through
    ``add_external_initializers``, which hands onnxruntime our buffer: it stays alive, next to
    onnxruntime's prepacked copy, until the session is created.
    ``copied_bytes``: every array made at load time, however handed over; ``spilled_bytes``: those
    handed over through the spill file. ``tables``: the ``(file, offset, bytes)`` of the
    gathered tables (default: :func:`table_ranges` of ``model``); with
    ``options.random_tables`` they are advised random-access once the session exists
    (``advised_bytes``: the mapped bytes advised).
    """

    name = "ort"

    def __init__(self, model, weights: dict[str, np.ndarray], options: RuntimeOptions, graph,
                 custom_ops: bool = False, spill=None, tables: list | None = None) -> None:
        import onnxruntime as ort

        from qbert_edge.runtime.loader import placeholder
        from qbert_edge.runtime.pages import advise_random

        name = str(graph.path)
        if tables is None:
            tables = table_ranges(model, weights, graph)
        if spill is not None:  # its pages are dirty: dropping them would write them out first
            tables = [t for t in tables if not spill.owns(t[0])]
        so = options.session_options()
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(graph.path.parent.resolve()))
        if custom_ops:
            from qbert_edge.runtime import ort_custom

            so.register_custom_ops_library(ort_custom.library_path())
        copied: dict[str, np.ndarray] = {}
        folder = graph.path.parent.resolve()
        spilled = 0
        for w_name, arr in weights.items():
            where = graph.file_location(arr)
            if where is not None and where[0].resolve().parent == folder:
                model.graph.initializer.append(placeholder(w_name, arr, where[0].name, where[1],
                                                           graph.declared.get(w_name)))
                if spill is not None and spill.owns(where[0]):
                    spilled += int(arr.nbytes)
            elif w_name in graph.declared:
                raise QbertEdgeError(f"{name}: {w_name}: a 4-bit initializer must stay in the file")
            else:
                model.graph.initializer.append(placeholder(w_name, arr))
                copied[w_name] = arr
        if copied:
            values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in copied.values()]
            so.add_external_initializers(list(copied), values)
        self.spilled_bytes = spilled
        self.copied_bytes = sum(int(a.nbytes) for a in copied.values()) + spilled
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise QbertEdgeError(f"{name}: onnxruntime cannot load this model ({_first_line(exc)})") from None
        release_free_memory()
        self.advised_bytes = advise_random(tables) if options.random_tables else 0
        super().__init__([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        outputs = self.session.run(None, feeds)
        return dict(zip(self.output_names, outputs))


class OrtCustomBackend(OrtBackend):
    """onnxruntime over the portable graph with our ops as keyed Python custom ops."""

    name = "ort-custom"

    def __init__(self, model, weights: dict[str, np.ndarray], options: RuntimeOptions, graph, spill=None) -> None:
        from qbert_edge.runtime import ort_custom

        self.scope = ort_custom.new_scope()
        tables = table_ranges(model, weights, graph)  # our own kernels read them from our mapping
        try:
            unused = ort_custom.rewrite(model, weights, self.scope, str(graph.path))
            weights = {k: v for k, v in weights.items() if k not in unused}
            kept = [t for t in model.graph.initializer if t.name not in unused]
            del model.graph.initializer[:]
            model.graph.initializer.extend(kept)
            super().__init__(model, weights, options, graph, custom_ops=True, spill=spill, tables=tables)
        except BaseException:
            ort_custom.release(self.scope)
            raise

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from qbert_edge.runtime import ort_custom

        try:
            out = super().run(feeds)
        finally:
            error = ort_custom.take_error(self.scope)
        if error:
            raise RuntimeError(error)
        return out

    def close(self) -> None:
        from qbert_edge.runtime import ort_custom

        ort_custom.release(self.scope)


class ReferenceBackend(Backend):
    """``onnx.reference.ReferenceEvaluator``; the mapped weights are passed as extra inputs."""

    name = "reference"

    def __init__(self, model, weights: dict[str, np.ndarray], name: str) -> None:
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        from qbert_edge.runtime import reference

        for w_name, arr in weights.items():
            elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
            model.graph.input.append(helper.make_tensor_value_info(w_name, elem, list(arr.shape)))
        self.weights = weights
        try:
            self.evaluator = ReferenceEvaluator(model, new_ops=list(reference.OPS))
        except Exception as exc:
            raise QbertEdgeError(f"{name}: the reference evaluator cannot load this model ({_first_line(exc)})") from None
        super().__init__(*_graph_io(model, set(weights) | {t.name for t in model.graph.initializer}))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        outputs = self.evaluator.run(None, {**feeds, **self.weights})
        return dict(zip(self.output_names, outputs))


def create(backend: str, graph, options: RuntimeOptions | None = None) -> Backend:
    """Build ``backend`` (a name from :data:`BACKENDS`) over a loaded graph."""
    options = options or RuntimeOptions()
    if options.return_memory and backend != "reference":
        return_memory_to_os()
    name = str(graph.path)
    has_ops = check_ops(graph.model, name)
    model = _copy(graph.model)
    weights = dict(graph.weights)
    if backend == "reference":
        return ReferenceBackend(model, weights, name)
    if backend == "ort-custom":
        if not has_ops:
            log.info("%s has no %s ops; ort-custom runs it as plain onnxruntime", name, OP_DOMAIN)
        return OrtCustomBackend(model, weights, options, graph)
    if backend == "ort":
        from qbert_edge.runtime.spill import Spill

        spill = Spill(graph) if options.spill else None
        try:
            return _native_backend(model, weights, options, graph, has_ops, spill)
        finally:
            if spill is not None:
                spill.close()
    raise QbertEdgeError(f"unknown backend {backend!r} (choose one of: auto, {', '.join(BACKENDS)})")


def _native_backend(model, weights: dict[str, np.ndarray], options: RuntimeOptions, graph, has_ops: bool,
                    spill) -> Backend:
    """``ort``: rewrite to onnxruntime's low-bit ops, one matrix at a time, and open the session."""
    name = str(graph.path)
    store = None if spill is None else spill.put
    before = weights
    if has_ops:
        from qbert_edge.runtime import native

        model, weights = native.native_rewrite(model, weights, strict=False, accuracy_level=options.accuracy_level,
                                               widen_2bit=options.widen_2bit, store=store, release=graph.forget,
                                               int8=options.int8_matmul, uint8=options.uint8_matmul)
    # a --target ort export (or any ONNX model) runs as it is, but for the settings below
    if options.accuracy_level is not None:
        set_accuracy_level(model, options.accuracy_level)
    weights = widen_2bit_matmuls(model, weights, rule=options.widen_2bit, store=store, release=graph.forget)
    kept = {id(a) for a in weights.values()} | {id(a.base) for a in weights.values() if a.base is not None}
    graph.forget([a for a in before.values() if id(a) not in kept and id(a.base) not in kept])
    del before
    release_free_memory()
    if has_ops and check_ops(model, name):  # shapes MatMulNBits cannot hold keep our op (logged by native)
        return OrtCustomBackend(model, weights, options, graph, spill=spill)
    return OrtBackend(model, weights, options, graph, spill=spill)


def return_memory_to_os(threshold: int = 128 * 1024) -> None:
    """glibc: allocations of at least ``threshold`` bytes use mmap, so ``free`` unmaps them at once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after the first large free, after
    which freed activation buffers stay in the heap and in RSS. Setting the threshold fixes it.
    Process-wide; a no-op off glibc.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Loading makes large temporaries (the native rewrite repacks widened codes); glibc keeps freed
    blocks for reuse, so without this they would stay in RSS during inference and raise its peak.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        pass


def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    # onnxruntime prefixes "[ONNXRuntimeError] : 1 : FAIL : ..." - keep the message part
    if "] :" in line:
        line = line.rsplit(" : ", 1)[-1]
    return line[:300]
