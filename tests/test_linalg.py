"""The paper's algorithms checked against their definitions and against a full SVD computed another way."""

import pytest
import torch

from lightning_adarank.optim.linalg import (
    low_rank_basis,
    moment_transform,
    project,
    project_back,
    projection_side,
    range_finder,
    select_rank,
    subspace_seed,
)


def _with_spectrum(m, n, singular_values, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    a = u @ torch.diag(torch.tensor(singular_values, dtype=torch.float32)) @ v.T
    return a + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("shape", [(48, 120), (120, 48)])
def test_range_finder_is_orthonormal_and_matches_svd(shape):
    a = _with_spectrum(*shape, [10.0 * 0.6**i for i in range(30)], seed=1)
    side = projection_side(a.shape)
    u, sv, w = range_finder(a, side, sketch_size=12, power_iters=2, generator=torch.Generator().manual_seed(0))
    s = min(shape)
    assert u.shape == (s, 12)
    torch.testing.assert_close(u.T @ u, torch.eye(12), atol=1e-5, rtol=0)
    # leading singular values agree with a full SVD (the reference, computed another way)
    ref = torch.linalg.svdvals(a.double()).float()
    torch.testing.assert_close(sv[:6], ref[:6], rtol=1e-3, atol=1e-4)
    # ‖U_rᵀ A‖² equals Σ σ_i² of the sketch: the energy reported is the energy kept
    r = 5
    kept = project(a, u[:, :r], side).square().sum()
    torch.testing.assert_close(kept, sv[:r].square().sum(), rtol=1e-4, atol=0)
    # the projected matrix that falls out of the small SVD equals the projection computed directly
    direct = project(a, u, side)
    torch.testing.assert_close(w, direct if side == "left" else direct.T, atol=1e-4, rtol=1e-4)


def test_rank_of_known_spectrum_is_found():
    a = _with_spectrum(64, 200, [5.0, 3.0, 2.0], noise=1e-4, seed=2)
    basis, kept, _ = low_rank_basis(
        a,
        "left",
        energy=0.99,
        min_rank=1,
        max_rank=8,
        oversample=4,
        power_iters=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert basis.shape[1] == 3
    assert kept >= 0.99


@pytest.mark.parametrize("seed", range(5))
def test_energy_kept_reaches_eta_below_max_rank(seed):
    decay = 0.3 + 0.1 * seed
    a = _with_spectrum(80, 96, [decay**i for i in range(40)], noise=1e-3, seed=seed)
    eta = 0.9
    for side in ("left", "right"):
        mat = a if side == "left" else a.T.contiguous()
        basis, _, low = low_rank_basis(
            mat,
            side,
            energy=eta,
            min_rank=1,
            max_rank=16,
            oversample=4,
            power_iters=1,
            generator=torch.Generator().manual_seed(seed),
        )
        true_kept = float(project(mat, basis, side).square().sum() / mat.square().sum())
        torch.testing.assert_close(low, project(mat, basis, side), atol=1e-5, rtol=1e-4)
        if basis.shape[1] < 16:
            assert true_kept >= eta - 1e-5
        # minimality: one rank less would not reach eta (checked with the exact SVD)
        sv = torch.linalg.svdvals(mat.double())
        if basis.shape[1] > 1:
            assert float(sv[: basis.shape[1] - 1].square().sum() / sv.square().sum()) < eta + 1e-3


def test_select_rank_bounds():
    sv = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert select_rank(sv, 4.0, 0.5, 1, 4) == 2
    assert select_rank(sv, 4.0, 1.0, 1, 4) == 4
    assert select_rank(sv, 100.0, 0.9, 1, 3) == 3  # cannot reach eta: max_rank
    assert select_rank(sv, 4.0, 0.1, 3, 4) == 3  # min_rank floor
    assert select_rank(sv, 0.0, 0.9, 2, 4) == 2  # zero gradient


def test_moment_transform_identity_and_definition():
    g = torch.Generator().manual_seed(0)
    p_old, _ = torch.linalg.qr(torch.randn(30, 4, generator=g))
    m, v = torch.randn(4, 50, generator=g), torch.rand(4, 50, generator=g)
    m2, v2 = moment_transform(p_old, p_old, m, v, "left")
    torch.testing.assert_close(m2, m, atol=1e-6, rtol=0)
    torch.testing.assert_close(v2, v, atol=1e-6, rtol=0)
    # a new basis of another rank: the first moment is the new coordinates of the old one's projection
    p_new, _ = torch.linalg.qr(torch.randn(30, 6, generator=g))
    m3, v3 = moment_transform(p_old, p_new, m, v, "left")
    assert m3.shape == (6, 50) and v3.shape == (6, 50)
    full_old = p_old @ m
    torch.testing.assert_close(p_new @ m3, p_new @ p_new.T @ full_old, atol=1e-5, rtol=0)
    assert (v3 >= 0).all()
    # right side: the same with moments stored as (m, r)
    m4, v4 = moment_transform(p_old, p_new, m.T, v.T, "right")
    torch.testing.assert_close(m4, m3.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(v4, v3.T, atol=1e-6, rtol=0)


def test_project_back_is_adjoint():
    g = torch.Generator().manual_seed(0)
    for shape in [(20, 50), (50, 20)]:
        side = projection_side(shape)
        s = min(shape)
        p, _ = torch.linalg.qr(torch.randn(s, 3, generator=g))
        a = torch.randn(shape, generator=g)
        low = project(a, p, side)
        n = torch.randn(low.shape, generator=g)
        # <P(a), n> == <a, P*(n)>
        torch.testing.assert_close((low * n).sum(), (a * project_back(n, p, side)).sum(), rtol=1e-5, atol=1e-5)


def test_subspace_seed_is_deterministic_and_distinct():
    seeds = {subspace_seed(0, i, r) for i in range(50) for r in range(20)}
    assert len(seeds) == 1000
    assert subspace_seed(3, 7, 2) == subspace_seed(3, 7, 2)
    assert all(0 <= s < 2**63 for s in seeds)
