"""Adam's statistics for the directions a subspace refresh brings in, tested against their definition.

The reference is ``torch.optim.AdamW`` started at the refresh on the new direction's own gradient stream: the
first steps in a new direction must be no larger than AdamW's first steps there (and later ones AdamW's size),
while the directions carried over step exactly as they did before the rule existed (``M ← R M``,
``V ← (R∘R) V`` only).
"""

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad
from lightning_adarank.optim import quant
from lightning_adarank.optim.linalg import moment_transform, projected_shape
from lightning_adarank.optim.new_directions import (
    carry_moments,
    fill_new_directions,
    fill_new_momentum,
    known_share,
    momentum_prior_weight,
    refresh_energies,
)
from lightning_adarank.optim.refresh import install_subspace

S, L = 12, 256  # a left-projected matrix (s ≤ l): moments are (r, l)


def _stream(gen: torch.Generator, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One projected-gradient row: a persistent mean plus per-column mini-batch noise."""
    return mean + scale * torch.randn(L, generator=gen)


def _unit(i: int) -> torch.Tensor:
    e = torch.zeros(S)
    e[i] = 1.0
    return e


def _run(bits: int, fill: bool, steps_after: int = 30):
    """300 steps in span(e0, e1), a refresh to [e0, e2] (e0 carried, e2 new), then ``steps_after`` steps.

    Returns the per-step Adam directions after the refresh (``(2, L)`` each) and the new row's gradients.
    ``fill=False`` installs the subspace as before the rule (rotated moments only), for comparison.
    """
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(S, L))
    opt = AdaRankGrad([p], max_rank=2, min_rank=2, state_bits=bits)
    group = opt.param_groups[0]
    st = opt.state[p]
    st.update(
        step=opt.context.kernels.step_counter(p, opt.context.kernels.uses_fused(p.device)), refreshes=0, pending=True
    )
    scale = torch.linspace(0.5, 2.0, L)  # per-column noise scale (input features differ)
    means = [0.8 * torch.randn(L, generator=gen) for _ in range(3)]  # rows e0, e1, and the new e2 (no larger)
    means[2] *= 0.5
    install_subspace(st, p, torch.stack([_unit(0), _unit(1)], 1), 1.0, True, bits, low=None, betas=(0.9, 0.999))

    def adam(low: torch.Tensor) -> torch.Tensor:
        d = torch.zeros_like(low)
        shape = projected_shape(p.shape, int(st["rank"]))
        (st["step"],) = opt.context.kernels.adamw_stored(
            [d], [low], [st], [shape], group, bits, lr=1.0, weight_decay=0.0
        )
        return d

    for _ in range(300):
        adam(torch.stack([_stream(gen, means[0], scale), _stream(gen, means[1], scale)]))
    new_basis = torch.stack([_unit(0), _unit(2)], 1)
    lows = [torch.stack([_stream(gen, means[0], scale), _stream(gen, means[2], scale)]) for _ in range(steps_after)]
    if fill:  # the refresh step's gradient, projected on the new basis, is the stream's first
        install_subspace(st, p, new_basis, 1.0, True, bits, low=lows[0], betas=(0.9, 0.999))
    else:  # the rotation alone: the rule's absence
        old = quant.load(st["basis"], (S, 2))
        shape = projected_shape(p.shape, 2)
        m, v = moment_transform(
            old, new_basis, quant.load(st["exp_avg"], shape), quant.load(st["exp_avg_sq"], shape), "left"
        )
        st["exp_avg"] = quant.store(None, m, bits, signed=True, salt=st["step"])
        st["exp_avg_sq"] = quant.store(None, v, bits, signed=False, salt=st["step"])
        st["basis"] = quant.store_basis(new_basis, bits)
    directions = [adam(low) for low in lows]
    return directions, [low[1].clone() for low in lows]


def _adamw_steps(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch.optim.AdamW (lr 1, no decay) started on the new direction's stream: its per-step updates."""
    w = nn.Parameter(torch.zeros(L))
    opt = torch.optim.AdamW([w], lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    out = []
    for g in rows:
        before = w.detach().clone()
        w.grad = g.clone()
        opt.step()
        out.append(w.detach() - before)
    return out


@pytest.mark.parametrize("bits", [32, 8])
def test_first_steps_in_a_new_direction_are_no_larger_than_adamws(bits):
    ours, rows = _run(bits, fill=True)
    ref = _adamw_steps(rows)
    ratios = [float(d[1].norm() / a.norm()) for d, a in zip(ours, ref)]
    slack = 1.0 if bits == 32 else 1.05  # 8-bit moments: their rounding
    assert max(ratios[:5]) <= slack, ratios  # the first steps: under AdamW's first steps
    assert min(ratios[:5]) > 0.5, ratios  # ... but not a cold start (momentum from the refresh gradient)
    # then AdamW's size, to the v prior's sampling error (one refresh gradient's energy along the direction)
    assert 0.85 <= min(ratios[5:]) and max(ratios) <= 1.2, ratios
    # the stream discriminates: without the rule the new direction's steps exceed AdamW's by far (1.6x at its
    # first step, more later: the bias correction is 1 − β2^300 ≈ 0.26 here, ≈ 1 later in training)
    before, _ = _run(bits, fill=False)
    assert float(before[0][1].norm() / ref[0].norm()) > 1.5
    assert max(float(d[1].norm() / a.norm()) for d, a in zip(before, ref)) > 2.0


def test_carried_directions_step_as_before():
    ours, _ = _run(32, fill=True)
    before, _ = _run(32, fill=False)
    for d, b in zip(ours, before):
        assert torch.equal(d[0], b[0])


def test_fill_matches_its_definition_elementwise():
    gen = torch.Generator().manual_seed(1)
    r_old, r_new, l = 3, 4, 5
    p_old = torch.linalg.qr(torch.randn(S, r_old, generator=gen))[0]
    p_new = torch.linalg.qr(torch.randn(S, r_new, generator=gen))[0]
    v_old = torch.rand(r_old, l, generator=gen)
    m_old = torch.randn(r_old, l, generator=gen)
    low = torch.randn(r_new, l, generator=gen)
    mass = 0.6
    _, v_rot = moment_transform(p_old, p_new, m_old, v_old, "left")
    rot = p_new.T @ p_old
    out = fill_new_directions(v_rot, v_old, known_share(rot), "left", refresh_energies(v_old, low, "left"), mass)
    mean_old = [sum(float(v_old[j, c]) for j in range(r_old)) / r_old for c in range(l)]
    for i in range(r_new):  # V_new[i,c] = Σ_j R_ij² V_old[j,c] + (1 − Σ_j R_ij²)·c₂·e_i·V̄_c/Σ_c V̄_c
        share = sum(float(rot[i, j]) ** 2 for j in range(r_old))
        e = sum(float(low[i, c]) ** 2 for c in range(l))
        for c in range(l):
            want = sum(float(rot[i, j]) ** 2 * float(v_old[j, c]) for j in range(r_old))
            want += max(0.0, 1.0 - share) * mass * e * mean_old[c] / sum(mean_old)
            assert abs(float(out[i, c]) - want) < 1e-5 * max(1.0, want)
    # right side: the same with the moments transposed
    sums_r = refresh_energies(v_old.T.contiguous(), low.T.contiguous(), "right")
    out_r = fill_new_directions(v_rot.T.contiguous(), v_old.T.contiguous(), known_share(rot), "right", sums_r, mass)
    assert torch.allclose(out_r, out.T, atol=1e-6)
    # the first moment: M_new[i] = R_i M_old + (1 − Σ_j R_ij²)·mass·G̃_i
    m_rot, _ = moment_transform(p_old, p_new, m_old, v_old, "left")
    m_out = fill_new_momentum(m_rot, known_share(rot), low, "left", 0.3)
    for i in range(r_new):
        share = sum(float(rot[i, j]) ** 2 for j in range(r_old))
        for c in range(l):
            want = sum(float(rot[i, j]) * float(m_old[j, c]) for j in range(r_old))
            want += max(0.0, 1.0 - share) * 0.3 * float(low[i, c])
            assert abs(float(m_out[i, c]) - want) < 1e-5
    m_out_r = fill_new_momentum(m_rot.T.contiguous(), known_share(rot), low.T.contiguous(), "right", 0.3)
    assert torch.allclose(m_out_r, m_out.T, atol=1e-6)
    # a carried direction (a unit row of R) is unchanged
    same = fill_new_directions(v_old, v_old, torch.ones(r_old), "left", refresh_energies(v_old, v_old, "left"), mass)
    assert torch.equal(same, v_old)
    assert torch.equal(fill_new_momentum(m_old, torch.ones(r_old), torch.randn(r_old, l), "left", 0.3), m_old)


def test_carry_moments_is_the_rotation_then_both_fills():
    """The installers' one formula against its parts, on both sides, carried and restarted: the sums go through
    ``reduce`` (FSDP2's all-reduce) before the fill. Tolerance ``rtol=1e-4``: the step count is a tensor, so
    ``1 − β^t`` is formed from fp32 ``β`` (0.999 is 1.3e-8 off in fp32: 1.3e-5 relative in ``1 − β2^37``)."""
    gen = torch.Generator().manual_seed(2)
    r_old, r_new, l = 3, 5, 7
    p_old = torch.linalg.qr(torch.randn(S, r_old, generator=gen))[0]
    p_new = torch.linalg.qr(torch.randn(S, r_new, generator=gen))[0]
    m_old, v_old = torch.randn(r_old, l, generator=gen), torch.rand(r_old, l, generator=gen)
    low, step, betas = torch.randn(r_new, l, generator=gen), torch.tensor(37.0), (0.9, 0.999)
    rot = p_new.T @ p_old
    m_rot, v_rot = moment_transform(p_old, p_new, m_old, v_old, "left")
    sums = refresh_energies(v_old, low, "left")
    want_v = fill_new_directions(v_rot, v_old, known_share(rot), "left", 2 * sums, 1 - 0.999**37)
    want_m = fill_new_momentum(m_rot, known_share(rot), low, "left", momentum_prior_weight(0.9) * (1 - 0.9**37))
    m, v = carry_moments(m_old, v_old, rot, "left", (r_new, l), low, step, betas, reduce=lambda x: 2 * x)
    assert torch.allclose(m, want_m, rtol=1e-4) and torch.allclose(v, want_v, rtol=1e-4)
    m_r, v_r = carry_moments(m_old.T, v_old.T, rot, "right", (l, r_new), low.T, step, betas, reduce=lambda x: 2 * x)
    assert torch.allclose(m_r, m.T, atol=1e-6) and torch.allclose(v_r, v.T, atol=1e-6)
    m0, v0 = carry_moments(None, v_old, None, "left", (r_new, l), low, step, betas)  # restarted at zero
    zero = torch.zeros(r_new, l)
    want_v0 = fill_new_directions(zero, v_old, None, "left", sums, 1 - 0.999**37)
    assert torch.allclose(v0, want_v0, rtol=1e-4) and (v0 > 0).all()
    assert torch.allclose(m0, momentum_prior_weight(0.9) * (1 - 0.9**37) * low, rtol=1e-4)


def _worst_noise_ratio(beta1: float, lam: float, steps: int) -> float:
    """The largest ratio, over ``k ≤ steps``, of a new direction's step on pure noise to AdamW's started on the
    same stream: the first moment's weights of ``g_1 … g_k`` come from running the recursion
    ``m ← β1·m + (1 − β1)·g`` on indicator vectors (ours from ``m = lam·g_1``, AdamW's from 0 with its bias
    correction), the step's size from the root of their sum of squares (independent noise, exact ``v``)."""
    ours, adamw, out = [lam], [0.0], 0.0
    for k in range(1, steps + 1):
        if k > 1:
            ours.append(0.0)
            adamw.append(0.0)
        ours = [beta1 * w for w in ours]
        adamw = [beta1 * w for w in adamw]
        ours[-1] += 1.0 - beta1
        adamw[-1] += 1.0 - beta1
        corr = 1.0 - beta1**k
        ratio = (sum(w * w for w in ours) / sum((w / corr) ** 2 for w in adamw)) ** 0.5
        out = max(out, ratio)
    return out


@pytest.mark.parametrize("beta1", [0.5, 0.8, 0.9, 0.95])
def test_momentum_prior_weight_is_the_largest_that_stays_under_adamw(beta1):
    def worst(lam: float) -> float:
        return _worst_noise_ratio(beta1, lam, int(30 / (1 - beta1)))

    lam = momentum_prior_weight(beta1)
    assert 0.0 < lam <= 1.0
    assert worst(lam) <= 1.0 + 1e-6
    if lam < 1.0:
        assert worst(min(1.0, lam + 0.02)) > 1.0 + 1e-6


def test_restarted_moments_get_the_prior():
    """``transform_moments=False`` with a rank change restarts the moments: every direction gets the prior."""
    p = nn.Parameter(torch.zeros(S, L))
    opt = AdaRankGrad([p], max_rank=3, transform_moments=False)
    st = opt.state[p]
    st.update(step=opt.context.kernels.step_counter(p, False), refreshes=0, pending=True)
    install_subspace(st, p, torch.stack([_unit(0), _unit(1)], 1), 1.0, False, low=None, betas=(0.9, 0.999))
    st["exp_avg_sq"].copy_(torch.rand(2, L))
    st["step"].fill_(50.0)
    v_old = st["exp_avg_sq"].clone()
    low = torch.randn(3, L)
    install_subspace(st, p, torch.stack([_unit(3), _unit(4), _unit(5)], 1), 1.0, False, low=low, betas=(0.9, 0.999))
    col = v_old.mean(0)
    want = (1 - 0.999**50) * low.square().sum(1, keepdim=True) * (col / col.sum())
    assert torch.allclose(st["exp_avg_sq"], want, rtol=1e-4)
    assert torch.allclose(st["exp_avg"], momentum_prior_weight(0.9) * (1 - 0.9**50) * low, rtol=1e-4)
    with pytest.raises(ValueError, match="projected gradient"):
        install_subspace(st, p, torch.stack([_unit(0), _unit(1)], 1), 1.0, False, low=None, betas=(0.9, 0.999))
