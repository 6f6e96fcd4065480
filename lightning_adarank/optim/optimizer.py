"""``AdaRankGrad``: AdamW whose moments live in an adaptive-rank subspace of each weight's gradient.

Pure PyTorch: importing this module does not import Lightning.

Per projected matrix ``W`` (2-D, ``min(W.shape) > max_rank``, in a group with ``low_rank=True``) one step is

1. **subspace refresh** (when one is pending): :func:`~lightning_adarank.optim.linalg.low_rank_basis` runs the
   randomized range finder on the current gradient and picks the smallest rank that keeps ``energy`` of
   ``‖G‖²_F``; the moments are carried into the new basis by
   :func:`~lightning_adarank.optim.linalg.moment_transform` (unless ``transform_moments=False``);
2. **projection** ``R = PᵀG`` (or ``G P``), AdamW moments and bias correction on ``R`` (torch's fused or
   foreach Adam kernel, applied to a zero "virtual parameter" so that it returns ``-m̂/(√v̂+ε)``);
3. **update** ``W ← W·(1 − lr·wd) + lr·scale·P(−m̂/(√v̂+ε))`` — decoupled weight decay on the full weight;
4. **refresh test** for the next step (see :class:`AdaRankGrad`).

Every other parameter gets exact AdamW through torch's own functional kernel (fused where the device has
it, else foreach), so it matches :class:`torch.optim.AdamW` bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_kernel
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from .linalg import (
    low_rank_basis,
    moment_transform,
    project,
    projection_side,
    subspace_seed,
)
from . import quant
from .config import AdaRankGradConfig
from .checkpoint import STATE_KEY, check_state_dict, format_tag
from .settings import normalize_params, validate_group

__all__ = ["AdaRankGrad", "SubspaceInfo"]

_EMA = 0.9  # smoothing of ‖PᵀG‖ in the refresh test (about ten steps of memory)
_SHARE_EVERY = 4  # the captured share ‖PᵀG‖²/‖G‖² needs a pass over G: measured every 4th step of a subspace
_EMA_SHARE = 0.7  # its smoothing per measurement (about three measurements, twelve steps, of memory)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class SubspaceInfo:
    """What the optimizer currently holds for one projected matrix (read-only snapshot)."""

    name: str
    shape: tuple[int, int]
    rank: int
    max_rank: int
    refreshes: int
    energy_kept: float
    """Share of ``‖G‖²_F`` kept by the subspace when it was chosen."""

    def state_numel(self) -> int:
        """Elements of optimizer state for this matrix: projection + two moments."""
        s, l = min(self.shape), max(self.shape)
        return self.rank * (s + 2 * l)

    def galore_numel(self) -> int:
        """Elements a fixed-rank GaLore at ``max_rank`` holds for the same matrix."""
        s, l = min(self.shape), max(self.shape)
        return self.max_rank * (s + 2 * l)


class AdaRankGrad(torch.optim.Optimizer):
    r"""AdamW with adaptive-rank gradient projection (AdaRankGrad, arXiv 2410.17881).

    Args:
        params: tensors, ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``) or param-group dicts
            (see :func:`lightning_adarank.param_groups`). A group may set ``low_rank=False`` to get plain
            AdamW, or override any per-group setting of :class:`~lightning_adarank.AdaRankGradConfig`.
        config: the settings (:class:`~lightning_adarank.AdaRankGradConfig`; its defaults when ``None``).
        **settings: individual settings, applied on top of ``config`` (e.g. ``lr=1e-3, max_rank=16``); every
            name and meaning is documented once, on :class:`~lightning_adarank.AdaRankGradConfig`.

    Refresh test: between ``min_gap`` and ``max_gap`` a matrix gets a new subspace when either smoothed ratio
    falls to ``tol`` of its value at the last refresh:

    * ``‖PᵀG‖`` — the projected gradient has *converged*: the directions of this subspace are spent (the
      paper's criterion, Algorithm 3, block 3);
    * ``‖PᵀG‖² / ‖G‖²`` — the share of the gradient the subspace captures: the gradient has *moved out* of
      the subspace.

    Both are ratios of a quantity to itself at refresh time, so the test is scale-free. They are smoothed
    with exponential moving averages so that mini-batch noise alone does not trigger a refresh (β = 0.9 per
    step for the norm; the share needs a pass over the full gradient, so it is measured on a subspace's
    first step and every 4th step after, β = 0.7 per measurement). The test is made at the end of a step and
    the refresh happens at the next one, on that step's gradient.

    Non-finite gradients: the step of a parameter whose gradient holds ``inf``/``nan`` is **skipped** (its
    weight and state are left untouched) with a warning, so one bad batch cannot corrupt the moments or the
    subspace. fp16/bf16 parameters keep fp32 optimizer state and fp32 math.
    """

    def __init__(self, params: Iterable, config: AdaRankGradConfig | None = None, **settings: Any) -> None:
        config = AdaRankGradConfig(**settings) if config is None else config.replace(**settings)
        self.config = config
        self.seed = config.seed
        self.fused = config.fused
        self._index: dict[int, int] = {}
        self._group_by_id: dict[int, dict] = {}
        super().__init__(normalize_params(params), {**config.group_defaults(), "low_rank": True})

    # ------------------------------------------------------------------ groups and bookkeeping
    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "_index"):
            self._index, self._group_by_id = {}, {}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group)
        if 8 in (group.get("state_bits"), group.get("dense_state_bits")):  # [state_bits] weights_only loads
            quant.allow_weights_only_loading()
        if "param_names" in group and len(group["param_names"]) != len(group["params"]):
            raise ValueError("AdaRankGrad: param_names and params of a group differ in length")
        for p in group["params"]:
            self._index.setdefault(id(p), len(self._index))
            self._group_by_id[id(p)] = group

    def is_projected(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` gets a low-rank projection under ``group``'s settings."""
        return bool(group["low_rank"]) and p.dim() == 2 and min(p.shape) > group["max_rank"]

    def _names(self) -> Iterable[tuple[str, Tensor, dict]]:
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                yield (names[pi] if names else f"group{gi}.param{pi}"), p, group

    def subspaces(self) -> dict[str, SubspaceInfo]:
        """Snapshot of every projected matrix that has a subspace, keyed by parameter name."""
        out = {}
        for name, p, group in self._names():
            st = self.state.get(p)
            if st and "basis" in st:
                out[name] = SubspaceInfo(
                    name=name, shape=tuple(p.shape), rank=int(st["rank"]), max_rank=int(group["max_rank"]),
                    refreshes=int(st["refreshes"]), energy_kept=float(st["energy_kept"]),
                )
        return out

    def ranks(self) -> dict[str, int]:
        """Current rank of every projected matrix, keyed by parameter name (``group{g}.param{i}`` if unnamed).

        Matrices appear after their first step (their subspace is chosen from their first gradient).
        """
        return {name: info.rank for name, info in self.subspaces().items()}

    def state_bytes(self) -> int:
        """Bytes of all optimizer state tensors (moments, projections, step counters)."""
        return sum(
            v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, Tensor)
        )

    def _use_fused(self, device: torch.device) -> bool:
        if self.fused is not None:
            return self.fused
        return device.type in _get_fused_kernels_supported_devices()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One optimization step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.step_params(params, group, [p.grad for p in params])
        return loss

    @torch.no_grad()
    def step_param(self, p: Tensor, grad: Tensor | None = None) -> None:
        """Update one parameter on its own (used by the layer-wise mode); ``grad`` defaults to ``p.grad``."""
        group = self._group_of(p)
        grad = p.grad if grad is None else grad
        if grad is not None:
            self.step_params([p], group, [grad])

    def _group_of(self, p: Tensor) -> dict:
        try:
            return self._group_by_id[id(p)]
        except KeyError:
            raise KeyError("parameter is not managed by this optimizer") from None

    @torch.no_grad()
    def step_params(self, params: list[Tensor], group: dict, grads: list[Tensor]) -> None:
        """Update ``params`` (all from ``group``) with ``grads``. The functional core of :meth:`step`.

        One host synchronisation reads every norm the step needs at once: ``‖PᵀG‖`` of the projected
        gradients (refresh test; a non-finite ``G`` shows up there), ``‖G‖`` of the unprojected ones (the
        non-finite check) and, every ``_SHARE_EVERY`` steps of a subspace, ``‖G‖`` of the projected ones
        (captured share). A refresh additionally reads ``‖G‖²`` of the refreshed matrices.
        """
        for g in grads:
            if g.is_sparse:
                raise TypeError("AdaRankGrad does not support sparse gradients (use nn.Embedding(sparse=False))")
        projected = [self.is_projected(p, group) for p in params]
        dense = [i for i, is_low in enumerate(projected) if not is_low]
        low, lowrank, skipped = [], [], 0
        grad_norms: dict[int, float] = {}  # ‖G‖ where known: refreshed matrices, and those measuring the share
        for i, p in enumerate(params):
            if not projected[i]:
                continue
            st = self.state[p]
            gsq = None
            if not st or st["pending"]:  # a refresh needs ‖G‖² (rank selection): reuse it for the share
                gsq = self._norms([grads[i]])[0] ** 2
            r = self.project_grad(p, grads[i], group, gsq)
            if r is None:
                skipped += 1
                continue
            low.append(i)
            lowrank.append(r)
            if gsq is not None:
                grad_norms[i] = math.sqrt(gsq)
        share_idx = [i for i in low if i not in grad_norms and self.share_due(params[i])]
        tensors = lowrank + [grads[i] for i in dense] + [grads[i] for i in share_idx]
        norms = self._norms(tensors) if tensors else []
        proj_norms = norms[: len(low)]
        dense_norms = norms[len(low): len(low) + len(dense)]
        grad_norms.update(zip(share_idx, norms[len(low) + len(dense):]))
        ok_dense = [i for i, n in zip(dense, dense_norms) if math.isfinite(n)]
        ok_low = [k for k, i in enumerate(low) if math.isfinite(proj_norms[k]) and math.isfinite(grad_norms.get(i, 0.0))]
        skipped += len(dense) - len(ok_dense) + len(low) - len(ok_low)
        if skipped:
            warnings.warn(
                f"AdaRankGrad: skipped the step of {skipped} parameter(s) with non-finite gradients",
                RuntimeWarning, stacklevel=3,
            )
        if ok_dense:
            self.update_dense([params[i] for i in ok_dense], [grads[i] for i in ok_dense], group)
        if ok_low:
            shares = []
            for k in ok_low:
                gn = grad_norms.get(low[k])
                shares.append(None if gn is None else (proj_norms[k] ** 2 / gn**2 if gn > 0 else 1.0))
            self.update_projected([params[low[k]] for k in ok_low], [lowrank[k] for k in ok_low], group,
                                  proj_norms=[proj_norms[k] for k in ok_low], shares=shares)

    def share_due(self, p: Tensor) -> bool:
        """Whether this step of ``p`` measures the captured share (a subspace's first step, then every 4th)."""
        return self.state[p]["since_refresh"] % _SHARE_EVERY == 0

    @staticmethod
    def _norms(tensors: list[Tensor]) -> list[float]:
        """Euclidean norms (fp32) of ``tensors`` with one host synchronisation for the whole list.

        On CPU a BLAS dot product per tensor (about twice as fast there as torch's norm kernel); elsewhere
        torch's multi-tensor norm (one launch for the whole list).
        """
        device = tensors[0].device
        if device.type == "cpu" and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
            flat = [t.reshape(-1) for t in tensors]
            return torch.stack([torch.dot(v, v) for v in flat]).sqrt_().tolist()
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        return torch.stack([n.to(device) for n in norms]).tolist()

    def _step_tensor(self, p: Tensor, fused: bool) -> Tensor:
        return torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")

    def _adamw(self, params, grads, exp_avgs, exp_avg_sqs, steps, group, *, lr, weight_decay) -> None:
        fused = self._use_fused(params[0].device) and all(p.dtype in _FUSED_DTYPES for p in params)
        for i, s in enumerate(steps):  # keep step counters where the chosen kernel wants them
            want = params[i].device if fused else torch.device("cpu")
            if s.device != want:
                steps[i] = s.to(want)
        beta1, beta2 = group["betas"]
        _adamw_kernel(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=not fused, fused=fused or None, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=lr, weight_decay=weight_decay, eps=group["eps"], maximize=False,
        )
        return steps

    # [state_bits] ------------------------------------------------------------------------------------------
    def _adamw_stored(self, params, grads, states, shapes, group, bits, *, lr, weight_decay) -> list[Tensor]:
        """Adam on moments stored at ``bits`` (:mod:`.quant`): fp32 moments in one batched kernel call, as
        before; low-bit ones one parameter at a time (load → Adam → store), so that at most one parameter's
        fp32 moments exist at once."""
        if bits == 32 and all(type(st["exp_avg"]) is Tensor and st["exp_avg"].dtype == torch.float32 for st in states):
            return self._adamw(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                               [st["step"] for st in states], group, lr=lr, weight_decay=weight_decay)
        steps = []
        for p, g, st, shape in zip(params, grads, states, shapes):
            m, v = quant.load(st["exp_avg"], shape), quant.load(st["exp_avg_sq"], shape)
            steps += self._adamw([p], [g], [m], [v], [st["step"]], group, lr=lr, weight_decay=weight_decay)
            st["exp_avg"] = quant.store(st["exp_avg"], m, bits, signed=True)
            st["exp_avg_sq"] = quant.store(st["exp_avg_sq"], v, bits, signed=False)
        return steps
    # [/state_bits] -----------------------------------------------------------------------------------------

    def update_dense(self, params: list[Tensor], grads: list[Tensor], group: dict) -> None:
        """Exact AdamW (torch's kernel) for parameters that are not projected; fp32 math for fp16/bf16."""
        fused = self._use_fused(params[0].device)
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = self._step_tensor(p, fused)
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                if group.get("dense_state_bits", 32) != 32:  # [state_bits] low-bit storage (quant.py)
                    st["exp_avg"] = quant.zeros(tuple(p.shape), group["dense_state_bits"], signed=True, device=p.device)
                    st["exp_avg_sq"] = quant.zeros(tuple(p.shape), group["dense_state_bits"], signed=False, device=p.device)
        low_prec = [p.dtype in (torch.float16, torch.bfloat16) for p in params]
        work = [p.float() if lp else p for p, lp in zip(params, low_prec)]
        wgrads = [g.float() if lp else g for g, lp in zip(grads, low_prec)]
        steps = self._adamw_stored(  # [state_bits]
            work, wgrads, states, [p.shape for p in params], group, group.get("dense_state_bits", 32),
            lr=group["lr"], weight_decay=group["weight_decay"],
        )
        for p, w, st, s, lp in zip(params, work, states, steps, low_prec):
            st["step"] = s
            if lp:
                p.copy_(w)

    # ------------------------------------------------------------------ projected parameters
    def project_grad(
        self, p: Tensor, grad: Tensor, group: dict, grad_sq_norm: float | None = None
    ) -> Tensor | None:
        """Refresh ``p``'s subspace if one is pending (from this gradient), then return the projected gradient.

        This is the first half of a projected step; :meth:`update_projected` is the second. The layer-wise
        mode calls them separately to accumulate projected gradients over micro-batches. Returns ``None``
        (and changes nothing) when a refresh is due but the gradient is not finite.
        """
        st = self.state[p]
        g = grad.float()
        if not st:
            st["step"] = self._step_tensor(p, self._use_fused(p.device))
            st["refreshes"] = 0
            st["pending"] = True
        if st["pending"]:
            if grad_sq_norm is None:
                grad_sq_norm = self._norms([g])[0] ** 2
            if not math.isfinite(grad_sq_norm):
                return None
            return self._refresh(p, g, group, st, grad_sq_norm)
        return project(g, st["basis"].float(), projection_side(p.shape))  # [state_bits] bf16 below 32 bits

    def _refresh(self, p: Tensor, g: Tensor, group: dict, st: dict, grad_sq_norm: float) -> Tensor:
        """Subspace refresh: range finder + rank selection on ``g``, then the moment transform.

        Returns the projected gradient in the new subspace (a by-product of the range finder).
        """
        side = projection_side(p.shape)
        gen = torch.Generator(device=g.device)
        gen.manual_seed(subspace_seed(self.seed, self._index[id(p)], st["refreshes"]))
        basis, kept, low = low_rank_basis(
            g, side, energy=group["energy"], min_rank=group["min_rank"], max_rank=group["max_rank"],
            oversample=group["oversample"], power_iters=group["power_iters"], generator=gen,
            total_energy=grad_sq_norm,
        )
        old = st.get("basis")
        # [state_bits] moments are loaded (dequantized) for the transform and stored (re-quantized) after it
        bits = group.get("state_bits", 32)
        shape = (basis.shape[1], p.shape[1]) if side == "left" else (p.shape[0], basis.shape[1])
        if old is None or (not group["transform_moments"] and old.shape != basis.shape):
            st["exp_avg"] = quant.zeros(shape, bits, signed=True, device=p.device)
            st["exp_avg_sq"] = quant.zeros(shape, bits, signed=False, device=p.device)
        elif group["transform_moments"]:
            old_shape = (old.shape[1], p.shape[1]) if side == "left" else (p.shape[0], old.shape[1])
            m, v = moment_transform(old.float(), basis, quant.load(st["exp_avg"], old_shape),
                                    quant.load(st["exp_avg_sq"], old_shape), side)
            st["exp_avg"] = quant.store(None, m, bits, signed=True)
            st["exp_avg_sq"] = quant.store(None, v, bits, signed=False)
        st["basis"] = basis if bits == 32 else basis.bfloat16()
        st["rank"] = basis.shape[1]
        st["energy_kept"] = kept
        st["refreshes"] += 1
        st["pending"] = False
        st["since_refresh"] = 0
        st["ref_norm"] = -1.0  # set from the first projected gradient in this subspace
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
        states = [self.state[p] for p in params]
        directions = [torch.zeros_like(r) for r in lowrank]  # become -m̂/(√v̂+ε)
        steps = self._adamw_stored(  # [state_bits]
            directions, lowrank, states, [d.shape for d in directions], group, group.get("state_bits", 32),
            lr=1.0, weight_decay=0.0,
        )
        lr, wd, alpha = group["lr"], group["weight_decay"], group["lr"] * group["scale"]
        decay = 1.0 - lr * wd
        for p, st, s, d in zip(params, states, steps, directions):
            st["step"] = s
            basis = st["basis"].float()  # [state_bits] bf16 below 32 bits
            if p.dtype == torch.float32:  # decay and update in one pass over W: W ← decay·W + α·P d
                if p.shape[0] <= p.shape[1]:
                    p.addmm_(basis, d, beta=decay, alpha=alpha)
                else:
                    p.addmm_(d, basis.mT, beta=decay, alpha=alpha)
            else:
                if wd:
                    p.mul_(decay)
                delta = basis @ d if p.shape[0] <= p.shape[1] else d @ basis.mT
                p.add_(delta.mul_(alpha).to(p.dtype))
        if proj_norms is None:
            proj_norms = self._norms(lowrank)
        if shares is None:
            shares = [None] * len(params)
        for st, pn, share in zip(states, proj_norms, shares):
            self._refresh_test(st, group, pn, share)

    @staticmethod
    def _refresh_test(st: dict, group: dict, proj_norm: float, share: float | None) -> None:
        """Adaptive subspace refresh (Algorithm 3, block 3): flag a refresh for the next step.

        ``share`` is measured on the first step of a subspace and then every ``_SHARE_EVERY`` steps (it
        costs a pass over the full gradient); its moving average moves only when it is measured.
        """
        if st["ref_norm"] < 0:
            st["ref_norm"], st["ema_norm"] = proj_norm, proj_norm
            st["ref_share"] = st["ema_share"] = 1.0 if share is None else share
        else:
            st["ema_norm"] = _EMA * st["ema_norm"] + (1 - _EMA) * proj_norm
            if share is not None:
                st["ema_share"] = _EMA_SHARE * st["ema_share"] + (1 - _EMA_SHARE) * share
        st["since_refresh"] += 1
        gap = st["since_refresh"]
        if gap >= group["max_gap"]:
            st["pending"] = True
        elif gap >= group["min_gap"]:
            tol = group["tol"]
            st["pending"] = st["ema_norm"] <= tol * st["ref_norm"] or st["ema_share"] <= tol * st["ref_share"]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus a format tag (:func:`~lightning_adarank.optim.checkpoint.format_tag`)."""
        return {**super().state_dict(), STATE_KEY: format_tag()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; tensors keep their saved dtype (torch would cast fp32 moments to a bf16 param's dtype).

        Raises ``ValueError`` naming the first mismatch when the state does not fit these parameters
        (:func:`~lightning_adarank.optim.checkpoint.check_state_dict`).
        """
        check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)
        self._group_by_id = {id(p): g for g in self.param_groups for p in g["params"]}
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for sid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(sid)
            if saved is None:
                continue
            st = self.state[p]
            for k, v in saved.items():
                if isinstance(v, Tensor):
                    st[k] = v.to(device=p.device if k != "step" or v.device.type != "cpu" else "cpu", copy=True)
