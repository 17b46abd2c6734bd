"""The eigen-solvers on matrices whose spectrum is known (the Hessian tests use them on real blocks)."""

import math

import pytest
import torch

from qbert_edge import eigen
from qbert_edge.errors import QbertEdgeError


def spectrum_matrix(values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def op_of(mats, calls=None):
    def apply(v):
        if calls is not None:
            calls.append(sorted(v))
        return {k: [mats[k] @ x[0]] for k, x in v.items()}

    return apply


def true_residual(A, r):
    v = r.vector[0]
    return float((A @ v - r.eigenvalue * v).norm() / abs(r.eigenvalue))


def test_lanczos_finds_dominant_of_either_sign_and_blocks_stop_independently():
    mats = {"a": spectrum_matrix([-5.0, 4.0, 2.0, 1.0, -0.5, 0.1]), "b": torch.diag(torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))}
    start = {"a": [torch.ones(6, dtype=torch.float64)], "b": [torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)]}
    calls = []
    res = eigen.lanczos(op_of(mats, calls), start, max_iter=50, tol=1e-10)
    assert res["a"].eigenvalue == pytest.approx(-5.0, rel=1e-8) and res["a"].converged
    assert res["b"].eigenvalue == pytest.approx(3.0, rel=1e-8) and res["b"].converged
    # b's Krylov space has dimension 2 (two distinct eigenvalues): exact after 2 products, then it stops
    assert res["b"].iterations == 2 and res["a"].iterations <= 6
    assert all(call == ["a"] for call in calls[2:])
    for k in mats:
        assert true_residual(mats[k], res[k]) == pytest.approx(res[k].residual, abs=1e-9)
        assert res[k].history[-1] == res[k].eigenvalue and len(res[k].history) == res[k].iterations


def test_lanczos_needs_fewer_products_than_power_iteration_from_the_same_start():
    values = [10.0, 7.0] + [float(x) for x in torch.linspace(-2, 5, 98)]
    A = spectrum_matrix(values, seed=3)
    start = {0: [torch.ones(100, dtype=torch.float64)]}
    lz = eigen.lanczos(op_of({0: A}), start, max_iter=200, tol=1e-8)[0]
    pw = eigen.power_iteration(op_of({0: A}), start, max_iter=200, tol=1e-8)[0]
    assert lz.converged and pw.converged
    assert lz.eigenvalue == pytest.approx(10.0, rel=1e-7) and pw.eigenvalue == pytest.approx(10.0, rel=1e-6)
    assert lz.iterations < pw.iterations / 2, (lz.iterations, pw.iterations)
    # the stopping test promises |error| ~ tol * |lambda| * |lambda| / gap = 1e-8 * 10 / 3
    assert abs(lz.eigenvalue - 10.0) <= 1e-8 * 10 * 10 / 3


def test_lanczos_restarts_within_max_basis_and_still_converges():
    values = [10.0, 9.5] + [float(x) for x in torch.linspace(-1, 8, 198)]
    A = spectrum_matrix(values, seed=4)
    start = {0: [torch.ones(200, dtype=torch.float64)]}
    small = eigen.lanczos(op_of({0: A}), start, max_iter=500, tol=1e-10, max_basis=3)[0]
    large = eigen.lanczos(op_of({0: A}), start, max_iter=500, tol=1e-10, max_basis=40)[0]
    assert small.converged and large.converged
    assert small.iterations > 3  # it had to restart
    assert small.eigenvalue == pytest.approx(10.0, rel=1e-8) and large.eigenvalue == pytest.approx(10.0, rel=1e-8)
    assert large.iterations <= small.iterations
    assert true_residual(A, small) == pytest.approx(small.residual, abs=1e-8)


def test_lanczos_on_a_plus_minus_pair_returns_an_eigenvalue_of_that_magnitude():
    A = torch.diag(torch.tensor([2.0, -2.0, 1.0], dtype=torch.float64))  # power iteration never settles here
    r = eigen.lanczos(op_of({0: A}), {0: [torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64)]}, max_iter=20, tol=1e-6)[0]
    assert r.converged and abs(r.eigenvalue) == pytest.approx(2.0, rel=1e-9)
    assert true_residual(A, r) < 1e-6


def test_lanczos_reports_no_convergence_at_the_cap():
    A = spectrum_matrix([1.0, 0.999, 0.998] + [0.5] * 57, seed=5)
    r = eigen.lanczos(op_of({0: A}), {0: [torch.ones(60, dtype=torch.float64)]}, max_iter=2, tol=1e-12)[0]
    assert not r.converged and r.iterations == 2 and r.residual > math.sqrt(1e-12)


def test_null_space_start_converges_to_zero():
    A = torch.diag(torch.tensor([0.0, 3.0], dtype=torch.float64))
    r = eigen.lanczos(op_of({0: A}), {0: [torch.tensor([1.0, 0.0], dtype=torch.float64)]}, max_iter=5, tol=1e-6)[0]
    assert r.converged and r.eigenvalue == 0.0 and r.iterations == 1


def test_bad_requests_fail_clearly():
    ident = lambda v: v  # noqa: E731
    with pytest.raises(QbertEdgeError, match="max_basis"):
        eigen.lanczos(ident, {0: [torch.ones(2)]}, max_basis=1)
    with pytest.raises(QbertEdgeError, match="start vector is zero"):
        eigen.lanczos(ident, {0: [torch.zeros(2)]})
    with pytest.raises(QbertEdgeError, match="unknown eigen-solver 'arnoldi'"):
        eigen.dominant_eigenpairs(ident, {0: [torch.ones(2)]}, method="arnoldi")
    with pytest.raises(QbertEdgeError, match="positive tolerance"):
        eigen.lanczos(ident, {0: [torch.ones(2)]}, tol=0)
