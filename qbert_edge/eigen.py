"""Dominant eigenpairs of symmetric operators given only as products ``v -> A v``, block by block.

An *operator* takes ``{block: v_block}`` (each ``v_block`` a list of tensors, e.g. one layer's
weights) and returns ``{block: A_block v_block}`` for exactly those blocks; the blocks are
independent symmetric matrices solved side by side, so one expensive call (a pass over the data)
serves every block still running, and a block that has converged is no longer passed in.

Two solvers, same results type (:class:`EigenResult`):

- :func:`lanczos` (the default of ``qbert-edge analyze``): a Krylov basis per block with full
  reorthogonalisation and thick restart; the estimate is the Ritz value of largest magnitude.
  It stops when that Ritz pair ``(theta, y)`` has a relative residual
  ``|A y - theta y| / |theta| <= sqrt(tol)``. A residual ``r`` puts an eigenvalue within ``r`` of
  ``theta``, and within ``r^2 / delta`` when the rest of the spectrum is ``delta`` away, so the
  eigenvalue error is about ``tol * |theta| * (|theta| / delta)``: ``tol`` relative for a
  dominant eigenvalue that stands clear of the next. The residual is exact, not estimated: it is
  the norm of the next Krylov direction before normalisation, times the last component of ``y``.
- :func:`power_iteration`: stops when the Rayleigh quotient moves by at most ``tol`` (relative)
  *and* the residual is at most ``sqrt(tol)``; it needs one product more than Lanczos from the
  same start (two quotients must agree) and converges more slowly.

Both keep the sign (a negative result means the most negative curvature dominates). The
Krylov basis costs memory: ``max_basis`` vectors per block (8 x 7 MB per MiniLM layer).

This module knows nothing about models or data (:mod:`qbert_edge.hessian` builds the operator).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qbert_edge.errors import QbertEdgeError

Blocks = dict[Hashable, list[torch.Tensor]]
Operator = Callable[[Blocks], Blocks]

DEFAULT_MAX_ITER = 50
DEFAULT_TOL = 1e-3
DEFAULT_MAX_BASIS = 8
METHODS = ("lanczos", "power")


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Inner product of two block vectors, accumulated in float64."""
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def norm(a: Sequence[torch.Tensor]) -> float:
    return math.sqrt(dot(a, a))


def scaled(a: Sequence[torch.Tensor], s: float) -> list[torch.Tensor]:
    return [x * s for x in a]


def combination(basis: Sequence[Sequence[torch.Tensor]], coeffs: Sequence[float]) -> list[torch.Tensor]:
    """``sum_j coeffs[j] * basis[j]`` for block vectors."""
    out = [torch.zeros_like(t) for t in basis[0]]
    for c, vec in zip(coeffs, basis):
        for acc, t in zip(out, vec):
            acc.add_(t, alpha=float(c))
    return out


