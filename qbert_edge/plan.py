"""The quantization plan: which bits, how many groups, for every quantizable module.

The plan is data, not code. The same plan drives fake quantization during training
(:mod:`qbert_edge.qmodel`) and the real packing at export, so training simulates exactly
the numbers the device computes. It is saved as versioned JSON (``qbert-edge/plan`` v2)::

    {"format": "qbert-edge/plan", "version": 2, "activation_bits": 8,
     "modules": {"encoder.layer.0.attention.self.query":
                     {"bits": 3, "groups": 128, "symmetric": false, "clip": "mse", "shape": [384, 384],
                      "reason": "rank 1 of 6 by Hessian (omega=12.3)"}, ...}}

Version 2 added ``clip`` (how a group's range is chosen); a v1 plan reads as ``clip="minmax"``.

Module names are relative to the encoder (``bert.`` is dropped for a classifier):
``embeddings.{word,position,token_type}_embeddings``, ``encoder.layer.N.attention.self.{query,key,value}``,
``encoder.layer.N.attention.output.dense``, ``encoder.layer.N.intermediate.dense``,
``encoder.layer.N.output.dense``, ``pooler.dense`` and ``classifier``.
A module missing from the plan stays fp32.

Groups are contiguous blocks of *output rows* of the ``[out, in]`` weight (for an
embedding table, of its ``[vocab, hidden]`` rows): 12 groups on a 12-head query matrix is one
group per head; 128 groups on a 768-row matrix is 6 rows each.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Mapping

from qbert_edge.errors import QbertEdgeError
from qbert_edge.fileio import read_json, write_json

PLAN_FORMAT = "qbert-edge/plan"
PLAN_VERSION = 2
MIN_BITS, MAX_BITS = 2, 8
#: how a group's range is chosen: its min/max, or the min/max narrowed to the least squared error
CLIPS = ("minmax", "mse")

EMBEDDINGS = {
    "word": "embeddings.word_embeddings",
    "position": "embeddings.position_embeddings",
    "token_type": "embeddings.token_type_embeddings",
}
LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
ATTENTION_LINEARS = LAYER_LINEARS[:4]
FFN_LINEARS = LAYER_LINEARS[4:]
HEAD_LINEARS = ("pooler.dense", "classifier")

_NAME = re.compile(
    r"^(?:embeddings\.(?:word|position|token_type)_embeddings"
    r"|encoder\.layer\.\d+\.(?:" + "|".join(re.escape(n) for n in LAYER_LINEARS) + r")"
    r"|pooler\.dense|classifier)$"
)


def is_embedding(name: str) -> bool:
    """True for the three embedding tables: ``is_embedding("embeddings.word_embeddings") -> True``."""
    return name.startswith("embeddings.")


def layer_index(name: str) -> int | None:
    """Encoder layer of a module name: ``layer_index("encoder.layer.3.output.dense") -> 3``."""
    m = re.match(r"^encoder\.layer\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ModuleQuant:
    """How one weight is quantized: ``bits`` per code, ``groups`` blocks of output rows.

    ``symmetric`` fixes the zero point at ``2**(bits-1)``; asymmetric (the default) takes the
    group's min/max range. ``clip="mse"`` narrows each group's range by the factor with the
    least squared error (:func:`qbert_edge.quant.mse_shrink`, chosen once from the weights the
    quantization starts from); ``"minmax"`` keeps the full range. ``shape`` is the weight's
    ``(rows, cols)`` (``[out, in]`` for a Linear, ``[vocab, hidden]`` for an embedding);
    ``reason`` says why it got these bits.
    """

    bits: int
    groups: int
    shape: tuple[int, int]
    symmetric: bool = False
    reason: str = ""
    clip: str = "minmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def rows_per_group(self) -> int:
        return self.shape[0] // self.groups

    @property
    def packed_bytes(self) -> int:
        """Bytes on the device: packed codes + one fp32 scale and one uint8 zero point per group."""
        rows, cols = self.shape
        return (rows * cols * self.bits + 7) // 8 + 5 * self.groups

    def validate(self, name: str) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise QbertEdgeError(f"plan: {name}: bits={self.bits!r} is out of range {MIN_BITS}..{MAX_BITS}")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise QbertEdgeError(f"plan: {name}: shape {self.shape} is not a 2-D weight shape")
        rows = self.shape[0]
        if not isinstance(self.groups, int) or self.groups < 1 or rows % self.groups:
            raise QbertEdgeError(
                f"plan: {name}: groups={self.groups!r} does not divide its {rows} rows"
            )
        if self.clip not in CLIPS:
            raise QbertEdgeError(f"plan: {name}: clip={self.clip!r} is not one of {', '.join(CLIPS)}")


@dataclass(frozen=True)
class Plan:
    """Bits for every quantized module, plus the activation bits (``None``: fp32 activations)."""

    modules: Mapping[str, ModuleQuant]
    activation_bits: int | None = 8
    meta: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, quant in self.modules.items():
            if not _NAME.match(name):
                raise QbertEdgeError(f"plan: unknown module name {name!r}")
            if not isinstance(quant, ModuleQuant):
                raise QbertEdgeError(f"plan: {name}: expected a ModuleQuant, got {type(quant).__name__}")
            quant.validate(name)
        if self.activation_bits is not None and self.activation_bits != 8:
            raise QbertEdgeError(
                f"plan: activation_bits={self.activation_bits!r}: only 8-bit (or null, fp32) activations are supported"
            )
        object.__setattr__(self, "modules", MappingProxyType(dict(sorted(self.modules.items(), key=_module_order))))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def check_model(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Check the plan against a model's quantizable modules (name -> weight shape)."""
        for name, quant in self.modules.items():
            if name not in shapes:
                raise QbertEdgeError(f"plan: module {name!r} does not exist in this model")
            if tuple(shapes[name]) != quant.shape:
                raise QbertEdgeError(
                    f"plan: {name}: plan says shape {list(quant.shape)}, the model has {list(shapes[name])}"
                )

    def weight_bits(self, shapes: Mapping[str, tuple[int, int]], include_embeddings: bool = False) -> float:
        """Average bits per weight over ``shapes`` (fp32 modules count 32)."""
        total = bits = 0
        for name, (rows, cols) in shapes.items():
            if is_embedding(name) and not include_embeddings:
                continue
            n = rows * cols
            total += n
            bits += n * (self.modules[name].bits if name in self.modules else 32)
        return bits / max(total, 1)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "activation_bits": self.activation_bits,
            "modules": {
                name: {**asdict(q), "shape": list(q.shape)} for name, q in self.modules.items()
            },
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "Plan":
        try:
            modules = {name: ModuleQuant(**{**q, "shape": tuple(q["shape"])}) for name, q in data["modules"].items()}
            return cls(modules=modules, activation_bits=data.get("activation_bits", 8), meta=data.get("meta", {}))
        except (KeyError, TypeError, AttributeError) as exc:
            raise QbertEdgeError(f"{source}: malformed plan ({exc})") from None

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> "Plan":
        data = read_json(path, PLAN_FORMAT, PLAN_VERSION)
        try:
            return cls.from_dict(data, source=str(path))
        except QbertEdgeError as exc:
            msg = str(exc)
            raise QbertEdgeError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def _module_order(item: tuple[str, object]) -> tuple:
    name = item[0]
    layer = layer_index(name)
    if is_embedding(name):
        return (0, 0, name)
    if layer is not None:
        return (1, layer, LAYER_LINEARS.index(name.split(".", 3)[3]))
    return (2, 0, name)


