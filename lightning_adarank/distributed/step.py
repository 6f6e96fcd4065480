"""AdaRankGrad's per-matrix step on FSDP2 parameters (``Shard(0)`` DTensors), without gathering a gradient.

:meth:`AdaRankGrad.step_params <lightning_adarank.AdaRankGrad.step_params>` hands its DTensor parameters to
:func:`step_sharded`. Each rank holds rows ``o_i … o_i + m_i`` of a weight ``W`` (``m × n``) and of its gradient
``G`` (FSDP2 has reduce-scattered it: the rows of the global mean gradient). The projection side is the one a
single process uses (:func:`~lightning_adarank.optim.linalg.projection_side`), so both compute the same thing:

**right side** (``m > n``: embeddings, MLP up-projections). ``P`` is ``n × r``.
  * sketch ``Y ← β1·Y + (1−β1)·GᵀΩ`` with ``GᵀΩ = Σ_i G_iᵀ Ω_i`` (``Ω_i``: rows ``o_i …`` of the single-process
    ``Ω``, regenerated from the same seed): **one all-reduce of n × k**; ``Y`` and ``P`` (computed from ``Y`` by the
    same SVD as on one process) are replicated, identical on every rank;
  * ``R_i = G_i P`` local; the moments (``m_i × r``) are **sharded** with the weight; ``W_i ← d·W_i + α N_i Pᵀ``.

**left side** (``m <= n``: attention and MLP down-projections, LM heads with ``m <= n``). ``P`` is ``m × r``.
  * sketch ``Y_i ← β1·Y_i + (1−β1)·G_i Ω`` local (``Y`` is **sharded**, ``m_i × k``); a refresh takes ``Y``'s basis by
    the distributed CholeskyQR2 (:func:`~lightning_adarank.distributed.linalg.sharded_sketch_basis`); ``P``'s rows
    ``P_i`` are **sharded**;
  * ``R = Σ_i P_iᵀ G_i``: **one all-reduce of r × n**; the moments (``r × n``) are **replicated** (they are the size
    of ``r`` rows of the weight, the smallest piece of the state); ``W_i ← d·W_i + α P_i N`` local.

Every sum of one step (the right-side sketches, the left-side ``PᵀG`` and ``PᵀY``, and every squared norm that
decides a skip: ``‖G‖²`` at a refresh, ``‖R‖²``, ``‖G‖²`` of the unprojected parameters) travels in **one
all-reduce** (:class:`~lightning_adarank.distributed.collectives.SumBuffer`). A refresh adds, per left-side
matrix, two ``k × k`` all-reduces (CholeskyQR2) and one ``r × (n + k + r_old)`` for all of them. Ranks, bases,
skip decisions and the refresh test read all-reduced (hence identical) values, so every rank makes the same
choices. Unprojected DTensor parameters get torch's AdamW kernel on the DTensors themselves (their moments are
DTensors sharded like them).

Not supported on DTensors (clear errors): ``subspace_source="gradient"`` (power iterations would need a
distributed QR of ``G``'s range per iteration), ``state_bits``/``dense_state_bits`` below 32, the grouped step
(DTensor parameters always take this per-matrix path), placements other than FSDP2's ``Shard(0)`` on a 1-D mesh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..optim.linalg import projection_side, sketch_basis, sketch_ema, sketch_noise
from ..optim.new_directions import carry_moments
from ..optim.projected import adam_update_
from ..optim.refresh_test import captured_share, mark_refreshed, run_refresh_tests
from ..optim.step_context import StepContext
from .collectives import SumBuffer
from .layout import ShardLayout, local, shard_layout, sharded_like
from .linalg import sharded_sketch_basis

__all__ = ["check_sharded_group", "step_sharded"]


def check_sharded_group(group: dict, params: list[Tensor], optimizer: Any) -> None:
    """Refuse the settings the sharded step does not implement, naming them."""
    if group.get("dense_state_bits", 32) != 32 or (
        group.get("state_bits", 32) != 32 and any(optimizer.is_projected(p, group) for p in params)
    ):
        raise NotImplementedError(
            "AdaRankGrad: state_bits/dense_state_bits below 32 are not supported for FSDP2 (DTensor) parameters"
            " (low-bit moments are not DTensors, so distributed checkpoints could not shard them); use 32"
        )
    if group["subspace_source"] != "moment" and any(optimizer.is_projected(p, group) for p in params):
        raise NotImplementedError(
            "AdaRankGrad: subspace_source='gradient' is not supported for FSDP2 (DTensor) parameters (its power"
            " iterations need a distributed QR of the gradient's range per iteration); use the default"
            " subspace_source='moment'"
        )


@dataclass
class _Item:
    """One projected matrix during a sharded step."""

    p: Tensor
    g: Tensor  # local rows of the gradient, fp32
    st: dict
    lay: ShardLayout
    side: str
    k: int
    pending: bool
    h_sq: int = -1  # handle: ‖G‖² (refresh) or ‖R‖² (right side)
    h_fresh: int = -1  # right: Σ G_iᵀ Ω_i
    h_proj: int = -1  # left: Σ P_iᵀ [G_i | Y_i]
    h_ysq: int = -1  # left: Σ ‖Y_i‖²
    h_dev: int = -1  # left, refresh: Σ ‖G_i Ω − Y_i‖² (the sketch's noise floor)
    noise: Tensor | None = None  # left, refresh: the sketch's noise energy (all-reduced)
    sketch: Tensor | None = None  # left: the new local sketch rows
    low: Tensor | None = None  # projected gradient (right: local rows; left: replicated)
    stats: tuple[Tensor, Tensor] | None = field(default=None)  # (PᵀY, ‖Y‖²) for the refresh test


def _measures_noise(it: _Item, group: dict, old: Tensor | None, fresh: Tensor) -> bool:
    """Whether this step's sketch measures the noise floor (``noise_floor`` setting): a refresh step with an
    average to compare the fresh sketch to (:meth:`~lightning_adarank.optim.projected.ProjectedStep.update_sketch`'s rule)."""
    return it.pending and group.get("noise_floor", False) and old is not None and old.shape == fresh.shape


def _blend(old: Tensor | None, fresh: Tensor, beta1: float) -> Tensor:
    """The moment sketch's average, with the single process's arithmetic (:meth:`~lightning_adarank.optim.projected.ProjectedStep.update_sketch`)."""
    if old is None or old.shape != fresh.shape:
        return fresh
    return sketch_ema(old, fresh, beta1)


@torch.no_grad()
def step_sharded(opt: Any, params: list[Tensor], group: dict, grads: list[Tensor]) -> None:
    """Step ``params`` (DTensors of ``group``) with ``grads`` (their DTensor gradients); see the module docstring."""
    check_sharded_group(group, params, opt)
    ctx = opt.context
    by_group: dict[int, list[int]] = {}
    layouts = [shard_layout(p) for p in params]
    for i, lay in enumerate(layouts):
        by_group.setdefault(id(lay.group), []).append(i)
    for idx in by_group.values():
        _step_mesh(ctx, [params[i] for i in idx], group, [grads[i] for i in idx], [layouts[i] for i in idx])


def _step_mesh(
    ctx: StepContext, params: list[Tensor], group: dict, grads: list[Tensor], layouts: list[ShardLayout]
) -> None:
    beta1 = group["betas"][0]
    buf = SumBuffer(layouts[0].group)
    items: list[_Item] = []
    dense: list[tuple[Tensor, Tensor, int]] = []
    for p, grad, lay in zip(params, grads, layouts):
        if grad.is_sparse:
            raise TypeError("AdaRankGrad does not support sparse gradients")
        if not ctx.is_projected(p, group):
            dense.append((p, grad, buf.add_square_sum(local(grad))))
            continue
        st = ctx.new_matrix_state(p)
        m, n = p.shape
        side = projection_side(p.shape)
        g = local(grad).float()
        it = _Item(p, g, st, lay, side, min(group["max_rank"] + group["oversample"], min(m, n)), bool(st["pending"]))
        if side == "right":
            omega = ctx.test_matrix(m, it.k, g.device)[lay.offset : lay.offset + lay.rows]
            it.h_fresh = buf.add(g.mT @ omega)
            if it.pending:
                it.h_sq = buf.add_square_sum(g)
            else:
                it.low = g @ st["basis"]
                it.h_sq = buf.add_square_sum(it.low)
        else:
            old = st.get("sketch")
            old = None if old is None else local(old)
            fresh = g @ ctx.test_matrix(n, it.k, g.device)
            if _measures_noise(it, group, old, fresh):
                it.h_dev = buf.add_square_sum(fresh - old)
            it.sketch = _blend(old, fresh, beta1)
            if it.pending:
                it.h_sq = buf.add_square_sum(g)
            else:
                it.h_proj = buf.add(local(st["basis"]).mT @ torch.cat([g, it.sketch], 1))
                it.h_ysq = buf.add_square_sum(it.sketch)
        items.append(it)
    if not len(buf):
        return
    buf.reduce()  # the step's one all-reduce

    # skip decisions from all-reduced values (the same on every rank): one host read for all
    checks = [buf[h][0] for _, _, h in dense] + [
        buf[it.h_sq][0] if it.h_sq >= 0 else buf[it.h_proj].sum() for it in items
    ]
    finite = [math.isfinite(v) for v in torch.stack(checks).tolist()] if checks else []
    ok_dense = [(p, g) for (p, g, _), f in zip(dense, finite) if f]
    ok_items = [it for it, f in zip(items, finite[len(dense) :]) if f]
    skipped = len(checks) - len(ok_dense) - len(ok_items)
    if skipped:
        ctx.warn_skipped(skipped, stacklevel=5)
    if ok_dense:
        ctx.update_dense([p for p, _ in ok_dense], [g for _, g in ok_dense], group)

    refresh_left = []
    for it in ok_items:
        n = it.p.shape[1]
        if it.side == "right":
            old, fresh = it.st.get("sketch"), buf[it.h_fresh].clone()
            noise = None
            if _measures_noise(it, group, old, fresh):
                noise = sketch_noise(torch.linalg.vector_norm(fresh - old).square(), beta1)
            y = _blend(old, fresh, beta1)
            it.st["sketch"] = y
            if it.pending:
                basis, kept = sketch_basis(
                    y, energy=group["energy"], min_rank=group["min_rank"], max_rank=group["max_rank"], noise=noise
                )
                it.low = it.g @ basis
                _install(ctx, it, group, basis, kept, None)
            it.stats = (it.st["basis"].mT @ y, y.reshape(-1) @ y.reshape(-1))
        else:
            _store_sketch(it)
            if it.pending:
                it.noise = sketch_noise(buf[it.h_dev][0], beta1) if it.h_dev >= 0 else None
                refresh_left.append(it)
            else:
                red = buf[it.h_proj]
                it.low = red[:, :n]
                it.stats = (red[:, n:], buf[it.h_ysq][0])
    if refresh_left:
        _refresh_left(ctx, refresh_left, group)
    if ok_items:
        _update(ctx, ok_items, group)


def _store_sketch(it: _Item) -> None:
    old = it.st.get("sketch")
    if old is not None and tuple(old.shape) == (it.p.shape[0], it.k):
        local(old).copy_(it.sketch)
    else:
        it.st["sketch"] = sharded_like(it.sketch.clone(), it.lay)


def _refresh_left(ctx: StepContext, items: list[_Item], group: dict) -> None:
    """New left-side subspaces: the distributed basis of each sketch, then one all-reduce for every
    ``P_newᵀ [G | Y | P_old]`` (projected gradient, refresh-test statistic, moment rotation)."""
    buf = SumBuffer(items[0].lay.group)
    handles = []
    for it in items:
        basis, kept, _ = sharded_sketch_basis(
            it.sketch,
            it.lay.group,
            energy=group["energy"],
            min_rank=group["min_rank"],
            max_rank=group["max_rank"],
            noise=it.noise,
            rows=it.p.shape[0],
        )
        old = it.st.get("basis")
        parts = [it.g, it.sketch] + ([local(old).float()] if old is not None else [])
        handles.append((basis, kept, buf.add(basis.mT @ torch.cat(parts, 1)), buf.add_square_sum(it.sketch)))
    buf.reduce()
    for it, (basis, kept, h, h_ysq) in zip(items, handles):
        n, k = it.p.shape[1], it.k
        red = buf[h]
        it.low = red[:, :n]
        it.stats = (red[:, n : n + k], buf[h_ysq][0])
        _install(ctx, it, group, basis, kept, red[:, n + k :] if red.shape[1] > n + k else None)


def _install(ctx: StepContext, it: _Item, group: dict, basis: Tensor, kept: float, rot_left: Tensor | None) -> None:
    """Adopt a new basis: moments zeroed or carried over (``M ← R M``, ``V ← (R∘R) V``), the new directions'
    second moment filled (:func:`~lightning_adarank.optim.new_directions.carry_moments`, as on one process),
    then the bookkeeping."""
    st, lay = it.st, it.lay
    r = basis.shape[1]
    shape = (r, it.p.shape[1]) if it.side == "left" else (lay.rows, r)
    old = st.get("basis")
    if old is None:
        m = torch.zeros(shape, device=it.g.device)
        v = torch.zeros(shape, device=it.g.device)
    elif group["transform_moments"] or old.shape[1] != r:  # carried or restarted, new directions filled
        rot = None
        if group["transform_moments"]:
            rot = rot_left if it.side == "left" else basis.mT @ old  # right: replicated n × r bases
        m, v = carry_moments(
            local(st["exp_avg"]),
            local(st["exp_avg_sq"]),
            rot,
            it.side,
            shape,
            it.low,
            st["step"],
            group["betas"],
            reduce=_all_reduced(lay) if it.side == "right" else None,  # the columns (weight rows) are sharded
        )
    else:
        m, v = local(st["exp_avg"]), local(st["exp_avg_sq"])
    if it.side == "right":  # moments sharded with the weight, basis replicated
        st["exp_avg"], st["exp_avg_sq"] = sharded_like(m.contiguous(), lay), sharded_like(v.contiguous(), lay)
        st["basis"] = basis
    else:  # moments replicated (r × n), basis rows sharded
        st["exp_avg"], st["exp_avg_sq"] = m.contiguous(), v.contiguous()
        st["basis"] = sharded_like(basis, lay)
    mark_refreshed(st, r, kept, it.g.device)


def _all_reduced(lay: ShardLayout):
    """A function that all-reduces a small vector over ``lay``'s process group (one :class:`SumBuffer`)."""

    def reduce(x: Tensor) -> Tensor:
        buf = SumBuffer(lay.group)
        h = buf.add(x)
        buf.reduce()
        return buf[h]

    return reduce


def _update(ctx: StepContext, items: list[_Item], group: dict) -> None:
    """Adam on the projected gradients (torch's kernel on local/replicated moments), back-projection into the
    local rows, and the refresh test on the all-reduced sketch statistics."""
    views = [
        {"exp_avg": local(it.st["exp_avg"]), "exp_avg_sq": local(it.st["exp_avg_sq"]), "step": it.st["step"]}
        for it in items
    ]
    adam_update_(
        ctx,
        [it.p for it in items],
        [it.low.contiguous() for it in items],
        views,
        [local(it.st["basis"]) for it in items],
        group,
        targets=[local(it.p) for it in items],
    )
    stats = []
    for it, view in zip(items, views):
        it.st["step"] = view["step"]
        pty, ysq = it.stats
        stats += [pty.reshape(-1) @ pty.reshape(-1), ysq.reshape(())]
    values = torch.stack(stats).tolist()  # one host read
    inside = [math.sqrt(values[2 * j]) for j in range(len(items))]
    run_refresh_tests(
        [it.st for it in items],
        group,
        inside,
        [captured_share(values[2 * j], values[2 * j + 1]).item() for j in range(len(items))],
    )
