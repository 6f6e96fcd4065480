"""Lightning callbacks in the style of ``LearningRateMonitor``: :class:`EffectiveRankMonitor`, :class:`MemoryMonitor`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..monitoring.history import RankHistory, find_adarank, memory_metrics, rank_metrics
from . import strategy as _strategy  # noqa: F401  (registers the adarank* strategy names)
from .swap import warn_if_nothing_projected

__all__ = ["EffectiveRankMonitor", "MemoryMonitor"]


class _IntervalMonitor(Callback):
    """Calls :meth:`_collect` every ``log_every_n_steps`` optimizer steps (or every epoch) and logs the result
    to every logger of the Trainer with ``step = trainer.global_step`` (optimizer steps taken so far)."""

    def __init__(self, logging_interval: str = "step", log_every_n_steps: int | None = None) -> None:
        if logging_interval not in ("step", "epoch"):
            raise ValueError(f"logging_interval must be 'step' or 'epoch', got {logging_interval!r}")
        if log_every_n_steps is not None and (not isinstance(log_every_n_steps, int) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        self.logging_interval = logging_interval
        self.log_every_n_steps = log_every_n_steps
        self._last_step = -1
        self._warned_no_logger = False

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def _emit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        metrics = self._collect(trainer, pl_module)
        if not metrics:
            return
        if not trainer.loggers and not self._warned_no_logger:
            self._warned_no_logger = True
            rank_zero_warn(f"{type(self).__name__}: the Trainer has no logger; nothing is logged")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.logging_interval != "step":
            return
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if every and step > 0 and step % every == 0:
            self._emit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval == "epoch":
            self._emit(trainer, pl_module)


class EffectiveRankMonitor(_IntervalMonitor):
    """Logs AdaRankGrad's rank per layer and the memory it saves, and plots the ranks at the end of fit.

    Logged (see :func:`~lightning_adarank.rank_metrics`): ``adarank/avg_rank`` (parameter-weighted mean rank of
    the projected matrices), ``adarank/state_reduction_vs_galore`` (share of their optimizer state saved against
    a fixed-rank GaLore at ``max_rank``), ``adarank/refreshes``, and with ``per_layer=True``
    ``adarank/rank/<param>`` and ``adarank/state_reduction_vs_galore/<param>`` for every matrix. Values are
    Python numbers read from the optimizer's bookkeeping: no device synchronisation, cheap every step.

    The ranks of every layer at every logged step are kept in :attr:`history` (a
    :class:`~lightning_adarank.RankHistory`), which is saved in checkpoints, so a resumed run continues it.
    At the end of fit, rank 0 saves ``plot_filename`` (heat map of rank per layer × step, and the average-rank
    curve) into ``trainer.log_dir`` (the logger's folder, else ``default_root_dir``).

    Args:
        logging_interval: ``"step"`` or ``"epoch"``.
        log_every_n_steps: log every this many optimizer steps; ``None`` takes the Trainer's
            ``log_every_n_steps``.
        per_layer: also log one series per matrix (off by default: hundreds of series for a big model).
        plot: save the plot at the end of fit.
        plot_filename: its file name.

    If the Trainer has no :class:`~lightning_adarank.AdaRankGrad` optimizer the callback warns once (saying
    how to enable it: :class:`~lightning_adarank.AdaRankGradCallback`) and does nothing; if AdaRankGrad
    projects no matrix it warns once naming them, and no plot is written.
    """

    def __init__(
        self,
        logging_interval: str = "step",
        log_every_n_steps: int | None = None,
        per_layer: bool = False,
        plot: bool = True,
        plot_filename: str = "adarank_ranks.png",
    ) -> None:
        super().__init__(logging_interval, log_every_n_steps)
        self.per_layer = per_layer
        self.plot = plot
        self.plot_filename = plot_filename
        self.history = RankHistory()
        self.plot_path: Path | None = None
        self._warned_no_adarank = False

    def _optimizer(self, trainer: pl.Trainer):
        opt = find_adarank(trainer.optimizers)
        if opt is None and not self._warned_no_adarank:
            self._warned_no_adarank = True
            rank_zero_warn(
                "EffectiveRankMonitor: the Trainer has no AdaRankGrad optimizer; nothing is logged. To train with"
                " AdaRankGrad, add lightning_adarank.AdaRankGradCallback() to the Trainer's callbacks (or pass"
                " strategy=lightning_adarank.AdaRankGradStrategy(), or return an AdaRankGrad from"
                " configure_optimizers)."
            )
        return opt

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        opt = self._optimizer(trainer)
        if opt is None:
            return {}
        warn_if_nothing_projected(opt, "EffectiveRankMonitor")
        if not opt.subspaces():  # nothing projected (yet): no row to record
            return {}
        self.history.record(trainer.global_step, opt)
        return rank_metrics(opt, per_layer=self.per_layer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = find_adarank(trainer.optimizers)  # after any optimizer swap and checkpoint restore
        if opt is not None:
            warn_if_nothing_projected(opt, "EffectiveRankMonitor")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = find_adarank(trainer.optimizers)
        if opt is None:
            return
        if not self.history.steps or self.history.steps[-1] != trainer.global_step:
            if opt.subspaces():
                self.history.record(trainer.global_step, opt)
        if self.plot and trainer.is_global_zero and self.history.layers:
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.plot_filename
            self.plot_path = self.history.plot(path)
            rank_zero_info(f"EffectiveRankMonitor: saved the rank plot to {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history.load_state_dict(state_dict["history"])
        self._last_step = int(state_dict.get("last_step", -1))


class MemoryMonitor(_IntervalMonitor):
    """Logs ``optimizer/state_bytes`` (every tensor in the optimizers' state, any optimizer) and
    ``memory/peak_bytes`` (``torch.cuda.max_memory_allocated`` on a CUDA device, the process's peak resident
    set size on CPU).

    Args:
        logging_interval, log_every_n_steps: as :class:`EffectiveRankMonitor`.
    """

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        return memory_metrics(trainer.optimizers, pl_module.device)
