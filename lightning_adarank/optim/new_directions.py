"""Adam's moments for the directions a subspace refresh brings in.

After a refresh the moments are carried into the new basis (``M ← R M``, ``V ← (R∘R) V`` with
``R = P_newᵀ P_old``: :func:`~lightning_adarank.optim.linalg.moment_transform`). A new direction ``p_i`` that
lies partly outside the old subspace keeps only the part of the old statistics that lies inside it: its row of
``V`` holds ``‖R_i‖² = Σ_j R_ij²`` of the averaging mass a carried row holds, and none at all for a direction
orthogonal to the old subspace (the same holds when the moments are restarted at zero because the rank changed
with ``transform_moments=False``). The step counter, and with it Adam's bias correction ``1 − β2^t``, carries
on (≈ 1 after a few hundred steps), so the direction's ``v̂`` is then ``1 − β2^k`` of what it should be, ``k``
steps after the refresh: its first steps were ``(1 − β1^k)/√(1 − β2^k)`` times a warmed-up direction's, 3.2×
at ``k = 1``, 6.5× at ``k = 10``, still 3.2× at ``k = 100`` (``v`` warms up over ``1/(1 − β2)`` steps).

:func:`fill_new_directions` gives each new direction the mass it misses, at a prior for its second moment:

``V_new[i, c] = Σ_j R_ij²·V_old[j, c] + (1 − Σ_j R_ij²)₊ · c₂ · X[i, c]``, ``X[i, c] = e_i · V̄_c / Σ_c V̄_c``

with ``c₂ = 1 − β2^t`` the averaging mass of a carried row (the bias correction at the refresh), ``V̄_c =
mean_j V_old[j, c]`` the old subspace's average second moment in column ``c`` and ``e_i = Σ_c G̃_ic²`` the
energy of the refresh step's gradient along the new direction (``G̃ = PᵀG``, the projected gradient of that
step). Every row of ``V`` then holds a carried row's averaging mass, so the global bias correction is right for
all of them. A carried direction (``R_i`` a unit vector) is unchanged. ``X`` is the factored (Adafactor-style,
rank-one) estimate of the new direction's ``E[g²]``: its total over the row from the refresh gradient (a sum of
``l`` squares: about ``√(2/l)`` relative noise, 7 % at ``l = 384``), its profile over the columns (input
features differ in scale) from the old statistics, averaged over ``1/(1 − β2)`` steps. The real statistics
replace it at Adam's own rate ``β2``.

The first moment misses the same share, and with a zero start a new direction's momentum warms up over
``1/(1 − β1)`` steps while Adam's ``β1`` correction has long reached 1: refreshes come every 11–50 steps per
matrix, so with ``M`` at zero a good part of every update stayed in that warm-up (on CoLA the weights moved
10e-4 RMS against AdamW's 15e-4). :func:`fill_new_momentum` starts it from the refresh step's projected gradient,
shrunk: ``M_new[i] += (1 − Σ_j R_ij²)₊ · λ(β1)·(1 − β1^t) · G̃_i``. A one-sample mean is mostly noise at small
batches, and counted in full it would make the next ``1/(1 − β1)`` steps up to 1.5× AdamW's;
``λ(β1)`` (:func:`momentum_prior_weight`, 0.59 at β1 = 0.9) is the largest share for which no step exceeds
AdamW's first steps on the same stream, on pure noise or on a pure signal. The priors need no per-direction
counters (the state dict's schema does not change) and no work on a normal step.

Measured (``tests/test_new_directions.py``'s stream: 300 steps, then a refresh bringing in one orthogonal
direction), the new direction's step as a multiple of ``torch.optim.AdamW``'s on its own stream from the refresh
on, at steps 1, 2, 5, 10, 20: before, 1.6, 2.2, 3.0, 3.4, 3.3; with both priors 0.63, 0.80, 0.93–0.98,
0.92–1.04, 0.99–1.10 over four streams, then 1.0–1.13 (the ``v`` prior's sampling error). With the ``v`` prior
alone (``M`` from zero): 0.10, 0.21, 0.46, 0.77, 1.02. (A first version without ``e_i``, the old rows' average
alone, damped new directions for ``1/(1 − β2)`` steps when they are weaker than the kept ones.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .linalg import Side, rotate_moments

__all__ = [
    "carry_moments",
    "fill_new_directions",
    "fill_new_momentum",
    "known_share",
    "momentum_prior_weight",
    "refresh_energies",
]


def known_share(rot: Tensor) -> Tensor:
    """``Σ_j R_ij²``: the share of each new direction ``p_i`` (rows of ``R = P_newᵀ P_old``) inside the old subspace."""
    return rot.square().sum(dim=1)


def refresh_energies(old_exp_avg_sq: Tensor, low: Tensor, side: Side) -> Tensor:
    """The sums :func:`fill_new_directions` needs, as one vector ``[e_1 … e_r, Σ_c V̄_c, l]`` (fp32): the
    refresh gradient's energy along each new direction (``low`` = ``PᵀG`` in the moments' layout), the old
    average second moment summed over the columns, and the number of columns. Sums over the column axis only, so a caller whose columns are sharded
    (FSDP2's right side) all-reduces this vector and passes it on."""
    axis = 0 if side == "left" else 1  # the direction axis
    energy = low.float().square().sum(dim=1 - axis)
    col = old_exp_avg_sq.float().mean(dim=axis)
    return torch.cat((energy, col.sum().reshape(1), torch.full((1,), float(col.numel()), device=col.device)))


@torch.no_grad()
def fill_new_directions(
    exp_avg_sq: Tensor, old_exp_avg_sq: Tensor, known: Tensor | None, side: Side, sums: Tensor, mass: Tensor | float
) -> Tensor:
    """Add the averaging mass each new direction misses to the carried second moment (module docstring).

    ``exp_avg_sq``: the second moment in the new basis (``(R∘R) V_old``, or zeros when it was restarted), in
    :func:`~lightning_adarank.optim.linalg.projected_shape`'s layout (``(r, l)`` on the left side, ``(l, r)``
    on the right); ``old_exp_avg_sq``: the old subspace's, same layout at the old rank; ``known``: the share of
    each new direction inside the old subspace (:func:`known_share`; ``None``: none, the moments were
    restarted); ``sums``: :func:`refresh_energies` (all-reduced where the columns are sharded); ``mass``:
    ``1 − β2^t`` at the refresh. Returns ``V_new + (1 − known)₊ · mass · X`` (a new fp32 tensor). Where the old
    second moment is all zero the column profile is flat (``1/l``).
    """
    axis = 0 if side == "left" else 1
    r = exp_avg_sq.shape[axis]
    if known is None:
        known = torch.zeros(r, device=exp_avg_sq.device)
    sums = sums.to(exp_avg_sq.device, torch.float32)
    energy, total, count = sums[:r], sums[r], sums[r + 1]
    col = old_exp_avg_sq.float().mean(dim=axis)  # V̄_c over this process's columns
    profile = torch.where(total > 0, col / total.clamp(min=torch.finfo(torch.float32).tiny), 1.0 / count)
    weight = (1.0 - known.float()).clamp(min=0.0) * energy * torch.as_tensor(mass, device=exp_avg_sq.device)
    if side == "left":
        return exp_avg_sq.float() + weight.reshape(r, 1) * profile.reshape(1, -1)
    return exp_avg_sq.float() + profile.reshape(-1, 1) * weight.reshape(1, r)


@functools.lru_cache(maxsize=16)
def momentum_prior_weight(beta1: float) -> float:
    """``λ(β1)``: the largest share of the refresh gradient a new direction's first moment may start from
    (:func:`fill_new_momentum`) without any of its steps exceeding AdamW's first steps on the same stream.

    A first moment started at ``λ·g₁`` (with full mass) gives ``g₁`` the weight ``β1^k·λ + (1−β1)·β1^(k−1)``
    ``k`` steps later, where AdamW's bias-corrected average gives it ``(1−β1)·β1^(k−1)/(1−β1^k)``. On a pure
    signal (``g`` constant) every ``λ ≤ 1`` stays under AdamW's step; on pure noise the step's size is the
    root of the sum of the squared weights, and ``λ`` is the largest value for which that never exceeds
    AdamW's, at any ``k`` (bisection on the closed form: 0.59 at β1 = 0.9, 0.43 at 0.95, 1 at β1 ≤ 0.5).
    """
    b = float(beta1)
    if b <= 0.0:
        return 0.0  # no memory: the first moment is the gradient itself
    e = 1.0 - b

    def worst(lam: float) -> float:
        out = 0.0
        for k in range(1, int(60 / e) + 2):
            s = (1.0 - b ** (2 * k)) / (1.0 - b * b)  # Σ_{i<k} β1^(2i)
            ours = (b**k * lam + e * b ** (k - 1)) ** 2 + e * e * (s - b ** (2 * (k - 1)))
            out = max(out, ours / (e * e * s / (1.0 - b**k) ** 2))
        return out

    lo, hi = 0.0, 1.0
    if worst(hi) <= 1.0 + 1e-9:
        return hi
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if worst(mid) <= 1.0 + 1e-9 else (lo, mid)
    return lo


@torch.no_grad()
def fill_new_momentum(exp_avg: Tensor, known: Tensor | None, low: Tensor, side: Side, mass: Tensor | float) -> Tensor:
    """The first moment's counterpart of :func:`fill_new_directions`: ``M_new[i] += (1 − known_i)₊·mass·G̃_i``
    with ``G̃ = PᵀG`` the refresh step's projected gradient (same layout as ``exp_avg``) and ``mass`` =
    ``λ(β1)·(1 − β1^t)`` (:func:`momentum_prior_weight`): a new direction's momentum starts from a shrunk
    one-sample estimate of its mean instead of zero. Returns a new fp32 tensor."""
    axis = 0 if side == "left" else 1
    r = exp_avg.shape[axis]
    if known is None:
        known = torch.zeros(r, device=exp_avg.device)
    weight = (1.0 - known.float()).clamp(min=0.0) * torch.as_tensor(mass, device=exp_avg.device)
    shape = (r, 1) if side == "left" else (1, r)
    return exp_avg.float() + weight.reshape(shape) * low.float()


@torch.no_grad()
def carry_moments(
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor,
    rot: Tensor | None,
    side: Side,
    new_shape: tuple[int, int],
    low: Tensor,
    step: Tensor,
    betas: tuple[float, float],
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Adam's moments ``(M, V)`` (fp32) of a subspace refresh, in the new basis: carried by the rotation ``rot`` =
    ``P_newᵀ P_old`` (:func:`~lightning_adarank.optim.linalg.rotate_moments`), or restarted at zero in
    ``new_shape`` (``rot=None``: ``transform_moments=False`` with a new rank; ``exp_avg`` is then not read); then the directions new to the
    subspace get the mass they miss (:func:`fill_new_directions`, :func:`fill_new_momentum`) from ``low``, this
    step's projected gradient in the new basis, at Adam's step count ``step`` (a tensor) and ``betas``.

    The one formula of every installer (single process and FSDP2). ``reduce``: applied to
    :func:`refresh_energies`' sums where the columns are sharded (an all-reduce)."""
    if rot is None:
        m = torch.zeros(new_shape, device=low.device)
        v, known = torch.zeros(new_shape, device=low.device), None
    else:
        (m, v), known = rotate_moments(rot, exp_avg, exp_avg_sq, side), known_share(rot)
    sums = refresh_energies(exp_avg_sq, low, side)
    if reduce is not None:
        sums = reduce(sums)
    t = step.to(v.device, torch.float32)
    beta1, beta2 = betas
    v = fill_new_directions(v, exp_avg_sq, known, side, sums, 1.0 - beta2**t)
    m = fill_new_momentum(m, known, low, side, momentum_prior_weight(beta1) * (1.0 - beta1**t))
    return m, v