def random_direction(like: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """A seeded unit-norm Gaussian direction shaped like ``like`` (same numbers on every run)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in like]
    return scaled(v, 1.0 / norm(v))


@dataclass(frozen=True)
class EigenResult:
    """Dominant eigenvalue estimate of one block and how the solver got there.

    ``iterations`` counts operator products; ``history`` holds the estimate after each;
    ``residual`` is ``|A v - eigenvalue v| / |eigenvalue|`` of the returned unit ``vector``.
    """

    eigenvalue: float
    converged: bool
    iterations: int
    history: tuple[float, ...] = ()
    vector: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False)
    residual: float = float("nan")


def _check(max_iter: int, tol: float) -> None:
    if max_iter < 1:
        raise QbertEdgeError(f"the eigen-solver needs max_iter >= 1, got {max_iter}")
    if not tol > 0:
        raise QbertEdgeError(f"the eigen-solver needs a positive tolerance, got {tol}")


def _unit_starts(start: Mapping[Hashable, Sequence[torch.Tensor]]) -> Blocks:
    out: Blocks = {}
    for k, v in start.items():
        n = norm(v)
        if n == 0:
            raise QbertEdgeError(f"eigen-solver block {k}: the start vector is zero")
        out[k] = scaled(v, 1.0 / n)
    return out


def _rounds(blocks, done: Mapping[Hashable, EigenResult], max_iter: int,
            callback: Callable[[int, list[Hashable]], None] | None) -> Iterator[tuple[int, list[Hashable]]]:
    """``(iteration, blocks still running)`` for each operator call, ``callback`` called first;
    stops at ``max_iter`` or when every block is in ``done``."""
    for it in range(1, max_iter + 1):
        running = [k for k in blocks if k not in done]
        if not running:
            return
        if callback is not None:
            callback(it, running)
        yield it, running


def power_iteration(
    operator: Operator,
    start: Mapping[Hashable, Sequence[torch.Tensor]],
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    callback: Callable[[int, list[Hashable]], None] | None = None,
) -> dict[Hashable, EigenResult]:
    """Power iteration on several symmetric blocks at once, each normalised on its own.

    A block has converged when its Rayleigh quotient ``lambda = v.Av`` (for unit ``v``) changes by
    at most ``tol * |lambda|`` from the previous iteration *and* the residual
    ``|Av - lambda v| <= sqrt(tol) * |lambda|`` (without it, a pair ``+-lambda`` of equal
    magnitude gives a steady Rayleigh quotient that is no eigenvalue).
    ``callback(iteration, running_blocks)`` is called before each operator call.

    >>> A = torch.diag(torch.tensor([-3.0, 2.0, 1.0]))
    >>> r = power_iteration(lambda v: {k: [A @ x[0]] for k, x in v.items()}, {0: [torch.ones(3)]}, tol=1e-9, max_iter=200)
    >>> round(r[0].eigenvalue, 4), r[0].converged
    (-3.0, True)
    """
    _check(max_iter, tol)
    vectors = _unit_starts(start)
    history: dict[Hashable, list[float]] = {k: [] for k in vectors}
    done: dict[Hashable, EigenResult] = {}
    for it, running in _rounds(vectors, done, max_iter, callback):
        products = operator({k: vectors[k] for k in running})
        for k in running:
            av = products[k]
            lam = dot(vectors[k], av)
            history[k].append(lam)
            n = norm(av)
            if n == 0.0:  # v is in the null space: eigenvalue 0, nothing more to learn
                done[k] = EigenResult(0.0, True, it, tuple(history[k]), tuple(vectors[k]), 0.0)
                continue
            # residual |Av - lam v| (v unit, so |Av|^2 = lam^2 + residual^2), relative to |lam|
            residual = math.sqrt(max(n * n - lam * lam, 0.0)) / max(abs(lam), 1e-30)
            steady = len(history[k]) > 1 and abs(lam - history[k][-2]) <= tol * abs(lam)
            converged = steady and residual <= math.sqrt(tol)
            vectors[k] = scaled(av, 1.0 / n)
            if converged or it == max_iter:
                done[k] = EigenResult(lam, converged, it, tuple(history[k]), tuple(vectors[k]), residual)
    return done


class _Krylov:
    """One block's Lanczos state: an orthonormal basis ``q_0..q_j`` and ``T = Q^T A Q``."""

    def __init__(self, start: list[torch.Tensor], max_basis: int):
        self.basis: list[list[torch.Tensor]] = [start]
        self.t = np.zeros((max_basis, max_basis))
        self.max_basis = max_basis
        self.history: list[float] = []

    def step(self, product: list[torch.Tensor]) -> tuple[float, float, np.ndarray, float, list[torch.Tensor] | None]:
        """Take ``A q_j``; return the dominant Ritz value, its residual, its coordinates, ``beta``
        and the next direction (None when the basis spans an invariant subspace)."""
        j = len(self.basis) - 1
        w = [t.clone() for t in product]
        coeffs = np.zeros(j + 1)
        for _ in range(2):  # classical Gram-Schmidt, twice: orthogonal to working precision
            for i, q in enumerate(self.basis):
                c = dot(q, w)
                coeffs[i] += c
                for wt, qt in zip(w, q):
                    wt.sub_(qt, alpha=c)
        self.t[: j + 1, j] = coeffs
        self.t[j, : j + 1] = coeffs
        values, vectors = np.linalg.eigh(self.t[: j + 1, : j + 1])
        top = int(np.argmax(np.abs(values)))
        theta, s = float(values[top]), vectors[:, top]
        beta = norm(w)
        residual = float(abs(beta * s[-1])) / max(abs(theta), 1e-30)
        self.history.append(theta)
        nxt = None if beta <= 1e-12 * max(abs(theta), 1e-30) else scaled(w, 1.0 / beta)
        return theta, residual, s, beta, nxt

    def ritz_vector(self, s: np.ndarray) -> list[torch.Tensor]:
        y = combination(self.basis, s)
        return scaled(y, 1.0 / norm(y))

    def extend(self, theta: float, s: np.ndarray, beta: float, nxt: list[torch.Tensor]) -> None:
        """Add ``nxt`` to the basis; when full, restart thick from the Ritz vector: the basis
        becomes ``[y, nxt]`` with ``T = [[theta, beta s_j], [beta s_j, .]]`` (no extra product)."""
        if len(self.basis) < self.max_basis:
            self.basis.append(nxt)
            return
        y = self.ritz_vector(s)
        self.basis = [y, nxt]
        self.t[:] = 0.0
        self.t[0, 0] = theta
        self.t[0, 1] = self.t[1, 0] = beta * s[-1]


def lanczos(
    operator: Operator,
    start: Mapping[Hashable, Sequence[torch.Tensor]],
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    max_basis: int = DEFAULT_MAX_BASIS,
    callback: Callable[[int, list[Hashable]], None] | None = None,
) -> dict[Hashable, EigenResult]:
    """Lanczos on several symmetric blocks at once: the eigenvalue of largest magnitude of each.

    A block stops when its dominant Ritz pair has a relative residual ``<= sqrt(tol)`` (see the
    module docstring), or at ``max_iter`` operator products. The basis holds at most
    ``max_basis`` vectors per block, then restarts thick from the Ritz vector.
    ``callback(iteration, running_blocks)`` is called before each operator call.

    >>> A = torch.diag(torch.tensor([-3.0, 2.0, 1.0]))
    >>> r = lanczos(lambda v: {k: [A @ x[0]] for k, x in v.items()}, {0: [torch.ones(3)]}, tol=1e-9)
    >>> round(r[0].eigenvalue, 4), r[0].converged, r[0].iterations
    (-3.0, True, 3)
    """
    _check(max_iter, tol)
    if max_basis < 2:
        raise QbertEdgeError(f"Lanczos needs max_basis >= 2, got {max_basis}")
    states = {k: _Krylov(v, max_basis) for k, v in _unit_starts(start).items()}
    done: dict[Hashable, EigenResult] = {}
    for it, running in _rounds(states, done, max_iter, callback):
        products = operator({k: states[k].basis[-1] for k in running})
        for k in running:
            state = states[k]
            theta, residual, s, beta, nxt = state.step(products[k])
            converged = nxt is None or residual <= math.sqrt(tol)
            if converged or it == max_iter:
                vector = tuple(state.ritz_vector(s))
                done[k] = EigenResult(theta, converged, it, tuple(state.history), vector, residual)
            else:
                state.extend(theta, s, beta, nxt)  # type: ignore[arg-type]
    return done


def dominant_eigenpairs(
    operator: Operator,
    start: Mapping[Hashable, Sequence[torch.Tensor]],
    *,
    method: str = "lanczos",
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    callback: Callable[[int, list[Hashable]], None] | None = None,
) -> dict[Hashable, EigenResult]:
    """:func:`lanczos` or :func:`power_iteration` by name (``method`` in :data:`METHODS`)."""
    if method == "lanczos":
        return lanczos(operator, start, max_iter=max_iter, tol=tol, callback=callback)
    if method == "power":
        return power_iteration(operator, start, max_iter=max_iter, tol=tol, callback=callback)
    raise QbertEdgeError(f"unknown eigen-solver {method!r}: choose one of {', '.join(METHODS)}")


def deflated(operator: Operator, found: Mapping[Hashable, EigenResult]) -> Operator:
    """``A - lambda u u^T`` per block: a solver on it finds the next eigenvalue by magnitude."""

    def apply(vectors: Blocks) -> Blocks:
        out = operator(vectors)
        for k, v in vectors.items():
            r = found[k]
            c = r.eigenvalue * dot(r.vector, v)
            out[k] = [a - c * u for a, u in zip(out[k], r.vector)]
        return out

    return apply
