"""The DRAM budget of a qbert-edge model, in one place: what the CI gate checks.

>>> round(budget_mb("ort-custom", file_mb=16.0, activations_mb=2.8, runtime_mb=15.0), 1)
48.4

**Derivation.** The model's share of DRAM is the peak RSS of a process running it minus the RSS
of a process that only imported the runtime (:mod:`qbert_edge.runtime.memory`)::

    budget = 1.5 x file + activations + runtime + backend's own copy

1. The weights, once: the file is memory-mapped and onnxruntime maps the same bytes as external
   data (:mod:`~qbert_edge.runtime.loader`), so every touched page counts one time: 1.0 x file.
2. What loading makes besides, at most half the file (:data:`FILE_FACTOR` = 1.5 in all): per-block
   scales and zero points, the stripped graph and its metadata (the tokenizer), rounding.
3. The activations of the batch and length: ``memory.activation_bytes``, the larger of the
   attention and FFN phases of one layer. Items 1-3 are the issue's target, "1.5 x the packed
   file size plus the activations".
4. The runtime's own cost, which does not depend on the model's size: the pages of onnxruntime's
   (and NumPy's BLAS) shared libraries that a session first touches, per-session structures,
   thread pools. Measured, not guessed: ``runtime_mb`` is the model share of a tiny BERT
   (2 layers, hidden 32, same plan and exporter, so the same kernels run) measured the same way,
   same batch and length, same machine: 14-16 MB on x86-64 with onnxruntime 1.32. It must stay
   below :data:`MAX_RUNTIME_MB`. It dominates for a 16 MB MiniLM, not for a 50 MB BERT-base.
5. What each backend holds by design (:func:`backend_extra_mb`):
   ``ort``: onnxruntime has no 3-bit kernel, so every 3-bit matrix is held at 4 bits (widened,
   prepacked): N*K/2 bytes each; a 2-bit matrix is held at 4 bits too where onnxruntime has no
   native 2-bit kernel for it (any ``accuracy_level`` but 4, or a block above 128: the rule of
   ``native.keeps_2bit``), and otherwise stays 2-bit and costs nothing here. ``native_4bit_mb`` of
   the report is that sum for the options measured (``memory.native_4bit_bytes``);
   ``ort-custom``: the NumPy kernel's workspace for one tile of :data:`kernels.TILE_ELEMENTS`
   values: fp32 tile (4 B), 64-bit unpacking words and their masked copy (8 + 8 B), codes (1 B)
   and their fp32 conversion (4 B) per value: :data:`TILE_BYTES_PER_VALUE`.

An fp32 copy of the weights (8 to 16 x the packed size at 2-4 bits) breaks the budget at once; so
does holding the parsed protobuf next to the backend's tensors (1 x file more). The ``reference``
backend is not held to it: ``onnx.reference`` keeps every intermediate tensor of a run alive until
the run ends, so its activations are the graph's sum, not one layer's peak.
"""

from __future__ import annotations

#: Weights once, plus at most half the file for what loading adds (items 1 and 2 above).
FILE_FACTOR = 1.5
#: Ceiling on the runtime's own, model-independent cost, MB (item 4 above).
MAX_RUNTIME_MB = 40.0
#: Bytes of workspace per value of the custom-op kernel's tile (item 5 above).
TILE_BYTES_PER_VALUE = 4 + 8 + 8 + 1 + 4
#: Backends held to the budget.
GATED_BACKENDS = ("ort", "ort-custom")


def backend_extra_mb(backend: str, native_4bit_mb: float = 0.0) -> float:
    """What ``backend`` holds by design beyond the file (item 5 above), MB."""
    if backend == "ort":
        return native_4bit_mb
    if backend == "ort-custom":
        from qbert_edge.runtime.kernels import TILE_ELEMENTS

        return TILE_ELEMENTS * TILE_BYTES_PER_VALUE / 1e6
    return 0.0


def budget_mb(backend: str, file_mb: float, activations_mb: float, runtime_mb: float, native_4bit_mb: float = 0.0) -> float:
    """DRAM budget of a model's share of peak RSS, MB (see the module docstring)."""
    return FILE_FACTOR * file_mb + activations_mb + runtime_mb + backend_extra_mb(backend, native_4bit_mb)


def check(report: dict, runtime_mb: float) -> tuple[bool, str]:
    """Is a ``qbert-edge/measure`` report within the budget? ``(ok, one-line summary)``."""
    backend = report["backend"]
    file_mb, act_mb = report["static_mb"]["total"], report["activations_mb"]
    extra = backend_extra_mb(backend, report.get("native_4bit_mb", 0.0))
    limit = budget_mb(backend, file_mb, act_mb, runtime_mb, report.get("native_4bit_mb", 0.0))
    share = report["rss_mb"]["model_share"]
    if share is None:
        return True, f"{backend}: RSS not measurable on this platform; budget {limit:.1f} MB"
    ok = share <= limit
    return ok, (f"{backend}: model share {share:.1f} MB {'<=' if ok else '>'} budget {limit:.1f} MB = "
                f"{FILE_FACTOR} x {file_mb:.1f} MB file + {act_mb:.1f} MB activations + {runtime_mb:.1f} MB runtime "
                f"+ {extra:.1f} MB {backend}")
