"""``GLUETransformer``: a LightningModule over ``AutoModelForSequenceClassification``.

The optimizer is chosen by name (``adarankgrad``, ``galore``, ``adamw``, ``lora``) and built by
:func:`lightning_adarank.build_optimizer`, with a linear warm-up/decay schedule
(``transformers.get_linear_schedule_with_warmup``) stepped every optimizer step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_adarank import AdaRankGradConfig
from lightning_adarank.optim.baselines import adarank_overrides
from nlp.data import DEFAULT_MODEL
from nlp.hub import load_classifier
from nlp.metrics import default_metric_names, make_metrics
from nlp.tasks import get_task

__all__ = ["GLUETransformer"]

OPTIMIZERS = ("adarankgrad", "galore", "adamw", "lora")
#: AdaRankGrad settings GLUETransformer sets with its own arguments
_RESERVED = {
    "lr": "learning_rate",
    "betas": "betas",
    "weight_decay": "weight_decay",
    "max_rank": "rank",
    "scale": "scale",
}


class GLUETransformer(L.LightningModule):
    """Fine-tune a pretrained encoder for sentence(-pair) classification or regression.

    Args:
        model_name_or_path: hub id or local folder of the pretrained encoder (a fresh head is added).
        task: a GLUE task name (sets ``num_labels``, the metrics and the validation splits), or
            ``None`` for your own data (then give ``num_labels``).
        num_labels: number of classes, 1 for regression. Must agree with ``task`` when both given.
        eval_splits: validation split names in val-dataloader order (metric prefixes); default from
            ``task`` (``["val_matched", "val_mismatched"]`` for MNLI) or ``["val"]``.
        metrics: metric names (accuracy, f1, matthews, pearson, spearman); default from ``task``.
        optimizer: ``adarankgrad``, ``galore`` (galore-torch), ``adamw`` (full fine-tuning) or
            ``lora`` (peft adapters + AdamW).
        learning_rate, weight_decay, betas: optimizer settings.
        rank: AdaRankGrad's maximum rank, GaLore's rank, LoRA's rank.
        scale: scale α of the projected update (AdaRankGrad/GaLore); ``None`` = optimizer default.
        warmup_ratio: fraction of all training steps used for linear warm-up.
        target_modules: which ``nn.Linear`` weights are projected / get adapters: ``"all-linear"``,
            a regex searched in module names, or a list of names.
        include_embeddings: also project embedding tables (AdaRankGrad/GaLore).
        galore_update_proj_gap: GaLore's subspace refresh period (500 in GaLore's GLUE runs).
        lora_alpha: LoRA alpha (default ``2 * rank``).
        lora_modules_to_save: modules kept fully trainable under LoRA (the task head).
        adarank: the other AdaRankGrad settings, typed (:class:`lightning_adarank.AdaRankGradConfig`; on the
            command line ``--model.adarank.energy 0.9``, in YAML ``adarank: {energy: 0.9, min_rank: 1}``; a
            dict works too). Its ``lr``, ``betas``, ``weight_decay``, ``max_rank`` and ``scale`` are set by
            ``learning_rate``, ``betas``, ``weight_decay``, ``rank`` and ``scale`` above (giving them here is
            an error). Saved in the hyper-parameters as a dict of the settings that differ from the defaults.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        task: str | None = None,
        num_labels: int | None = None,
        eval_splits: list[str] | None = None,
        metrics: list[str] | None = None,
        optimizer: str = "adarankgrad",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        rank: int = 8,
        scale: float | None = None,
        warmup_ratio: float = 0.06,
        target_modules: str | list[str] = "all-linear",
        include_embeddings: bool = False,
        galore_update_proj_gap: int = 500,
        lora_alpha: float | None = None,
        lora_modules_to_save: list[str] | None = None,
        adarank: AdaRankGradConfig = AdaRankGradConfig(),  # noqa: B008  (frozen: a safe default)
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        spec = get_task(task) if task else None
        if spec is not None:
            if num_labels is not None and num_labels != spec.num_labels:
                raise ValueError(f"num_labels={num_labels} disagrees with task {spec.name!r} ({spec.num_labels}).")
            num_labels = spec.num_labels
            task = spec.name
        if num_labels is None or num_labels < 1:
            raise ValueError("Give a GLUE task or num_labels >= 1 (1 = regression).")
        if lora_modules_to_save is None:
            lora_modules_to_save = ["classifier"]
        self.save_hyperparameters(
            dict(
                model_name_or_path=model_name_or_path,
                task=task,
                num_labels=num_labels,
                eval_splits=eval_splits,
                metrics=metrics,
                optimizer=optimizer,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                betas=tuple(betas),
                rank=rank,
                scale=scale,
                warmup_ratio=warmup_ratio,
                target_modules=target_modules,
                include_embeddings=include_embeddings,
                galore_update_proj_gap=galore_update_proj_gap,
                lora_alpha=lora_alpha,
                lora_modules_to_save=lora_modules_to_save,
                adarank=adarank_overrides(adarank, _RESERVED),
            )
        )
        self.task_spec = spec
        id2label = dict(enumerate(spec.label_names)) if spec and spec.label_names else None
        model: nn.Module = load_classifier(model_name_or_path, num_labels, id2label=id2label)
        if optimizer == "lora":
            from lightning_adarank import apply_lora

            model = apply_lora(
                model, rank, alpha=lora_alpha, target_modules=target_modules, modules_to_save=lora_modules_to_save
            )
        model.train()  # from_pretrained returns eval mode; fine-tuning wants dropout on
        self.model = model
        names = list(eval_splits) if eval_splits else (list(spec.eval_splits) if spec else ["val"])
        metric_names = tuple(metrics) if metrics else (spec.metrics if spec else default_metric_names(num_labels))
        self.val_metrics = nn.ModuleDict({s: make_metrics(metric_names, num_labels) for s in names})
        self._seen_splits: set[str] = set()

    # ------------------------------------------------------------------ properties
    @property
    def eval_split_names(self) -> list[str]:
        """Validation split names, in dataloader order."""
        return list(self.val_metrics.keys())

    @property
    def monitor_key(self) -> str:
        """Logged name of the headline metric (e.g. ``val/matthews``), for checkpoints/early stopping."""
        first = self.eval_split_names[0]
        name = self.task_spec.monitor if self.task_spec else next(iter(self.val_metrics[first].keys()))
        return f"{first}/{name}"

    # ------------------------------------------------------------------ steps
    def forward(self, **batch: torch.Tensor):
        """Run the wrapped ``transformers`` model; returns its output (``loss`` when labels given)."""
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(**batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return out.loss

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.hparams.num_labels == 1 else logits.argmax(-1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        split = self.eval_split_names[dataloader_idx]
        out = self.model(**batch)
        self.val_metrics[split].update(self._predictions(out.logits), batch["labels"])
        self._seen_splits.add(split)
        self.log(f"{split}/loss", out.loss, batch_size=batch["labels"].shape[0], add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        for split, coll in self.val_metrics.items():
            if split in self._seen_splits:
                self.log_dict({f"{split}/{k}": v for k, v in coll.compute().items()}, prog_bar=True)
            coll.reset()
        self._seen_splits.clear()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "labels"}
        return self._predictions(self.model(**batch).logits)

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        """The chosen optimizer (via ``lightning_adarank.build_optimizer``) with linear warm-up and decay."""
        from transformers import get_linear_schedule_with_warmup

        from lightning_adarank import build_optimizer

        hp = self.hparams
        extra: dict[str, Any] = {}
        if hp.optimizer == "adarankgrad":
            extra.update(hp.adarank or {})
        elif hp.optimizer == "galore":
            extra["galore_update_proj_gap"] = hp.galore_update_proj_gap
        elif hp.adarank:
            raise ValueError(
                f"adarank settings {sorted(hp.adarank)} are for optimizer='adarankgrad', not {hp.optimizer!r}."
            )
        opt = build_optimizer(
            self.model,
            hp.optimizer,
            lr=hp.learning_rate,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            rank=hp.rank,
            scale=hp.scale,
            target_modules=hp.target_modules,
            include_embeddings=hp.include_embeddings,
            **extra,
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(hp.warmup_ratio * total)
        sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
