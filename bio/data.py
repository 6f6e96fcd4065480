"""Loading tokenized cells, and the Lightning data module for cell classification (group-aware, stratified
splits). Masked-gene pre-training data: :mod:`bio.pretrain_data`.

Cells come from a Geneformer-style tokenized ``.dataset`` folder (``datasets.load_from_disk``; our
``python -m bio tokenize`` output or Geneformer's own), from an ``.h5ad`` file tokenized on the fly, or
from the built-in ``scanpy:pbmc68k_reduced`` (bundled with scanpy; counts recovered as ``expm1(.raw.X)``).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_adarank.integrations.resumable import resumable_loader  # exact mid-epoch resume

from .splits import split_indices
from .tokenizer import tokenize_anndata_with_report

__all__ = [
    "CellClassificationDataModule",
    "PaddingCollator",
    "split_indices",
    "load_cells",
    "BUILTIN_PBMC",
]

log = logging.getLogger(__name__)
BUILTIN_PBMC = "scanpy:pbmc68k_reduced"


def default_dictionary_dir() -> Path:
    """``<repo>/../shared/data/geneformer/gc30M`` (this project's checkout layout; not shipped)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer" / "gc30M"


def load_cells(
    *,
    dataset_path: str | None = None,
    h5ad: str | None = None,
    dictionary_dir: str | None = None,
    obs_columns: Sequence[str] = (),
    model_input_size: int = 2048,
    special_tokens: bool = False,
    counts: str = "auto",
    undo_log1p: bool = False,
    gene_id_column: str | None = None,
    progress: bool = True,
):
    """Load tokenized cells as a ``datasets.Dataset`` from exactly one of ``dataset_path`` or ``h5ad``.

    ``h5ad`` may be a file path or ``"scanpy:pbmc68k_reduced"`` (700 real PBMCs shipped with scanpy; its
    ``.raw`` is log-normalised, so counts are taken as ``expm1(.raw.X)``).
    """
    if (dataset_path is None) == (h5ad is None):
        raise ValueError("give exactly one of dataset_path (a tokenized .dataset folder) or h5ad")
    if dataset_path is not None:
        import datasets

        path = Path(dataset_path)
        if not path.exists():
            raise FileNotFoundError(f"tokenized dataset folder not found: {path}")
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} is a DatasetDict; point dataset_path at one split")
        if "input_ids" not in ds.column_names:
            raise ValueError(f"{path} has no 'input_ids' column; is it a Geneformer tokenized dataset?")
        return ds
    if dictionary_dir is None:
        dictionary_dir = str(default_dictionary_dir())
    if h5ad == BUILTIN_PBMC:
        import scanpy as sc

        adata = sc.datasets.pbmc68k_reduced()
        counts, undo_log1p = "raw", True
    else:
        import anndata

        path = Path(h5ad)
        if not path.exists():
            raise FileNotFoundError(f"h5ad file not found: {path}")
        adata = anndata.read_h5ad(path)
    missing = [c for c in obs_columns if c not in adata.obs.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not in the AnnData obs; available: {list(adata.obs.columns)}")
    ds, report = tokenize_anndata_with_report(
        adata,
        dictionary_dir,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        counts=counts,
        undo_log1p=undo_log1p,
        gene_id_column=gene_id_column,
        obs_columns=list(obs_columns),
        progress=progress,
    )
    log.info(report.summary())
    return ds


class PaddingCollator:
    """Dynamic padding: pads ``input_ids`` to the longest cell of the batch (optionally truncating to
    ``max_length``, keeping a trailing ``<eos>`` if the cells have one) and builds ``attention_mask``."""

    def __init__(self, pad_token_id: int = 0, max_length: int | None = None, eos_token_id: int | None = None):
        self.pad_token_id, self.max_length, self.eos_token_id = pad_token_id, max_length, eos_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = []
        for row in rows:
            ids = list(row["input_ids"])
            if self.max_length is not None and len(ids) > self.max_length:
                last = ids[-1]
                ids = ids[: self.max_length]
                if self.eos_token_id is not None and last == self.eos_token_id:
                    ids[-1] = last
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            attention[i, : len(s)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if "label" in rows[0]:
            batch["labels"] = torch.as_tensor([r["label"] for r in rows], dtype=torch.long)
        return batch


class CellClassificationDataModule(L.LightningDataModule):
    """Cell-state classification data: label mapping, group-aware stratified splits, dynamic padding.

    Args:
        dataset_path: tokenized ``.dataset`` folder (ours or Geneformer's), with the label (and group) columns.
        h5ad: ``.h5ad`` file to tokenize on the fly, or ``"scanpy:pbmc68k_reduced"``.
        dictionary_dir: Geneformer dictionary folder for ``h5ad`` (default ``<repo>/../shared/data/geneformer/gc30M``).
        label_column: column with the cell state (e.g. ``disease``).
        group_column: column with the donor/individual; no individual ends up in two splits. ``None``: plain
            stratified split.
        classes: keep only these labels, in this order (default: all, sorted).
        val_fraction, test_fraction: approximate split sizes (in cells).
        val_groups, test_groups: explicit held-out groups instead of fractions.
        min_cells_per_class: classes below this raise an error (or are dropped with ``drop_rare_classes``).
        max_length: truncate cells to this many tokens at batching time (``None``: as tokenized).
        model_input_size, special_tokens, counts, undo_log1p, gene_id_column: tokenizer settings for ``h5ad``.
        subsample: keep this many cells (stratified-random, for quick runs).
    """

    def __init__(
        self,
        dataset_path: str | None = None,
        h5ad: str | None = None,
        dictionary_dir: str | None = None,
        label_column: str = "disease",
        group_column: str | None = "individual",
        classes: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        val_groups: list[str] | None = None,
        test_groups: list[str] | None = None,
        min_cells_per_class: int = 3,
        drop_rare_classes: bool = False,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        max_length: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        subsample: int | None = None,
        model_input_size: int = 2048,
        special_tokens: bool = False,
        counts: str = "auto",
        undo_log1p: bool = False,
        gene_id_column: str | None = None,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._dataset = None
        self._splits: dict[str, Any] | None = None
        self._label_names: list[str] | None = None

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> CellClassificationDataModule:
        """Build from an in-memory tokenized ``datasets.Dataset`` (e.g. :func:`bio.tokenize_anndata` output)."""
        dm = cls(**kwargs)
        dm._dataset = dataset
        return dm

    # ------------------------------------------------------------------ data preparation
    def _cells(self):
        if self._dataset is None:
            h = self.hparams
            obs = [h.label_column] + ([h.group_column] if h.group_column else [])
            self._dataset = load_cells(
                dataset_path=h.dataset_path,
                h5ad=h.h5ad,
                dictionary_dir=h.dictionary_dir,
                obs_columns=obs,
                model_input_size=h.model_input_size,
                special_tokens=h.special_tokens,
                counts=h.counts,
                undo_log1p=h.undo_log1p,
                gene_id_column=h.gene_id_column,
            )
        return self._dataset

    def _prepare(self) -> None:
        if self._splits is not None:
            return
        h = self.hparams
        ds = self._cells()
        for col, what in ((h.label_column, "label_column"), (h.group_column, "group_column")):
            if col is not None and col not in ds.column_names:
                raise ValueError(
                    f"{what}={col!r} is not a column of the tokenized cells; columns: {ds.column_names}"
                    + (" (set group_column: null for a plain stratified split)" if what == "group_column" else "")
                )
        labels = np.asarray([str(x) for x in ds[h.label_column]])
        keep = np.ones(len(labels), dtype=bool)
        if h.classes is not None:
            unknown = sorted(set(h.classes) - set(labels.tolist()))
            if unknown:
                raise ValueError(f"classes {unknown} do not occur in column {h.label_column!r}")
            keep &= np.isin(labels, h.classes)
        names, counts = np.unique(labels[keep], return_counts=True)
        rare = {str(n): int(c) for n, c in zip(names, counts) if c < h.min_cells_per_class}
        if rare:
            if not h.drop_rare_classes:
                raise ValueError(
                    f"class(es) with fewer than {h.min_cells_per_class} cells cannot be split into "
                    f"train/validation/test: {rare}. Drop them (drop_rare_classes=True), merge them, or lower "
                    "min_cells_per_class."
                )
            warnings.warn(f"dropping rare classes {rare}", stacklevel=2)
            keep &= ~np.isin(labels, list(rare))
        label_names = list(h.classes) if h.classes is not None else sorted(set(labels[keep].tolist()))
        label_names = [n for n in label_names if n not in rare]
        if len(label_names) < 2:
            raise ValueError(f"need at least 2 classes in {h.label_column!r}, found {label_names}")
        index = np.flatnonzero(keep)
        if h.subsample is not None and h.subsample < len(index):
            rng = np.random.default_rng(h.seed)
            index = np.sort(rng.choice(index, size=h.subsample, replace=False))
        lookup = {n: i for i, n in enumerate(label_names)}
        y = np.array([lookup[v] for v in labels[index]])
        groups = None
        if h.group_column is not None:
            groups = np.asarray([str(g) for g in ds.select(index)[h.group_column]])
        tr, va, te = split_indices(
            y,
            groups,
            val_fraction=h.val_fraction,
            test_fraction=h.test_fraction,
            seed=h.seed,
            val_groups=h.val_groups,
            test_groups=h.test_groups,
        )
        labelled = ds.select(index).add_column("label", y.tolist())
        cols = [c for c in labelled.column_names if c not in ("input_ids", "label")]
        labelled = labelled.remove_columns(cols)
        self._splits = {"train": labelled.select(tr), "val": labelled.select(va), "test": labelled.select(te)}
        self._groups = {
            k: sorted(set(groups[v].tolist())) if groups is not None else None
            for k, v in (("train", tr), ("val", va), ("test", te))
        }
        self._label_names = label_names

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    # ------------------------------------------------------------------ public properties
    @property
    def label_names(self) -> list[str]:
        """Class names; index = label id (linked to the model so the mapping is saved with it)."""
        self._prepare()
        return list(self._label_names)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def splits(self) -> dict[str, Any]:
        """The ``train``/``val``/``test`` ``datasets.Dataset`` objects (columns ``input_ids``, ``label``)."""
        self._prepare()
        return self._splits

    @property
    def split_groups(self) -> dict[str, list[str] | None]:
        """Groups (individuals) in each split (``None`` without a group column)."""
        self._prepare()
        return self._groups

    def majority_baseline(self, split: str = "test") -> dict[str, float]:
        """Accuracy and macro-F1 of always predicting the most frequent training class."""
        train_y = np.asarray(self.splits["train"]["label"])
        y = np.asarray(self.splits[split]["label"])
        majority = int(np.bincount(train_y, minlength=self.num_labels).argmax())
        from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

        target = torch.as_tensor(y)
        preds = torch.full_like(target, majority)
        k = self.num_labels
        return {
            "accuracy": float(multiclass_accuracy(preds, target, num_classes=k, average="micro")),
            "macro_f1": float(multiclass_f1_score(preds, target, num_classes=k, average="macro")),
            "class": self.label_names[majority],
        }

    def save_label_mapping(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"label_names": self.label_names, "label_column": self.hparams.label_column}, indent=2)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"label_names": self._label_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._label_names is not None and state_dict.get("label_names") not in (None, self._label_names):
            raise ValueError(
                f"checkpoint labels {state_dict['label_names']} differ from the data's {self._label_names}"
            )

    # ------------------------------------------------------------------ loaders
    def _collator(self):
        return PaddingCollator(self.hparams.pad_token_id, self.hparams.max_length, self.hparams.eos_token_id)

    def _loader(self, split: str, shuffle: bool):
        bs = self.hparams.batch_size if split == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        return resumable_loader(
            self.splits[split].with_format("python"),
            batch_size=bs,
            shuffle=shuffle,
            seed=self.hparams.seed,
            collate_fn=self._collator(),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader("test", False)
