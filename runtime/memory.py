"""What a model costs in DRAM and time, measured in a fresh process (``qbert-edge measure``).

>>> report = measure("model.onnx", backend="ort", batch=1, seq_len=128, runs=20)   # doctest: +SKIP
>>> report["rss_mb"]["model_share"]                                                # doctest: +SKIP
21.4

:func:`measure` starts a child Python process (``python -m qbert_edge.runtime.memory``) so that
nothing the caller loaded counts. The child imports the runtime and the backend's packages, reads
its RSS (the **baseline**), loads the session (**after load**), runs ``warmup`` + ``runs``
inferences on random token ids of shape ``[batch, seq_len]``, and reads ``VmHWM``, the kernel's
high-water mark of its RSS (**peak**; ``peak_load``: the same read right after loading, so
``peak_load - after_load`` is what loading held only transiently). The model's share of DRAM is ``peak - baseline``: the weights
the process touched (mapped file pages count too), every copy made while loading, the
activations and onnxruntime's own buffers. Latency is the wall time of each timed run (p50/p90).

:func:`measure_series` measures several ``(batch, runs)`` steps one after another in one such
process (one load): each step's peak also covers the steps before it, so the first step's
figures are a fresh process's and the batches go in increasing order.

Next to it the parent reports what the file holds (:func:`static_bytes`, by kind: packed codes,
scales, zero points, fp32 and int8 tensors, graph) and :func:`activation_bytes`, an estimate of
the live fp32 activations for the batch and length. The JSON is ``qbert-edge/measure`` v1.

``engine="plain-ort"`` measures ``onnxruntime.InferenceSession(path)`` with onnxruntime's defaults
(only the thread count set): the baseline a user gets without qbert-edge, for comparisons.
Linux only (``/proc/self/status``); elsewhere the RSS fields are null. Never use the reference
backend's figures as speed or memory results: it exists for correctness.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from qbert_edge.errors import QbertEdgeError

FORMAT = "qbert-edge/measure"
VERSION = 1
MB = 1e6  # megabytes, as in the exporter's size report and the tables
ENGINES = ("qbert-edge", "plain-ort")
#: Seconds the child may take before the measurement is abandoned.
CHILD_TIMEOUT = 1800


@dataclass(frozen=True)
class MeasureConfig:
    """What to measure: the model, backend, input shape, repetitions and runtime options."""

    model: str
    backend: str = "auto"
    batch: int = 1
    seq_len: int = 128
    runs: int = 20
    warmup: int = 3
    threads: int | None = None
    arena: bool | None = None
    prepacking: bool | None = None
    optimization: str | None = None
    accuracy_level: int | None = None
    widen_2bit: bool | None = None
    return_memory: bool | None = None
    spill: bool | None = None
    mem_pattern: bool | None = None
    random_tables: bool | None = None
    int8_matmul: bool | None = None
    uint8_matmul: bool | None = None
    engine: str = "qbert-edge"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise QbertEdgeError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise QbertEdgeError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if self.engine not in ENGINES:
            raise QbertEdgeError(f"unknown engine {self.engine!r} (use {', '.join(ENGINES)})")

    def options(self):
        from qbert_edge.runtime.backends import RuntimeOptions

        keys = ("threads", "arena", "prepacking", "optimization", "accuracy_level", "widen_2bit", "return_memory",
                "spill", "mem_pattern", "random_tables", "int8_matmul", "uint8_matmul")
        given = {k: getattr(self, k) for k in keys}
        return RuntimeOptions(**{k: v for k, v in given.items() if v is not None})


# --------------------------------------------------------------------------- /proc


def proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile: ``percentile([1, 2, 3, 4], 50) -> 2.5``."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --------------------------------------------------------------------------- static bytes

#: (domain, op) -> {input index: kind} for the weight inputs of the low-bit ops.
_WEIGHT_INPUTS = {
    ("qbert_edge", "QMatMul"): {1: "packed_codes", 2: "scales", 3: "zero_points"},
    ("qbert_edge", "QGather"): {0: "packed_codes", 1: "scales", 2: "zero_points"},
    ("com.microsoft", "MatMulNBits"): {1: "packed_codes", 2: "scales", 3: "zero_points"},
    ("com.microsoft", "GatherBlockQuantized"): {0: "packed_codes", 2: "scales", 3: "zero_points"},
}


def static_bytes(graph) -> dict[str, int]:
    """Bytes of a loaded graph by kind; ``graph`` is the protobuf, metadata and anything else."""
    from onnx import numpy_helper

    kinds: dict[str, str] = {}
    for node in graph.model.graph.node:
        for index, kind in _WEIGHT_INPUTS.get((node.domain, node.op_type), {}).items():
            if index < len(node.input) and node.input[index]:
                kinds[node.input[index]] = kind
    out = {"packed_codes": 0, "scales": 0, "zero_points": 0, "fp32": 0, "int8": 0, "other": 0}
    arrays = dict(graph.weights)
    arrays.update({t.name: numpy_helper.to_array(t) for t in graph.model.graph.initializer})
    for name, arr in arrays.items():
        kind = kinds.get(name)
        if kind is None:
            kind = "fp32" if arr.dtype == np.float32 else "int8" if arr.dtype.itemsize == 1 else "other"
        out[kind] += int(arr.nbytes)
    out["graph"] = max(0, graph.file_bytes - sum(out.values()))
    out["total"] = graph.file_bytes
    return out


def native_4bit_bytes(graph, accuracy_level: int | None = None, widen_2bit: bool | None = None) -> int:
    """Bytes of the 4-bit copies the ``ort`` backend makes of narrower weights: N*K/2 bytes each.

    onnxruntime has no 3-bit kernel, so every 3-bit weight is widened to 4 bits. A 2-bit matmul
    is widened where onnxruntime has no native 2-bit kernel for it, by the rule the backend
    applies (:func:`qbert_edge.runtime.native.matmul_layout` / ``keeps_2bit``) with
    ``accuracy_level`` (None: as exported) and ``widen_2bit`` (None: the rule). 2-bit gathers stay
    2-bit. ``accuracy_level``/``widen_2bit`` are :class:`RuntimeOptions` fields.
    """
    from onnx import helper

    from qbert_edge.runtime.native import keeps_2bit, matmul_layout

    total = 0
    for node in graph.model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        bits = int(a.get("bits", 8))
        if node.domain == "qbert_edge" and node.op_type == "QMatMul" and bits < 4:
            if matmul_layout(bits, int(a["K"]), accuracy_level, widen_2bit)[0] == 4:
                total += int(a["N"]) * int(a["K"]) // 2
        elif node.domain == "qbert_edge" and node.op_type == "QGather" and bits == 3:
            total += int(a["rows"]) * int(a["cols"]) // 2
        elif node.op_type == "MatMulNBits" and bits == 2 and widen_2bit is not False:
            level = accuracy_level if accuracy_level is not None else int(a.get("accuracy_level", 0))
            if widen_2bit or not keeps_2bit(level, int(a["block_size"])):
                total += int(a["N"]) * int(a["K"]) // 2
    return total


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class ModelDims:
    """BERT dimensions read off a graph (``None`` where the graph does not say)."""

    hidden: int | None
    intermediate: int | None
    heads: int | None
    layers: int


def model_dims(graph) -> ModelDims:
    """Hidden size (word-embedding width), intermediate size (widest Linear), heads, layers."""
    from onnx import helper, numpy_helper

    shapes = {t.name: tuple(t.dims) for t in graph.model.graph.initializer}
    shapes.update({k: v.shape for k, v in graph.weights.items()})
    hidden = None
    linears: list[tuple[int, int]] = []
    heads = None
    layers = 0
    for node in graph.model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QGather" and "input_ids" in node.input:
            hidden = int(attrs["cols"])
        elif node.op_type in ("Gather", "GatherBlockQuantized") and "input_ids" in node.input:
            shape = shapes.get(node.input[0])
            if shape and len(shape) == 2:
                hidden = int(shape[1]) * (2 if attrs.get("bits") == 4 else 4 if attrs.get("bits") == 2 else 1)
        elif node.op_type in ("QMatMul", "MatMulNBits"):
            linears.append((int(attrs["N"]), int(attrs["K"])))
        elif node.op_type == "MatMul" and len(node.input) > 1 and len(shapes.get(node.input[1], ())) == 2:
            k, n = shapes[node.input[1]]
            linears.append((int(n), int(k)))
        elif node.op_type in ("LayerNormalization", "SkipLayerNormalization"):
            layers += 1
        if node.op_type == "Reshape" and len(node.input) > 1 and heads is None:
            const = next((t for t in graph.model.graph.initializer if t.name == node.input[1]), None)
            if const is not None:
                value = numpy_helper.to_array(const).reshape(-1)
                if value.size == 4 and value[2] > 0 and value[3] > 0:
                    heads = int(value[2])
    if hidden is None and linears:
        hidden = max(set(k for _, k in linears), key=[k for _, k in linears].count)
    intermediate = max((n for n, k in linears if k == hidden), default=None)
    return ModelDims(hidden, intermediate, heads, max(0, (layers - 1) // 2))


def activation_bytes(dims: ModelDims, batch: int, seq_len: int) -> int:
    """Estimated peak of live fp32 activations of one BERT encoder layer at a time.

    onnxruntime frees each tensor after its last use and runs one layer after the other, so the
    peak is the larger of two phases (B batch, S length, H hidden, A heads, I intermediate)::

        attention: residual + Q, K, V + context       5 * B*S*H   + scores, softmax   2 * B*A*S*S
        FFN:       residual + output                   2 * B*S*H   + up-projection, GELU temporaries 3 * B*S*I

    times 4 bytes. Unknown heads count as H/64 (BERT's head size), unknown I as 4H.
    """
    if dims.hidden is None:
        return 0
    h = dims.hidden
    a = dims.heads or max(1, h // 64)
    i = dims.intermediate or 4 * h
    bs = batch * seq_len
    attention = 5 * bs * h + 2 * batch * a * seq_len * seq_len
    ffn = 2 * bs * h + 3 * bs * i
    return 4 * max(attention, ffn)


# --------------------------------------------------------------------------- parent side


def measure(config: MeasureConfig | str, **kwargs) -> dict:
    """Measure ``config`` (or a model path plus :class:`MeasureConfig` fields) in a fresh process."""
    if not isinstance(config, MeasureConfig):
        config = MeasureConfig(model=str(config), **kwargs)
    return measure_series(config, [(config.batch, config.runs)])[0]


def measure_series(config: MeasureConfig, steps: Sequence[tuple[int, int]]) -> list[dict]:
    """Measure ``config`` at each ``(batch, runs)`` of ``steps`` in turn, all in one fresh process
    that loads the model once: one report per step, as :func:`measure` gives.

    ``VmHWM`` never falls, so a step's ``peak`` (and ``model_share``) is the high-water mark of the
    steps before it too (listed in its ``preceded_by``): give the batches in increasing order. The
    first step's figures are exactly those of a fresh process measured at that step alone; the
    later ones can hold what onnxruntime's arena kept from the smaller batches."""
    from qbert_edge.runtime import backends
    from qbert_edge.runtime.loader import load_graph

    steps = [(int(batch), int(runs)) for batch, runs in steps]
    if not steps:
        raise QbertEdgeError("measure_series: no (batch, runs) steps given")
    for batch, runs in steps:
        MeasureConfig(**{**asdict(config), "batch": batch, "runs": runs})  # the same checks as one step
    backend = backends.resolve(config.backend) if config.engine == "qbert-edge" else "onnxruntime"
    config = MeasureConfig(**{**asdict(config), "backend": backend})
    graph = load_graph(config.model)
    static = static_bytes(graph)
    dims = model_dims(graph)
    options = config.options()
    native_4bit = native_4bit_bytes(graph, options.accuracy_level, options.widen_2bit) if backend == "ort" else 0
    del graph
    child = _run_child(config, steps)
    done = [(step["batch"], len(step["latency_ms"])) for step in child["steps"]]
    if done != steps:
        raise QbertEdgeError(f"{config.model}: the measuring process ran {done}, not the steps asked for {steps}")
    host = {
        "machine": platform.machine(),
        "emulated": emulated(),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
    }
    reports = []
    for i, ((batch, runs), step) in enumerate(zip(steps, child["steps"])):
        latency = step["latency_ms"]
        reports.append({
            "format": FORMAT,
            "version": VERSION,
            "model": str(config.model),
            "engine": config.engine,
            "backend": backend,
            "batch": batch,
            "seq_len": config.seq_len,
            "runs": runs,
            "warmup": config.warmup,
            "preceded_by": [b for b, _ in steps[:i]],
            "threads": child["threads"],
            "options": child["options"],
            "static_mb": {k: round(v / MB, 3) for k, v in static.items()},
            "dims": asdict(dims),
            "activations_mb": round(activation_bytes(dims, batch, config.seq_len) / MB, 3),
            "native_4bit_mb": round(native_4bit / MB, 3),
            "rss_mb": {k: (None if v is None else round(v / MB, 2)) for k, v in step["rss"].items()},
            "load_s": round(child["load_s"], 3),
            "latency_ms": {
                "p50": round(percentile(latency, 50), 2),
                "p90": round(percentile(latency, 90), 2),
                "mean": round(float(np.mean(latency)), 2),
                "min": round(min(latency), 2),
            },
            "host": host,
        })
    return reports


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or what ``platform`` knows)."""
    try:
        for line in open("/proc/cpuinfo").read().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emulated() -> str | None:
    """The emulated CPU when this process runs under qemu user mode, else None.

    ``tools/arm`` sets ``QBERT_EDGE_EMULATED=<cpu>``; otherwise an aarch64 process whose
    ``/proc/cpuinfo`` shows an x86 ``vendor_id`` and no ``CPU implementer`` is emulated.
    Under emulation, every RSS figure includes the emulator itself.
    """
    if os.environ.get("QBERT_EDGE_EMULATED"):
        return os.environ["QBERT_EDGE_EMULATED"]
    if platform.machine() not in ("aarch64", "arm64"):
        return None
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return "qemu" if "vendor_id" in cpuinfo and "CPU implementer" not in cpuinfo else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def _run_child(config: MeasureConfig, steps: Sequence[tuple[int, int]]) -> dict:
    payload = {**asdict(config), "steps": [list(step) for step in steps]}
    cmd = [sys.executable, "-m", "qbert_edge.runtime.memory", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise QbertEdgeError(f"{config.model}: measurement took longer than {CHILD_TIMEOUT} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise QbertEdgeError(f"{config.model}: measurement failed ({err[-1] if err else 'exit code %d' % proc.returncode})")
    result = json.loads(lines[-1])
    if "error" in result:
        raise QbertEdgeError(result["error"])
    return result


# --------------------------------------------------------------------------- child side


def _import_backend(config: MeasureConfig) -> None:
    """Import everything the backend needs, so it counts in the baseline and not in the model."""
    import onnx  # noqa: F401  (the loader and the backends import these lazily)
    import onnx.helper  # noqa: F401
    import onnx.numpy_helper  # noqa: F401

    import qbert_edge.exporters.metadata  # noqa: F401
    import qbert_edge.runtime.loader  # noqa: F401

    random_feeds(["input_ids"], {}, 1, 1)  # numpy.random's modules belong to the harness, not the model
    import qbert_edge.runtime.session  # noqa: F401

    if config.backend in ("ort", "ort-custom", "onnxruntime"):
        import onnxruntime  # noqa: F401
    if config.backend == "ort":
        import qbert_edge.runtime.native  # noqa: F401
    if config.backend == "ort-custom":
        import qbert_edge.runtime.ort_custom  # noqa: F401
    if config.backend == "reference":
        import onnx.reference  # noqa: F401

        import qbert_edge.runtime.reference  # noqa: F401


def _child(config: MeasureConfig, steps: Sequence[tuple[int, int]]) -> dict:
    import gc

    _import_backend(config)
    gc.collect()
    base = proc_status()
    start = time.perf_counter()
    if config.engine == "plain-ort":
        run, limits, names, threads, options = _plain_ort(config)
    else:
        from qbert_edge.runtime.session import Session

        session = Session(config.model, backend=config.backend, options=config.options(), require_metadata=False)
        run, limits, names = session.run, session._limits, session.input_names
        threads, options = session.options.resolved_threads, asdict(session.options)
    load_s = time.perf_counter() - start
    loaded = proc_status()  # its VmHWM is the peak while loading
    out = []
    for batch, runs in steps:
        latencies = timed_runs(run, random_feeds(names, limits, batch, config.seq_len, config.seed), config.warmup, runs)
        out.append({"batch": batch, "rss": _rss(base, loaded, proc_status()), "latency_ms": latencies})
    return {"steps": out, "load_s": load_s, "threads": threads, "options": options}


def timed_runs(run, feeds, warmup: int, runs: int) -> list[float]:
    """``run(feeds)`` ``warmup`` times untimed, then ``runs`` times: the wall time of each (ms)."""
    for _ in range(warmup):
        run(feeds)
    latencies = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(feeds)
        latencies.append((time.perf_counter() - t0) * 1e3)
    return latencies


def _rss(base: dict, loaded: dict, after: dict) -> dict:
    """The RSS figures (bytes) of one step from the three ``/proc`` reads around it."""
    rss = {
        "baseline": base.get("VmRSS"),
        "after_load": loaded.get("VmRSS"),
        "after_runs": after.get("VmRSS"),
        "peak": after.get("VmHWM"),
        "peak_load": loaded.get("VmHWM"),
        "anon_baseline": base.get("RssAnon"),
        "file_baseline": base.get("RssFile"),
        "anon_after_load": loaded.get("RssAnon"),
        "file_after_load": loaded.get("RssFile"),
        "anon_after_runs": after.get("RssAnon"),
        "file_after_runs": after.get("RssFile"),
        "model_share": None,
        "load_share": None,
        "load_peak_share": None,
    }
    if rss["peak"] is not None and rss["baseline"] is not None:
        rss["model_share"] = rss["peak"] - rss["baseline"]
        rss["load_share"] = rss["after_load"] - rss["baseline"]
        rss["load_peak_share"] = rss["peak_load"] - rss["baseline"]
    return rss


def _plain_ort(config: MeasureConfig):
    import onnxruntime as ort

    from qbert_edge.runtime.backends import default_threads

    so = ort.SessionOptions()
    threads = config.threads or default_threads()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(config.model, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    limits = _plain_limits(config.model)

    def run(feeds):
        return sess.run(None, {k: v for k, v in feeds.items() if k in names})

    return run, limits, names, threads, {"onnxruntime_defaults": True}


def _plain_limits(path: str) -> dict[str, int]:
    """Vocabulary sizes of a plain model without loading it twice: the loader's graph is cheap."""
    from qbert_edge.runtime.backends import index_limits
    from qbert_edge.runtime.loader import load_graph

    graph = load_graph(path)
    limits = index_limits(graph.model, graph.weights)
    del graph
    return limits


def random_feeds(names: list[str], limits: dict[str, int], batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (within the vocabulary), all-ones attention mask, zero token types."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in names:
        if name == "attention_mask":
            feeds[name] = np.ones((batch, seq_len), np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq_len), np.int64)
        else:
            high = min(limits.get(name, 1000), 30000)
            feeds[name] = rng.integers(min(high - 1, 1000) if high > 2000 else 0, high, size=(batch, seq_len), dtype=np.int64)
    return feeds


def main(argv: list[str] | None = None) -> None:
    """Child entry point: measure the JSON config in ``argv[0]`` and print one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    payload = json.loads(argv[0])
    steps = [tuple(step) for step in payload.pop("steps")]
    config = MeasureConfig(**payload)
    try:
        result = _child(config, steps)
    except QbertEdgeError as exc:
        result = {"error": str(exc)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
