"""Bits per encoder layer from the Hessian sensitivity: a :class:`~qbert_edge.sensitivity.Sensitivity` -> a Plan.

Schemes (Q-BERT, Table 1 and 4):

- ``"B"``: every encoder Linear gets B bits (``"4"``, ``"8"``);
- ``"lo/hi"`` (``"2/3"``, ``"2/4"``): the layers with the largest Omega get ``hi`` bits, the
  rest ``lo``. How many get ``hi`` is set by exactly one of ``high_layers=K``,
  ``avg_bits=X`` (the most layers whose average bits per encoder weight stay ``<= X``) or
  ``budget_mb=M`` (the most layers whose encoder size stays ``<= M``).

Module-level choices go on top: ``attention_bits`` / ``ffn_bits`` fix the bits of the four
attention Linears / the two feed-forward Linears of every layer (Table 4b); the scheme then
decides only the other kind. ``word_bits`` / ``position_bits`` set the embedding tables
(``None`` keeps a table fp32). Every encoder Linear's ``reason`` names its layer's Omega and rank.

Size (what ``budget_mb`` counts): the encoder layers' Linear weights as the device stores
them: densely packed codes (``ceil(rows * cols * bits / 8)`` bytes per matrix) plus, per
group, a float32 scale and a uint8 zero point. Embeddings, pooler, classifier, biases and
LayerNorms are not counted (the plan's meta reports the embeddings and head separately).
1 MB = 10^6 bytes. The budget is never exceeded; a budget too small for the lowest width
everywhere is an error.

This module reads and writes no files and needs no model (the shapes come from the
sensitivity file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qbert_edge.errors import QbertEdgeError
from qbert_edge.plan import (
    ATTENTION_LINEARS,
    FFN_LINEARS,
    MAX_BITS,
    MIN_BITS,
    ModuleQuant,
    Plan,
    layer_index,
    uniform_plan,
)
from qbert_edge.sensitivity import Sensitivity

MB = 1_000_000
SCALE_BYTES, ZERO_BYTES = 4, 1
_SCHEME = re.compile(r"^\s*(\d+)\s*(?:/\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class Scheme:
    """``lo`` bits for the less sensitive layers, ``hi`` for the more sensitive (equal: uniform)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        for b in (self.lo, self.hi):
            if not MIN_BITS <= b <= MAX_BITS:
                raise QbertEdgeError(f"scheme {self}: bits must be in {MIN_BITS}..{MAX_BITS}")
        if self.lo > self.hi:
            raise QbertEdgeError(f"scheme {self}: write the lower width first (e.g. 2/3)")

    @property
    def uniform(self) -> bool:
        return self.lo == self.hi

    def __str__(self) -> str:
        return str(self.lo) if self.uniform else f"{self.lo}/{self.hi}"

    @classmethod
    def parse(cls, text: str) -> Scheme:
        """``Scheme.parse("2/3") -> Scheme(lo=2, hi=3)``; ``Scheme.parse("4") -> Scheme(lo=4, hi=4)``."""
        m = _SCHEME.match(str(text))
        if not m:
            raise QbertEdgeError(f"scheme {text!r}: expected bits B (e.g. 4) or lo/hi (e.g. 2/3)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if m.group(2) and lo == hi:
            raise QbertEdgeError(f"scheme {text!r}: lo and hi are equal; write {lo} for a uniform plan")
        return cls(lo, hi)


def module_bytes(quant: ModuleQuant) -> int:
    """Stored bytes of one quantized matrix: packed codes + a float32 scale and uint8 zero per group."""
    rows, cols = quant.shape
    return (rows * cols * quant.bits + 7) // 8 + quant.groups * (SCALE_BYTES + ZERO_BYTES)


def encoder_bytes(plan: Plan) -> int:
    """Bytes of the encoder layers' Linear weights in ``plan`` (what ``budget_mb`` counts)."""
    return sum(module_bytes(q) for name, q in plan.modules.items() if layer_index(name) is not None)


def other_bytes(plan: Plan) -> int:
    """Bytes of the quantized modules outside the encoder layers (embeddings, pooler, classifier)."""
    return sum(module_bytes(q) for name, q in plan.modules.items() if layer_index(name) is None)


def encoder_avg_bits(plan: Plan) -> float:
    """Average bits per encoder-layer weight (codes only, no scales)."""
    n = b = 0
    for name, q in plan.modules.items():
        if layer_index(name) is not None:
            k = q.shape[0] * q.shape[1]
            n += k
            b += k * q.bits
    return b / max(n, 1)


def allocate_bits(
    sens: Sensitivity,
    scheme: str | Scheme,
    *,
    high_layers: int | None = None,
    avg_bits: float | None = None,
    budget_mb: float | None = None,
    groups: int = 128,
    attention_bits: int | None = None,
    ffn_bits: int | None = None,
    word_bits: int | None = 8,
    position_bits: int | None = 8,
    token_type_bits: int | None = 8,
    head_bits: int | None = 8,
    symmetric: bool = False,
    clip: str = "minmax",
    source: str = "",
) -> Plan:
    """A plan for the model ``sens`` describes (see the module docstring for the rules)."""
    scheme = scheme if isinstance(scheme, Scheme) else Scheme.parse(scheme)
    targets = [x for x in (high_layers, avg_bits, budget_mb) if x is not None]
    if len(targets) > 1:
        raise QbertEdgeError("give at most one of high_layers, avg_bits and budget_mb")
    for label, b in (("attention", attention_bits), ("ffn", ffn_bits)):
        if b is not None and not MIN_BITS <= b <= MAX_BITS:
            raise QbertEdgeError(f"{label} bits {b} out of range {MIN_BITS}..{MAX_BITS}")
    if attention_bits is not None and ffn_bits is not None and not scheme.uniform:
        raise QbertEdgeError("attention and ffn bits are both fixed: the mixed-precision scheme has nothing left to decide")
    analysed = {l.layer for l in sens.layers}
    missing = sorted(set(range(sens.num_layers)) - analysed)
    if missing:
        raise QbertEdgeError(f"{source or 'sensitivity'}: layers {missing} were not analysed; allocation needs every encoder layer")
    if not sens.shapes:
        raise QbertEdgeError(f"{source or 'sensitivity'}: no module shapes recorded; re-run analyze")
    if groups < 1:
        raise QbertEdgeError(f"groups must be at least 1, got {groups}")

    ranking = sens.ranking()
    n = len(ranking)
    fixed = {**{s: attention_bits for s in ATTENTION_LINEARS if attention_bits is not None},
             **{s: ffn_bits for s in FFN_LINEARS if ffn_bits is not None}}
    embedding_bits = {"word": word_bits, "position": position_bits, "token_type": token_type_bits}

    def build(k: int) -> Plan:
        top = set(ranking[:k])
        layer_bits = {i: (scheme.hi if i in top else scheme.lo) for i in ranking}
        return _plan(sens, layer_bits, fixed, k, scheme, groups, embedding_bits, head_bits, symmetric, clip)

    if scheme.uniform:
        if high_layers is not None:
            raise QbertEdgeError(f"scheme {scheme} is uniform: high_layers applies to a lo/hi scheme such as 2/3")
        plan = build(0)
        _check_targets(plan, avg_bits, budget_mb, scheme)
        return _with_meta(plan, sens, scheme, 0, avg_bits, budget_mb, source)

    if high_layers is not None:
        if not 0 <= high_layers <= n:
            raise QbertEdgeError(f"high_layers={high_layers} out of range 0..{n}")
        k = high_layers
    elif avg_bits is None and budget_mb is None:
        raise QbertEdgeError(f"scheme {scheme}: say how many layers get {scheme.hi} bits (high_layers, avg_bits or budget_mb)")
    else:
        k = -1
        for cand in range(n + 1):
            if _fits(build(cand), avg_bits, budget_mb):
                k = cand
        if k < 0:
            _check_targets(build(0), avg_bits, budget_mb, scheme)  # raises with the numbers
    plan = build(k)
    return _with_meta(plan, sens, scheme, k, avg_bits, budget_mb, source)


def _plan(sens, layer_bits, fixed, k, scheme, groups, embedding_bits, head_bits, symmetric, clip) -> Plan:
    reasons = {}
    for name in sens.shapes:
        i = layer_index(name)
        if i is None:
            continue
        l = sens.layer(i)
        suffix = name.split(".", 3)[3]
        why = f"layer {i}: rank {sens.rank(i)} of {sens.num_layers} by Hessian (omega={l.omega:.4g})"
        if suffix in fixed:
            why += f"; {'attention' if suffix in ATTENTION_LINEARS else 'ffn'} bits fixed at {fixed[suffix]}"
        elif scheme.uniform:
            why += f"; uniform {scheme.lo} bits"
        else:
            why += f"; top {k} layers get {scheme.hi} bits, the rest {scheme.lo}"
        reasons[name] = why
    base = uniform_plan(
        sens.shapes,
        scheme.lo,
        groups,
        symmetric=symmetric,
        clip=clip,
        embedding_bits=embedding_bits,
        head_bits=head_bits,
        layer_bits=layer_bits,
        reasons=reasons,
    )
    if not fixed:
        return base
    modules = dict(base.modules)
    for name, q in modules.items():
        i = layer_index(name)
        if i is not None and name.split(".", 3)[3] in fixed:
            modules[name] = replace(q, bits=fixed[name.split(".", 3)[3]])
    return Plan(modules=modules, activation_bits=base.activation_bits, meta=base.meta)


def _fits(plan: Plan, avg_bits: float | None, budget_mb: float | None) -> bool:
    if avg_bits is not None and encoder_avg_bits(plan) > avg_bits + 1e-9:
        return False
    return budget_mb is None or encoder_bytes(plan) <= budget_mb * MB


def _check_targets(plan: Plan, avg_bits: float | None, budget_mb: float | None, scheme: Scheme) -> None:
    if avg_bits is not None and encoder_avg_bits(plan) > avg_bits + 1e-9:
        raise QbertEdgeError(
            f"average of {avg_bits:g} bits is impossible with scheme {scheme}: "
            f"the smallest plan averages {encoder_avg_bits(plan):.3g} bits per encoder weight"
        )
    if budget_mb is not None and encoder_bytes(plan) > budget_mb * MB:
        raise QbertEdgeError(
            f"budget of {budget_mb:g} MB is too small for scheme {scheme}: the smallest plan's encoder "
            f"weights take {encoder_bytes(plan) / MB:.4g} MB (codes + scales + zero points)"
        )


def _with_meta(plan: Plan, sens: Sensitivity, scheme: Scheme, k: int, avg_bits, budget_mb, source: str) -> Plan:
    meta = {
        "made_by": "qbert-edge allocate",
        "sensitivity": source or None,
        "model": sens.model,
        "scheme": str(scheme),
        "high_layers": k if not scheme.uniform else None,
        "ranking": sens.ranking(),
        "omega": {str(l.layer): l.omega for l in sens.layers},
        "target": {"avg_bits": avg_bits, "budget_mb": budget_mb},
        "encoder_bytes": encoder_bytes(plan),
        "encoder_mb": encoder_bytes(plan) / MB,
        "encoder_avg_bits": encoder_avg_bits(plan),
        "other_quantized_bytes": other_bytes(plan),
        "size_counts": "encoder-layer Linear weights: packed codes + float32 scale + uint8 zero per group; 1 MB = 1e6 bytes",
    }
    if sens.warnings:
        meta["sensitivity_warnings"] = list(sens.warnings)
    return Plan(modules=plan.modules, activation_bits=plan.activation_bits, meta=meta)

