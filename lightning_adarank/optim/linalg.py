"""The paper's algorithms as pure functions on tensors (no optimizer state, no Lightning).

Notation: a weight gradient ``G`` of shape ``(m, n)`` is projected on its *smaller* side, as GaLore does.
``side == "left"`` (``m <= n``): ``P`` is ``(m, r)`` and the projected gradient is ``Pᵀ G`` of shape ``(r, n)``.
``side == "right"`` (``m > n``): ``P`` is ``(n, r)`` and the projected gradient is ``G P`` of shape ``(m, r)``.

- :func:`range_finder` — Algorithm 1: randomized range finder (Halko, Martinsson & Tropp 2011) with power
  iterations, returning an orthonormal basis of the dominant subspace and approximate singular values.
  Never a full SVD of the gradient: the only SVD is of a ``(k, l)`` sketch with ``k = rank + oversample``.
- :func:`sketch_basis` — basis and rank from an accumulated sketch ``Y = M Ω`` of the smoothed gradient
  ``M`` (the optimizer's default ``subspace_source="moment"``): one small SVD of ``Y``, no pass over ``G``.
- :func:`sketch_noise` / :func:`signal_spectrum` — the sketch's mini-batch noise floor, removed before the rank
  is chosen (the rank follows the smoothed gradient's structure, not its noise).
- :func:`select_rank` — Algorithm 2: smallest rank that keeps a fraction ``energy`` of ``‖G‖²_F``.
- :func:`moment_transform` — Algorithm 3, block 2: carry Adam's moments into a new subspace.
- :func:`project` / :func:`project_back` — the projection and its adjoint.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .rounding import LOW_PRECISION, add_stochastic_

Side = Literal["left", "right"]

__all__ = [
    "Side",
    "projection_side",
    "subspace_seed",
    "range_finder",
    "select_rank",
    "low_rank_basis",
    "sketch_basis",
    "sketch_noise",
    "signal_spectrum",
    "sketch_rank",
    "sketch_side",
    "moment_transform",
    "rotate_moments",
    "project",
    "projected_shape",
    "project_back",
    "rank_factor",
    "apply_update_",
    "add_to_weight_",
    "sketch_ema",
    "cholesky_qr_condition_limit",
    "orthonormalize_batched",
    "oriented_batched",
    "range_finder_batched",
    "select_ranks_batched",
]


def projection_side(shape: torch.Size | tuple[int, ...]) -> Side:
    """Which side of a 2-D weight is projected: the smaller one (``"left"`` when rows <= columns)."""
    m, n = shape
    return "left" if m <= n else "right"


def _oriented(grad: Tensor, side: Side) -> Tensor:
    """The matrix ``A`` whose column space is sought: ``G`` for the left side, ``Gᵀ`` (a view) for the right."""
    return grad if side == "left" else grad.mT


def subspace_seed(seed: int, index: int, refresh: int) -> int:
    """A 63-bit seed mixed from the user seed, the parameter's index and its refresh count (splitmix64).

    Every data-parallel rank derives the same random test matrix from the same all-reduced gradient,
    so subspaces agree across ranks without any communication.
    """
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + refresh * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) % (1 << 64)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x & ((1 << 63) - 1)


@torch.no_grad()
def range_finder(
    grad: Tensor,
    side: Side,
    sketch_size: int,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Randomized range finder (the paper's Algorithm 1).

    Sketches the projected side of ``grad`` with a Gaussian test matrix of ``sketch_size`` columns,
    runs ``power_iters`` power iterations with re-orthonormalisation after every product (for numerical
    stability), then takes a small SVD of the ``(k, l)`` matrix ``QᵀA``: :func:`range_finder_batched` on a
    stack of one (CholeskyQR2 with a Householder fallback, :func:`orthonormalize_batched`).

    Args:
        grad: 2-D float tensor ``(m, n)`` (fp32 recommended).
        side: which side is projected (see :func:`projection_side`).
        sketch_size: number of sketch columns ``k`` (target rank + oversampling); clipped to ``min(m, n)``.
        power_iters: power iterations ``q``; each costs two products with ``grad``.
        generator: RNG for the test matrix (on ``grad``'s device).

    Returns:
        ``(U, S, W)``: ``U`` of shape ``(s, k)`` with orthonormal columns, approximate leading singular vectors
        of the projected side (``s = min(m, n)``); ``S`` the ``k`` approximate singular values, descending;
        ``W = Uᵀ A`` of shape ``(k, l)``, the projected matrix, which falls out of the small SVD for free
        (``W = diag(S) Vᵀ``), so ``‖U[:, :r]ᵀ A‖²_F == Σ S[:r]²`` holds exactly (up to rounding).
    """
    a = _oriented(grad, side)  # (s, l), s <= l
    s, l = a.shape
    k = max(1, min(sketch_size, s))
    omega = torch.randn(l, k, generator=generator, device=a.device, dtype=a.dtype)
    u, sv, w, _ = range_finder_batched(a.unsqueeze(0), omega.unsqueeze(0), power_iters)  # one implementation
    return u[0], sv[0], w[0]


