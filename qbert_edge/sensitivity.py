"""The sensitivity file (``qbert-edge/sensitivity`` v1) and the warnings a user needs from it.

A :class:`Sensitivity` holds, for every analysed encoder layer, the top Hessian eigenvalue on
each data subset; from them ``mean``, ``std`` (population, ddof=0) and
``omega = |mean| + std`` (Q-BERT's Omega), and the rank by Omega (1 = most sensitive).
It also records the model and data it came from, the analysis settings, timings, the
quantizable module shapes (so ``allocate`` needs no model) and the warnings of
:func:`diagnose`. Saved as JSON::

    {"format": "qbert-edge/sensitivity", "version": 1, "model": "minilm-rt", "data": "rt:train",
     "num_layers": 6, "params": "weight of the 6 Linears ...",
     "settings": {"subsets": 10, "fraction": 0.1, ...},
     "layers": [{"layer": 0, "eigenvalues": [...], "converged": [...], "iterations": [...],
                 "mean": 1.9, "std": 0.2, "omega": 2.1, "rank": 4, ...}, ...],
     "shapes": {"encoder.layer.0.attention.self.query": [384, 384], ...},
     "warnings": [...], "timings": {...}, "landscape": null}

``mean``, ``std``, ``omega`` and ``rank`` are written for people; on load they are
recomputed from the eigenvalues. This module computes nothing from a model (that is
:mod:`qbert_edge.hessian`) and imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from qbert_edge.errors import QbertEdgeError
from qbert_edge.fileio import read_json, write_json

SENSITIVITY_FORMAT = "qbert-edge/sensitivity"
SENSITIVITY_VERSION = 1

WILD_VARIATION = 0.5  # std / |mean| above this: the layer's rank is not to be trusted
NOISE_SIGMAS = 2.0  # a negative mean this many standard errors below 0 is not noise


@dataclass(frozen=True)
class LayerSensitivity:
    """The top eigenvalue of one layer's Hessian block on each subset."""

    layer: int
    eigenvalues: tuple[float, ...]
    converged: tuple[bool, ...]
    iterations: tuple[int, ...]
    modules: tuple[str, ...] = ()
    parameters: int = 0
    residuals: tuple[float, ...] = ()  # |H v - lambda v| / |lambda| of each result; () if not recorded

    def __post_init__(self) -> None:
        for name in ("eigenvalues", "converged", "iterations", "modules", "residuals"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.eigenvalues)
        if n == 0:
            raise QbertEdgeError(f"sensitivity: layer {self.layer} has no eigenvalues")
        if len(self.converged) != n or len(self.iterations) != n or len(self.residuals) not in (0, n):
            raise QbertEdgeError(
                f"sensitivity: layer {self.layer}: eigenvalues, converged, iterations and residuals differ in length"
            )
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in self.eigenvalues):
            raise QbertEdgeError(f"sensitivity: layer {self.layer}: eigenvalues must be finite numbers")

    @property
    def mean(self) -> float:
        return sum(self.eigenvalues) / len(self.eigenvalues)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0): ``std`` of ``(1, 3) -> 1.0``."""
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.eigenvalues) / len(self.eigenvalues))

    @property
    def omega(self) -> float:
        """Q-BERT's Omega: ``|mean| + std``."""
        return abs(self.mean) + self.std

    def to_dict(self, rank: int | None = None) -> dict:
        return {
            "layer": self.layer,
            "modules": list(self.modules),
            "parameters": self.parameters,
            "eigenvalues": list(self.eigenvalues),
            "converged": list(self.converged),
            "iterations": list(self.iterations),
            **({"residuals": list(self.residuals)} if self.residuals else {}),
            "dominant_negative": [x < 0 for x in self.eigenvalues],
            "mean": self.mean,
            "std": self.std,
            "omega": self.omega,
            "rank": rank,
        }


