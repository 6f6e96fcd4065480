"""``AdaRankGrad``: AdamW whose moments live in an adaptive-rank subspace of each weight's gradient.

Pure PyTorch: importing this module does not import Lightning.

Per projected matrix ``W`` (2-D, ``min(W.shape) > max_rank``, in a group with ``low_rank=True``) one step is

0. **sketch** (``subspace_source="moment"``): ``Y ← β1·Y + (1−β1)·G Ω``, a sketch of the full first moment;
1. **subspace refresh** (when one is pending): the top-``r`` left singular vectors of ``Y``
   (:func:`~lightning_adarank.optim.linalg.sketch_basis`), or with ``subspace_source="gradient"`` the
   randomized range finder on the current gradient (:func:`~lightning_adarank.optim.linalg.low_rank_basis`);
   ``r`` is the smallest rank that keeps ``energy``; the moments are carried into the new basis by
   :func:`~lightning_adarank.optim.linalg.moment_transform` (unless ``transform_moments=False``);
2. **projection** ``R = PᵀG`` (or ``G P``), AdamW moments and bias correction on ``R`` (torch's fused or
   foreach Adam kernel, applied to a zero "virtual parameter" so that it returns ``N = -m̂/(√v̂+ε)``);
3. **update** ``W ← W·(1 − lr·wd) + lr·α·c·P N`` with ``c = √(s/r)`` (``scale_mode="rms"``: the update's RMS is
   ``lr·α·rms(N)`` whatever the rank ``r`` and the projected side ``s``) or ``c = 1`` (``"galore"``);
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
    sketch_basis,
    sketch_side,
    subspace_seed,
)
from . import quant
from .config import AdaRankGradConfig
from .checkpoint import STATE_KEY, check_state_dict, format_tag
from .grouped_step import GroupedStep
from .settings import normalize_params, validate_group

__all__ = ["AdaRankGrad", "SubspaceInfo"]

_EMA = 0.9  # smoothing of ‖PᵀG‖ and of the share ‖PᵀG‖²/‖G‖² in the refresh test (about ten steps of memory)
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


class AdaRankGrad(GroupedStep, torch.optim.Optimizer):
    r"""AdamW with adaptive-rank gradient projection (AdaRankGrad, arXiv 2410.17881).

    Args:
        params: tensors, ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``) or param-group dicts
            (see :func:`lightning_adarank.param_groups`). A group may set ``low_rank=False`` to get plain
            AdamW, or override any per-group setting of :class:`~lightning_adarank.AdaRankGradConfig`.
        config: the settings (:class:`~lightning_adarank.AdaRankGradConfig`; its defaults when ``None``).
        **settings: individual settings, applied on top of ``config`` (e.g. ``lr=1e-3, max_rank=16``); every
            name and meaning is documented once, on :class:`~lightning_adarank.AdaRankGradConfig`.

    Three choices differ from a literal GaLore/paper transcription; each is documented with its formula on
    :class:`~lightning_adarank.AdaRankGradConfig` and was measured (README, "How AdaRankGrad works here"):

    * **update magnitude** (``scale_mode="rms"``): ``W ← W(1 − lr·wd) + lr·α·√(s/r)·P N``. ``P`` has
      orthonormal columns, so the update's RMS is ``lr·α·rms(N)``: that of the Adam direction, as in full
      AdamW, whatever the rank ``r`` and the projected side ``s``. GaLore's raw ``lr·α·P N`` has RMS ≈
      ``lr·α·√(r/s)``: a rank-dependent learning-rate cut. ``scale_mode="galore"`` keeps it.
    * **subspace and rank from the smoothed gradient** (``subspace_source="moment"``): a sketch ``Y = M Ω`` of
      the full first moment ``M = EMA_β1(G)`` is kept (``s × k``, one skinny product per step); a refresh
      takes the top singular vectors of ``Y`` and the rank that keeps ``energy`` of ``‖Y‖²``, so mini-batch
      noise (high-rank) does not pin the rank at ``max_rank``.
    * **calibrated refresh test**, below: its reference comes from batches the subspace was not chosen from.

    Refresh test: from ``min_gap`` steps after a refresh until ``max_gap`` a matrix gets a new subspace when
    either moving average (β = 0.9 per step) falls to ``tol`` × its reference:

    * ``‖PᵀG‖`` — the projected gradient has *converged*: the directions of this subspace are spent (the
      paper's criterion, Algorithm 3, block 3);
    * ``‖PᵀG‖² / ‖G‖²`` — the share of the gradient the subspace captures: the gradient has *moved out* of
      the subspace.

    With ``subspace_source="moment"`` both are read on the moment sketch ``Y`` instead of the batch gradient
    (``‖PᵀY‖`` and ``‖PᵀY‖²/‖Y‖²``): the smoothed gradient, whose noise no longer hides a slow fall (on one
    batch ``‖PᵀG‖`` never falls below the noise floor), and no pass over ``G`` is needed for the share.
    The reference of each is its **mean over the calibration steps**, steps 1 … ``min_gap − 1`` after the
    refresh; the refresh step itself is left out, because the gradient the subspace was chosen from projects
    onto it more than any other batch will (selection bias: with it as reference the test fired every
    15–25 steps on a stationary fine-tuning stream). Both statistics are ratios of a quantity to itself, so
    the test is scale-free. On a stationary stream the averages stay at their references and only
    ``max_gap`` refreshes; when the gradient rotates away the share falls and a refresh follows. The test is
    made at the end of a step and the refresh happens at the next one. The per-matrix statistics are plain
    numbers in the state (sums, counts, moving averages), so checkpoints load with ``weights_only=True``.

    Non-finite gradients: the step of a parameter whose gradient holds ``inf``/``nan`` is **skipped** (its
    weight and state are left untouched) with a warning, so one bad batch cannot corrupt the moments or the
    subspace. In the grouped step (``grouped``, the default on GPUs) this is decided on the device: a projected
    matrix is skipped alone; the unprojected parameters of a group share the fused kernel's skip flag (one
    non-finite gradient skips all of them for that step); the warning comes at the next flag read
    (``refresh_check_every``). fp16/bf16 parameters keep fp32 optimizer state and fp32 math.
    """

    def __init__(self, params: Iterable, config: AdaRankGradConfig | None = None, **settings: Any) -> None:
        config = AdaRankGradConfig(**settings) if config is None else config.replace(**settings)
        self.config = config
        self.seed = config.seed
        self.fused = config.fused
        self._index: dict[int, int] = {}
        self._group_by_id: dict[int, dict] = {}
        self._test_matrices: dict[tuple, Tensor] = {}  # Ω of the moment sketches, by (rows, cols, device)
        self._init_grouped()
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

        With ``grouped`` (``None``: on accelerators) and more than one parameter the grouped step
        (:meth:`~lightning_adarank.optim.grouped_step.GroupedStep._step_params_grouped`: no host
        synchronisation on a normal step), else the per-matrix loop (:meth:`_step_params_loop`).
        """
        for g in grads:
            if g.is_sparse:
                raise TypeError("AdaRankGrad does not support sparse gradients (use nn.Embedding(sparse=False))")
        grouped = self.config.grouped
        if grouped is None:
            grouped = params[0].device.type != "cpu"
        # low-bit moments (a ``state_bits`` setting, issue 15) take the per-matrix path until the store's
        # moments()/store_moments() point decodes/encodes them
        low_bit = group.get("state_bits", 32) != 32 or group.get("dense_state_bits", 32) != 32
        if grouped and len(params) > 1 and not low_bit:
            self._step_params_grouped(params, group, grads)
        else:
            self._step_params_loop(params, group, grads)

    @torch.no_grad()
    def _step_params_loop(self, params: list[Tensor], group: dict, grads: list[Tensor]) -> None:
        """The per-matrix step: one projection, Adam call and update per matrix.

        One host synchronisation reads every norm the step needs at once: ``‖PᵀG‖`` of the projected
        gradients (refresh test; a non-finite ``G`` shows up there), ``‖G‖`` of the unprojected ones (the
        non-finite check) and ``‖G‖`` of the projected ones (captured share). A refresh additionally reads
        ``‖G‖²`` of the refreshed matrices.
        """
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
            r = self.project_grad(p, grads[i], group, gsq, sketch=False)
            if r is None:
                skipped += 1
                continue
            low.append(i)
            lowrank.append(r)
            if gsq is not None:
                grad_norms[i] = math.sqrt(gsq)
        refreshed = set(grad_norms)
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
        if group["subspace_source"] == "moment":  # the steps not skipped; refreshed ones are sketched already
            for k in ok_low:
                if low[k] not in refreshed:
                    self._update_sketch(params[low[k]], grads[low[k]].float(), group, self.state[params[low[k]]], True)
        if ok_low:
            shares = []
            for k in ok_low:
                gn = grad_norms.get(low[k])
                shares.append(None if gn is None else (proj_norms[k] ** 2 / gn**2 if gn > 0 else 1.0))
            self.update_projected([params[low[k]] for k in ok_low], [lowrank[k] for k in ok_low], group,
                                  proj_norms=[proj_norms[k] for k in ok_low], shares=shares)

    def share_due(self, p: Tensor) -> bool:
        """Whether this step of ``p`` needs the batch's captured share ``‖PᵀG‖²/‖G‖²`` (a pass over ``G``).

        Every step with ``subspace_source="gradient"``; never with ``"moment"``, whose refresh test reads the
        moment sketch instead (:meth:`_sketch_stats`).
        """
        return self._group_of(p)["subspace_source"] != "moment"

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

    def _adamw(self, params, grads, exp_avgs, exp_avg_sqs, steps, group, *, lr, weight_decay, found_inf=None):
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
            **({"found_inf": found_inf} if found_inf is not None else {}),
        )
        return steps

    # [state_bits] ------------------------------------------------------------------------------------------
    def _adamw_stored(self, params, grads, states, shapes, group, bits, *, lr, weight_decay, found_inf=None) -> list[Tensor]:
        """Adam on moments stored at ``bits`` (:mod:`.quant`): fp32 moments in one batched kernel call, as
        before; low-bit ones one parameter at a time (load → Adam → store), so that at most one parameter's
        fp32 moments exist at once."""
        if bits == 32 and all(type(st["exp_avg"]) is Tensor and st["exp_avg"].dtype == torch.float32 for st in states):
            return self._adamw(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                               [st["step"] for st in states], group, lr=lr, weight_decay=weight_decay, found_inf=found_inf)
        steps = []
        for p, g, st, shape in zip(params, grads, states, shapes):
            m, v = quant.load(st["exp_avg"], shape), quant.load(st["exp_avg_sq"], shape)
            steps += self._adamw([p], [g], [m], [v], [st["step"]], group, lr=lr, weight_decay=weight_decay,
                                 found_inf=found_inf)
            st["exp_avg"] = quant.store(st["exp_avg"], m, bits, signed=True)
            st["exp_avg_sq"] = quant.store(st["exp_avg_sq"], v, bits, signed=False)
        return steps
    # [/state_bits] -----------------------------------------------------------------------------------------

    def update_dense(self, params: list[Tensor], grads: list[Tensor], group: dict, check_finite: bool = False) -> None:
        """Exact AdamW (torch's kernel) for parameters that are not projected; fp32 math for fp16/bf16.

        ``check_finite``: skip on the device when a gradient is not finite (the fused kernel's skip flag: all
        of ``params`` skip this step), counted and warned about at the next read; without the fused kernel the
        check is a host read, and only the non-finite parameters skip.
        """
        fused = self._use_fused(params[0].device)
        found_inf = None
        if check_finite:
            if fused and all(p.dtype in _FUSED_DTYPES for p in params):
                dev = params[0].device
                norms = [n if n.device == dev else n.to(dev) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)]
                bad = ~torch.isfinite(torch.stack(norms))
                found_inf = bad.any().float()
                self._unread_skips.append(found_inf * len(params))
            else:
                ok = [i for i, n in enumerate(self._norms(grads)) if math.isfinite(n)]
                if len(ok) < len(params):
                    self._warn_skipped(len(params) - len(ok))
                    params, grads = [params[i] for i in ok], [grads[i] for i in ok]
                    if not params:
                        return
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
            lr=group["lr"], weight_decay=group["weight_decay"], found_inf=found_inf,
        )
        for p, w, st, s, lp in zip(params, work, states, steps, low_prec):
            st["step"] = s
            if lp:
                p.copy_(w)

    # ------------------------------------------------------------------ projected parameters
    def project_grad(
        self, p: Tensor, grad: Tensor, group: dict, grad_sq_norm: float | None = None, *, new_step: bool = True,
        sketch: bool = True,
    ) -> Tensor | None:
        """Refresh ``p``'s subspace if one is pending (from this gradient), then return the projected gradient.

        This is the first half of a projected step; :meth:`update_projected` is the second. The layer-wise
        mode calls them separately to accumulate projected gradients over micro-batches, with
        ``new_step=False`` for every micro-batch after a window's first (the moment sketch then adds the
        micro-batch's share instead of starting a new average step). Returns ``None`` (and changes nothing
        but the sketch's skipped update) when a refresh is due but the gradient is not finite.

        ``sketch=False``: on a step without a refresh the caller updates the moment sketch itself
        (:meth:`_update_sketch`) once it knows the step is not skipped (the per-matrix loop does).
        """
        st = self.state[p]
        g = grad.float()
        if not st:
            st["step"] = self._step_tensor(p, self._use_fused(p.device))
            st["refreshes"] = 0
            st["pending"] = True
        moment = group["subspace_source"] == "moment"
        if st["pending"]:
            if grad_sq_norm is None:
                grad_sq_norm = self._norms([g])[0] ** 2
            if not math.isfinite(grad_sq_norm):
                return None
            if moment:
                self._update_sketch(p, g, group, st, new_step)
            return self._refresh(p, g, group, st, grad_sq_norm)
        if moment and sketch:
            self._update_sketch(p, g, group, st, new_step)
        return project(g, st["basis"].float(), projection_side(p.shape))  # [state_bits] bf16 below 32 bits

    def _test_matrix(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """The fixed Gaussian ``Ω`` (``rows × cols``) of the moment sketches; depends only on (seed, shape).

        Shared by every matrix with the same long side, never stored in the state: it is regenerated
        bit-identically from the seed after a resume, and agrees across data-parallel ranks.
        """
        key = (rows, cols, str(device))
        omega = self._test_matrices.get(key)
        if omega is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(subspace_seed(self.seed, -1 - rows, cols))
            omega = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
            self._test_matrices[key] = omega
        return omega

    @staticmethod
    def _sketch(st: dict, p: Tensor) -> Tensor:
        """The moment sketch ``Y`` (``min(shape) × sketch_cols``) of ``p`` as fp32 (dequantized below 32 bits)."""
        y = st["sketch"]
        return y.float() if type(y) is Tensor else quant.load(y, (min(p.shape), st["sketch_cols"]))

    def _update_sketch(self, p: Tensor, g: Tensor, group: dict, st: dict, new_step: bool) -> None:
        """``Y ← β1·Y + (1−β1)·A Ω`` (``A = G`` or ``Gᵀ``): by linearity ``Y`` is the sketch ``M Ω`` of the full first
        moment. A non-finite ``G`` leaves ``Y`` as it was (checked on the device, no synchronisation).

        Below 32 ``state_bits`` the sketch is stored like the moments (bf16, or 8-bit blocks with ``sketch_cols``
        recording its width) and updated on its dequantized values.
        """
        a = sketch_side(g, projection_side(p.shape))
        k = min(group["max_rank"] + group["oversample"], a.shape[0])
        fresh = a @ self._test_matrix(a.shape[1], k, g.device)
        bits = group.get("state_bits", 32)
        y = st.get("sketch")
        if y is not None and bits != 32:
            if st.get("sketch_cols") != k:
                y = None
            else:
                y = quant.load(y, fresh.shape)
        if y is None or y.shape != fresh.shape:  # the average starts at the first sketch (no zero-bias)
            y, new = None, torch.where(torch.isfinite(fresh).all(), fresh, torch.zeros_like(fresh))
        else:
            beta1 = group["betas"][0]
            new = torch.add(y, fresh, alpha=1.0 - beta1) if not new_step else fresh.mul_(1.0 - beta1).add_(y, alpha=beta1)
            new = torch.where(torch.isfinite(new).all(), new, y)
        if bits == 32 and y is not None:
            y.copy_(new)
            return
        if bits != 32:
            st["sketch_cols"] = k
            new = quant.store(st.get("sketch") if y is not None else None, new, bits, signed=True)
        st["sketch"] = new

    def _refresh(self, p: Tensor, g: Tensor, group: dict, st: dict, grad_sq_norm: float) -> Tensor:
        """Subspace refresh: a basis and rank from the moment sketch (or from ``g``), then the moment transform.

        Returns the projected gradient in the new subspace.
        """
        side = projection_side(p.shape)
        if group["subspace_source"] == "moment":
            basis, kept = sketch_basis(self._sketch(st, p), energy=group["energy"], min_rank=group["min_rank"],
                                       max_rank=group["max_rank"])
            low = project(g, basis, side)
        else:
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
        # refresh-test statistics (see _refresh_test): calibration sums and counts, then moving averages
        st["ref_norm"] = st["ref_share"] = 0.0
        st["ref_count"] = st["ref_share_count"] = 0
        st["ema_norm"] = st["ema_share"] = -1.0
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
        lr, wd = group["lr"], group["weight_decay"]
        decay = 1.0 - lr * wd
        rms = group["scale_mode"] == "rms"
        for p, st, s, d in zip(params, states, steps, directions):
            st["step"] = s
            basis = st["basis"].float()  # [state_bits] bf16 below 32 bits
            alpha = lr * group["scale"] * (math.sqrt(basis.shape[0] / basis.shape[1]) if rms else 1.0)
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
        if group["subspace_source"] == "moment":
            proj_norms, shares = self._sketch_stats(states, params)
        elif proj_norms is None:
            proj_norms = self._norms(lowrank)
        if shares is None:
            shares = [None] * len(params)
        for st, pn, share in zip(states, proj_norms, shares):
            self._refresh_test(st, group, pn, share)

    def _sketch_stats(self, states: list[dict], params: list[Tensor]) -> tuple[list[float], list[float]]:
        """The refresh test's statistics with ``subspace_source="moment"``, from the sketch ``Y = M Ω``:
        ``‖PᵀY‖`` (the smoothed projected gradient, sketched) and ``‖PᵀY‖²/‖Y‖²`` (the share of the smoothed
        gradient the subspace captures). One synchronisation for all; mini-batch noise is averaged out already.
        """
        sketches = [self._sketch(st, p) for st, p in zip(states, params)]
        norms = self._norms([st["basis"].float().mT @ y for st, y in zip(states, sketches)] + sketches)
        n = len(states)
        inside, total = norms[:n], norms[n:]
        return inside, [a * a / (b * b) if b > 0 else 1.0 for a, b in zip(inside, total)]

    @staticmethod
    def _refresh_test(st: dict, group: dict, proj_norm: float, share: float | None) -> None:
        """Adaptive subspace refresh (Algorithm 3, block 3), calibrated: flag a refresh for the next step.

        Step ``j`` of a subspace (``j = 0``: the refresh step, left out: its gradient chose the subspace).
        Steps ``1 … K`` (``K = max(1, min_gap − 1)``) add ``‖PᵀG‖`` and the share to the reference sums; from step
        1 both enter moving averages (β = ``_EMA``). From ``min_gap`` steps on, a refresh is flagged when an
        average has fallen to ``tol`` × its reference mean (and always at ``max_gap``). ``share`` is ``None``
        when it was not measured this step; the share statistic then does not move.
        """
        j = st["since_refresh"]
        calib = max(1, group["min_gap"] - 1)
        if j >= 1:
            st["ema_norm"] = proj_norm if st["ema_norm"] < 0 else _EMA * st["ema_norm"] + (1 - _EMA) * proj_norm
            if j <= calib:
                st["ref_norm"] += proj_norm
                st["ref_count"] += 1
            if share is not None:
                ema = st["ema_share"]
                st["ema_share"] = share if ema < 0 else _EMA * ema + (1 - _EMA) * share
                if j <= calib:
                    st["ref_share"] += share
                    st["ref_share_count"] += 1
        st["since_refresh"] = gap = j + 1
        if gap >= group["max_gap"]:
            st["pending"] = True
        elif gap >= group["min_gap"] and st["ref_count"] >= calib:
            tol = group["tol"]
            fell = st["ema_norm"] <= tol * st["ref_norm"] / st["ref_count"]
            if st["ref_share_count"]:
                fell = fell or st["ema_share"] <= tol * st["ref_share"] / st["ref_share_count"]
            st["pending"] = fell

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus a format tag (:func:`~lightning_adarank.optim.checkpoint.format_tag`), with
        every view into the grouped step's storage cloned into its own tensor.

        A checkpoint then holds exactly the state of each matrix (no shared storages), in the per-matrix
        layout; :meth:`load_state_dict` drops the storage, and the next grouped step rebuilds it.
        """
        sd = super().state_dict()
        sd["state"] = {
            k: {n: v.clone() if isinstance(v, Tensor) and v._base is not None else v for n, v in st.items()}
            for k, st in sd["state"].items()
        }
        sd[STATE_KEY] = format_tag()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; tensors keep their saved dtype (torch would cast fp32 moments to a bf16 param's dtype).

        The refresh-test statistics may be numbers (per-matrix step) or 0-d tensors (grouped step); both load.
        Raises ``ValueError`` naming the first mismatch when the state does not fit these parameters
        (:func:`~lightning_adarank.optim.checkpoint.check_state_dict`).
        """
        check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)
        self._group_by_id = {id(p): g for g in self.param_groups for p in g["params"]}
        self._init_grouped()
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
