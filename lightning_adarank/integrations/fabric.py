"""AdaRankGrad with Lightning Fabric.

``fabric.setup(model, AdaRankGrad(...))`` works as is (single device or ``strategy="ddp"``): Fabric wraps the
optimizer and DDP all-reduces the gradients before ``optimizer.step()``. :class:`FabricRankMonitor` is the
Fabric front end of :class:`~lightning_adarank.EffectiveRankMonitor` and :class:`~lightning_adarank.MemoryMonitor`
(same :class:`~lightning_adarank.RankHistory` and metric functions)::

    logger = CSVLogger("logs")
    monitor = FabricRankMonitor(loggers=logger, log_every_n_steps=10)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", loggers=logger, callbacks=[monitor])
    fabric.launch()
    model, optimizer = fabric.setup(model, AdaRankGrad(param_groups(model), lr=1e-3))
    ...                                  # train: the monitor runs after every optimizer.step()
    monitor.save_plot()                  # rank 0 writes logs/.../adarank_ranks.png
    fabric.save("ckpt.pt", {"model": model, "optimizer": optimizer, "monitor": monitor})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..monitoring.history import RankHistory, find_adarank, memory_metrics, rank_metrics
from ..optim.layerwise import LayerwiseUpdater

__all__ = ["FabricRankMonitor", "layerwise_updater"]


class FabricRankMonitor:
    """Records AdaRankGrad's ranks (and memory) in a Fabric loop; a Fabric callback.

    Passed as ``Fabric(callbacks=[monitor])`` it runs on Fabric's ``on_after_optimizer_step`` hook; without
    Fabric callbacks call ``monitor.update(optimizer)`` after each ``optimizer.step()``. Every
    ``log_every_n_steps`` steps it records the ranks in :attr:`history` and logs :func:`rank_metrics` (and
    :func:`memory_metrics` when ``memory``) to ``loggers`` with ``step`` = optimizer steps taken.

    It is stateful (``state_dict``/``load_state_dict``): put it in ``fabric.save``/``fabric.load`` state to
    keep the history across a resume.

    Args:
        loggers: a Lightning/Fabric logger or a list of them (e.g. the ones given to ``Fabric(loggers=...)``).
        log_every_n_steps: record and log every this many optimizer steps.
        per_layer: also log one rank series per matrix.
        memory: also log ``optimizer/state_bytes`` and ``memory/peak_bytes``.
    """

    def __init__(
        self, loggers: Any = None, log_every_n_steps: int = 1, per_layer: bool = False, memory: bool = True
    ) -> None:
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be a positive int, got {log_every_n_steps!r}")
        self.loggers = [] if loggers is None else list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.memory = memory
        self.history = RankHistory()
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self._is_global_zero = True

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """Fabric's hook (called by the wrapped optimizer after each step)."""
        if strategy is not None:
            self._is_global_zero = bool(getattr(strategy, "is_global_zero", True))
        self.update(optimizer, device=getattr(strategy, "root_device", None))

    def update(self, optimizer: Any, device: Any = None) -> dict[str, float]:
        """Count one optimizer step; on a logging step record the ranks and log. Returns what was logged."""
        self.step += 1
        if self.step % self.log_every_n_steps:
            return {}
        opt = find_adarank([optimizer])
        metrics: dict[str, float] = {}
        if opt is not None and opt.subspaces():  # nothing projected (yet): no row, no rank metrics
            self.history.record(self.step, opt)
            metrics.update(rank_metrics(opt, per_layer=self.per_layer))
        if self.memory:
            metrics.update(memory_metrics([optimizer], device))
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)
        self.last_metrics = metrics
        return metrics

    def save_plot(self, path: str | Path | None = None, filename: str = "adarank_ranks.png") -> Path | None:
        """On rank 0, save the rank plot to ``path`` (default: the first logger's ``log_dir``, else the working
        directory, + ``filename``). Returns the path, or ``None`` on other ranks or when no matrix was projected."""
        if not self._is_global_zero or not self.history.layers:
            return None
        if path is None:
            root = next((lg.log_dir for lg in self.loggers if getattr(lg, "log_dir", None)), ".")
            path = Path(root) / filename
        return self.history.plot(path)

    def state_dict(self) -> dict[str, Any]:
        """Step counter and history (plain Python values)."""
        return {"step": self.step, "history": self.history.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.step = int(state_dict["step"])
        self.history.load_state_dict(state_dict["history"])


def layerwise_updater(model: Any, optimizer: Any, accumulate_grad_batches: int = 1) -> LayerwiseUpdater:
    """A :class:`~lightning_adarank.optim.layerwise.LayerwiseUpdater` for a model and optimizer set up by Fabric.

    Unwraps Fabric's wrappers and attaches to the DDP module under ``strategy="ddp"`` (a communication hook)
    or to the module itself. Train with ``updater.backward(loss, fabric.backward)`` instead of
    ``fabric.backward(loss); optimizer.step()``: the parameters are updated inside backward. Do not use
    ``fabric.no_backward_sync`` with it (every micro-batch must be all-reduced), nor gradient clipping::

        model, optimizer = fabric.setup(model, AdaRankGrad(param_groups(model)))
        updater = layerwise_updater(model, optimizer, accumulate_grad_batches=4)
        for batch in loader:
            if updater.backward(model(batch).loss / 4, fabric.backward):
                monitor.update(optimizer)   # a completed optimizer step
    """
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    opt = getattr(optimizer, "optimizer", optimizer)  # Fabric's _FabricOptimizer
    forward = getattr(model, "_forward_module", model)  # Fabric's _FabricModule
    target = forward if isinstance(forward, DistributedDataParallel) else getattr(model, "_original_module", model)
    return LayerwiseUpdater(opt, accumulate_grad_batches).attach(target)