@dataclass(frozen=True)
class Landscape:
    """Mean loss on a square grid around a layer's weights, along its top two eigenvectors.

    ``losses[a][b]`` is the loss at ``theta + steps[a] * u1 + steps[b] * u2``.
    """

    layer: int
    eigenvalues: tuple[float, float]
    radius: float
    steps: tuple[float, ...]
    losses: tuple[tuple[float, ...], ...]
    examples: int = 0

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "eigenvalues": list(self.eigenvalues),
            "radius": self.radius,
            "steps": list(self.steps),
            "losses": [list(r) for r in self.losses],
            "examples": self.examples,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Landscape:
        return cls(
            layer=int(d["layer"]),
            eigenvalues=tuple(d["eigenvalues"]),
            radius=float(d["radius"]),
            steps=tuple(d["steps"]),
            losses=tuple(tuple(r) for r in d["losses"]),
            examples=int(d.get("examples", 0)),
        )


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivity of one model on one data set, with how it was measured."""

    model: str
    data: str
    num_layers: int
    layers: tuple[LayerSensitivity, ...]
    shapes: Mapping[str, tuple[int, int]]
    params: str = ""
    settings: Mapping[str, object] = field(default_factory=dict)
    timings: Mapping[str, object] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    landscape: Landscape | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(self.layers, key=lambda l: l.layer)))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        object.__setattr__(self, "shapes", MappingProxyType({k: tuple(int(x) for x in v) for k, v in self.shapes.items()}))
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "timings", MappingProxyType(dict(self.timings)))
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))
        if not self.layers:
            raise QbertEdgeError("sensitivity: no layers")
        seen = [l.layer for l in self.layers]
        if len(set(seen)) != len(seen):
            raise QbertEdgeError(f"sensitivity: layers {seen} repeat a layer")
        if any(not 0 <= i < self.num_layers for i in seen):
            raise QbertEdgeError(f"sensitivity: layers {seen} out of range for {self.num_layers} encoder layers")
        if len({len(l.eigenvalues) for l in self.layers}) != 1:
            raise QbertEdgeError("sensitivity: layers have different numbers of subsets")

    @property
    def subsets(self) -> int:
        return len(self.layers[0].eigenvalues)

    def layer(self, i: int) -> LayerSensitivity:
        for l in self.layers:
            if l.layer == i:
                return l
        raise QbertEdgeError(f"sensitivity: layer {i} was not analysed (have {[l.layer for l in self.layers]})")

    def ranking(self) -> list[int]:
        """Layers from most to least sensitive (largest Omega first; ties: lower layer first)."""
        return [l.layer for l in sorted(self.layers, key=lambda l: (-l.omega, l.layer))]

    def rank(self, i: int) -> int:
        """1-based rank of layer ``i`` by Omega."""
        return self.ranking().index(i) + 1

    def with_warnings(self, warnings) -> Sensitivity:
        return replace(self, warnings=tuple(warnings))

    def with_landscape(self, landscape: Landscape | None) -> Sensitivity:
        return replace(self, landscape=landscape)

    def to_dict(self) -> dict:
        return {
            "format": SENSITIVITY_FORMAT,
            "version": SENSITIVITY_VERSION,
            "model": self.model,
            "data": self.data,
            "num_layers": self.num_layers,
            "params": self.params,
            "statistics": "per layer over subsets: mean, population std (ddof=0), omega = |mean| + std; rank 1 = largest omega",
            "settings": dict(self.settings),
            "layers": [l.to_dict(self.rank(l.layer)) for l in self.layers],
            "ranking": self.ranking(),
            "warnings": list(self.warnings),
            "timings": dict(self.timings),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "landscape": None if self.landscape is None else self.landscape.to_dict(),
            **({"extra": dict(self.extra)} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "sensitivity") -> Sensitivity:
        try:
            layers = tuple(
                LayerSensitivity(
                    layer=int(d["layer"]),
                    eigenvalues=tuple(float(x) for x in d["eigenvalues"]),
                    converged=tuple(bool(x) for x in d["converged"]),
                    iterations=tuple(int(x) for x in d["iterations"]),
                    modules=tuple(d.get("modules", ())),
                    parameters=int(d.get("parameters", 0)),
                    residuals=tuple(float(x) for x in d.get("residuals", ())),
                )
                for d in data["layers"]
            )
            land = data.get("landscape")
            return cls(
                model=str(data["model"]),
                data=str(data["data"]),
                num_layers=int(data["num_layers"]),
                layers=layers,
                shapes={k: tuple(v) for k, v in data["shapes"].items()},
                params=str(data.get("params", "")),
                settings=data.get("settings", {}),
                timings=data.get("timings", {}),
                warnings=tuple(data.get("warnings", ())),
                landscape=None if land is None else Landscape.from_dict(land),
                extra=data.get("extra", {}),
            )
        except QbertEdgeError as exc:
            raise QbertEdgeError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise QbertEdgeError(f"{source}: malformed sensitivity file ({type(exc).__name__}: {exc})") from None

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> Sensitivity:
        return cls.from_dict(read_json(path, SENSITIVITY_FORMAT, SENSITIVITY_VERSION), source=str(path))


def diagnose(sens: Sensitivity) -> list[str]:
    """The warnings a user needs: not at a minimum, wild variation, no convergence.

    - *not at a minimum*: a layer whose mean eigenvalue is negative by more than
      ``NOISE_SIGMAS`` standard errors (``std / sqrt(K)``; with one subset, any negative value);
    - *negative dominant eigenvalue*: on some subsets (but not beyond noise overall);
    - *wild variation*: ``std > WILD_VARIATION * |mean|`` over at least two subsets;
    - *not converged*: the eigen-solver hit its iteration cap.

    >>> l = LayerSensitivity(0, (-5.0, -5.2), (True, True), (9, 8))
    >>> diagnose(Sensitivity("m", "d", 1, (l,), {}))[0][:40]
    'model m is not at a minimum of the loss:'
    """
    k = sens.subsets
    out: list[str] = []
    below = []
    for l in sens.layers:
        se = l.std / math.sqrt(k) if k > 1 else 0.0
        if l.mean < 0 and (k == 1 or -l.mean > NOISE_SIGMAS * se):
            below.append(f"layer {l.layer} (mean {l.mean:.4g}, std {l.std:.3g})")
    if below:
        out.append(
            f"model {sens.model} is not at a minimum of the loss: large negative curvature dominates "
            f"{', '.join(below)}; Omega uses |mean|, but fine-tune the model further before trusting a low-bit plan"
        )
    for l in sens.layers:
        neg = sum(x < 0 for x in l.eigenvalues)
        if neg and not any(f"layer {l.layer} (" in b for b in below):
            out.append(
                f"layer {l.layer}: the dominant eigenvalue is negative on {neg} of {k} subsets "
                f"(min {min(l.eigenvalues):.4g}): the loss is not convex there"
            )
    for l in sens.layers:
        if k > 1 and l.std > WILD_VARIATION * abs(l.mean):
            out.append(
                f"layer {l.layer}: eigenvalue varies widely across subsets (mean {l.mean:.4g}, std {l.std:.3g}); "
                "its rank is uncertain: use more or larger subsets"
            )
    max_iter = sens.settings.get("max_iter")
    tol = sens.settings.get("tol")
    for l in sens.layers:
        bad = sum(not c for c in l.converged)
        if bad:
            out.append(
                f"layer {l.layer}: the eigen-solver did not converge on {bad} of {k} subsets "
                f"(max_iter={max_iter}, tol={tol}); raise --max-iter or --tol"
            )
    return out