def select_rank(singular_values: Tensor, total_energy: float, energy: float, min_rank: int, max_rank: int) -> int:
    """Adaptive rank (the paper's Algorithm 2).

    The smallest ``r`` in ``[min_rank, max_rank]`` with ``Σ_{i<=r} σ_i² >= energy · ‖G‖²_F``; ``max_rank``
    when even that cannot reach ``energy``. ``total_energy`` is the exact ``‖G‖²_F``.
    """
    total = torch.tensor([float(total_energy)], dtype=torch.float64, device=singular_values.device)
    return int(select_ranks_batched(singular_values.unsqueeze(0), total, energy, min_rank, max_rank)[0])


@torch.no_grad()
def low_rank_basis(
    grad: Tensor,
    side: Side,
    *,
    energy: float,
    min_rank: int,
    max_rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
    total_energy: float | None = None,
) -> tuple[Tensor, float, Tensor]:
    """Range finder + rank selection.

    Returns an orthonormal ``(s, r)`` basis ``P``, the share of ``‖G‖²_F`` it keeps, and the projected
    gradient in :func:`project`'s layout (``PᵀG`` or ``G P``), taken from the range finder at no extra pass.
    """
    if total_energy is None:
        total_energy = float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
    u, sv, w = range_finder(grad, side, max_rank + oversample, power_iters, generator)
    r = select_rank(sv, total_energy, energy, min_rank, max_rank)
    kept = float(sv[:r].double().square().sum()) / total_energy if total_energy > 0 else 1.0
    low = w[:r] if side == "left" else w[:r].mT
    return u[:, :r].contiguous(), kept, low.contiguous()


def sketch_side(grad: Tensor, side: Side) -> Tensor:
    """The matrix ``A`` (``s × l``) whose column space the sketch ``Y = A Ω`` tracks: ``G`` or ``Gᵀ`` (a view)."""
    return _oriented(grad, side)


@torch.no_grad()
def sketch_noise(deviation_sq: Tensor, beta1: float) -> Tensor:
    """The mini-batch noise energy ``ν`` in the moment sketch ``Y = EMA_β1(G Ω)``, from one step's deviation.

    ``deviation_sq = ‖G_t Ω − Y_{t−1}‖²``: this step's fresh sketch against the average before it. If the fresh
    sketches are a slowly moving mean plus independent noise of energy ``σ²`` per step, the average keeps
    ``ν = σ²·(1−β1)/(1+β1)`` of it and the deviation has ``E‖D‖² = σ² + ν``, hence ``ν = (1−β1)/2 · E‖D‖²``. One
    step's ``‖D‖²`` sums ``s·k`` entries, so it estimates that well. Drift of the mean adds to ``‖D‖²`` only damped
    by the same ``(1−β1)/2``; it can only overstate ``ν``.
    """
    return deviation_sq * (0.5 * (1.0 - beta1))


def signal_spectrum(singular_values: Tensor, noise: Tensor | float, rows: int) -> Tensor:
    """The sketch's energy per direction above its noise floor: ``max(σ_i² − c·ν/k, 0)`` over the last dimension.

    ``singular_values`` is ``(…, k)`` of an ``rows × k`` sketch, ``noise`` (``ν``, :func:`sketch_noise`) a number or
    a ``(…)`` tensor. The noise part of ``Y`` is a ``rows × k`` matrix of roughly independent entries (noise through
    a Gaussian ``Ω``) with energy ``ν``: its ``k`` squared singular values average ``ν/k`` and spread up to the
    Marchenko–Pastur edge ``c·ν/k``, ``c = (1 + √(k/rows))²``. Only energy above that edge is signal; pure noise
    leaves (almost) nothing. Noise stronger along some directions than others shows up as signal there (a higher
    rank: the safe side).
    """
    k = singular_values.shape[-1]
    edge = (1.0 + math.sqrt(k / max(rows, k))) ** 2 / k
    noise = torch.as_tensor(noise, dtype=torch.float64, device=singular_values.device)
    return (singular_values.double().square() - edge * noise.unsqueeze(-1)).clamp(min=0.0)


