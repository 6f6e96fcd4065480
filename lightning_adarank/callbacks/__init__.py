"""Callbacks that show what AdaRankGrad does: rank per layer, memory saved, plots.

:mod:`.history` holds the logic (no Lightning); :mod:`.monitors` the Lightning callbacks.
"""

from .history import RankHistory, find_adarank, memory_metrics, peak_memory_bytes, rank_metrics
from .monitors import EffectiveRankMonitor, MemoryMonitor

__all__ = [
    "EffectiveRankMonitor", "MemoryMonitor", "RankHistory", "find_adarank", "memory_metrics", "peak_memory_bytes",
    "rank_metrics",
]
