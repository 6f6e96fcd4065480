"""lightning-adarank: the AdaRankGrad optimizer for PyTorch, Lightning and Fabric.

The optimizer (:class:`AdaRankGrad`, :func:`param_groups`) is pure PyTorch; the Lightning pieces are
imported lazily, so ``import lightning_adarank`` does not import Lightning.
"""

from __future__ import annotations

import importlib
import sys

from .groups import param_groups, target_parameter_names
from .optimizer import AdaRankGrad, SubspaceInfo

__version__ = "0.1.0"

# public name -> submodule that defines it (imported on first access)
_LAZY = {
    "OPTIMIZER_CHOICES": "baselines",
    "build_optimizer": "baselines",
    "apply_lora": "baselines",
    "optimizer_state_bytes": "baselines",
    # Lightning / Fabric integration (importing any of these imports Lightning and registers the
    # "adarank", "adarank_ddp", ... strategy names)
    "AdaRankGradStrategy": "strategy",
    "EffectiveRankMonitor": "callbacks",
    "MemoryMonitor": "callbacks",
    "RankHistory": "callbacks",
    "rank_metrics": "callbacks",
    "memory_metrics": "callbacks",
    "FabricRankMonitor": "fabric",
    "layerwise_updater": "fabric",
    "LayerwiseUpdater": "layerwise",
    "plot_rank_history": "plotting",
}

__all__ = ["AdaRankGrad", "SubspaceInfo", "param_groups", "target_parameter_names", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "lightning.pytorch" in sys.modules:  # Lightning is loaded already: register "adarank", "adarank_ddp", ... now
    importlib.import_module(".strategy", __name__)
