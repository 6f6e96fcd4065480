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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import quant
from .checkpoint import STATE_KEY, check_state_dict, format_tag, migrate_state_dict
from .config import AdaRankGradConfig
from .group_checks import normalize_params, validate_group
from .grouped_step import GroupedStep
from .projected import ProjectedStep
from .step_context import StepContext
from .targets import check_low_rank_shapes

__all__ = ["AdaRankGrad", "SubspaceInfo"]

_DTENSOR: list = []


def _is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter); these are stepped by :mod:`lightning_adarank.distributed`."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor  # noqa: PLC0415
        except ImportError:  # torch built without distributed
            DTensor = ()  # type: ignore[assignment]  # noqa: N806
        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


_SHARDED: dict[str, Callable] = {}


def register_sharded_support(*, step: Callable, pad_states: Callable, unpad_states: Callable) -> None:
    """Plug in the step and checkpoint layout of DTensor (FSDP2) parameters.

    Called once by :mod:`lightning_adarank.distributed` when it is imported (``import lightning_adarank`` does):
    the distribution layer sits above this module and registers itself, so nothing here imports upward.
    """
    _SHARDED.update(step=step, pad=pad_states, unpad=unpad_states)


def _sharded(name: str) -> Callable:
    if not _SHARDED:
        raise RuntimeError(
            "AdaRankGrad: DTensor (FSDP2) parameters are stepped by lightning_adarank.distributed, which is not"
            " loaded; `import lightning_adarank` (or lightning_adarank.distributed) first"
        )
    return _SHARDED[name]


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _sketch_numel(st: dict, p: Tensor) -> int:
    """Elements of ``p``'s moment sketch (its logical size: an 8-bit buffer holds more bytes than elements)."""
    if "sketch" not in st:
        return 0
    if "sketch_cols" in st:
        return min(p.shape) * int(st["sketch_cols"])
    return _local(st["sketch"]).numel()


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
    sketch_numel: int = 0
    """Elements of the moment sketch ``Y`` (``min(shape) × (max_rank + oversample)`` with
    ``subspace_source="moment"``, else 0)."""

    def state_numel(self) -> int:
        """Elements of optimizer state for this matrix: projection + two moments + the moment sketch."""
        s, l = min(self.shape), max(self.shape)
        return self.rank * (s + 2 * l) + self.sketch_numel

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

    Three choices differ from a literal GaLore/paper transcription; each is documented with its formula on
    :class:`~lightning_adarank.AdaRankGradConfig` and was measured (docs, "How AdaRankGrad works here"):

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
        self.context = StepContext(config, {})
        """What every step path shares (:class:`~lightning_adarank.optim.step_context.StepContext`): the
        distribution layer and the layer-wise mode step through it."""
        self._projected = ProjectedStep(self.context)
        self._grouped = GroupedStep(self.context, self._projected)
        super().__init__(normalize_params(params), {**config.group_defaults(), "low_rank": True})
        self.context.bind(self.state)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "context" in self.__dict__:  # torch's load_state_dict builds a new state: the paths step on it
            self.context.bind(self.state)

    # ------------------------------------------------------------------ groups and bookkeeping
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group)
        check_low_rank_shapes(group)  # a conv kernel in a low_rank group gets dense AdamW: say so
        if "param_names" in group and len(group["param_names"]) != len(group["params"]):
            raise ValueError("AdaRankGrad: param_names and params of a group differ in length")
        self.context.register(self.param_groups)

    def is_projected(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` gets a low-rank projection under ``group``'s settings."""
        return self.context.is_projected(p, group)

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
                    name=name,
                    shape=tuple(p.shape),
                    rank=int(st["rank"]),
                    max_rank=int(group["max_rank"]),
                    refreshes=int(st["refreshes"]),
                    energy_kept=float(st["energy_kept"]),
                    sketch_numel=_sketch_numel(st, p),
                )
        return out

    def ranks(self) -> dict[str, int]:
        """Current rank of every projected matrix, keyed by parameter name (``group{g}.param{i}`` if unnamed).

        Matrices appear after their first step (their subspace is chosen from their first gradient).
        """
        return {name: info.rank for name, info in self.subspaces().items()}

    def state_bytes(self) -> int:
        """Bytes of all optimizer state tensors as stored (moments, projections, sketches, step counters,
        statistics; at 8 bits codes, scales and headers: :func:`~lightning_adarank.optim.quant.state_nbytes`).

        Counts this rank's part only: the local shard of a DTensor (FSDP2), the whole of a replicated tensor.
        """
        return sum(quant.state_nbytes(v) for st in self.state.values() for v in st.values())

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
        group = self.context.group_of(p)
        grad = p.grad if grad is None else grad
        if grad is not None:
            self.step_params([p], group, [grad])

    @torch.no_grad()
    def project_grad(self, p: Tensor, grad: Tensor, group: dict, grad_sq_norm: float | None = None, **kw: Any):
        """The first half of ``p``'s projected step (:meth:`ProjectedStep.project_grad
        <lightning_adarank.optim.projected.ProjectedStep.project_grad>`): refresh if pending, then ``PᵀG``."""
        return self._projected.project_grad(p, grad, group, grad_sq_norm, **kw)

    @torch.no_grad()
    def update_projected(self, params: list[Tensor], lowrank: list[Tensor], group: dict, **kw: Any) -> None:
        """The second half (:meth:`ProjectedStep.update_projected
        <lightning_adarank.optim.projected.ProjectedStep.update_projected>`): Adam, update, refresh test."""
        self._projected.update_projected(params, lowrank, group, **kw)

    @torch.no_grad()
    def update_dense(self, params: list[Tensor], grads: list[Tensor], group: dict) -> None:
        """Exact AdamW for parameters that are not projected (:meth:`StepContext.update_dense
        <lightning_adarank.optim.step_context.StepContext.update_dense>`)."""
        self.context.update_dense(params, grads, group)

    @torch.no_grad()
    def step_params(self, params: list[Tensor], group: dict, grads: list[Tensor]) -> None:
        """Update ``params`` (all from ``group``) with ``grads``. The functional core of :meth:`step`.

        With ``grouped`` (``None``: on accelerators) and more than one parameter the grouped step
        (:meth:`~lightning_adarank.optim.grouped_step.GroupedStep.step`: no host synchronisation on a normal
        step), else the per-matrix step (:meth:`~lightning_adarank.optim.projected.ProjectedStep.step`).
        """
        for g in grads:
            if g.is_sparse:
                raise TypeError("AdaRankGrad does not support sparse gradients (use nn.Embedding(sparse=False))")
        sharded = [i for i, p in enumerate(params) if _is_dtensor(p)]
        if sharded:  # FSDP2 parameters: the distribution layer's per-matrix step (never grouped)
            _sharded("step")(self, [params[i] for i in sharded], group, [grads[i] for i in sharded])
            if len(sharded) == len(params):
                return
            keep = [i for i in range(len(params)) if i not in set(sharded)]
            params, grads = [params[i] for i in keep], [grads[i] for i in keep]
        grouped = self.config.grouped
        if grouped is None:  # compile=True compiles the grouped step: it groups on every device
            grouped = self.config.compile or params[0].device.type != "cpu"
        # low-bit moments take the per-matrix path: the grouped step keeps fp32 moments in flat per-shape buffers
        # (its batched Adam call works on them in place), so grouped=True with low-bit state is refused
        low_bit = group.get("state_bits", 32) != 32 or group.get("dense_state_bits", 32) != 32
        if low_bit and (self.config.grouped or self.config.compile):
            which = "grouped=True" if self.config.grouped else "compile=True (which compiles the grouped step)"
            raise ValueError(
                f"AdaRankGrad: {which} cannot step low-bit state (state_bits/dense_state_bits below 32): the "
                "grouped step keeps fp32 moments in flat per-shape buffers and steps them in place. Use "
                "grouped=None and compile=False (the defaults: low-bit groups then take the per-matrix step)"
            )
        if grouped and len(params) > 1 and not low_bit:
            self._grouped.step(params, group, grads, next(i for i, g in enumerate(self.param_groups) if g is group))
        else:
            self._projected.step(params, group, grads)

    def share_due(self, p: Tensor) -> bool:
        """Whether this step of ``p`` needs the batch's captured share (:meth:`StepContext.share_due
        <lightning_adarank.optim.step_context.StepContext.share_due>`)."""
        return self.context.share_due(p)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus a format tag (:func:`~lightning_adarank.optim.checkpoint.format_tag`), with
        every view into the grouped step's storage cloned into its own tensor.

        A checkpoint then holds exactly the state of each matrix (no shared storages), in the per-matrix
        layout; :meth:`load_state_dict` drops the storage, and the next grouped step rebuilds it.
        """
        self._grouped.park_all()  # flags not read yet travel in the state, to be acted on at the same step after a resume
        sd = super().state_dict()
        sd["state"] = {
            k: {n: v.clone() if isinstance(v, Tensor) and v._base is not None else v for n, v in st.items()}
            for k, st in sd["state"].items()
        }
        sd[STATE_KEY] = {**format_tag(), "flag_reads": self._grouped.flag_reads(len(self.param_groups))}
        if any(_is_dtensor(p) for g in self.param_groups for p in g["params"]):
            _sharded("pad")(self, sd)  # fixed shapes for distributed checkpoints (DCP loads in place)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; tensors keep their saved dtype (torch would cast fp32 moments to a bf16 param's dtype).

        The refresh-test statistics may be numbers (per-matrix step) or 0-d tensors (grouped step); both load.
        Raises ``ValueError`` naming the first mismatch when the state does not fit these parameters
        (:func:`~lightning_adarank.optim.checkpoint.check_state_dict`).
        """
        state_dict = migrate_state_dict(self, state_dict)  # an old (format 0-1) 8-bit state: the current format
        check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)  # a new self.state: bound to the context by __setstate__
        self.context.register(self.param_groups)
        self._grouped.reset((state_dict.get(STATE_KEY) or {}).get("flag_reads") or [])
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
        if any(
            "basis" in st and "rank" in st and st["basis"].dim() == 2 and st["basis"].shape[1] != int(st["rank"])
            for st in self.state.values()
        ):
            _sharded("unpad")(self)  # a state saved padded to max_rank (FSDP2 parameters; see distributed.checkpoint)
