"""``LowMemoryAdaRankGrad``: the low-memory recipe (:mod:`lightning_adarank.optim.low_memory`) as one Lightning
callback::

    trainer = Trainer(precision="bf16-true", callbacks=[LowMemoryAdaRankGrad(lr=1e-5, max_rank=128)])

bf16 weights updated with stochastic rounding, layer-wise updates (the embedding and ``lm_head`` included and
projected), 8-bit state, activation checkpointing of every Hugging Face model in the module.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..optim.low_memory import LOW_MEMORY_SETTINGS, enable_activation_checkpointing
from .optimizer_callbacks import AdaRankGradCallback

__all__ = ["LowMemoryAdaRankGrad"]


class LowMemoryAdaRankGrad(AdaRankGradCallback):
    """:class:`~lightning_adarank.AdaRankGradCallback` with the low-memory recipe switched on: ``layerwise=True``,
    ``include_embeddings=True``, ``state_bits=8``, ``dense_state_bits=8``, ``stochastic_rounding=True`` (any of
    them, and every other AdaRankGrad setting, may be given to override), and activation checkpointing turned
    on in every Hugging Face model inside the LightningModule when fit starts
    (``activation_checkpointing=False`` leaves the model alone; other models must checkpoint their blocks
    themselves, a warning says so).

    The Trainer must hold the weights in 16 bits: ``precision="bf16-true"`` (refused otherwise when fit sets
    up: an fp32 model would keep 4 bytes a weight, and ``"bf16-mixed"`` keeps fp32 weights too).
    """

    def __init__(self, *, activation_checkpointing: bool = True, **settings: Any) -> None:
        merged = {"layerwise": True, "include_embeddings": True, **LOW_MEMORY_SETTINGS, **settings}
        super().__init__(**merged)
        self.activation_checkpointing = activation_checkpointing

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if str(trainer.precision) != "bf16-true":
            raise ValueError(
                f"LowMemoryAdaRankGrad needs Trainer(precision='bf16-true') (16-bit weights, updated with stochastic "
                f"rounding), got precision={trainer.precision!r}"
            )
        if self.activation_checkpointing:
            enable_activation_checkpointing(pl_module)
