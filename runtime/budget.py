"""The DRAM budget of a qbert-edge model, in one place: what the CI gate and ``measure`` check.

>>> round(budget_mb(file_mb=15.3, activations_mb=2.6), 1)
57.6

**Derivation.** The model's share of DRAM is the peak RSS of a process running it minus the RSS
of a process that only imported the runtime (:mod:`qbert_edge.runtime.memory`). It holds:

1. the weights, once: the file is memory-mapped and onnxruntime maps the same bytes as external
   data (:mod:`~qbert_edge.runtime.loader`), so every touched page counts one time -> 1.0 x file;
2. what loading makes besides, bounded by half the file (:data:`FILE_FACTOR` = 1.5 in all): 3-bit
   codes widened to 4 bits for ``MatMulNBits`` (4/3 of the 3-bit layers), per-block scales and
   zero points, ``MatMulNBits``' prepacked copies, the fp32 tile the custom-op kernel dequantizes,
   the stripped graph and metadata (tokenizer);
3. the activations of the batch and length: ``memory.activation_bytes``, the larger of the
   attention and FFN phases of one layer (what the issue's target adds to 1.5 x the file);
4. onnxruntime's fixed cost, independent of the model: the pages of its shared library that a
   session first touches and its per-session structures and thread pool. Measured on a 5 KB
   two-op model (``tests/runtime/test_memory.py``): 17.5 MB (``ort``), 19.1 MB (``ort-custom``),
   x86-64, onnxruntime 1.32 -> :data:`RUNTIME_OVERHEAD_MB` with headroom for the kernel
   workspaces (``MatMulNBits`` dequantizes a block of B, the custom op a tile of W).

An fp32 copy of the weights (8 to 16 x the packed size at 2-4 bits) breaks the budget at once;
so does holding the parsed protobuf next to the backend's tensors (1 x file more).
The ``reference`` backend is not held to it: ``onnx.reference`` keeps every intermediate tensor
of a run alive until the run ends, so its activations are the graph's sum, not one layer's peak.
"""

from __future__ import annotations

#: Weights once, plus at most half the file for what loading adds (item 1 and 2 above).
FILE_FACTOR = 1.5
#: onnxruntime's model-independent cost, MB (item 4 above).
RUNTIME_OVERHEAD_MB = 32.0
#: Backends held to the budget.
GATED_BACKENDS = ("ort", "ort-custom")


def budget_mb(file_mb: float, activations_mb: float) -> float:
    """DRAM budget of a model's share of peak RSS, MB: ``1.5 x file + activations + overhead``."""
    return FILE_FACTOR * file_mb + activations_mb + RUNTIME_OVERHEAD_MB


def check(report: dict) -> tuple[bool, str]:
    """Does a ``qbert-edge/measure`` report stay within the budget? ``(ok, one-line summary)``."""
    limit = budget_mb(report["static_mb"]["total"], report["activations_mb"])
    share = report["rss_mb"]["model_share"]
    if share is None:
        return True, f"{report['backend']}: RSS not measurable on this platform; budget {limit:.1f} MB"
    ok = share <= limit
    return ok, (f"{report['backend']}: model share {share:.1f} MB {'<=' if ok else '>'} budget {limit:.1f} MB "
                f"(1.5 x {report['static_mb']['total']:.1f} MB file + {report['activations_mb']:.1f} MB activations "
                f"+ {RUNTIME_OVERHEAD_MB:.0f} MB onnxruntime)")
