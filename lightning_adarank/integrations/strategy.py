"""``AdaRankGradStrategy`` (one device) and ``AdaRankGradDDPStrategy``: Lightning strategies that train the
LightningModule with AdaRankGrad.

They are plain subclasses of :class:`~lightning.pytorch.strategies.SingleDeviceStrategy` and
:class:`~lightning.pytorch.strategies.DDPStrategy` with typed ``__init__``s, so LightningCLI configures them
(``--trainer.strategy lightning_adarank.AdaRankGradStrategy --trainer.strategy.init_args.max_rank 4``) and
the Trainer's connector sets accelerator, devices, cluster environment and launcher exactly as for their
base. The only things they change are ``setup_optimizers`` (the module's optimizer is replaced, see
:class:`~lightning_adarank.integrations.swap.OptimizerSwap`, shared with
:class:`~lightning_adarank.AdaRankGradCallback`) and, in layer-wise mode, ``backward``.

Importing this module registers ``adarank`` (automatic choice: one device, or DDP with several devices, as
Lightning's ``"auto"``) and ``adarank_<flavour>`` for every DDP flavour Lightning registers
(``adarank_ddp``, ``adarank_ddp_spawn``, ``adarank_ddp_fork``, ``adarank_ddp_notebook``,
``adarank_ddp_find_unused_parameters_true``, ...) in Lightning's ``StrategyRegistry``. Lightning has no
entry-point discovery for strategies, so ``Trainer(strategy="adarank_ddp")`` needs this module imported
first (touching any Lightning name of the package does it, e.g. ``lightning_adarank.AdaRankGradCallback``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, StrategyRegistry

from .checkpoint_io import VerifiedCheckpointIO
from .swap import OptimizerSwap, build_adarank_from, rebind_lr_scheduler  # noqa: F401  (were defined here)
from .typed import split_settings, with_adarank_settings

__all__ = [
    "AdaRankGradDDPStrategy",
    "AdaRankGradModelParallelStrategy",
    "AdaRankGradStrategy",
    "AdaRankGradStrategyMixin",
]


class AdaRankGradStrategyMixin:
    """What :class:`AdaRankGradStrategy` and :class:`AdaRankGradDDPStrategy` add to their Lightning base
    (``isinstance(strategy, AdaRankGradStrategyMixin)`` tells either)."""

    _adarank: OptimizerSwap

    @property
    def adarank_settings(self) -> dict[str, Any]:
        """The AdaRankGrad settings given to the strategy (checked)."""
        return dict(self._adarank.settings)

    @property
    def adarank_layerwise(self) -> bool:
        return self._adarank.layerwise

    @property
    def _layerwise(self) -> Any:
        return self._adarank.updater

    def setup_optimizers(self, trainer: Any) -> None:
        """Call the module's ``configure_optimizers`` and replace its optimizer with AdaRankGrad."""
        super().setup_optimizers(trainer)  # type: ignore[misc]
        self._adarank.swap(self)

    def setup(self, trainer: Any) -> None:
        """The base strategy's setup (DDP wrapping, optimizers), then the layer-wise hooks when asked for."""
        super().setup(trainer)  # type: ignore[misc]
        self._adarank.attach_layerwise(self, trainer, unsync=False)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """In layer-wise mode, tell the updater whether this micro-batch completes the optimizer step."""
        swap = self._adarank
        if swap.updater is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        swap.before_backward(self.lightning_module.trainer)  # type: ignore[attr-defined]
        out = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        swap.after_backward()
        return out

    def block_backward_sync(self) -> Any:
        """Layer-wise DDP all-reduces every micro-batch (a refresh needs the same gradient on every rank)."""
        if self._adarank.updater is not None:
            return contextlib.nullcontext()
        return super().block_backward_sync()  # type: ignore[misc]

    def teardown(self) -> None:
        self._adarank.detach()
        super().teardown()  # type: ignore[misc]


