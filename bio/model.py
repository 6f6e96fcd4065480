"""``GeneformerClassifier``: Geneformer (``BertForSequenceClassification``) cell-state classification."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lightning_adarank import AdaRankGradConfig
from lightning_adarank.optim.baselines import adarank_overrides

from .optim import RESERVED, OptimizerChoice

__all__ = ["GeneformerClassifier", "load_bert_config"]


def load_bert_config(model_config: str | dict | None, overrides: dict | None = None):
    """A ``BertConfig`` from a Geneformer ``config.json`` path (or a dict), with ``overrides`` applied."""
    from transformers import BertConfig

    if model_config is None:
        raise ValueError("give pretrained (a local Geneformer checkpoint folder) or model_config (a config.json)")
    if isinstance(model_config, dict):
        cfg = BertConfig(**model_config)
    else:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"model config not found: {path}")
        cfg = BertConfig.from_json_file(str(path))
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ValueError(f"config_overrides: BertConfig has no field {key!r}")
        setattr(cfg, key, value)
    return cfg


class GeneformerClassifier(OptimizerChoice, L.LightningModule):
    """Fine-tune Geneformer to classify cell states, with AdaRankGrad, GaLore, AdamW or LoRA.

    Args:
        label_names: class names, index = label id (the CLI links them from the data module; they are
            saved in the checkpoint hyper-parameters and in the HF config's ``id2label``).
        pretrained: local Geneformer checkpoint folder (e.g. a downloaded ``gf-12L-30M-i2048``, or the
            output of ``python -m bio pretrain``). ``None``: train from ``model_config``.
        model_config: Geneformer ``config.json`` (path or dict) for training from scratch.
        config_overrides: fields replaced in the config (e.g. a smaller model: ``num_hidden_layers: 2``).
        freeze_layers: freeze the first N encoder layers (Geneformer's recipes freeze some).
        optimizer: ``adarankgrad`` | ``galore`` | ``adamw`` | ``lora``.
        lr, weight_decay, warmup_steps, lr_schedule: AdamW-style settings; ``linear`` = warmup then linear decay.
        rank: AdaRankGrad's max rank, GaLore's rank, LoRA's rank (paper: 16).
        scale: projected-update scale (``None``: optimizer default).
        target_modules: which linear layers AdaRankGrad/GaLore project (``all-linear``, a regex or names).
        include_embeddings: project the gene-embedding table too. ``None`` (default): dense Adam for the
            table, from scratch and when fine-tuning ``pretrained`` (projecting it was measured to cost 9
            points of macro-F1 from scratch and 12 fine-tuning a briefly pre-trained checkpoint:
            ``benchmarks/from_scratch.py``); the choice is logged. ``True`` saves the table's two Adam moments
            (most of the state of a small model) and is obeyed, with a warning from scratch.
        adarank: the other AdaRankGrad settings, typed (:class:`lightning_adarank.AdaRankGradConfig`:
            ``--model.adarank.energy 0.9``, YAML ``adarank: {energy: 0.9, min_rank: 1}``, or a dict); ``lr``,
            ``weight_decay``, ``max_rank`` and ``scale`` are set by the arguments of those names (``rank`` for
            ``max_rank``). Saved in the hyper-parameters as a dict of the non-default settings.
        lora_alpha: LoRA's alpha (default ``2 * rank``).
        rank_monitor, memory_monitor: add lightning_adarank's ``EffectiveRankMonitor`` / ``MemoryMonitor``.
    """

    def __init__(
        self,
        label_names: list[str],
        pretrained: str | None = None,
        model_config: str | dict | None = None,
        config_overrides: dict | None = None,
        freeze_layers: int = 0,
        optimizer: Literal["adarankgrad", "galore", "adamw", "lora"] = "adarankgrad",
        lr: float = 5e-5,
        weight_decay: float = 0.001,
        warmup_steps: int = 0,
        lr_schedule: Literal["linear", "constant"] = "linear",
        rank: int = 16,
        scale: float | None = None,
        target_modules: str | list[str] = "all-linear",
        include_embeddings: bool | None = None,
        adarank: AdaRankGradConfig = AdaRankGradConfig(),  # noqa: B008  (frozen: a safe default)
        lora_alpha: float | None = None,
        rank_monitor: bool = True,
        memory_monitor: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["adarank"])
        self.save_hyperparameters({"adarank": adarank_overrides(adarank, RESERVED)})  # plain values
        if len(label_names) < 2:
            raise ValueError(f"need at least two classes, got {label_names}")
        self.label_names = list(label_names)
        self.model = self._build()
        k = len(self.label_names)
        metrics = MetricCollection(
            {
                "f1_macro": MulticlassF1Score(num_classes=k, average="macro"),
                "accuracy": MulticlassAccuracy(num_classes=k, average="micro"),
            }
        )
        self.metrics = torch.nn.ModuleDict({f"{s}_": metrics.clone(prefix=f"{s}/") for s in ("train", "val", "test")})
        self.confusion = torch.nn.ModuleDict(
            {f"{s}_": MulticlassConfusionMatrix(num_classes=k) for s in ("val", "test")}
        )
        self.history: list[dict[str, float]] = []  # per validation epoch
        self.confusion_matrices: dict[str, list[list[int]]] = {}

    def _build(self):
        from transformers import BertForSequenceClassification

        h = self.hparams
        k = len(self.label_names)
        id2label = dict(enumerate(self.label_names))
        label2id = {n: i for i, n in id2label.items()}
        if h.pretrained:
            path = Path(h.pretrained)
            if not path.is_dir():
                raise FileNotFoundError(f"pretrained checkpoint folder not found: {path}")
            model = BertForSequenceClassification.from_pretrained(
                str(path),
                num_labels=k,
                id2label=id2label,
                label2id=label2id,
                local_files_only=True,
                **(h.config_overrides or {}),
            )
        else:
            cfg = load_bert_config(h.model_config, h.config_overrides)
            cfg.num_labels, cfg.id2label, cfg.label2id = k, id2label, label2id
            cfg.problem_type = "single_label_classification"
            cfg.architectures = ["BertForSequenceClassification"]
            model = BertForSequenceClassification(cfg)
        if h.freeze_layers:
            layers = model.bert.encoder.layer
            if h.freeze_layers > len(layers):
                raise ValueError(f"freeze_layers={h.freeze_layers} but the model has {len(layers)} layers")
            for layer in layers[: h.freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)
        if h.optimizer == "lora":
            from lightning_adarank import apply_lora

            model = apply_lora(
                model, h.rank, alpha=h.lora_alpha, target_modules=h.target_modules, modules_to_save=["classifier"]
            )
        return model

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _step(self, batch, stage: str):
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        preds = logits.argmax(-1)
        self.metrics[f"{stage}_"].update(preds, batch["labels"])
        if f"{stage}_" in self.confusion:
            self.confusion[f"{stage}_"].update(preds, batch["labels"])
        bs = batch["labels"].shape[0]
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=bs)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return torch.softmax(self(batch["input_ids"], batch["attention_mask"]), -1)

    def _epoch_end(self, stage: str) -> dict[str, float]:
        values = {k: float(v) for k, v in self.metrics[f"{stage}_"].compute().items()}
        self.log_dict(values, prog_bar=stage != "train")
        self.metrics[f"{stage}_"].reset()
        if f"{stage}_" in self.confusion:
            cm = self.confusion[f"{stage}_"].compute().cpu().tolist()
            self.confusion[f"{stage}_"].reset()
            self.confusion_matrices[stage] = cm
            self._write_confusion(stage, cm)
        return values

    def _write_confusion(self, stage: str, cm: list[list[int]]) -> None:
        if self.trainer is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        log_dir = getattr(self.trainer.logger, "log_dir", None) if self.trainer.logger else None
        if not log_dir:
            return
        path = Path(log_dir) / f"confusion_{stage}_epoch{self.current_epoch}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["true \\ predicted", *self.label_names])
            for name, row in zip(self.label_names, cm):
                w.writerow([name, *row])

    def on_train_epoch_end(self):
        self._epoch_end("train")

    def on_validation_epoch_end(self):
        values = self._epoch_end("val")
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, "step": self.global_step, **values})

    def on_test_epoch_end(self):
        self._epoch_end("test")

    # ------------------------------------------------------------------ optimizer, callbacks, export
    def save_pretrained(self, directory: str | Path) -> Path:
        """Save a Hugging Face checkpoint (LoRA merged) with ``id2label`` and ``label_mapping.json``."""
        directory = Path(directory)
        model = self.model
        if self.hparams.optimizer == "lora":
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(str(directory))
        (directory / "label_mapping.json").write_text(json.dumps({"label_names": self.label_names}, indent=2))
        return directory

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["label_names"] = self.label_names
