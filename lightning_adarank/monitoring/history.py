"""What the rank and memory monitors compute, with no Lightning in it (shared by the Lightning callbacks and
the Fabric helper): :func:`rank_metrics`, :func:`memory_metrics` and :class:`RankHistory`."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch

from ..optim.baselines import optimizer_state_bytes
from ..optim.optimizer import AdaRankGrad

__all__ = ["RankHistory", "find_adarank", "memory_metrics", "peak_memory_bytes", "rank_metrics"]


def find_adarank(optimizers: Iterable[Any]) -> AdaRankGrad | None:
    """The first :class:`AdaRankGrad` among ``optimizers`` (Lightning/Fabric wrappers are looked through)."""
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)  # LightningOptimizer / _FabricOptimizer
        for candidate in (inner, opt):  # the wrapper imitates the class: prefer the real optimizer
            if isinstance(candidate, AdaRankGrad):
                return candidate
    return None


def rank_metrics(optimizer: AdaRankGrad, per_layer: bool = False, prefix: str = "adarank/") -> dict[str, float]:
    """The effective-rank and memory figures of AdaRankGrad for its projected matrices.

    * ``{prefix}avg_rank``: parameter-weighted average rank, ``Σ rᵢ·nᵢ / Σ nᵢ`` (``nᵢ`` = elements of matrix i);
    * ``{prefix}state_reduction_vs_galore``: ``1 − Σ stateᵢ / Σ galoreᵢ`` — the share of the projected
      matrices' optimizer state (projection + two moments + the moment sketch, ``r·(m + 2n) + m·k`` elements
      for an ``m×n`` matrix, ``m ≤ n``, :meth:`SubspaceInfo.state_numel`) saved against a fixed-rank GaLore at
      ``max_rank`` (``R·(m + 2n)``, no sketch);
    * ``{prefix}refreshes``: subspace refreshes so far, summed over matrices;
    * with ``per_layer``: ``{prefix}rank/<name>`` and ``{prefix}state_reduction_vs_galore/<name>``
      (the same figure, one matrix) for every matrix.

    Python numbers only (no device synchronisation). Empty before the first step.
    """
    infos = optimizer.subspaces()
    if not infos:
        return {}
    numel = sum(i.shape[0] * i.shape[1] for i in infos.values())
    state = sum(i.state_numel() for i in infos.values())
    galore = sum(i.galore_numel() for i in infos.values())
    out = {
        f"{prefix}avg_rank": sum(i.rank * i.shape[0] * i.shape[1] for i in infos.values()) / numel,
        f"{prefix}state_reduction_vs_galore": 1.0 - state / galore,
        f"{prefix}refreshes": float(sum(i.refreshes for i in infos.values())),
    }
    if per_layer:
        for name, i in infos.items():
            out[f"{prefix}rank/{name}"] = float(i.rank)
            out[f"{prefix}state_reduction_vs_galore/{name}"] = 1.0 - i.state_numel() / i.galore_numel()
    return out


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory: ``torch.cuda.max_memory_allocated`` on a CUDA device, else the process's peak RSS."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def memory_metrics(optimizers: Iterable[Any], device: torch.device | str | None = None) -> dict[str, float]:
    """``optimizer/state_bytes`` (every tensor in the optimizers' state) and ``memory/peak_bytes``."""
    opts = [getattr(o, "optimizer", o) for o in optimizers]
    return {
        "optimizer/state_bytes": float(sum(optimizer_state_bytes(o) for o in opts)),
        "memory/peak_bytes": float(peak_memory_bytes(device)),
    }


class RankHistory:
    """Rank of every projected matrix over steps (what the heat-map plot shows).

    ``record(step, optimizer)`` appends one row; ``state_dict()`` holds only lists of Python numbers and
    strings (checkpoint-safe, loads with ``weights_only=True``).
    """

    def __init__(self) -> None:
        self.layers: list[str] = []
        self.numels: list[int] = []
        self.max_ranks: list[int] = []
        self.steps: list[int] = []
        self.rows: list[list[int]] = []  # rows[k][j]: rank of layers[j] at steps[k] (-1: not yet projected)
        self._index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def record(self, step: int, optimizer: AdaRankGrad) -> None:
        """Record the current rank of every projected matrix at ``step`` (replaces a row for the same step)."""
        infos = optimizer.subspaces()
        for name, info in infos.items():
            if name not in self._index:
                self._index[name] = len(self.layers)
                self.layers.append(name)
                self.numels.append(info.shape[0] * info.shape[1])
                self.max_ranks.append(info.max_rank)
        row = [-1] * len(self.layers)
        for name, info in infos.items():
            row[self._index[name]] = info.rank
        if self.steps and self.steps[-1] >= step:  # a resumed run re-records a step: keep history monotone
            keep = next(k for k, s in enumerate(self.steps) if s >= step)
            del self.steps[keep:], self.rows[keep:]
        self.steps.append(int(step))
        self.rows.append(row)

    def matrix(self) -> list[list[float]]:
        """``[layer][k]`` ranks as floats, ``nan`` where a layer had no subspace yet."""
        nan = float("nan")
        return [[(r[j] if j < len(r) and r[j] >= 0 else nan) for r in self.rows] for j in range(len(self.layers))]

    def average(self) -> list[float]:
        """Parameter-weighted average rank at each recorded step (layers without a subspace left out)."""
        out = []
        for r in self.rows:
            pairs = [(r[j], self.numels[j]) for j in range(len(r)) if r[j] >= 0]
            total = sum(n for _, n in pairs)
            out.append(sum(v * n for v, n in pairs) / total if total else float("nan"))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain lists (checkpoint-safe)."""
        return {
            "layers": list(self.layers),
            "numels": list(self.numels),
            "max_ranks": list(self.max_ranks),
            "steps": list(self.steps),
            "rows": [list(r) for r in self.rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.layers = list(state["layers"])
        self.numels = [int(n) for n in state["numels"]]
        self.max_ranks = [int(n) for n in state["max_ranks"]]
        self.steps = [int(s) for s in state["steps"]]
        self.rows = [[int(v) for v in r] for r in state["rows"]]
        self._index = {n: j for j, n in enumerate(self.layers)}

    def plot(self, path: Any, title: str | None = None) -> Any:
        """Save the heat map and average-rank curve (see :func:`lightning_adarank.monitoring.plotting.plot_rank_history`)."""
        from .plotting import plot_rank_history  # noqa: PLC0415

        return plot_rank_history(self, path, title=title)
