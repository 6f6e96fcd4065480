"""``AdaRankGradCallback``: add one callback to any Lightning Trainer and it trains with AdaRankGrad."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from . import strategy as _strategy  # noqa: F401  (registers the adarank* strategy names)
from .swap import OptimizerSwap, check_strategy
from .typed import with_adarank_settings

__all__ = ["AdaRankGradCallback", "ContinueWithAdamW"]


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


class ContinueWithAdamW(Callback):
    """Resume an AdaRankGrad checkpoint with the module's own AdamW: ``Trainer(callbacks=[ContinueWithAdamW()])``
    and ``trainer.fit(module, ckpt_path=...)``, without :class:`AdaRankGradCallback` (or the AdaRankGrad strategy).

    Lightning would load the checkpoint's AdaRankGrad state into the AdamW that ``configure_optimizers`` returns,
    and torch refuses it (another group count) or, when the counts match, fails at the first step. This callback
    rewrites the checkpoint's optimizer state before Lightning loads it (``on_fit_start``, after the optimizers
    are built and before the restore), with :func:`~lightning_adarank.export.adamw.convert_state_dict`:

    * ``moments="convert"`` (default): AdamW-shaped moments, ``M = P·M_low`` and ``V = (P∘P)·V_low`` for each
      projected matrix, the dense parameters' moments as they are, the step counts kept;
    * ``moments="drop"``: no moments (AdamW starts them afresh, with its bias correction), the rest of the run's
      position kept.

    Either way each of the module's groups takes the learning rate, betas, eps and weight decay the run had
    reached, the LR schedulers' per-group lists are mapped back onto the module's groups, and the epoch and
    step counters, callbacks and loops resume as usual. An optimizer that is an AdaRankGrad, or a saved state
    that is not one, is left alone. ``benchmarks/continue_adamw.py`` compares the two against staying on
    AdaRankGrad.
    """

    def __init__(self, moments: str = "convert") -> None:
        if moments not in ("convert", "drop"):
            raise ValueError(f"ContinueWithAdamW: moments={moments!r} must be 'convert' or 'drop'")
        self.moments = moments
        self._checkpoint: dict | None = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._checkpoint = checkpoint  # the dict Lightning restores the optimizers from, after on_fit_start

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from ..export.adamw import convert_state_dict, is_adarank_state  # noqa: PLC0415
        from ..optim.optimizer import AdaRankGrad  # noqa: PLC0415
        from .swap import _PER_GROUP_LISTS  # noqa: PLC0415

        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is None:
            return
        saved_states = checkpoint.get("optimizer_states") or []
        for i, (saved, opt) in enumerate(zip(saved_states, trainer.optimizers)):
            if isinstance(opt, AdaRankGrad) or not is_adarank_state(saved):
                continue
            try:
                converted, origin = convert_state_dict(saved, dict(pl_module.named_parameters()), like=opt)
            except (TypeError, ValueError) as err:
                raise type(err)(f"ContinueWithAdamW: {str(err).removeprefix('convert_state_dict: ')}") from err
            if self.moments == "drop":
                converted["state"] = {}
            saved_states[i] = converted
            n_saved = len(saved["param_groups"])
            for cfg, sched_state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers") or []):
                if getattr(cfg.scheduler, "optimizer", None) is opt:
                    _remap_scheduler_state(sched_state, origin, n_saved, _PER_GROUP_LISTS)


def _remap_scheduler_state(state: dict, origin: list[int], n_saved: int, keys: tuple[str, ...]) -> None:
    """Map a saved LR scheduler's per-group lists (one entry per AdaRankGrad group) onto the new groups."""
    for sub in state.get("_schedulers") or []:
        if isinstance(sub, dict):
            _remap_scheduler_state(sub, origin, n_saved, keys)
    for key in keys:
        value = state.get(key)
        if isinstance(value, (list, tuple)) and len(value) == n_saved:
            state[key] = [value[o] for o in origin]