@with_adarank_settings()
class AdaRankGradStrategy(AdaRankGradStrategyMixin, SingleDeviceStrategy):
    """Train the LightningModule with :class:`~lightning_adarank.AdaRankGrad` on the Trainer's device.

    At ``fit`` it calls the module's ``configure_optimizers`` (through Lightning, so LR-scheduler configs keep
    working), builds AdaRankGrad over the parameters the returned optimizer trains (each param group keeps
    its lr/betas/eps/weight decay unless given here) and re-binds the schedulers to it. A module whose
    ``configure_optimizers`` already returns an AdaRankGrad keeps it (the settings here are then ignored, with
    a warning). The device is the Trainer's (``accelerator``/``devices``); given several devices, the strategy
    becomes an :class:`AdaRankGradDDPStrategy` with the same settings, as Lightning's ``strategy="auto"``
    would choose DDP. Registered as ``"adarank"``. Every setting is checked when the strategy is built.

    Args:
        target_modules: which weights are projected: ``"all-linear"``, a regex searched in module names, or
            a list of module names (see :func:`~lightning_adarank.param_groups`).
        include_embeddings: also project every ``nn.Embedding`` table and the output layer.
        layerwise: update each parameter inside backward as soon as its gradient is ready and free the
            gradient (see :mod:`lightning_adarank.optim.layerwise`). Works with ``accumulate_grad_batches``
            and DDP; refused with ``gradient_clip_val``, fp16 mixed precision and manual optimization.
    """

    def __init__(
        self,
        *,
        target_modules: str | list[str] = "all-linear",
        include_embeddings: bool = False,
        layerwise: bool = False,
        **settings: Any,
    ) -> None:
        unknown = set(settings) - set(split_settings(settings)[0])
        if "base" in unknown:
            raise TypeError(
                "AdaRankGradStrategy(base=...) was replaced by real classes: AdaRankGradStrategy() for one"
                " device, AdaRankGradDDPStrategy(process_group_backend=..., start_method=..., ...) for DDP"
            )
        if unknown:
            raise TypeError(
                f"AdaRankGradStrategy: unknown setting(s) {sorted(unknown)} (an AdaRankGrad setting was"
                " expected; configure DDP with AdaRankGradDDPStrategy(...))"
            )
        self._adarank = OptimizerSwap("AdaRankGradStrategy", target_modules, include_embeddings, layerwise, settings)
        super().__init__(device="cpu")
        self._checkpoint_io = VerifiedCheckpointIO()  # atomic saves, CRC-checked loads (a Trainer plugin wins)
        self.cluster_environment = None
        self._devices_given = False

    # The Trainer's connector sets ``cluster_environment`` and then ``parallel_devices`` on a strategy that has
    # them: that is how this strategy learns its device, or becomes DDP when it gets several.
    @property
    def parallel_devices(self) -> list[torch.device]:
        return [self.root_device] if self._devices_given else []

    @parallel_devices.setter
    def parallel_devices(self, devices: list[Any]) -> None:
        devices = [d if isinstance(d, torch.device) else torch.device(d) for d in devices]
        if len(devices) <= 1:
            self._root_device = devices[0] if devices else torch.device("cpu")
            self._devices_given = True
            return
        from lightning.fabric.utilities.imports import _IS_INTERACTIVE  # noqa: PLC0415

        swap, env = self._adarank, self.cluster_environment
        acc, prec, io = self._accelerator, self._precision_plugin, self._checkpoint_io
        self.__class__ = AdaRankGradDDPStrategy  # type: ignore[assignment]
        DDPStrategy.__init__(
            self,
            accelerator=acc,
            parallel_devices=devices,
            cluster_environment=env,
            checkpoint_io=io,
            precision_plugin=prec,
            start_method="fork" if _IS_INTERACTIVE else "popen",
        )
        swap.owner = "AdaRankGradDDPStrategy"
        self._adarank = swap


