"""The batched linear algebra of the grouped step against the per-matrix functions and a full SVD."""

import pytest
import torch

from lightning_adarank.optim.linalg import (
    cholesky_qr_condition_limit,
    oriented_batched,
    orthonormalize_batched,
    project,
    range_finder_batched,
    select_ranks_batched,
)


def _with_spectrum(m, n, singular_values, noise=0.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    a = u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T
    return (a + noise * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)


def _orth_error(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (q.mT @ q - eye).abs().amax(dim=(-2, -1))


def test_cholesky_qr_is_orthonormal_and_spans_the_columns():
    y = torch.randn(5, 60, 12, generator=torch.Generator().manual_seed(0))
    q, fallback = orthonormalize_batched(y)
    assert not fallback.any()  # a Gaussian sketch is well conditioned: no fallback
    assert _orth_error(q).max() < 1e-5
    # same column space: projecting y onto span(Q) leaves it unchanged
    torch.testing.assert_close(q @ (q.mT @ y), y, atol=1e-4, rtol=1e-4)
    # and, column by column, the same subspaces as Householder QR (Q = Q_house · diag(±1))
    ref = torch.linalg.qr(y)[0]
    torch.testing.assert_close((q.mT @ ref).abs(), torch.eye(12).expand(5, 12, 12), atol=1e-4, rtol=0)


def _naive_cholesky_qr2(y):
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(y.mT @ y)
        if info != 0:
            return None
        y = torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False)
    return y


def test_ill_conditioned_or_rank_deficient_sketch_falls_back_to_householder():
    g = torch.Generator().manual_seed(1)
    good = torch.randn(60, 12, generator=g)
    u, _ = torch.linalg.qr(torch.randn(60, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    graded = u @ torch.diag(torch.logspace(0, -5, 12)) @ v.T  # κ = 1e5, columns mixed: beyond CholeskyQR2 in fp32
    deficient = torch.randn(60, 2, generator=g) @ torch.randn(2, 12, generator=g)  # rank 2
    with_nan = good.clone()
    with_nan[3, 4] = float("nan")
    y = torch.stack([good, graded, deficient, with_nan])
    q, fallback = orthonormalize_batched(y)
    assert fallback.tolist() == [False, True, True, True]
    assert _orth_error(q[:3]).max() < 1e-5  # orthonormal even where Cholesky-QR is not
    torch.testing.assert_close(q[1] @ (q[1].T @ graded), graded, atol=1e-5, rtol=0)
    # without the detection the graded sketch would come back far from orthonormal (or not at all)
    naive = _naive_cholesky_qr2(graded)
    assert naive is None or not _orth_error(naive) < 1e-3
    # a milder κ = 1e3 is within CholeskyQR2's reach: no fallback, still orthonormal
    mild = u @ torch.diag(torch.logspace(0, -3, 12)) @ v.T
    q, fallback = orthonormalize_batched(mild[None])
    assert not fallback.any() and _orth_error(q).max() < 1e-5
    assert cholesky_qr_condition_limit(torch.float32) < cholesky_qr_condition_limit(torch.float64)


@pytest.mark.parametrize("shape", [(48, 120), (120, 48)])
def test_batched_range_finder_matches_svd_per_matrix(shape):
    side = "left" if shape[0] <= shape[1] else "right"
    grads = torch.stack(
        [_with_spectrum(*shape, [10.0 * (0.5 + 0.1 * b) ** i for i in range(30)], seed=b) for b in range(4)]
    )
    a = oriented_batched(grads, side)
    s, l = a.shape[1:]
    g = torch.Generator().manual_seed(0)
    omega = torch.randn(4, l, 12, generator=g)
    u, sv, w, fallbacks = range_finder_batched(a, omega, power_iters=2)
    assert u.shape == (4, s, 12) and sv.shape == (4, 12) and w.shape == (4, 12, l)
    assert _orth_error(u).max() < 1e-5
    for b in range(4):
        ref = torch.linalg.svdvals(grads[b].double()).float()  # the reference, computed another way
        torch.testing.assert_close(sv[b, :6], ref[:6], rtol=1e-3, atol=1e-4)
        # W is the projection of A on U, and its energy is the sum of the kept σ²
        direct = project(grads[b], u[b], side)
        torch.testing.assert_close(w[b], direct if side == "left" else direct.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(w[b, :5].square().sum(), sv[b, :5].square().sum(), rtol=1e-4, atol=0)
    assert fallbacks.shape == (4,)


def _rank_by_definition(sv: list[float], total: float, energy: float, lo: int, hi: int) -> int:
    """Algorithm 2 written out: the smallest r in [lo, hi] whose first r σ² keep energy·total (hi if none)."""
    if not total > 0:
        return lo
    for r in range(1, len(sv) + 1):
        if sum(x * x for x in sv[:r]) >= energy * total * (1 - 1e-12):
            return max(lo, min(r, hi))
    return max(lo, min(hi, len(sv)))


def test_rank_selection_follows_its_definition():
    sv = torch.tensor(
        [
            [5.0, 3.0, 2.0, 0.1, 0.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
            [4.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [3.0, 2.0, 1.0, 1.0, 1.0],
        ]
    )
    totals = torch.stack(
        [sv[0].square().sum(), sv[1].square().sum() * 2, sv[2].square().sum(), torch.tensor(0.0), sv[4].square().sum()]
    )
    for energy, lo, hi in [(0.9, 1, 4), (0.99, 2, 8), (1.0, 1, 3), (0.5, 1, 8)]:
        got = select_ranks_batched(sv, totals, energy, lo, hi).tolist()
        want = [_rank_by_definition(sv[b].tolist(), float(totals[b]), energy, lo, hi) for b in range(5)]
        assert got == want, (energy, lo, hi)
