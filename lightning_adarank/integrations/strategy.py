"""``AdaRankGradStrategy``: train any LightningModule with AdaRankGrad, on one device or with DDP.

The strategy is a *subclass* of a real Lightning strategy chosen at construction time
(``AdaRankGradStrategy(base="ddp")`` is an instance of ``AdaRankGradDDPStrategy``, a subclass of both
:class:`AdaRankGradStrategy` and :class:`~lightning.pytorch.strategies.DDPStrategy`), so the Trainer's
connector configures it exactly like the base strategy (accelerator, devices, cluster environment,
launcher); the only thing it changes is :meth:`setup_optimizers`.

Importing this module registers ``adarank`` (automatic choice, like ``strategy="auto"``) and
``adarank_<name>`` for every DDP flavour Lightning registers (``adarank_ddp``, ``adarank_ddp_spawn``,
``adarank_ddp_fork``, ``adarank_ddp_notebook``, ``adarank_ddp_find_unused_parameters_true``, ...) in
Lightning's ``StrategyRegistry``. Lightning has no entry-point discovery for strategies, so
``Trainer(strategy="adarank_ddp")`` needs this module imported first: ``import lightning_adarank.strategy``
or touching any Lightning name of the package (``lightning_adarank.AdaRankGradStrategy``,
``lightning_adarank.EffectiveRankMonitor``, ...).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any

import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    StrategyRegistry,
)
from lightning.pytorch.strategies.single_xla import SingleDeviceXLAStrategy
from lightning.pytorch.strategies.xla import XLAStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from ..optim.config import SETTING_NAMES
from ..optim.groups import target_parameter_names
from ..optim.layerwise import LayerwiseUpdater
from ..optim.optimizer import AdaRankGrad

__all__ = ["AdaRankGradStrategy", "build_adarank_from", "rebind_lr_scheduler"]

#: settings of :class:`AdaRankGrad` the strategy accepts
OPTIMIZER_SETTINGS = SETTING_NAMES
#: settings read group by group from the module's own optimizer when not given to the strategy
_FROM_MODULE = ("lr", "betas", "eps", "weight_decay")
#: per-parameter-group lists a torch LR scheduler may hold (remapped when the groups are split)
_PER_GROUP_LISTS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs", "base_momentums", "max_momentums")


# ---------------------------------------------------------------------------------------------- optimizer swap
def build_adarank_from(
    optimizer: Optimizer,
    model: torch.nn.Module,
    target_modules: Any = "all-linear",
    include_embeddings: bool = False,
    **settings: Any,
) -> tuple[AdaRankGrad, list[int]]:
    """Build an :class:`AdaRankGrad` over the parameters ``optimizer`` trains, keeping its per-group settings.

    Every parameter group of ``optimizer`` is split into a projected part (weights selected by
    ``target_modules``, see :func:`~lightning_adarank.param_groups`) and a dense part, in that order. Each new
    group takes ``lr`` (the scheduler's ``initial_lr`` when there is one), ``betas``, ``eps`` and
    ``weight_decay`` from the group it came from unless ``settings`` gives them (then they apply to every
    group), so the usual "no weight decay on biases and norms" split survives. Keys added by LR schedulers
    (``initial_lr``, ``max_lr``, ...) are carried over. Other ``settings`` (``max_rank``, ``energy``, ...)
    are :class:`AdaRankGrad` arguments.

    Returns:
        the new optimizer and ``origin``: for each new group, the index of the group of ``optimizer`` it came
        from (what :func:`rebind_lr_scheduler` needs).

    Raises:
        ValueError: ``target_modules`` selects none of the parameters ``optimizer`` trains.
    """
    unknown = set(settings) - OPTIMIZER_SETTINGS
    if unknown:
        raise TypeError(f"unknown AdaRankGrad setting(s) {sorted(unknown)}; valid: {sorted(OPTIMIZER_SETTINGS)}")
    names = {id(p): n for n, p in model.named_parameters()}
    targets = set(target_parameter_names(model, target_modules, include_embeddings))
    defaults_keys = set(getattr(optimizer, "defaults", {}))
    groups: list[dict] = []
    origin: list[int] = []
    for gi, old in enumerate(optimizer.param_groups):
        carried = {k: v for k, v in old.items() if k not in defaults_keys and k not in ("params", "param_names")}
        for key in _FROM_MODULE:
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
                groups.append({
                    **carried, "params": params, "low_rank": low_rank,
                    "param_names": [names.get(id(p), f"group{gi}.param{i}") for i, p in enumerate(params)],
                })
                origin.append(gi)
    if not any(g["low_rank"] for g in groups):
        raise ValueError(
            f"AdaRankGradStrategy: target_modules={target_modules!r} selects no weight that the module's optimizer"
            f" trains ({type(model).__name__}); nothing would be projected"
        )
    ctor = {k: v for k, v in settings.items() if k not in _FROM_MODULE}
    return AdaRankGrad(groups, **ctor), origin


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


# ---------------------------------------------------------------------------------------------- the strategy
class AdaRankGradStrategy:
    """A Lightning strategy that trains the LightningModule with :class:`~lightning_adarank.AdaRankGrad`.

    ``AdaRankGradStrategy(base, ...)`` returns an instance of a subclass of ``base``'s strategy class (and of
    this class), so ``isinstance(strategy, AdaRankGradStrategy)`` and ``isinstance(strategy, DDPStrategy)`` both
    hold and Lightning configures it like ``base``.

    At ``fit`` it calls the module's ``configure_optimizers`` (through Lightning, so LR-scheduler configs keep
    working), builds ``AdaRankGrad`` over the parameters the returned optimizer trains (see
    :func:`build_adarank_from`: each of its param groups keeps its lr/betas/eps/weight decay unless given
    here) and re-binds the schedulers to it. A module whose ``configure_optimizers`` already returns an
    ``AdaRankGrad`` keeps it (settings given here are then ignored, with a warning).

    Args:
        base: ``"auto"`` (one device, or DDP when the Trainer is given several devices, as Lightning's
            ``"auto"``), the name of a registered single-device or DDP strategy (``"ddp"``, ``"ddp_spawn"``,
            ``"ddp_find_unused_parameters_true"``, ...) or such a strategy instance (e.g.
            ``DDPStrategy(process_group_backend="gloo")``). FSDP and DeepSpeed are refused: they shard the
            parameters or the optimizer.
        target_modules: which weights are projected (``"all-linear"``, a regex, or a list of module names; see
            :func:`~lightning_adarank.param_groups`).
        include_embeddings: also project ``nn.Embedding`` tables.
        layerwise: update each parameter inside backward as soon as its gradient is ready and free the gradient
            (see :mod:`lightning_adarank.optim.layerwise`). Works with ``accumulate_grad_batches`` (low-rank
            accumulation) and DDP (a communication hook steps each all-reduced bucket; every micro-batch is
            all-reduced). Refused with ``gradient_clip_val`` (global-norm clipping needs all gradients before
            any update), fp16 mixed precision (the GradScaler unscales all gradients at once) and manual
            optimization.
        **optimizer_settings: any :class:`AdaRankGrad` argument (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``max_rank``, ``energy``, ``min_gap``, ``seed``, ...).

    Under DDP every rank sees the same all-reduced gradients and AdaRankGrad's randomness depends only on
    ``(seed, parameter index, refresh count)``, so all ranks keep bit-identical parameters, ranks and
    subspaces without extra communication.
    """

    _adarank_base_cls: type | None = None  # set on the concrete subclasses

    def __new__(cls, base: Any = "auto", *args: Any, **kwargs: Any):
        if cls._adarank_base_cls is None:
            base_cls, _, _ = _resolve_base(base)
            cls = _subclass_for(base_cls)
        return object.__new__(cls)

    def __init__(
        self,
        base: Any = "auto",
        target_modules: Any = "all-linear",
        include_embeddings: bool = False,
        layerwise: bool = False,
        **optimizer_settings: Any,
    ) -> None:
        unknown = set(optimizer_settings) - OPTIMIZER_SETTINGS
        if unknown:
            raise TypeError(
                f"AdaRankGradStrategy: unknown optimizer setting(s) {sorted(unknown)}; valid: {sorted(OPTIMIZER_SETTINGS)}."
                " To configure the base strategy pass an instance, e.g. base=DDPStrategy(process_group_backend='gloo')"
            )
        if not isinstance(target_modules, (str, list, tuple)):
            raise TypeError(f"target_modules must be 'all-linear', a regex or a list of names, got {target_modules!r}")
        base_cls, init_params, instance = _resolve_base(base)
        if instance is not None:
            self.__dict__.update(instance.__dict__)
        else:
            base_cls.__init__(self, **init_params)
        self.adarank_target_modules = target_modules
        self.adarank_include_embeddings = include_embeddings
        self.adarank_settings = dict(optimizer_settings)
        self.adarank_layerwise = bool(layerwise)
        self._layerwise: LayerwiseUpdater | None = None

    def __reduce__(self):  # the concrete classes are made at run time: pickle them through their base
        return _rebuild_strategy, (self._adarank_base_cls,), self.__getstate__()

    def setup_optimizers(self, trainer: Any) -> None:
        """Call the module's ``configure_optimizers`` and replace its optimizer with :class:`AdaRankGrad`."""
        super().setup_optimizers(trainer)  # type: ignore[misc]
        optimizers = self.optimizers
        if any(isinstance(o, AdaRankGrad) for o in optimizers):
            if self.adarank_settings or self.adarank_target_modules != "all-linear":
                rank_zero_warn(
                    "AdaRankGradStrategy: configure_optimizers already returns AdaRankGrad; the strategy's"
                    " target_modules and optimizer settings are ignored"
                )
            return
        if len(optimizers) != 1 or not isinstance(optimizers[0], Optimizer) or not optimizers[0].param_groups:
            raise ValueError(
                "AdaRankGradStrategy replaces the single optimizer that configure_optimizers returns; got"
                f" {len(optimizers)} ({', '.join(type(o).__name__ for o in optimizers) or 'none'}). Return an"
                " AdaRankGrad from configure_optimizers yourself when you need several optimizers."
            )
        old = optimizers[0]
        new, origin = build_adarank_from(
            old, self.lightning_module, self.adarank_target_modules, self.adarank_include_embeddings,
            **self.adarank_settings,
        )
        for config in self.lr_scheduler_configs:
            rebind_lr_scheduler(config.scheduler, old, new, origin)
        self.optimizers = [new]

    # ------------------------------------------------------------------ layer-wise mode
    def setup(self, trainer: Any) -> None:
        """The base strategy's setup (DDP wrapping, optimizers), then the layer-wise hooks when asked for."""
        super().setup(trainer)  # type: ignore[misc]
        if self.adarank_layerwise and trainer.state.fn == TrainerFn.FITTING:
            self._layerwise = _attach_layerwise(self, trainer)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """In layer-wise mode, tell the updater whether this micro-batch completes the optimizer step."""
        updater = self._layerwise
        if updater is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        updater.begin_micro_batch(not self.lightning_module.trainer.fit_loop._should_accumulate())
        out = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        updater.end_micro_batch()
        return out

    def block_backward_sync(self) -> Any:
        """Layer-wise DDP all-reduces every micro-batch (a refresh needs the same gradient on every rank)."""
        if self._layerwise is not None:
            return contextlib.nullcontext()
        return super().block_backward_sync()  # type: ignore[misc]

    def teardown(self) -> None:
        if self._layerwise is not None:
            self._layerwise.detach()
            self._layerwise = None
        super().teardown()  # type: ignore[misc]