def sketch_basis(
    sketch: Tensor, *, energy: float, min_rank: int, max_rank: int, noise: Tensor | float | None = None
) -> tuple[Tensor, float]:
    """Basis and adaptive rank from a sketch ``Y = M Ω`` (``s × k``) of a matrix ``M`` (``s × l``).

    ``Ω`` is an ``l × k`` Gaussian test matrix, so ``Y``'s range approximates ``M``'s dominant column space
    (the randomized range finder without power iterations) and its singular values ``σ_i(Y)`` sample how
    ``M``'s energy is spread over directions. Returns the top-``r`` left singular vectors of ``Y`` (orthonormal,
    ``s × r``) and the share ``Σ_{i<=r} σ_i(Y)² / ‖Y‖²_F`` they keep, with ``r`` the smallest rank in
    ``[min_rank, max_rank]`` whose share reaches ``energy`` (:func:`select_rank` with ``‖Y‖²_F`` as total).
    With ``noise`` (``ν``, :func:`sketch_noise`) the rank is chosen on the energy above the noise floor
    (:func:`signal_spectrum`): the smallest ``r`` keeping ``energy`` of the signal; pure noise gives ``min_rank``.

    A rank-``ρ`` ``M`` (``ρ <= k``) gives a rank-``ρ`` ``Y``, hence ``r = ρ`` at any ``energy < 1``; a flat
    spectrum of more than ``k`` directions gives a flat ``σ(Y)``, hence ``r ≈ energy · k`` (capped at
    ``max_rank``). Only the ``k`` sampled directions are seen: the share is of ``‖Y‖²``, not of ``‖M‖²``.
    """
    u, sv, _ = torch.linalg.svd(sketch, full_matrices=False)
    r, kept = sketch_rank(sv, sketch.shape[0], energy=energy, min_rank=min_rank, max_rank=max_rank, noise=noise)
    return u[:, :r].contiguous(), kept


def sketch_rank(
    singular_values: Tensor,
    rows: int,
    *,
    energy: float,
    min_rank: int,
    max_rank: int,
    noise: Tensor | float | None = None,
) -> tuple[int, float]:
    """:func:`sketch_basis`'s rank and kept share from the singular values of a ``rows × k`` sketch (shared with
    the sharded sketch basis): the rank on the energy above the noise floor when ``noise`` is given."""
    sv = singular_values
    total = float(sv.double().square().sum())
    if noise is None:
        r = select_rank(sv, total, energy, min_rank, max_rank)
    else:
        signal = signal_spectrum(sv, noise, rows)
        r = select_rank(signal.sqrt(), float(signal.sum()), energy, min_rank, max_rank)
    r = min(r, sv.numel())
    return r, float(sv[:r].double().square().sum()) / total if total > 0 else 1.0


@torch.no_grad()
def moment_transform(
    p_old: Tensor, p_new: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, side: Side
) -> tuple[Tensor, Tensor]:
    """Carry Adam's moments from subspace ``P_old`` to ``P_new`` (ranks may differ).

    With ``R = P_newᵀ P_old`` (``r_new × r_old``): ``M ← R M`` and ``V ← (R∘R) V`` (element-wise square, so
    ``V`` stays non-negative). ``R M`` is the exact coordinates, in the new basis, of the first moment's
    component that lies in the new subspace; ``(R∘R) V`` is the second moment of those coordinates if the
    old coordinates were uncorrelated (the diagonal approximation Adam already makes). When the subspace
    does not change (``P_new = P_old``), ``R = I`` and both moments are returned unchanged.
    For ``side == "right"`` the moments are stored transposed (``(m, r)``), so the products are on the right.
    """
    return rotate_moments(p_new.mT @ p_old, exp_avg, exp_avg_sq, side)


def rotate_moments(rot: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, side: Side) -> tuple[Tensor, Tensor]:
    """:func:`moment_transform` from the rotation ``R = P_newᵀ P_old`` (``r_new × r_old``) itself: ``M ← R M``,
    ``V ← (R∘R) V`` (left side), or ``M Rᵀ``, ``V (R∘R)ᵀ`` (right side, moments stored ``(m, r)``). FSDP2 forms
    ``R`` from sharded bases and calls this."""
    if side == "left":
        return rot @ exp_avg, rot.square() @ exp_avg_sq
    return exp_avg @ rot.mT, exp_avg_sq @ rot.square().mT


def projected_shape(shape: tuple[int, ...] | torch.Size, rank: int) -> tuple[int, int]:
    """Shape of a projected gradient and of its moments at ``rank`` (:func:`project`'s layout): ``(r, n)`` when
    ``m <= n``, else ``(m, r)``."""
    m, n = shape
    return (rank, n) if m <= n else (m, rank)


