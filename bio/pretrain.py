"""``GeneformerPretrainer``: masked-gene modeling (Geneformer's pre-training objective, ``BertForMaskedLM``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lightning_adarank import AdaRankGradConfig
from lightning_adarank.optim.baselines import adarank_overrides

from .model import load_bert_config
from .optim import RESERVED, OptimizerChoice

__all__ = ["GeneformerPretrainer"]


class GeneformerPretrainer(OptimizerChoice, L.LightningModule):
    """Pre-train (or continue pre-training) a Geneformer-architecture BERT by masked-gene modeling.

    Use with :class:`bio.MaskedGeneDataModule` (15% of gene tokens masked). The loss is the cross-entropy
    on masked positions; to save memory the vocabulary projection is applied to masked positions only.

    Args:
        model_config: Geneformer ``config.json`` (path or dict); ``vocab_size`` must match the token dictionary.
        config_overrides: fields replaced in the config (e.g. ``num_hidden_layers: 2``).
        pretrained: continue from a local checkpoint folder instead.
        save_dir: at the end of fitting, ``save_pretrained`` here (a folder ``GeneformerClassifier(pretrained=...)`` loads).
        optimizer: ``adarankgrad`` | ``galore`` | ``adamw`` (LoRA needs pretrained weights: not offered here).
        include_embeddings: ``None`` (default): dense Adam for the embedding table (logged; ``True`` from
            scratch warns; see :class:`bio.GeneformerClassifier`).
        other arguments: as :class:`bio.GeneformerClassifier`.
    """

    def __init__(
        self,
        model_config: str | dict | None = None,
        config_overrides: dict | None = None,
        pretrained: str | None = None,
        save_dir: str | None = None,
        optimizer: Literal["adarankgrad", "galore", "adamw"] = "adarankgrad",
        lr: float = 1e-3,
        weight_decay: float = 0.001,
        warmup_steps: int = 0,
        lr_schedule: Literal["linear", "constant"] = "linear",
        rank: int = 16,
        scale: float | None = None,
        target_modules: str | list[str] = "all-linear",
        include_embeddings: bool | None = None,
        adarank: AdaRankGradConfig = AdaRankGradConfig(),  # noqa: B008  (frozen: a safe default)
        rank_monitor: bool = True,
        memory_monitor: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["adarank"])
        self.save_hyperparameters({"adarank": adarank_overrides(adarank, RESERVED)})  # plain values
        if optimizer == "lora":
            raise ValueError("LoRA adapts pretrained weights; pre-train with adarankgrad, galore or adamw")
        from transformers import BertForMaskedLM

        if pretrained:
            self.model = BertForMaskedLM.from_pretrained(pretrained, local_files_only=True, **(config_overrides or {}))
        else:
            cfg = load_bert_config(model_config, config_overrides)
            cfg.architectures = ["BertForMaskedLM"]
            self.model = BertForMaskedLM(cfg)

    def forward(self, input_ids, attention_mask, labels):
        """Masked-gene cross-entropy (mean over masked positions)."""
        hidden = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        masked = labels != -100
        logits = self.model.cls(hidden[masked])
        return torch.nn.functional.cross_entropy(logits, labels[masked])

    def _step(self, batch, stage):
        loss = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        self.log(
            f"{stage}/mlm_loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=batch["input_ids"].shape[0],
        )
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_validation_epoch_end(self):
        loss = self.trainer.callback_metrics.get("val/mlm_loss")
        if loss is not None:
            self.log("val/perplexity", math.exp(min(float(loss), 50.0)))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hugging Face checkpoint (``config.json`` + weights)."""
        self.model.save_pretrained(str(directory))
        return Path(directory)

    def on_fit_end(self):
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.save_pretrained(self.hparams.save_dir)
