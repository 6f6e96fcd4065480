"""The batched subspace refresh of the grouped step.

With ``subspace_source="moment"`` the pending matrices of one shape take their bases and ranks from one
batched SVD of their moment sketches ``Y`` (``(B, s, k)``; the per-matrix
:func:`~lightning_adarank.optim.linalg.sketch_basis`, batched). With ``"gradient"`` every pending matrix of one ``(shape, dtype, device)`` goes through one batched range finder
(:func:`~lightning_adarank.optim.linalg.range_finder_batched`: batched matmuls, CholeskyQR2 with a Householder
fallback, a batched SVD of the small sketches) and one batched rank selection; the rank, ``‖G‖²`` and the
energy kept come to the host in one read (a refresh step may synchronise: the rank decides the storage).
The random test matrix of each matrix is drawn from its own generator, seeded exactly as in the per-matrix
path (:func:`~lightning_adarank.optim.linalg.subspace_seed`), so a matrix's subspace does not depend on what it
is batched with and data-parallel ranks agree without communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import quant
from .grouped import STACK_BYTES
from .linalg import (
    oriented_batched,
    project,
    projected_shape,
    projection_side,
    range_finder_batched,
    select_ranks_batched,
    signal_spectrum,
)
from .new_directions import carry_moments
from .refresh_test import mark_refreshed

__all__ = ["refresh_batched", "install_subspace"]


def install_subspace(
    st: dict,
    p: Tensor,
    basis: Tensor,
    kept: float,
    transform_moments: bool,
    bits: int = 32,
    *,
    low: Tensor | None,
    betas: tuple[float, float],
) -> None:
    """Put a new basis into ``p``'s state, carrying the moments into it (``M ← R M``, ``V ← (R∘R) V``,
    :func:`~lightning_adarank.optim.linalg.moment_transform`) or starting them at zero, stored at ``bits``
    (:mod:`.quant`: loaded for the rotation, stored after it); the second moment of the directions new to the
    subspace is then filled to a carried row's averaging mass
    (:func:`~lightning_adarank.optim.new_directions.fill_new_directions`, from ``low``: this step's gradient
    projected on ``basis``, and Adam's ``betas``; the first moment likewise:
    :func:`~lightning_adarank.optim.new_directions.fill_new_momentum`); then the bookkeeping (:func:`mark_refreshed`).

    The one installer of a subspace for the per-matrix, grouped and layer-wise paths. FSDP2 stores sharded
    moments and bases, but forms its moments with the same
    :func:`~lightning_adarank.optim.new_directions.carry_moments` and then calls :func:`mark_refreshed`."""
    side = projection_side(p.shape)
    s, r = min(p.shape), basis.shape[1]
    r_old = int(st["rank"]) if "basis" in st else None
    new_shape = projected_shape(p.shape, r)
    if r_old is None:  # the first subspace: every direction starts with the step counter
        st["exp_avg"] = quant.zeros(new_shape, bits, signed=True, device=p.device)
        st["exp_avg_sq"] = quant.zeros(new_shape, bits, signed=False, device=p.device)
    elif transform_moments or r_old != r:
        if low is None:
            raise ValueError("install_subspace: a refresh of an existing subspace needs the projected gradient `low`")
        old_shape = projected_shape(p.shape, r_old)
        rot = basis.mT @ quant.load(st["basis"], (s, r_old)) if transform_moments else None
        m_old = quant.load(st["exp_avg"], old_shape) if transform_moments else None
        m, v = carry_moments(
            m_old, quant.load(st["exp_avg_sq"], old_shape), rot, side, new_shape, low, st["step"], betas
        )
        st["exp_avg"] = quant.store(None, m, bits, signed=True, salt=st.get("step"))
        st["exp_avg_sq"] = quant.store(None, v, bits, signed=False, salt=st.get("step"))
    st["basis"] = quant.store_basis(basis, bits)
    mark_refreshed(st, r, kept, p.device)


@torch.no_grad()
def refresh_batched(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    group: dict,
    seed_of: Callable[[Tensor, int], int],
    noises: list[Tensor | None] | None = None,
    *,
    stack_bytes: int = STACK_BYTES,
) -> list[bool]:
    """Refresh the subspace of every ``params[i]`` from ``grads[i]`` (or from its moment sketch, already updated
    with this gradient); ``False`` where the gradient is not finite (that matrix's state is left untouched).

    ``seed_of(p, refresh_count)`` gives the range finder's test-matrix seed (``subspace_source="gradient"``).
    The gradients of one shape are stacked ``stack_bytes`` at a time (the grouped step's bound).
    ``noises[i]``: the noise energy of ``params[i]``'s sketch (``None``: not measured); the rank is chosen above
    that floor (:func:`~lightning_adarank.optim.linalg.signal_spectrum`), as in the per-matrix refresh.
    """
    done = [False] * len(params)
    keys: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        keys.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
    max_rank, oversample = group["max_rank"], group["oversample"]
    moment = group["subspace_source"] == "moment"
    chunks = []  # at most stack_bytes of stacked fp32 gradients at once (at least one matrix)
    for (shape, dtype, device), idx in keys.items():
        per = max(1, stack_bytes // (4 * shape[0] * shape[1]))
        chunks += [((shape, dtype, device), idx[lo : lo + per]) for lo in range(0, len(idx), per)]
    for (shape, _, device), idx in chunks:
        side = projection_side(shape)
        if moment:  # ‖G‖² only (the non-finite check): no stack of the gradients
            gn2 = torch.stack([torch.linalg.vector_norm(grads[i], dtype=torch.float32) for i in idx]).square()
        else:
            g = torch.stack([grads[i].float() for i in idx])
            gn2 = torch.linalg.vector_norm(g, dim=(1, 2)).square()
        if moment:
            y = torch.stack([states[i]["sketch"] for i in idx])
            u, sv, _ = torch.linalg.svd(y, full_matrices=False)
            total = sv.double().square().sum(-1)  # the energy of the sketch (sketch_basis's total)
        else:
            finite = torch.isfinite(gn2)
            g = torch.where(finite[:, None, None], g, 0.0)  # a non-finite matrix is skipped below; keep the SVD sane
            a = oriented_batched(g, side)
            s, l = a.shape[1:]
            k = max(1, min(max_rank + oversample, s))
            omegas = []
            for i in idx:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed_of(params[i], states[i]["refreshes"]))
                omegas.append(torch.randn(l, k, generator=gen, device=device, dtype=torch.float32))
            u, sv, _, _ = range_finder_batched(a, torch.stack(omegas), group["power_iters"])
            total = gn2.double()
            del g, a  # the next chunk's stack must not coexist with this one
        rank_sv, rank_total = sv, total
        nu = [noises[i] for i in idx] if moment and noises is not None else []
        if any(v is not None for v in nu):  # the rank above the sketch's noise floor (as sketch_basis)
            zero = torch.zeros((), device=device)
            signal = signal_spectrum(sv, torch.stack([zero if v is None else v.reshape(()) for v in nu]), y.shape[1])
            rank_sv, rank_total = signal.sqrt(), signal.sum(-1)
        ranks = select_ranks_batched(rank_sv, rank_total, group["energy"], group["min_rank"], max_rank)
        ranks = ranks.clamp(max=u.shape[-1])
        kept_sq = torch.cumsum(sv.double().square(), -1).gather(1, (ranks - 1).unsqueeze(1)).squeeze(1)
        host = torch.cat((ranks.double(), total.double(), kept_sq, gn2.double())).tolist()  # one read per shape
        n = len(idx)
        for b, i in enumerate(idx):
            r, tot, kept, g2 = int(host[b]), host[n + b], host[2 * n + b], host[3 * n + b]
            if not (g2 == g2 and abs(g2) != float("inf")):  # non-finite gradient: skip this matrix
                continue
            basis = u[b, :, :r].contiguous()
            install_subspace(
                states[i],
                params[i],
                basis,
                kept / tot if tot > 0 else 1.0,
                group["transform_moments"],
                low=project(grads[i].float(), basis, side),
                betas=group["betas"],
            )
            done[i] = True
    return done