def project(grad: Tensor, basis: Tensor, side: Side) -> Tensor:
    """Projected gradient: ``Pᵀ G`` (left, ``(r, n)``) or ``G P`` (right, ``(m, r)``)."""
    return basis.mT @ grad if side == "left" else grad @ basis


def project_back(low_rank: Tensor, basis: Tensor, side: Side) -> Tensor:
    """Adjoint of :func:`project`: ``P N`` (left) or ``N Pᵀ`` (right), back in the weight's shape."""
    return basis @ low_rank if side == "left" else low_rank @ basis.mT


def sketch_ema(y: Tensor, fresh: Tensor, beta1: float, *, new_step: bool = True) -> Tensor:
    """The moment sketch's average: ``β1·Y + (1−β1)·A Ω`` (``fresh = A Ω``, overwritten and returned).

    ``new_step=False`` (one more micro-batch's share of the same step, the layer-wise accumulation) adds
    ``(1−β1)·A Ω`` without decaying ``Y`` again. By linearity ``Y`` stays the sketch ``M Ω`` of the first moment.
    Every path (per-matrix, grouped, layer-wise, FSDP2) averages with this one function.
    """
    if not new_step:
        return fresh.mul_(1.0 - beta1).add_(y)
    return fresh.mul_(1.0 - beta1).add_(y, alpha=beta1)


def add_to_weight_(weight: Tensor, delta: Tensor) -> None:
    """``W ← W + Δ`` for an fp32 ``Δ``: in place for fp32 ``W``; fp16/bf16 ``W`` takes ``Δ`` rounded to its dtype."""
    weight.add_(delta if weight.dtype == delta.dtype else delta.to(weight.dtype))


def rank_factor(scale_mode: str, side_len: int, rank: int) -> float:
    """``c`` in the projected update's ``α = lr·scale·c``: ``√(s/r)`` for ``scale_mode="rms"`` (the update's RMS
    is then ``lr·scale·rms(N)`` whatever the rank ``r`` and projected side ``s``), ``1`` for ``"galore"``."""
    return math.sqrt(side_len / rank) if scale_mode == "rms" else 1.0


def apply_update_(
    weight: Tensor,
    basis: Tensor,
    direction: Tensor,
    side: Side,
    *,
    decay: float,
    alpha: float,
    salt: int | Tensor | None = None,
    kind: int = 0,
) -> None:
    """``W ← decay·W + α·project_back(N)`` in place: one ``addmm_`` pass over an fp32 ``W``; for fp16/bf16 the
    whole right-hand side is formed in fp32 a chunk of rows at a time and written with stochastic rounding
    seeded by ``(salt, kind)`` (:func:`~lightning_adarank.optim.rounding.add_stochastic_`; ``salt=None``: round
    to nearest)."""
    if weight.dtype == torch.float32:
        if side == "left":
            weight.addmm_(basis, direction, beta=decay, alpha=alpha)
        else:
            weight.addmm_(direction, basis.mT, beta=decay, alpha=alpha)
        return
    if weight.dtype in LOW_PRECISION:
        if side == "left":
            add_stochastic_(
                weight, lambda r0, r1: (basis[r0:r1] @ direction).mul_(alpha), decay=decay, salt=salt, kind=kind
            )
        else:
            add_stochastic_(
                weight, lambda r0, r1: (direction[r0:r1] @ basis.mT).mul_(alpha), decay=decay, salt=salt, kind=kind
            )
        return
    if decay != 1.0:
        weight.mul_(decay)
    add_to_weight_(weight, project_back(direction, basis, side).mul_(alpha))


# ----------------------------------------------------------------------------- batched (a stack of same-shape matrices)
# The grouped step (:mod:`~lightning_adarank.optim.grouped`) runs every matrix of one shape through these at once:
# one operator per stage for the whole stack instead of one per matrix. Shapes carry a leading batch dimension B.


def cholesky_qr_condition_limit(dtype: torch.dtype) -> float:
    """Largest estimated condition number of a sketch that Cholesky-QR2 orthonormalises safely in ``dtype``.

    CholeskyQR2 is accurate to working precision when ``u·κ(Y)² ≪ 1`` (Yamamoto et al. 2015); the estimate
    used (ratio of the Cholesky factor's extreme diagonal entries) can undershoot ``κ`` by a modest factor, so the
    limit is ``0.1/√u``: about 290 in fp32, 6.7e6 in fp64. Above it the Householder QR is used instead.
    """
    return 0.1 / torch.finfo(dtype).eps ** 0.5


