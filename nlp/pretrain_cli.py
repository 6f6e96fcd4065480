"""``python -m nlp pretrain fit --config nlp/configs/pretrain/llama_60m_adarankgrad.yaml``: causal-LM pre-training.

LightningCLI over :class:`~nlp.pretrain.CausalLMPretrainer` and :class:`~nlp.lm_data.PackedTextDataModule`;
the model's ``vocab_size`` is linked from the data module's tokenizer. The memory monitor (optimizer state
and peak memory) is added by default, and with ``--model.optimizer adarankgrad`` the effective-rank monitor too,
unless the config already has them.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from nlp.lm_data import PackedTextDataModule
from nlp.pretrain import CausalLMPretrainer

__all__ = ["PretrainCLI", "main"]


class PretrainCLI(LightningCLI):
    """LightningCLI with the tokenizer → model link and the rank/memory callbacks on by default."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        from lightning_adarank import EffectiveRankMonitor, MemoryMonitor

        trainer = super().instantiate_trainer(**kwargs)
        have = {type(cb).__name__ for cb in trainer.callbacks}
        wanted = [MemoryMonitor]
        if self.model.hparams.optimizer == "adarankgrad":
            wanted.insert(0, EffectiveRankMonitor)
        for cls in wanted:
            if cls.__name__ not in have:
                trainer.callbacks.append(cls())
        return trainer


def main(args: list[str] | None = None, run: bool = True) -> PretrainCLI:
    """Entry point of ``python -m nlp pretrain``; ``args`` replaces the arguments after ``pretrain``."""
    return PretrainCLI(
        CausalLMPretrainer,
        PackedTextDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
