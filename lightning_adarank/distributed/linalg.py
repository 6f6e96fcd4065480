"""The distributed range finder: a basis of a row-sharded sketch without gathering it.

For the left side (``m <= n``) of an FSDP2 weight the moment sketch ``Y = M Ω`` (``m × k``) is split by rows like
the weight: rank ``i`` holds ``Y_i``. Its left singular vectors are found by **CholeskyQR2** on the small Gram
matrix (Yamamoto et al. 2015), in fp64:

1. ``W = Σ_i Y_iᵀ Y_i`` (one all-reduce of ``k × k``), ``W = R₁ᵀR₁`` (Cholesky, replicated), ``Q_i = Y_i R₁⁻¹``;
2. the same once more on ``Q`` (one all-reduce of ``k × k``): ``Q_i ← Q_i R₂⁻¹``, ``R = R₂ R₁``, so ``Y = Q R`` with
   ``Q`` orthonormal to fp64 rounding;
3. the SVD of the ``k × k`` ``R = U_R Σ V_Rᵀ`` (replicated): ``Y``'s singular values are ``Σ`` and its left singular
   vectors ``Q U_R``, whose rows ``Q_i U_R`` stay on rank ``i``.

Every rank factorizes the same all-reduced ``W``, so the rank and the basis agree on every rank bit for bit. The
Cholesky factor is refused when it fails or its diagonal spans more than
:func:`~lightning_adarank.optim.linalg.cholesky_qr_condition_limit` (fp64: about 6.7e6; rank-deficient sketches,
e.g. a gradient of rank below ``k`` or an all-zero one, land here); the sketch is then gathered (``m × k``, never
the ``m × n`` gradient) and decomposed exactly as on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.linalg import cholesky_qr_condition_limit, sketch_rank
from .collectives import all_gather_rows

__all__ = ["sharded_left_singular", "sharded_sketch_basis"]


def _cholesky_upper(w: Tensor) -> Tensor | None:
    """Upper Cholesky factor ``R`` (``W = RᵀR``), or ``None`` when ``W`` is not safely positive definite."""
    if not bool(torch.isfinite(w).all()):
        return None
    low, info = torch.linalg.cholesky_ex(w)
    if int(info) != 0:
        return None
    d = low.diagonal().abs()
    if not bool(d.min() > 0) or float(d.max() / d.min()) > cholesky_qr_condition_limit(torch.float64):
        return None
    return low.mT


@torch.no_grad()
def sharded_left_singular(y_local: Tensor, group: object) -> tuple[Tensor, Tensor, bool]:
    """Left singular vectors and singular values of the row-sharded ``Y`` (rank ``i`` holds rows ``Y_i``).

    Returns ``(U_i, σ, gathered)``: this rank's rows of ``U`` (fp64, ``m_i × k``), all ``k`` singular values (fp64,
    descending, replicated) and whether the fallback gathered ``Y`` (ill-conditioned Gram matrix).
    """
    y = y_local.double()
    w1 = y.mT @ y
    dist.all_reduce(w1, group=group)
    r1 = _cholesky_upper(w1)
    if r1 is not None:
        q = torch.linalg.solve_triangular(r1, y, upper=True, left=False)  # Y R₁⁻¹
        w2 = q.mT @ q
        dist.all_reduce(w2, group=group)
        r2 = _cholesky_upper(w2)
        if r2 is not None:
            q = torch.linalg.solve_triangular(r2, q, upper=True, left=False)
            ub, sv, _ = torch.linalg.svd(r2 @ r1)
            return q @ ub, sv, False
    # ill-conditioned (every rank decides alike: the same all-reduced Gram): gather the m × k sketch
    full, start = all_gather_rows(y_local.float(), group)
    u, sv, _ = torch.linalg.svd(full, full_matrices=False)
    return u[start : start + y_local.shape[0]].double(), sv.double(), True


@torch.no_grad()
def sharded_sketch_basis(
    y_local: Tensor,
    group: object,
    *,
    rows: int,
    energy: float,
    min_rank: int,
    max_rank: int,
    noise: Tensor | float | None = None,
) -> tuple[Tensor, float, bool]:
    """:func:`~lightning_adarank.optim.linalg.sketch_basis` for a row-sharded sketch.

    Returns this rank's rows of the top-``r`` left singular vectors (fp32, ``m_i × r``), the share of ``‖Y‖²`` they
    keep, and whether the sketch was gathered. ``r`` and the share are identical on every rank. ``rows``: the whole
    sketch's number of rows (all shards); ``noise``: its noise energy (all-reduced by the caller), as in
    ``sketch_basis``.
    """
    u, sv, gathered = sharded_left_singular(y_local, group)
    r, kept = sketch_rank(sv, rows, energy=energy, min_rank=min_rank, max_rank=max_rank, noise=noise)
    return u[:, :r].float().contiguous(), kept, gathered