def groups_for(rows: int, groups: int) -> int:
    """The largest group count ``<= groups`` that divides ``rows``: ``groups_for(2, 128) -> 2``."""
    g = max(1, min(groups, rows))
    while rows % g:
        g -= 1
    return g


def uniform_plan(
    shapes: Mapping[str, tuple[int, int]],
    bits: int,
    groups: int = 128,
    *,
    symmetric: bool = False,
    clip: str = "minmax",
    embedding_bits: Mapping[str, int | None] | None = None,
    head_bits: int | None = 8,
    activation_bits: int | None = 8,
    layer_bits: Mapping[int, int] | None = None,
    module_bits: Mapping[str, int] | None = None,
    reasons: Mapping[str, str] | None = None,
    meta: Mapping[str, object] | None = None,
) -> Plan:
    """Build a plan for a model's quantizable ``shapes``.

    Encoder Linears get ``bits`` (or ``layer_bits[i]`` for layer i, or ``module_bits[suffix]``
    for a Linear kind such as ``"intermediate.dense"``; the most specific wins) with up to
    ``groups`` groups; embeddings get ``embedding_bits`` (default 8 for each table, one group per
    row; ``None`` keeps a table fp32); pooler and classifier get ``head_bits``. Every module
    gets ``symmetric`` and ``clip``.
    """
    embedding_bits = {"word": 8, "position": 8, "token_type": 8} if embedding_bits is None else embedding_bits
    modules: dict[str, ModuleQuant] = {}
    for name, shape in shapes.items():
        rows = shape[0]
        if is_embedding(name):
            kind = next(k for k, v in EMBEDDINGS.items() if v == name)
            b, g = embedding_bits.get(kind), rows
        elif name in HEAD_LINEARS:
            b, g = head_bits, groups_for(rows, groups)
        else:
            layer = layer_index(name)
            suffix = name.split(".", 3)[3]
            b = bits
            if module_bits and suffix in module_bits:
                b = module_bits[suffix]
            if layer_bits and layer in layer_bits:
                b = layer_bits[layer]
            g = groups_for(rows, groups)
        if b is None:
            continue
        reason = (reasons or {}).get(name, "")
        modules[name] = ModuleQuant(bits=b, groups=g, shape=tuple(shape), symmetric=symmetric, reason=reason, clip=clip)
    return Plan(modules=modules, activation_bits=activation_bits, meta=meta or {})
