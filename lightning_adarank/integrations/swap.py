"""The optimizer swap both Lightning doors share: replace the module's optimizer with AdaRankGrad at fit start.

:class:`OptimizerSwap` is the one implementation behind :class:`~lightning_adarank.AdaRankGradCallback`
(which runs it in ``on_fit_start``) and :class:`~lightning_adarank.AdaRankGradStrategy` /
:class:`~lightning_adarank.AdaRankGradDDPStrategy` (which run it in ``setup_optimizers``). Both points come
after ``strategy.setup`` has built the module's optimizers and wrapped the model, and before Lightning
restores a checkpoint's optimizer and scheduler states (``Trainer._run``: ``strategy.setup`` →
``on_fit_start`` → ``restore_training_state``), so a resumed run loads its saved AdaRankGrad state into the
swapped optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from ..optim.config import SETTING_NAMES, AdaRankGradConfig
from ..optim.layerwise import LayerwiseUpdater, check_layerwise_params
from ..optim.optimizer import AdaRankGrad
from ..optim.targets import explain_no_match, target_parameter_names
from .added_groups import AddedGroups
from .typed import FROM_MODULE

__all__ = [
    "OptimizerSwap",
    "build_adarank_from",
    "check_strategy",
    "name_load_errors",
    "rebind_lr_scheduler",
    "warn_if_nothing_projected",
]

#: per-parameter-group lists a torch LR scheduler may hold (remapped when the groups are split)
_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")


def build_adarank_from(
    optimizer: Optimizer,
    model: torch.nn.Module,
    target_modules: Any = "all-linear",
    include_embeddings: bool = False,
    config: AdaRankGradConfig | None = None,
    owner: str = "AdaRankGrad",
    **settings: Any,
) -> tuple[AdaRankGrad, list[int]]:
    """Build an :class:`AdaRankGrad` over the parameters ``optimizer`` trains, keeping its per-group settings.

    Every parameter group of ``optimizer`` is split into a projected part (weights selected by
    ``target_modules``, see :func:`~lightning_adarank.param_groups`) and a dense part, in that order. Each new
    group takes ``lr`` (the scheduler's ``initial_lr`` when there is one), ``betas``, ``eps`` and
    ``weight_decay`` from the group it came from unless ``settings`` gives them (then they apply to every
    group, a scheduler's current factor kept on ``lr``), so the usual "no weight decay on biases and norms"
    split survives. Keys added by LR schedulers (``initial_lr``, ``max_lr``, ...) are carried over. The other
    AdaRankGrad settings come from ``config`` (default :class:`AdaRankGradConfig`) updated by ``settings``.
    ``owner`` (the callback or strategy the user built) starts every error message.

    Returns:
        the new optimizer and ``origin``: for each new group, the index of the group of ``optimizer`` it came
        from (what :func:`rebind_lr_scheduler` needs).

    Raises:
        ValueError: ``target_modules`` selects none of the parameters ``optimizer`` trains.
        TypeError: an unknown setting.
    """
    unknown = set(settings) - SETTING_NAMES
    if unknown:
        raise TypeError(f"{owner}: unknown AdaRankGrad setting(s) {sorted(unknown)}; valid: {sorted(SETTING_NAMES)}")
    names = {id(p): n for n, p in model.named_parameters()}
    targets = set(target_parameter_names(model, target_modules, include_embeddings, only_trainable=False))
    defaults_keys = set(getattr(optimizer, "defaults", {}))
    groups: list[dict] = []
    origin: list[int] = []
    for gi, old in enumerate(optimizer.param_groups):
        carried = {k: v for k, v in old.items() if k not in defaults_keys and k not in ("params", "param_names")}
        for key in FROM_MODULE:
            if key in old:
                carried[key] = tuple(old[key]) if key == "betas" else old[key]
        if "lr" in settings:  # keep the scheduler's current factor on the new base lr
            base = old.get("initial_lr", old["lr"])
            factor = old["lr"] / base if base else 1.0
            carried["lr"] = settings["lr"] * factor
            if "initial_lr" in carried:
                carried["initial_lr"] = settings["lr"]
        for key in ("betas", "eps", "weight_decay"):
            if key in settings:
                carried[key] = tuple(settings[key]) if key == "betas" else settings[key]
        low = [p for p in old["params"] if names.get(id(p)) in targets]
        rest = [p for p in old["params"] if names.get(id(p)) not in targets]
        for params, low_rank in ((low, True), (rest, False)):
            if params:
                groups.append(
                    {
                        **carried,
                        "params": params,
                        "low_rank": low_rank,
                        "param_names": [names.get(id(p), f"group{gi}.param{i}") for i, p in enumerate(params)],
                    }
                )
                origin.append(gi)
    if not any(g["low_rank"] for g in groups):
        raise ValueError(
            f"{owner}: target_modules={target_modules!r} selects no weight that the module's optimizer"
            f" ({type(optimizer).__name__}) trains in {type(model).__name__}, so nothing would be projected: "
            + explain_no_match(model, target_modules, include_embeddings)
        )
    ctor = {k: v for k, v in settings.items() if k not in FROM_MODULE}
    try:
        return AdaRankGrad(groups, config=config, **ctor), origin
    except (TypeError, ValueError) as err:  # a setting carried over from the module's optimizer
        raise type(err)(
            f"{owner}: the settings of the module's {type(optimizer).__name__} do not carry over to AdaRankGrad:"
            f" {_without_prefix(str(err))}"
        ) from err


def _without_prefix(message: str) -> str:
    return message.removeprefix("AdaRankGrad: ").removeprefix("AdaRankGrad state: ")


#: the settings that decide a checkpoint's layout, and what the user changes to match one
_LAYOUT_FIX = {"low_rank": "target_modules and include_embeddings as in the run that saved it"}


def name_load_errors(optimizer: AdaRankGrad, owner: str) -> None:
    """Make ``optimizer.load_state_dict`` errors (a checkpoint that does not fit, e.g. another ``max_rank``) name
    ``owner``, the object the user built, and the setting to give it, instead of the optimizer."""
    load = optimizer.load_state_dict

    def load_state_dict(state_dict: dict) -> None:
        try:
            load(state_dict)
        except ValueError as err:
            message = str(err)
            if not message.startswith("AdaRankGrad"):
                raise
            message = re.sub(
                r"the saved layout needs (\w+)=(.+?) \(build the optimizer with it\)",
                lambda m: f"resume with {_LAYOUT_FIX.get(m[1], f'{owner}({m[1]}={m[2]})')}",
                _without_prefix(message),
            )
            raise ValueError(f"{owner}: the checkpoint's optimizer state does not fit: {message}") from err

    optimizer.load_state_dict = load_state_dict  # type: ignore[method-assign]


def _track_step_called(opt: Optimizer) -> None:
    """Wrap ``opt.step`` the way torch's LR schedulers do (so they do not warn about the call order)."""
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return
    func = type(opt).step
    opt_ref = weakref.ref(opt)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        o = opt_ref()
        o._opt_called = True  # type: ignore[union-attr]
        return func(o, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


def rebind_lr_scheduler(scheduler: Any, old: Optimizer, new: Optimizer, origin: list[int]) -> None:
    """Point a torch LR scheduler built for ``old`` at ``new`` (whose group ``j`` came from ``old``'s ``origin[j]``).

    Works for every scheduler of ``torch.optim.lr_scheduler`` (including ``SequentialLR``/``ChainedScheduler``
    and ``ReduceLROnPlateau``) and for those built on them, e.g. transformers'
    ``get_linear_schedule_with_warmup`` (a ``LambdaLR``): per-group lists are remapped, the schedule's
    position (``last_epoch``) and the current learning rates are kept.
    """
    for sub in getattr(scheduler, "_schedulers", []) or []:
        rebind_lr_scheduler(sub, old, new, origin)
    if getattr(scheduler, "optimizer", None) is not old:
        if getattr(scheduler, "optimizer", None) is not new:
            raise ValueError(f"{type(scheduler).__name__} does not belong to the module's optimizer")
        return
    n_old = len(old.param_groups)
    for attr in _PER_GROUP_LISTS:
        value = getattr(scheduler, attr, None)
        if isinstance(value, (list, tuple)) and len(value) == n_old:
            setattr(scheduler, attr, [value[o] for o in origin])
    scheduler.optimizer = new
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in new.param_groups]
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in new.param_groups]
    _track_step_called(new)


# ------------------------------------------------------------------------------------------- checks
def check_strategy(strategy: Any, owner: str) -> None:
    """Refuse strategies AdaRankGrad cannot run under. It runs on one device, under DDP (every rank holds whole
    matrices) and under ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` (its DTensor row shards are stepped
    by :mod:`lightning_adarank.distributed` without gathering them). FSDP1 (``FSDPStrategy``: flat parameters)
    and DeepSpeed (flattened, partitioned fp32 groups) hide the matrix shapes a projection needs."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy  # noqa: PLC0415

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"{owner}: {type(strategy).__name__} flattens the parameters (and shards them as flat buffers), so"
            " AdaRankGrad cannot see the weight matrices it projects; it is not supported. For sharded training use"
            " ModelParallelStrategy with FSDP2 (torch.distributed.fsdp.fully_shard in configure_model), or a DDP"
            " strategy."
        )
    if isinstance(strategy, ModelParallelStrategy):
        return
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or "XLA" in type(strategy).__name__:
        raise ValueError(
            f"{owner}: runs under single-device, DDP and ModelParallel (FSDP2) strategies only, not"
            f" {type(strategy).__name__}"
        )


def warn_if_nothing_projected(optimizer: AdaRankGrad, owner: str) -> None:
    """Warn once per optimizer when no parameter is projected (the run is then plain AdamW), naming the
    matrices that were candidates and why each is not projected (``min(shape) <= max_rank``)."""
    if getattr(optimizer, "_adarank_checked_projection", False):
        return
    optimizer._adarank_checked_projection = True  # type: ignore[attr-defined]
    candidates = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            if optimizer.is_projected(p, group):
                return
            if group["low_rank"] and p.dim() == 2:
                candidates.append(f"{name} {tuple(p.shape)}: min(shape)={min(p.shape)} <= max_rank={group['max_rank']}")
    why = "; ".join(candidates[:8]) + ("; ..." if len(candidates) > 8 else "")
    rank_zero_warn(
        f"{owner}: AdaRankGrad projects no matrix, so this run is plain AdamW. "
        + (
            f"Matrices selected but too small: {why}. Lower max_rank below their smaller side."
            if candidates
            else "No 2-D weight is in a low_rank group; check target_modules."
        )
    )


# ------------------------------------------------------------------------------------------- the swap
class OptimizerSwap:
    """Replaces the module's optimizer with :class:`AdaRankGrad` (and drives layer-wise mode), for both doors.

    Args:
        owner: the door's name, for messages.
        target_modules, include_embeddings, layerwise: see :class:`~lightning_adarank.AdaRankGradCallback`.
        settings: AdaRankGrad settings; ``None`` for one of :data:`FROM_MODULE` keeps the module's value.
            Checked now (``AdaRankGradConfig``): a bad value fails when the door is built.
    """

    def __init__(
        self, owner: str, target_modules: Any, include_embeddings: bool, layerwise: bool, settings: dict[str, Any]
    ) -> None:
        unknown = set(settings) - SETTING_NAMES
        if unknown:
            raise TypeError(
                f"{owner}: unknown AdaRankGrad setting(s) {sorted(unknown)}; valid: {sorted(SETTING_NAMES)}"
            )
        if not isinstance(target_modules, (str, list, tuple)):
            raise TypeError(
                f"{owner}: target_modules must be 'all-linear', a regex or a list of names, got {target_modules!r}"
            )
        self.owner = owner
        self.target_modules = list(target_modules) if isinstance(target_modules, tuple) else target_modules
        self.include_embeddings = bool(include_embeddings)
        self.layerwise = bool(layerwise)
        #: the settings given (not None), checked
        self.settings = {k: v for k, v in settings.items() if v is not None or k not in FROM_MODULE}
        self.config = AdaRankGradConfig(**self.settings)
        self.overrides = {k: getattr(self.config, k) for k in FROM_MODULE if k in self.settings}
        default = AdaRankGradConfig()
        self.changed = {
            k: v
            for k, v in self.config.to_dict().items()
            if k in self.overrides or (k not in FROM_MODULE and v != getattr(default, k))
        }
        self.updater: LayerwiseUpdater | None = None
        self._unsynced: Any = None

    def swap(self, strategy: Any) -> AdaRankGrad:
        """Replace ``strategy.optimizers`` (one torch optimizer) with AdaRankGrad and re-bind the schedulers."""
        check_strategy(strategy, self.owner)
        optimizers = strategy.optimizers
        current = next((o for o in optimizers if isinstance(o, AdaRankGrad)), None)
        if current is not None:
            if self.changed or self.target_modules != "all-linear" or self.include_embeddings:
                rank_zero_warn(
                    f"{self.owner}: the optimizer is an AdaRankGrad already (configure_optimizers returns"
                    " one); the given target_modules and settings are ignored"
                )
            self._note_left_alone(optimizers, current)
            self._adopt(current, strategy)
            warn_if_nothing_projected(current, self.owner)
            return current
        if len(optimizers) != 1 or not isinstance(optimizers[0], Optimizer) or not optimizers[0].param_groups:
            raise ValueError(
                f"{self.owner} replaces the single optimizer that configure_optimizers returns; got"
                f" {len(optimizers)} ({', '.join(type(o).__name__ for o in optimizers) or 'none'}). Return an"
                " AdaRankGrad from configure_optimizers yourself when you need several optimizers."
            )
        old = optimizers[0]
        new, origin = build_adarank_from(
            old,
            strategy.lightning_module,
            self.target_modules,
            self.include_embeddings,
            config=self.config,
            owner=self.owner,
            **self.overrides,
        )
        for cfg in strategy.lr_scheduler_configs:
            rebind_lr_scheduler(cfg.scheduler, old, new, origin)
        strategy.optimizers = [new]
        self._adopt(new, strategy)
        warn_if_nothing_projected(new, self.owner)
        return new

    def _adopt(self, optimizer: AdaRankGrad, strategy: Any) -> None:
        """Once per optimizer: groups added later (BaseFinetuning) follow the projection rule, and checkpoint
        errors name the object the user built."""
        if getattr(optimizer, "_adarank_adopted", False):
            return
        optimizer._adarank_adopted = True  # type: ignore[attr-defined]
        AddedGroups(
            optimizer, strategy, self.target_modules, self.include_embeddings, self.owner, layerwise=self.layerwise
        ).install()
        name_load_errors(optimizer, self.owner)

    def _note_left_alone(self, optimizers: list, current: AdaRankGrad) -> None:
        """Say once, at info level, which optimizers ``configure_optimizers`` returned besides the AdaRankGrad."""
        others = [o for o in optimizers if o is not current and not getattr(o, "_adarank_left_noted", False)]
        for o in others:
            o._adarank_left_noted = True
        if others:
            rank_zero_info(
                f"{self.owner}: configure_optimizers returns {len(optimizers)} optimizers; the AdaRankGrad is used as"
                f" it is and {', '.join(type(o).__name__ for o in others)} (the optimizer(s) at position"
                f" {', '.join(str(optimizers.index(o)) for o in others)}) left as returned, not projected"
            )

    # ------------------------------------------------------------------ layer-wise mode
    def attach_layerwise(self, strategy: Any, trainer: Any, unsync: bool) -> None:
        """Check that the run can be layer-wise and attach a :class:`LayerwiseUpdater` to the (DDP) model.

        ``unsync``: make ``strategy.block_backward_sync`` a no-op while attached (layer-wise DDP all-reduces
        every micro-batch, so that a refresh sees the same gradient on every rank); the strategies override
        that method themselves and pass ``False``.
        """
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if not self.layerwise or trainer.state.fn != TrainerFn.FITTING:
            return
        who = f"{self.owner}(layerwise=True)"
        if not strategy.lightning_module.automatic_optimization:
            raise ValueError(f"{who} needs automatic optimization")
        if trainer.gradient_clip_val:
            raise ValueError(
                f"{who} cannot clip gradients by global norm (gradient_clip_val={trainer.gradient_clip_val}): each"
                " parameter is updated before the others' gradients exist. Remove gradient_clip_val or use"
                " layerwise=False."
            )
        if str(trainer.precision).startswith("16"):
            raise ValueError(
                f"{who} does not support fp16 mixed precision (GradScaler); use precision='bf16-mixed' or '32-true'"
            )
        if len(strategy.optimizers) != 1 or not isinstance(strategy.optimizers[0], AdaRankGrad):
            raise ValueError(f"{who} needs exactly one AdaRankGrad optimizer")
        model = strategy.model
        check_layerwise_params(strategy.optimizers[0], who)
        is_ddp = isinstance(model, DistributedDataParallel)
        if is_ddp and getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise ValueError(f"{who} installs its own DDP communication hook; remove ddp_comm_hook from the strategy")
        updater = LayerwiseUpdater(strategy.optimizers[0], accumulate_grad_batches=trainer.accumulate_grad_batches)
        self.updater = updater.attach(model if is_ddp else strategy.lightning_module)
        if unsync and is_ddp:
            self._unsynced = strategy
            strategy.block_backward_sync = contextlib.nullcontext  # instance attribute; removed in detach()

    def before_backward(self, trainer: Any) -> None:
        """Before each backward in layer-wise mode: does this micro-batch complete the optimizer step?"""
        if self.updater is not None:
            self.updater.begin_micro_batch(not trainer.fit_loop._should_accumulate())

    def after_backward(self) -> None:
        if self.updater is not None:
            self.updater.end_micro_batch()

    def detach(self) -> None:
        """Remove the layer-wise hooks (at teardown)."""
        if self.updater is not None:
            self.updater.detach()
            self.updater = None
        if self._unsynced is not None:
            self._unsynced.__dict__.pop("block_backward_sync", None)
            self._unsynced = None
