"""The per-matrix step of :class:`~lightning_adarank.AdaRankGrad` (the CPU default, and the layer-wise mode's): the
moment sketch, the subspace refresh (basis, adaptive rank, moment transform), the projection, the update
``W ← W·(1 − lr·wd) + lr·α·c·P N`` and the refresh test, one matrix at a time, on the optimizer's
:class:`~lightning_adarank.optim.step_context.StepContext`. The layer-wise mode calls
:meth:`ProjectedStep.project_grad` and :meth:`ProjectedStep.update_projected` separately (through the optimizer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import quant
from .linalg import (
    apply_update_,
    low_rank_basis,
    project,
    projection_side,
    rank_factor,
    sketch_basis,
    sketch_ema,
    sketch_noise,
    sketch_side,
)
from .refresh import install_subspace
from .refresh_test import captured_share, run_refresh_tests
from .step_context import StepContext

__all__ = ["ProjectedStep", "adam_update_"]


def adam_update_(
    ctx: StepContext,
    params: list[Tensor],
    lowrank: list[Tensor],
    states: list[dict],
    bases: list[Tensor],
    group: dict,
    targets: list[Tensor] | None = None,
) -> None:
    """Adam in each matrix's subspace, then the update into its weight: the stage the per-matrix path, the
    layer-wise mode and FSDP2 share.

    torch's kernel (:meth:`~lightning_adarank.optim.adam_kernels.AdamKernels.adamw_stored`, at ``lr=1`` with no
    decay) turns ``lowrank[i]`` (``params[i]``'s projected gradient) into the direction ``N = −m̂/(√v̂+ε)``; then
    ``W ← (1 − lr·wd)·W + lr·scale·c·P N`` (:func:`~lightning_adarank.optim.linalg.apply_update_`, ``c`` from
    :func:`~lightning_adarank.optim.linalg.rank_factor` with ``s = min(W.shape)`` and ``r`` the basis' columns).

    ``states[i]``: the moments (``exp_avg``, ``exp_avg_sq``) and step counter of ``params[i]``; its ``step`` is
    replaced by the kernel's. ``bases[i]``: the fp32 basis ``P``. ``targets[i]``: the tensor the update is written
    into (default ``params[i]``). FSDP2 passes its local rows as ``targets``, ``bases`` (left side) and moments.
    """
    directions = [torch.zeros_like(r) for r in lowrank]  # become -m̂/(√v̂+ε)
    steps = ctx.kernels.adamw_stored(  # [state_bits]
        directions,
        lowrank,
        states,
        [d.shape for d in directions],
        group,
        group.get("state_bits", 32),
        lr=1.0,
        weight_decay=0.0,
        rotated=math.sqrt(group["max_rank"]) if group["transform_moments"] else 1.0,
    )
    lr, wd = float(group["lr"]), group["weight_decay"]  # these paths read on the host anyway
    decay = 1.0 - lr * wd
    for p, target, basis, st, s, d in zip(params, targets or params, bases, states, steps, directions):
        st["step"] = s
        alpha = lr * group["scale"] * rank_factor(group["scale_mode"], min(p.shape), basis.shape[1])
        rounding = ctx.weight_rounding(p, group, s)
        apply_update_(target, basis, d, projection_side(p.shape), decay=decay, alpha=alpha, **rounding)


class ProjectedStep:
    """Projection, sketch, refresh and projected update of one group's matrices (per-matrix path)."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    @torch.no_grad()
    def step(self, params: list[Tensor], group: dict, grads: list[Tensor]) -> None:
        """The per-matrix step: one projection, Adam call and update per matrix.

        One host synchronisation reads every norm the step needs at once: ``‖PᵀG‖`` of the projected
        gradients (refresh test; a non-finite ``G`` shows up there), ``‖G‖`` of the unprojected ones (the
        non-finite check) and ``‖G‖`` of the projected ones (captured share). A refresh additionally reads
        ``‖G‖²`` of the refreshed matrices.
        """
        ctx = self.ctx
        projected = [ctx.is_projected(p, group) for p in params]
        dense = [i for i, is_low in enumerate(projected) if not is_low]
        low, lowrank, skipped = [], [], 0
        grad_norms: dict[int, float] = {}  # ‖G‖ where known: refreshed matrices, and those measuring the share
        for i, p in enumerate(params):
            if not projected[i]:
                continue
            st = ctx.state[p]
            gsq = None
            if not st or st["pending"]:  # a refresh needs ‖G‖² (rank selection): reuse it for the share
                gsq = ctx.kernels.norms([grads[i]])[0] ** 2
            r = self.project_grad(p, grads[i], group, gsq, sketch=False)
            if r is None:
                skipped += 1
                continue
            low.append(i)
            lowrank.append(r)
            if gsq is not None:
                grad_norms[i] = math.sqrt(gsq)
        refreshed = set(grad_norms)
        share_idx = [i for i in low if i not in grad_norms and ctx.share_due(params[i])]
        tensors = lowrank + [grads[i] for i in dense] + [grads[i] for i in share_idx]
        norms = ctx.kernels.norms(tensors) if tensors else []
        proj_norms = norms[: len(low)]
        dense_norms = norms[len(low) : len(low) + len(dense)]
        grad_norms.update(zip(share_idx, norms[len(low) + len(dense) :]))
        ok_dense = [i for i, n in zip(dense, dense_norms) if math.isfinite(n)]
        ok_low = [
            k for k, i in enumerate(low) if math.isfinite(proj_norms[k]) and math.isfinite(grad_norms.get(i, 0.0))
        ]
        skipped += len(dense) - len(ok_dense) + len(low) - len(ok_low)
        if skipped:
            ctx.warn_skipped(skipped)
        if ok_dense:
            ctx.update_dense([params[i] for i in ok_dense], [grads[i] for i in ok_dense], group)
        if group["subspace_source"] == "moment":  # the steps not skipped; refreshed ones are sketched already
            for k in ok_low:
                if low[k] not in refreshed:
                    self.update_sketch(params[low[k]], grads[low[k]].float(), group, ctx.state[params[low[k]]], True)
        if ok_low:
            shares = []
            for k in ok_low:
                gn = grad_norms.get(low[k])
                shares.append(None if gn is None else float(captured_share(proj_norms[k] ** 2, gn**2)))
            self.update_projected(
                [params[low[k]] for k in ok_low],
                [lowrank[k] for k in ok_low],
                group,
                proj_norms=[proj_norms[k] for k in ok_low],
                shares=shares,
            )

    def project_grad(
        self,
        p: Tensor,
        grad: Tensor,
        group: dict,
        grad_sq_norm: float | None = None,
        *,
        new_step: bool = True,
        sketch: bool = True,
        measure_noise: bool = True,
    ) -> Tensor | None:
        """Refresh ``p``'s subspace if one is pending (from this gradient), then return the projected gradient.

        This is the first half of a projected step; :meth:`update_projected` is the second. The layer-wise
        mode calls them separately to accumulate projected gradients over micro-batches, with
        ``new_step=False`` for every micro-batch after a window's first (the moment sketch then adds the
        micro-batch's share instead of starting a new average step). Returns ``None`` (and changes nothing
        but the sketch's skipped update) when a refresh is due but the gradient is not finite.

        ``sketch=False``: on a step without a refresh the caller updates the moment sketch itself
        (:meth:`update_sketch`) once it knows the step is not skipped (the per-matrix loop does).
        ``measure_noise=False``: with the ``noise_floor`` setting, a refresh from this gradient chooses its rank on
        the whole sketch energy, without a noise floor measured from it
        (:func:`~lightning_adarank.optim.linalg.sketch_noise`), for a gradient that is one micro-batch's share of
        a step (the layer-wise mode's accumulation windows)
        """
        st = self.ctx.new_matrix_state(p)
        g = grad.float()
        moment = group["subspace_source"] == "moment"
        if st["pending"]:
            if grad_sq_norm is None:
                grad_sq_norm = self.ctx.kernels.norms([g])[0] ** 2
            if not math.isfinite(grad_sq_norm):
                return None
            noise = self.update_sketch(p, g, group, st, new_step) if moment else None
            return self.refresh(p, g, group, st, grad_sq_norm, noise if measure_noise else None)
        if moment and sketch:
            self.update_sketch(p, g, group, st, new_step)
        return project(g, self.basis(st, p), projection_side(p.shape))

    @staticmethod
    def basis(st: dict, p: Tensor) -> Tensor:
        """``p``'s projection basis ``P`` (``min(shape) × rank``) as fp32: the stored tensor itself at 32
        ``state_bits``, else loaded (bf16, or 8-bit blocks with the linear code map: :func:`quant.store_basis`)."""
        return quant.load(st["basis"], (min(p.shape), int(st["rank"])))

    @staticmethod
    def sketch(st: dict, p: Tensor) -> Tensor:
        """The moment sketch ``Y`` (``min(shape) × sketch_cols``) of ``p`` as fp32 (dequantized below 32 bits)."""
        y = st["sketch"]
        return quant.load(y, (min(p.shape), st["sketch_cols"])) if "sketch_cols" in st else y.float()

    def update_sketch(self, p: Tensor, g: Tensor, group: dict, st: dict, new_step: bool) -> Tensor | None:
        """``Y ← β1·Y + (1−β1)·A Ω`` (``A = G`` or ``Gᵀ``): by linearity ``Y`` is the sketch ``M Ω`` of the full first
        moment. A non-finite ``G`` leaves ``Y`` as it was (checked on the device, no synchronisation).

        With the ``noise_floor`` setting, on a refresh step (``st["pending"]``) of a new step with a sketch to compare
        to, returns the sketch's noise energy :func:`~lightning_adarank.optim.linalg.sketch_noise` (a 0-d device tensor), else ``None``.

        Below 32 ``state_bits`` the sketch is stored like the moments (bf16, or 8-bit blocks with ``sketch_cols``
        recording its width) and updated on its dequantized values.
        """
        a = sketch_side(g, projection_side(p.shape))
        k = min(group["max_rank"] + group["oversample"], a.shape[0])
        fresh = a @ self.ctx.test_matrix(a.shape[1], k, g.device)
        bits = group.get("state_bits", 32)
        y = st.get("sketch")
        if y is not None and bits != 32:
            if st.get("sketch_cols") != k:
                y = None
            else:
                y = quant.load(y, fresh.shape)
        noise = None
        if y is None or y.shape != fresh.shape:  # the average starts at the first sketch (no zero-bias)
            y, new = None, torch.where(torch.isfinite(fresh).all(), fresh, torch.zeros_like(fresh))
        else:
            beta1 = group["betas"][0]
            if new_step and st.get("pending") and group.get("noise_floor", False):
                noise = sketch_noise(torch.linalg.vector_norm(fresh - y).square(), beta1)
            new = sketch_ema(y, fresh, beta1, new_step=new_step)
            new = torch.where(torch.isfinite(new).all(), new, y)
        if bits == 32 and y is not None:
            y.copy_(new)
            return noise
        if bits != 32:
            st["sketch_cols"] = k
            new = quant.store(st.get("sketch") if y is not None else None, new, bits, signed=True, salt=st.get("step"))
        st["sketch"] = new
        return noise

    def refresh(
        self, p: Tensor, g: Tensor, group: dict, st: dict, grad_sq_norm: float, noise: Tensor | None = None
    ) -> Tensor:
        """Subspace refresh: a basis and rank from the moment sketch (or from ``g``), then the moment transform.

        ``noise``: the sketch's noise energy (:meth:`update_sketch`); the rank is chosen above that floor.

        Returns the projected gradient in the new subspace.
        """
        side = projection_side(p.shape)
        if group["subspace_source"] == "moment":
            basis, kept = sketch_basis(
                self.sketch(st, p),
                energy=group["energy"],
                min_rank=group["min_rank"],
                max_rank=group["max_rank"],
                noise=noise,
            )
            low = project(g, basis, side)
        else:
            gen = torch.Generator(device=g.device)
            gen.manual_seed(self.ctx.subspace_seed(p, st["refreshes"]))
            basis, kept, low = low_rank_basis(
                g,
                side,
                energy=group["energy"],
                min_rank=group["min_rank"],
                max_rank=group["max_rank"],
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                generator=gen,
                total_energy=grad_sq_norm,
            )
        install_subspace(
            st,
            p,
            basis,
            kept,
            group["transform_moments"],
            group.get("state_bits", 32),
            low=low,
            betas=group["betas"],
        )
        return low

    def update_projected(
        self,
        params: list[Tensor],
        lowrank: list[Tensor],
        group: dict,
        proj_norms: list[float] | None = None,
        shares: list[float | None] | None = None,
    ) -> None:
        """AdamW on projected gradients, back-projection into the weights, and the refresh test.

        ``lowrank[i]`` is ``params[i]``'s projected gradient in its current subspace; ``proj_norms[i]`` its norm
        (computed here when not given); ``shares[i]`` the captured share ``‖PᵀG‖²/‖G‖²`` when it was measured
        this step, else ``None``.
        """
        states = [self.ctx.state[p] for p in params]
        bases = [self.basis(st, p) for st, p in zip(states, params)]  # loaded once per step (8 bits: dequantized)
        adam_update_(self.ctx, params, lowrank, states, bases, group)
        if group["subspace_source"] == "moment":
            proj_norms, shares = self.sketch_stats(states, params, bases)
        elif proj_norms is None:
            proj_norms = self.ctx.kernels.norms(lowrank)
        if shares is None:
            shares = [None] * len(params)
        run_refresh_tests(states, group, proj_norms, shares)

    def sketch_stats(
        self, states: list[dict], params: list[Tensor], bases: list[Tensor]
    ) -> tuple[list[float], list[float]]:
        """The refresh test's statistics with ``subspace_source="moment"``, from the sketch ``Y = M Ω``:
        ``‖PᵀY‖`` (the smoothed projected gradient, sketched) and ``‖PᵀY‖²/‖Y‖²`` (the share of the smoothed
        gradient the subspace captures). One synchronisation for all; mini-batch noise is averaged out already.
        ``bases``: the loaded (fp32) bases of ``params``, as the update used them.
        """
        sketches = [self.sketch(st, p) for st, p in zip(states, params)]
        norms = self.ctx.kernels.norms([basis.mT @ y for basis, y in zip(bases, sketches)] + sketches)
        n = len(states)
        inside, total = torch.tensor(norms[:n], dtype=torch.float64), torch.tensor(norms[n:], dtype=torch.float64)
        return norms[:n], captured_share(inside.square(), total.square()).tolist()
