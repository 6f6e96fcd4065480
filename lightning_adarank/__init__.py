"""lightning-adarank: the AdaRankGrad optimizer for PyTorch, Lightning and Fabric.

The optimizer (:class:`AdaRankGrad`, :func:`param_groups`, settings in :class:`AdaRankGradConfig`) is pure
PyTorch. With Lightning, add one callback: ``Trainer(callbacks=[AdaRankGradCallback(max_rank=16)])``, or use
``strategy=AdaRankGradStrategy(...)`` / ``AdaRankGradDDPStrategy(...)``. The Lightning, Hugging Face Trainer and
PEFT-export pieces are imported lazily, so ``import lightning_adarank`` imports none of Lightning,
transformers or peft.
"""

from __future__ import annotations

import importlib
import sys

from . import distributed as _distributed  # noqa: F401  (registers the FSDP2 step with the optimizer)
from .optim.config import AdaRankGradConfig
from .optim.optimizer import AdaRankGrad, SubspaceInfo
from .optim.targets import param_groups, target_parameter_names

__version__ = "0.2.0"

# public name -> submodule that defines it (imported on first access)
_LAZY = {
    "OPTIMIZER_CHOICES": "optim.baselines",
    "build_optimizer": "optim.baselines",
    "apply_lora": "optim.baselines",
    "optimizer_state_bytes": "optim.baselines",
    # Lightning / Fabric integration (importing any of these imports Lightning and registers the
    # "adarank", "adarank_ddp", ... strategy names)
    "AdaRankGradCallback": "integrations.optimizer_callbacks",
    "AdaRankGradStrategy": "integrations.strategy",
    "AdaRankGradDDPStrategy": "integrations.strategy",
    "AdaRankGradModelParallelStrategy": "integrations.strategy",
    "EffectiveRankMonitor": "integrations.monitors",
    "MemoryMonitor": "integrations.monitors",
    "RankHistory": "monitoring.history",
    "rank_metrics": "monitoring.history",
    "memory_metrics": "monitoring.history",
    "FabricRankMonitor": "integrations.fabric",
    "layerwise_updater": "integrations.fabric",
    "LayerwiseUpdater": "optim.layerwise",
    # the low-memory recipe (bf16 weights with stochastic rounding, layer-wise, 8-bit state, checkpointing)
    "low_memory_adarank": "optim.low_memory",
    "LowMemoryAdaRankGrad": "integrations.low_memory",
    "plot_rank_history": "monitoring.plotting",
    "VerifiedCheckpointIO": "integrations.checkpoint_io",
    "CheckpointFileError": "optim.checkpoint",
    # export of a fine-tune as a PEFT LoRA adapter (imports peft on first use)
    "export_lora": "export.lora",
    "LoraExportReport": "export.report",
    # Hugging Face Trainer integration (importing it imports transformers)
    "AdaRankGradTrainerCallback": "integrations.hf",
    # going back to AdamW from an AdaRankGrad run
    "ContinueWithAdamW": "integrations.optimizer_callbacks",
    "adamw_state_dict": "export.adamw",
}

__all__ = ["AdaRankGrad", "AdaRankGradConfig", "SubspaceInfo", "param_groups", "target_parameter_names", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "lightning.pytorch" in sys.modules:  # Lightning is loaded already: register "adarank", "adarank_ddp", ... now
    importlib.import_module(".integrations.strategy", __name__)
