"""Property-based tests (hypothesis) of the math and the optimizer step on random shapes, dtypes and degenerate
gradients: orthonormal bases, energy kept >= eta when reachable, finite moments and weights, and untouched
weights for skipped steps."""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_adarank import AdaRankGrad
from lightning_adarank.optim.linalg import low_rank_basis, projection_side, range_finder

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
KINDS = ["random", "zero", "rank1", "equal_columns", "tiny", "huge", "low_rank"]


@st.composite
def shapes(draw):
    kind = draw(st.sampled_from(["row", "col", "small", "any"]))
    if kind == "row":
        return (1, draw(st.integers(1, 40)))
    if kind == "col":
        return (draw(st.integers(1, 40)), 1)
    if kind == "small":  # min(shape) <= the sketch size (max_rank + oversample)
        return (
            (draw(st.integers(1, 6)), draw(st.integers(1, 40)))
            if draw(st.booleans())
            else (draw(st.integers(1, 40)), draw(st.integers(1, 6)))
        )
    return (draw(st.integers(1, 40)), draw(st.integers(1, 40)))


def gradient(shape, kind, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if kind == "zero":
        x = torch.zeros(shape)
    elif kind == "rank1":
        x = torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
    elif kind == "equal_columns":
        x = torch.randn(m, 1, generator=g).expand(m, n).contiguous()
    elif kind == "low_rank":
        x = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
    else:
        x = torch.randn(shape, generator=g)
        x = x * {"tiny": 1e-30, "huge": 1e30}.get(kind, 1.0)
    return x.to(dtype)


@SETTINGS
@given(
    shape=shapes(),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31),
    sketch=st.integers(1, 12),
    power=st.integers(0, 2),
)
def test_range_finder_basis_is_orthonormal_and_finite(shape, kind, seed, sketch, power):
    grad = gradient(shape, kind, seed)
    side = projection_side(shape)
    u, s, w = range_finder(grad, side, sketch, power, torch.Generator().manual_seed(seed))
    k = min(sketch, min(shape))
    assert u.shape == (min(shape), k) and s.shape == (k,) and w.shape == (k, max(shape))
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(w).all()
    torch.testing.assert_close(u.mT @ u, torch.eye(k), atol=1e-4, rtol=0)
    assert (s[:-1] >= s[1:]).all() and (s >= 0).all()


@SETTINGS
@given(
    shape=shapes(),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31),
    energy=st.sampled_from([0.5, 0.9, 0.99, 1.0]),
    max_rank=st.integers(1, 8),
)
@example(shape=(2, 2), kind="rank1", seed=0, energy=1.0, max_rank=2)  # CI find: η = 1 on a 2x2 rank-1 matrix
def test_low_rank_basis_keeps_energy_when_reachable(shape, kind, seed, energy, max_rank):
    grad = gradient(shape, kind, seed)
    side = projection_side(shape)
    total = float(torch.linalg.vector_norm(grad.double())) ** 2
    basis, kept, low = low_rank_basis(
        grad,
        side,
        energy=energy,
        min_rank=1,
        max_rank=max_rank,
        oversample=4,
        power_iters=2,
        generator=torch.Generator().manual_seed(seed),
        total_energy=total,
    )
    r = basis.shape[1]
    assert 1 <= r <= min(max_rank, min(shape))
    torch.testing.assert_close(basis.mT @ basis, torch.eye(r), atol=1e-4, rtol=0)
    assert math.isfinite(kept) and torch.isfinite(low).all()
    # the best rank-max_rank energy, by a full SVD of the (small) test matrix in float64
    sv = torch.linalg.svdvals(grad.double())
    best = float(sv[:max_rank].square().sum()) / total if total > 0 else 1.0
    if total > 0 and best >= energy + 1e-3:  # reachable with margin: the adaptive rank must keep at least eta
        assert kept >= energy - 1e-3, (kept, energy, best)
        exact = (
            float(torch.linalg.vector_norm(basis.mT.double() @ (grad.double() if side == "left" else grad.double().mT)))
            ** 2
            / total
        )
        assert exact >= energy - 1e-3
    if kind in ("rank1", "equal_columns") and total > 0 and energy < 1.0:  # η = 1 may need the rounding tail too
        assert r == 1 and kept > 0.999  # one direction holds everything


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    kind=st.sampled_from(KINDS + ["inf", "nan"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31),
    max_rank=st.integers(1, 6),
)
def test_optimizer_step_keeps_weights_and_moments_finite(shape, kind, dtype, seed, max_rank):
    """Steps on degenerate gradients; a non-finite gradient (or one whose square overflows fp32, 1e30, or fp16
    overflow to inf) skips the step: weights and state untouched."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = AdaRankGrad([w], lr=1e-2, max_rank=max_rank, min_gap=1, max_gap=2, oversample=4)
    for t in range(3):  # a normal step first, then the degenerate one(s): refreshes land on them too
        before = w.detach().clone()
        state_before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[w].items()}
        if t == 0:
            w.grad = gradient(shape, "random", seed, dtype)
        elif kind in ("inf", "nan"):
            g = gradient(shape, "random", seed + t)
            g.view(-1)[seed % g.numel()] = float(kind)
            w.grad = g.to(dtype)
        else:
            w.grad = gradient(shape, kind, seed + t).to(dtype)  # fp16: 1e30 overflows to inf here
        finite_sq = math.isfinite(float(torch.linalg.vector_norm(w.grad.float())) ** 2) and math.isfinite(
            float(w.grad.float().square().sum())
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        skipped = any("skipped" in str(c.message) for c in caught)
        assert torch.isfinite(w).all()
        for k, v in opt.state[w].items():
            if isinstance(v, torch.Tensor):
                assert torch.isfinite(v).all(), k
        if skipped:
            assert torch.equal(w, before)
            for k, v in state_before.items():
                now = opt.state[w][k]
                assert torch.equal(now, v) if isinstance(v, torch.Tensor) else now == v, k
        if t > 0 and kind in ("inf", "nan"):
            assert skipped
        if t > 0 and kind in ("random", "rank1", "equal_columns", "low_rank", "zero") and finite_sq:
            assert not skipped
        if "basis" in opt.state[w]:
            b = opt.state[w]["basis"]
            torch.testing.assert_close(b.mT @ b, torch.eye(b.shape[1]), atol=1e-4, rtol=0)