@torch.no_grad()
def orthonormalize_batched(y: Tensor, max_cond: float | None = None) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of the column spaces of ``y[b]`` (``(B, s, k)``, ``s >= k``): CholeskyQR2, with fallback.

    Cholesky-QR forms the small Gram matrix ``YᵀY = LLᵀ`` and returns ``Y L⁻ᵀ``: two batched matmuls and a
    ``(k, k)`` factorisation instead of a Householder QR over the tall matrix (much faster on GPUs). It squares
    the condition number, so it is applied twice (CholeskyQR2) and a matrix falls back to
    ``torch.linalg.qr`` (Householder) when its Gram matrix is not positive definite (rank-deficient or
    non-finite sketch) or its estimated condition number exceeds ``max_cond``
    (default :func:`cholesky_qr_condition_limit`).

    Returns ``(Q, fallback)``: ``Q`` of ``y``'s shape with orthonormal columns, and a ``(B,)`` bool tensor
    telling which matrices took the Householder path. Reading the fallback decision is one host
    synchronisation (this runs on refresh steps only).
    """
    if y.dim() != 3 or y.shape[1] < y.shape[2]:
        raise ValueError(f"orthonormalize_batched expects (B, s, k) with s >= k, got {tuple(y.shape)}")
    limit = cholesky_qr_condition_limit(y.dtype) if max_cond is None else max_cond
    q = y
    bad = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        diag = chol.diagonal(dim1=-2, dim2=-1)
        bad |= (info != 0) | ~(diag.amin(-1) * limit > diag.amax(-1))  # ~(>) also catches nan
        chol = torch.where(bad[:, None, None], torch.eye(y.shape[2], dtype=y.dtype, device=y.device), chol)
        q = torch.linalg.solve_triangular(chol.mT, q, upper=True, left=False)  # Q Lᵀ = Y
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        q = q.index_copy(0, idx, torch.linalg.qr(y.index_select(0, idx), mode="reduced")[0])
    return q, bad


def oriented_batched(grads: Tensor, side: Side) -> Tensor:
    """The stack of matrices ``A`` whose column spaces are sought: ``G`` (left) or ``Gᵀ`` (right, a view)."""
    return grads if side == "left" else grads.mT


@torch.no_grad()
def range_finder_batched(a: Tensor, omega: Tensor, power_iters: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`range_finder` for a stack ``a`` of oriented matrices ``(B, s, l)`` with test matrices ``omega``.

    ``omega`` is ``(B, l, k)`` (drawn by the caller, one generator per matrix, so a matrix's subspace does not
    depend on what it is batched with). Orthonormalisation is :func:`orthonormalize_batched`.

    Returns ``(U, S, W, fallback)``: ``U`` ``(B, s, k)`` orthonormal, ``S`` ``(B, k)`` descending, ``W = Uᵀ A``
    ``(B, k, l)`` (so ``‖U[:, :, :r]ᵀ A‖² = Σ S[:r]²``), and the ``(B,)`` count of Householder fallbacks.
    """
    y = torch.bmm(a, omega)
    fallbacks = torch.zeros(a.shape[0], dtype=torch.int64, device=a.device)
    for _ in range(power_iters):
        q, bad = orthonormalize_batched(y)
        z, bad2 = orthonormalize_batched(torch.bmm(a.mT, q))
        fallbacks += bad.long() + bad2.long()
        y = torch.bmm(a, z)
    q, bad = orthonormalize_batched(y)
    fallbacks += bad.long()
    b = torch.bmm(q.mT, a)  # (B, k, l)
    ub, sv, vh = torch.linalg.svd(b, full_matrices=False)
    return torch.bmm(q, ub), sv, sv.unsqueeze(-1) * vh, fallbacks


def select_ranks_batched(
    singular_values: Tensor, total_energy: Tensor, energy: float, min_rank: int, max_rank: int
) -> Tensor:
    """:func:`select_rank` for a stack: ``(B, k)`` singular values, ``(B,)`` exact ``‖G‖²_F`` → ``(B,)`` ranks.

    Stays on the device (no host read); a matrix with ``‖G‖ = 0`` gets ``min_rank``.
    """
    k = singular_values.shape[-1]
    kept = torch.cumsum(singular_values.double().square(), -1) / total_energy.double().unsqueeze(-1)
    reached = kept >= energy * (1.0 - 1e-12)
    first = reached.long().argmax(-1) + 1  # first True (argmax of a 0/1 row returns its first maximum)
    ranks = torch.where(reached.any(-1), first, torch.full_like(first, max_rank))
    ranks = ranks.clamp(max=min(max_rank, k)).clamp(min=min_rank)
    return torch.where(total_energy > 0, ranks, torch.full_like(ranks, min_rank))
