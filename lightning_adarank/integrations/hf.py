"""AdaRankGrad from the Hugging Face ``transformers.Trainer``: :class:`AdaRankGradTrainerCallback`.

The optimizer goes in through the Trainer's ``optimizers`` argument, with ``None`` for the scheduler so that
the Trainer builds its own (``lr_scheduler_type``, ``warmup_ratio``/``warmup_steps``) on top of it::

    from lightning_adarank import AdaRankGrad, AdaRankGradTrainerCallback, param_groups

    opt = AdaRankGrad(param_groups(model, max_rank=8), lr=2e-5, energy=0.9)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(opt, None))
    AdaRankGradTrainerCallback().attach(trainer)  # logs adarank/avg_rank, ... with the Trainer's own logs
    trainer.train()

The callback adds its metrics to the Trainer's training logs (``state.log_history`` and every reporting
integration: TensorBoard, W&B, ...). :meth:`AdaRankGradTrainerCallback.attach` puts it ahead of the reporting
integrations, which the Trainer otherwise calls first; passed as ``Trainer(callbacks=[...])`` it still reaches
``state.log_history`` and the console, not the integrations.

**Layer-wise mode** (``layerwise=True``): every parameter is updated inside backward
(:class:`~lightning_adarank.LayerwiseUpdater`), so full-size gradients never all exist at once, and
``gradient_accumulation_steps`` works (low-rank accumulation). The callback drives the updater's micro-batch
protocol from the Trainer's events (``on_step_begin``, ``on_substep_end``, ``on_pre_optimizer_step``); the
Trainer's own ``optimizer.step()`` then finds no gradients. Refused with a clear error: gradient clipping
(``max_grad_norm > 0``, which needs every gradient before any update; set ``max_grad_norm=0``), ``fp16``
(loss scaling: the updater would see scaled gradients; use ``bf16``), and more than one process (the
post-accumulate-grad hooks fire before DDP's all-reduce; use the Lightning strategy ``adarank_ddp`` there).

This module imports ``transformers``; ``import lightning_adarank`` does not (it is loaded on first access to
``lightning_adarank.AdaRankGradTrainerCallback``).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..monitoring.history import find_adarank, memory_metrics, rank_metrics
from ..optim.layerwise import LayerwiseUpdater
from ..optim.optimizer import AdaRankGrad

__all__ = ["AdaRankGradTrainerCallback"]


class AdaRankGradTrainerCallback(TrainerCallback):
    """Logs AdaRankGrad's rank and memory figures with the Trainer's training logs; optionally runs the
    layer-wise mode.

    Logged at every logging step of the Trainer (``logging_steps``), see :func:`~lightning_adarank.rank_metrics`
    and :func:`~lightning_adarank.memory_metrics`: ``adarank/avg_rank`` (parameter-weighted mean rank of the
    projected matrices), ``adarank/state_reduction_vs_galore`` (share of their optimizer state saved against a
    fixed-rank GaLore at ``max_rank``), ``adarank/refreshes``, ``optimizer/state_bytes`` (every tensor in the
    optimizer's state), ``memory/peak_bytes``; with ``per_layer=True`` also ``adarank/rank/<param>``.

    Args:
        per_layer: also log one rank per projected matrix.
        memory: log ``optimizer/state_bytes`` and ``memory/peak_bytes``.
        layerwise: update each parameter inside backward (see the module docstring for what is refused).
    """

    def __init__(self, per_layer: bool = False, memory: bool = True, layerwise: bool = False) -> None:
        self.per_layer = per_layer
        self.memory = memory
        self.layerwise = layerwise
        self.updater: LayerwiseUpdater | None = None
        self._optimizer: AdaRankGrad | None = None
        self._micro = 0

    # ------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> AdaRankGradTrainerCallback:
        """Add this callback to ``trainer`` right after its ``DefaultFlowCallback``, ahead of the reporting
        integrations, so that they log its metrics too. Returns ``self``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        at = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(at, self)
        return self

    def _find(self, optimizer: Any) -> AdaRankGrad | None:
        if self._optimizer is None and optimizer is not None:
            self._optimizer = find_adarank([optimizer])
        return self._optimizer

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        opt = self._find(optimizer)
        if not self.layerwise:
            return
        if opt is None:
            raise ValueError(
                "AdaRankGradTrainerCallback(layerwise=True) needs an AdaRankGrad optimizer: pass "
                "Trainer(optimizers=(AdaRankGrad(param_groups(model), ...), None))"
            )
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"AdaRankGradTrainerCallback(layerwise=True): gradient clipping (max_grad_norm={args.max_grad_norm}) "
                "needs every gradient before any update, which the layer-wise mode never has; set "
                "TrainingArguments(max_grad_norm=0)"
            )
        if args.fp16:
            raise ValueError(
                "AdaRankGradTrainerCallback(layerwise=True) does not support fp16 (the loss scaler "
                "unscales gradients after backward, when the layer-wise updates are done); use bf16"
            )
        if args.world_size > 1:
            raise ValueError(
                f"AdaRankGradTrainerCallback(layerwise=True) runs in a single process (world_size={args.world_size}):"
                " under DDP the per-parameter hooks fire before the gradient all-reduce; use the Lightning strategy "
                "'adarank_ddp' with layerwise=True for data-parallel layer-wise training"
            )
        if self.updater is None:
            self.updater = LayerwiseUpdater(opt, accumulate_grad_batches=args.gradient_accumulation_steps).attach()
        self._micro = 0

    def on_train_end(self, args, state, control, **kwargs):
        if self.updater is not None:
            self.updater.detach()
            self.updater = None

    # ------------------------------------------------------------------ layer-wise micro-batch protocol
    def _begin(self, args) -> None:
        self.updater.begin_micro_batch(self._micro + 1 >= args.gradient_accumulation_steps)

    def on_step_begin(self, args, state, control, **kwargs):  # before the first micro-batch of a step
        if self.updater is not None:
            self._micro = 0
            self._begin(args)

    def on_substep_end(self, args, state, control, **kwargs):  # after a micro-batch that does not end the step
        if self.updater is not None:
            self.updater.end_micro_batch()
            self._micro += 1
            self._begin(args)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # after the last micro-batch's backward
        if self.updater is not None:
            # a short window (the epoch's last) ends before its k-th micro-batch: what was accumulated is stepped now
            self.updater.begin_micro_batch(True)
            self.updater.end_micro_batch()
            self._micro = 0

    # ------------------------------------------------------------------ logging
    def metrics(self) -> dict[str, float]:
        """The figures logged now (empty before the first optimizer step or without AdaRankGrad)."""
        opt = self._optimizer
        if opt is None:
            return {}
        out = rank_metrics(opt, per_layer=self.per_layer)
        if self.memory and out:
            device = next((p.device for g in opt.param_groups for p in g["params"]), None)
            out.update(memory_metrics([opt], device))
        return out

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or "loss" not in logs:  # training logs only (not evaluation or the final summary)
            return
        self._find(optimizer)
        extra = self.metrics()
        if not extra:
            return
        logs.update(extra)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(extra)  # the Trainer appended a copy of ``logs`` before calling the callbacks