@with_adarank_settings(DDPStrategy.__init__)
class AdaRankGradDDPStrategy(AdaRankGradStrategyMixin, DDPStrategy):
    """:class:`AdaRankGradStrategy` under DDP: DDPStrategy's arguments plus every AdaRankGrad setting.

    DDP all-reduces the gradients before the optimizer step and AdaRankGrad's randomness depends only on
    ``(seed, parameter index, refresh count)``, so every rank keeps bit-identical parameters, ranks and
    subspaces without extra communication. Registered as ``"adarank_ddp"``, ``"adarank_ddp_spawn"``, ... (one
    per DDP flavour). Extra keyword arguments (``find_unused_parameters``, ``static_graph``, ...) go to
    ``DistributedDataParallel`` as with ``DDPStrategy``.

    Args:
        target_modules: which weights are projected (see :class:`AdaRankGradStrategy`).
        include_embeddings: also project every ``nn.Embedding`` table and the output layer.
        layerwise: layer-wise updates in backward (a DDP communication hook steps each all-reduced bucket;
            every micro-batch is all-reduced).
    """

    def __init__(
        self,
        *args: Any,
        target_modules: str | list[str] = "all-linear",
        include_embeddings: bool = False,
        layerwise: bool = False,
        **kwargs: Any,
    ) -> None:
        settings, ddp_kwargs = split_settings(kwargs)
        self._adarank = OptimizerSwap("AdaRankGradDDPStrategy", target_modules, include_embeddings, layerwise, settings)
        super().__init__(*args, **ddp_kwargs)
        if self._checkpoint_io is None:  # atomic saves, CRC-checked loads (a Trainer plugin wins)
            self._checkpoint_io = VerifiedCheckpointIO()


@with_adarank_settings(ModelParallelStrategy.__init__)
class AdaRankGradModelParallelStrategy(AdaRankGradStrategyMixin, ModelParallelStrategy):
    """:class:`AdaRankGradStrategy` over Lightning's ``ModelParallelStrategy`` (FSDP2): its arguments plus every
    AdaRankGrad setting.

    The LightningModule's ``configure_model`` applies ``torch.distributed.fsdp.fully_shard`` (on
    ``self.device_mesh["data_parallel"]``, e.g. with ``data_parallel_size=2, tensor_parallel_size=1``); the module's
    optimizer, built over the DTensor parameters, is replaced by AdaRankGrad, which steps each row shard without
    gathering it (:mod:`lightning_adarank.distributed`). Tensor parallelism (``tensor_parallel_size > 1`` with
    sharded placements other than FSDP2's ``Shard(0)``) is refused at the first step. Checkpoints: with
    ``save_distributed_checkpoint=True`` (default) a DCP directory with each rank's shards, else one full file;
    both resume exactly.

    Args:
        target_modules: which weights are projected (see :class:`AdaRankGradStrategy`).
        include_embeddings: also project every ``nn.Embedding`` table and the output layer.
        layerwise: not supported with FSDP2 (refused at fit start, with the reason).
    """

    def __init__(
        self,
        *args: Any,
        target_modules: str | list[str] = "all-linear",
        include_embeddings: bool = False,
        layerwise: bool = False,
        **kwargs: Any,
    ) -> None:
        settings, mp_kwargs = split_settings(kwargs)
        self._adarank = OptimizerSwap(
            "AdaRankGradModelParallelStrategy", target_modules, include_embeddings, layerwise, settings
        )
        super().__init__(*args, **mp_kwargs)


def _register(registry: Any = StrategyRegistry) -> None:
    """Register ``adarank`` and ``adarank_<ddp flavour>`` (idempotent)."""
    registry.register("adarank", AdaRankGradStrategy, description="AdaRankGrad, automatic device choice", override=True)
    for name, entry in list(registry.items()):
        if entry["strategy"] is DDPStrategy:
            registry.register(
                f"adarank_{name}",
                AdaRankGradDDPStrategy,
                description=f"AdaRankGrad over {name}",
                override=True,
                **entry["init_params"],
            )


_register()
