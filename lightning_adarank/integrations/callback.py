"""``AdaRankGradCallback``: add one callback to any Lightning Trainer and it trains with AdaRankGrad."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import strategy as _strategy  # noqa: F401  (registers the adarank* strategy names)
from .swap import OptimizerSwap, check_strategy
from .typed import with_adarank_settings

__all__ = ["AdaRankGradCallback"]


@with_adarank_settings()
class AdaRankGradCallback(Callback):
    """Switch a Trainer to :class:`~lightning_adarank.AdaRankGrad`: ``Trainer(callbacks=[AdaRankGradCallback()])``.

    When fit starts (``on_fit_start``: after the strategy has called the module's ``configure_optimizers``
    and wrapped the model), the optimizer the module returned is replaced by an AdaRankGrad over the same
    parameters. Each of its param groups is split into a projected part (the weights ``target_modules``
    selects) and a dense part (exact AdamW), and keeps its own lr, betas, eps and weight decay unless given
    here; the module's LR schedulers are re-bound to the new optimizer at the same position of their
    schedule. A resumed fit (``ckpt_path=...``) then restores the checkpoint's AdaRankGrad state and the
    schedulers into it, since Lightning restores optimizer states after ``on_fit_start``. A module whose
    ``configure_optimizers`` already returns an AdaRankGrad keeps it.

    Works on one device and under every DDP flavour (``strategy="ddp"``, ``"ddp_spawn"``, ...: every rank
    derives the same subspaces, ranks stay bit-identical) and under ``ModelParallelStrategy`` with FSDP2
    (``fully_shard`` in ``configure_model``: the shards are stepped without gathering them, see
    :mod:`lightning_adarank.distributed`; layer-wise mode is refused there). FSDP1 (``FSDPStrategy``) and
    DeepSpeed are refused when fit sets up. Every setting is checked when the callback is built.

    Args:
        target_modules: which weights are projected: ``"all-linear"``, a regex searched in module names, or
            a list of module names (see :func:`~lightning_adarank.param_groups`).
        include_embeddings: also project ``nn.Embedding`` tables.
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
        self._swap = OptimizerSwap("AdaRankGradCallback", target_modules, include_embeddings, layerwise, settings)

    @property
    def config(self):
        """The checked settings (:class:`~lightning_adarank.AdaRankGradConfig`; ``lr``, ``betas``, ``eps`` and
        ``weight_decay`` apply only where given)."""
        return self._swap.config

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> AdaRankGradCallback:
        """The callback with every setting of an :class:`~lightning_adarank.AdaRankGradConfig` (its lr, betas,
        eps and weight decay then override the module's)."""
        return cls(**config.to_dict(), **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # refuse a sharding strategy before it wraps the model
            check_strategy(trainer.strategy, "AdaRankGradCallback")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.swap(trainer.strategy)
        self._swap.attach_layerwise(trainer.strategy, trainer, unsync=True)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._swap.before_backward(trainer)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.after_backward()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap.detach()
