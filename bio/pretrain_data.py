"""The Lightning data module for masked-gene pre-training (Geneformer's objective) on tokenized cells.

Cells are loaded as for classification (:func:`bio.data.load_cells`): a tokenized ``.dataset`` folder, an
``.h5ad`` tokenized on the fly, or the built-in ``scanpy:pbmc68k_reduced``.
"""

from __future__ import annotations

import lightning as L
import numpy as np

from lightning_adarank.integrations.resumable import resumable_loader  # exact mid-epoch resume

from .data import default_dictionary_dir, load_cells

__all__ = ["MaskedGeneDataModule"]


class MaskedGeneDataModule(L.LightningDataModule):
    """Masked-gene modeling data (Geneformer's pre-training objective): 15% of the gene tokens are
    selected; of those 80% become ``<mask>``, 10% a random gene, 10% unchanged
    (``transformers.DataCollatorForLanguageModeling`` over the gene vocabulary).

    Args:
        dataset_path / h5ad / dictionary_dir: as for :class:`CellClassificationDataModule`;
            ``dictionary_dir`` also provides the vocabulary (pad/mask ids) and is always needed.
        val_fraction: random cells held out for validation loss.
        mlm_probability: fraction of genes masked (0.15).
        max_length: truncate cells at batching time.
    """

    def __init__(
        self,
        dataset_path: str | None = None,
        h5ad: str | None = None,
        dictionary_dir: str | None = None,
        val_fraction: float = 0.05,
        mlm_probability: float = 0.15,
        batch_size: int = 16,
        max_length: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        model_input_size: int = 2048,
        special_tokens: bool = False,
        counts: str = "auto",
        undo_log1p: bool = False,
        gene_id_column: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._dataset = None
        self._splits = None

    @classmethod
    def from_dataset(cls, dataset, **kwargs) -> MaskedGeneDataModule:
        """Build from an in-memory tokenized ``datasets.Dataset``."""
        dm = cls(**kwargs)
        dm._dataset = dataset
        return dm

    def _dictionaries(self):
        from .dictionaries import load_dictionaries

        return load_dictionaries(self.hparams.dictionary_dir or default_dictionary_dir())

    @property
    def vocab_size(self) -> int:
        return self._dictionaries().vocab_size

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        h = self.hparams
        if self._dataset is None:
            self._dataset = load_cells(
                dataset_path=h.dataset_path,
                h5ad=h.h5ad,
                dictionary_dir=h.dictionary_dir,
                model_input_size=h.model_input_size,
                special_tokens=h.special_tokens,
                counts=h.counts,
                undo_log1p=h.undo_log1p,
                gene_id_column=h.gene_id_column,
            )
        ds = self._dataset.select_columns(["input_ids"])
        rng = np.random.default_rng(h.seed)
        order = rng.permutation(len(ds))
        n_val = int(round(len(ds) * h.val_fraction))
        self._splits = {"train": ds.select(np.sort(order[n_val:])), "val": ds.select(np.sort(order[:n_val]))}
        from transformers import DataCollatorForLanguageModeling

        from .dictionaries import gene_tokenizer

        self._mlm = DataCollatorForLanguageModeling(
            gene_tokenizer(self._dictionaries()), mlm_probability=h.mlm_probability
        )

    def _collate(self, rows):
        ml = self.hparams.max_length
        feats = [{"input_ids": list(r["input_ids"])[:ml] if ml else list(r["input_ids"])} for r in rows]
        return self._mlm(feats)

    def _loader(self, split, shuffle):
        return resumable_loader(
            self._splits[split].with_format("python"),
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            seed=self.hparams.seed,
            collate_fn=self._collate,
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)