def _attach_layerwise(strategy: Any, trainer: Any) -> LayerwiseUpdater:
    """Check that the run can be layer-wise and attach a :class:`LayerwiseUpdater` to the wrapped model."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    if not strategy.lightning_module.automatic_optimization:
        raise ValueError("AdaRankGradStrategy(layerwise=True) needs automatic optimization")
    if trainer.gradient_clip_val:
        raise ValueError(
            "AdaRankGradStrategy(layerwise=True) cannot clip gradients by global norm (gradient_clip_val="
            f"{trainer.gradient_clip_val}): each parameter is updated before the others' gradients exist."
            " Remove gradient_clip_val or use layerwise=False."
        )
    if str(trainer.precision).startswith("16"):
        raise ValueError("AdaRankGradStrategy(layerwise=True) does not support fp16 mixed precision (GradScaler);"
                         " use precision='bf16-mixed' or '32-true'")
    if len(strategy.optimizers) != 1 or not isinstance(strategy.optimizers[0], AdaRankGrad):
        raise ValueError("AdaRankGradStrategy(layerwise=True) needs exactly one AdaRankGrad optimizer")
    model = strategy.model
    if isinstance(model, DistributedDataParallel) and getattr(strategy, "_ddp_comm_hook", None) is not None:
        raise ValueError("AdaRankGradStrategy(layerwise=True) installs its own DDP communication hook;"
                         " remove ddp_comm_hook from the base strategy")
    updater = LayerwiseUpdater(strategy.optimizers[0], accumulate_grad_batches=trainer.accumulate_grad_batches)
    return updater.attach(model if isinstance(model, DistributedDataParallel) else strategy.lightning_module)


class _AutoStrategy(SingleDeviceStrategy):
    """``base="auto"``: single device until the Trainer hands over its devices; DDP when there are several.

    The Trainer's connector sets ``cluster_environment`` and then ``parallel_devices`` on any strategy that
    has them; the setter picks the device (one) or turns this object into the DDP variant (several), exactly
    what Lightning's own ``strategy="auto"`` would choose.
    """

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.cluster_environment = None
        self._devices_given = False

    @property
    def parallel_devices(self) -> list[torch.device]:
        return [self.root_device] if self._devices_given else []

    @parallel_devices.setter
    def parallel_devices(self, devices: list[Any]) -> None:
        devices = [torch.device(d) if not isinstance(d, torch.device) else d for d in devices]
        if len(devices) <= 1:
            self._root_device = devices[0] if devices else torch.device("cpu")
            self._devices_given = True
            return
        from lightning.fabric.utilities.imports import _IS_INTERACTIVE  # noqa: PLC0415

        keep = {k: getattr(self, k) for k in ("adarank_target_modules", "adarank_include_embeddings", "adarank_settings",
                                              "adarank_layerwise", "_layerwise")}
        env, acc, prec, io = self.cluster_environment, self._accelerator, self._precision_plugin, self._checkpoint_io
        self.__class__ = _subclass_for(DDPStrategy)
        DDPStrategy.__init__(
            self, accelerator=acc, parallel_devices=devices, cluster_environment=env, checkpoint_io=io,
            precision_plugin=prec, start_method="fork" if _IS_INTERACTIVE else "popen",
        )
        self.__dict__.update(keep)


_SUPPORTED = (SingleDeviceStrategy, DDPStrategy)
# subclasses of the above that shard parameters/optimizer state or run on XLA (untested there)
_UNSUPPORTED = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, XLAStrategy, SingleDeviceXLAStrategy)
_SUBCLASSES: dict[type, type] = {}


def _resolve_base(base: Any) -> tuple[type, dict, Strategy | None]:
    """``base`` → (strategy class, its init parameters, instance to copy or None)."""
    if isinstance(base, AdaRankGradStrategy):
        raise TypeError("AdaRankGradStrategy: base must be a plain Lightning strategy, not another AdaRankGradStrategy")
    if isinstance(base, str):
        name = base.lower()
        if name == "auto":
            return _AutoStrategy, {}, None
        if name not in StrategyRegistry:
            raise ValueError(f"AdaRankGradStrategy: unknown base strategy {base!r}")
        entry = StrategyRegistry[name]
        cls, params = entry["strategy"], dict(entry["init_params"])
        instance = None
    elif isinstance(base, Strategy):
        cls, params, instance = type(base), {}, base
    else:
        raise TypeError(f"AdaRankGradStrategy: base must be 'auto', a strategy name or a Strategy, got {base!r}")
    if not _supported(cls):
        raise ValueError(
            f"AdaRankGradStrategy supports single-device and DDP base strategies, not {getattr(cls, '__name__', cls)}"
            " (FSDP and DeepSpeed shard the parameters or the optimizer state; XLA is untested)"
        )
    return cls, params, instance


def _supported(cls: Any) -> bool:
    return (
        isinstance(cls, type) and issubclass(cls, _SUPPORTED) and not issubclass(cls, _UNSUPPORTED)
        and not issubclass(cls, AdaRankGradStrategy)
    )


def _subclass_for(base_cls: type) -> type:
    """The (cached) class ``AdaRankGrad<Base>`` deriving from :class:`AdaRankGradStrategy` and ``base_cls``."""
    if base_cls not in _SUBCLASSES:
        name = "AdaRankGrad" + base_cls.__name__.lstrip("_")
        _SUBCLASSES[base_cls] = type(name, (AdaRankGradStrategy, base_cls), {
            "_adarank_base_cls": base_cls, "__module__": __name__,
            "__doc__": f"{AdaRankGradStrategy.__name__} over :class:`{base_cls.__module__}.{base_cls.__qualname__}`.",
        })
    return _SUBCLASSES[base_cls]


def _rebuild_strategy(base_cls: type) -> AdaRankGradStrategy:
    return object.__new__(_subclass_for(base_cls))


def _register(registry: Any = StrategyRegistry) -> None:
    """Register ``adarank`` and ``adarank_<ddp flavour>`` (idempotent)."""
    registry.register("adarank", AdaRankGradStrategy, description="AdaRankGrad, automatic device choice",
                      override=True, base="auto")
    for name, entry in list(registry.items()):
        cls = entry["strategy"]
        if _supported(cls) and issubclass(cls, DDPStrategy):
            registry.register(f"adarank_{name}", AdaRankGradStrategy, description=f"AdaRankGrad over {name}",
                              override=True, base=name)


_register()
