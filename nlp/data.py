"""LightningDataModules for GLUE and for users' own text-classification files.

Tokenization runs once per (source data, tokenizer, max_length, subsample) and is cached with
``datasets``' ``save_to_disk`` under ``cache_dir``: the records are built in memory
(``Dataset.from_list``), and in-memory datasets never get ``datasets``' fingerprint cache files,
so an explicit content-keyed folder is the only cache that works for local GLUE files, user files
and hub splits alike. Batches are padded per batch (``DataCollatorWithPadding``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from lightning_adarank.integrations.resumable import resumable_loader  # exact mid-epoch resume
from nlp.hub import load_tokenizer
from nlp.readers import (
    DataError,
    file_fingerprint,
    glue_split_files,
    read_glue_split,
    read_hub_split,
    read_table,
    resolve_task_dir,
)
from nlp.tasks import GLUETask, get_task

__all__ = ["TextClassificationDataModule", "GLUEDataModule", "DEFAULT_MODEL", "default_cache_dir"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "roberta-base"
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$LIGHTNING_ADARANK_CACHE/nlp`` or ``~/.cache/lightning_adarank/nlp``."""
    base = os.environ.get("LIGHTNING_ADARANK_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lightning_adarank"
    )
    return Path(base) / "nlp"


class TextClassificationDataModule(L.LightningDataModule):
    """Sentence or sentence-pair classification/regression from your own CSV, TSV or JSON files.

    Args:
        train_file: training file (``.csv``, ``.tsv``, ``.json`` or ``.jsonl``).
        val_file: validation file in the same format.
        text_columns: one column (single sentence) or two (pair) holding the text.
        label_column: column holding the label.
        label_list: allowed labels in label-id order (e.g. ``["neg", "pos"]``); inferred from the
            training file (sorted) when omitted. Labels outside it are an error.
        is_regression: float targets, one output (like STS-B).
        model_name_or_path: tokenizer to use (hub id or local folder); should match the model.
        max_length: truncate to this many tokens.
        batch_size: training batch size.
        eval_batch_size: validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        max_train_samples / max_eval_samples: random subsample (by ``seed``) for quick runs.
        seed: seed for subsampling.
        cache_dir: where tokenized splits are saved (default :func:`default_cache_dir`).
        delimiter: override the CSV/TSV delimiter.
    """

    task_name: str | None = None

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        text_columns: Sequence[str] = ("sentence",),
        label_column: str = "label",
        label_list: list[str] | None = None,
        is_regression: bool = False,
        model_name_or_path: str = DEFAULT_MODEL,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 42,
        cache_dir: str | None = None,
        delimiter: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_file = train_file
        self.val_file = val_file
        self.text_columns = tuple(text_columns)
        self.label_column = label_column
        self._label_list = [str(x) for x in label_list] if label_list is not None else None
        self._is_regression = is_regression
        self.model_name_or_path = model_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.delimiter = delimiter
        self.datasets: dict[str, Any] = {}
        self._tokenizer = None
        self.cache_hits: list[str] = []  # splits loaded from cache in this process (for tests/logs)

    # ------------------------------------------------------------------ task description
    @property
    def is_regression(self) -> bool:
        """Whether targets are floats with a single model output."""
        return self._is_regression

    @property
    def label_list(self) -> list[str] | None:
        """Class names in label-id order (``None`` for regression)."""
        if self.is_regression:
            return None
        if self._label_list is None:
            if not self.train_file:
                raise DataError("TextClassificationDataModule needs train_file (or label_list).")
            _, raw = read_table(self.train_file, self.text_columns, self.label_column, delimiter=self.delimiter)
            self._label_list = _sorted_labels(raw)
        return self._label_list

    @property
    def num_labels(self) -> int:
        """Number of model outputs (1 for regression)."""
        return 1 if self.is_regression else len(self.label_list or [])

    @property
    def eval_split_names(self) -> list[str]:
        """Names of the validation splits, in val-dataloader order; used as metric prefixes."""
        return ["val"]

    @property
    def tokenizer(self):
        """The ``AutoTokenizer`` for ``model_name_or_path`` (loaded lazily)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    # ------------------------------------------------------------------ raw data
    def _split_source(self, split: str) -> str:
        """A string that changes whenever the raw data of ``split`` changes (cache key part)."""
        path = self.train_file if split == "train" else self.val_file
        if not path:
            raise DataError(
                f"No file given for split {split!r} (set {'train_file' if split == 'train' else 'val_file'})."
            )
        if not Path(path).expanduser().is_file():
            raise DataError(f"Data file {str(path)!r} not found.")
        return json.dumps(
            [
                file_fingerprint(Path(path).expanduser()),
                self.text_columns,
                self.label_column,
                self.label_list,
                self.is_regression,
                self.delimiter,
            ]
        )

    def _read_split(self, split: str):
        """Records (list of dicts or a ``datasets.Dataset``) with ``text_a``[, ``text_b``], ``label``."""
        path = self.train_file if split == "train" else self.val_file
        recs, raw = read_table(path, self.text_columns, self.label_column, delimiter=self.delimiter)
        for i, (rec, y) in enumerate(zip(recs, raw)):
            rec["label"] = self._label_id(y, f"{path}: row {i + 1}")
        return recs

    def _label_id(self, y: Any, where: str) -> int | float:
        if self.is_regression:
            try:
                return float(y)
            except (TypeError, ValueError):
                raise DataError(f"{where}: label {y!r} is not a number (is_regression=True).") from None
        labels = self.label_list or []
        key = _label_key(y)
        if key not in labels:
            raise DataError(f"{where}: label {y!r} is not one of the allowed labels {labels}.")
        return labels.index(key)

    # ------------------------------------------------------------------ tokenization + cache
    def _cache_path(self, split: str) -> Path:
        from datasets.fingerprint import Hasher

        n = self.max_train_samples if split == "train" else self.max_eval_samples
        key = json.dumps(
            [_CACHE_VERSION, self._split_source(split), Hasher.hash(self.tokenizer), self.max_length, n, self.seed]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.task_name or 'custom'}-{split}-{digest}"

    def _build_split(self, split: str):
        import datasets

        path = self._cache_path(split)
        if path.is_dir():
            self.cache_hits.append(split)
            return datasets.load_from_disk(str(path))
        raw = self._read_split(split)
        ds = raw if isinstance(raw, datasets.Dataset) else datasets.Dataset.from_list(raw)
        n = self.max_train_samples if split == "train" else self.max_eval_samples
        if n is not None and n < len(ds):
            idx = sorted(random.Random(self.seed).sample(range(len(ds)), n))
            ds = ds.select(idx)
        tok = self.tokenizer
        pair = "text_b" in ds.column_names

        def encode(batch):
            args = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
            return tok(*args, truncation=True, max_length=self.max_length)

        text_cols = [c for c in ds.column_names if c != "label"]
        ds = ds.map(encode, batched=True, remove_columns=text_cols, desc=f"Tokenizing {split}")
        ds = ds.rename_column("label", "labels")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        ds.save_to_disk(str(tmp))
        os.replace(tmp, path)
        return datasets.load_from_disk(str(path))

    def prepare_data(self) -> None:
        """Read, tokenize and cache every split (runs once, on the main process)."""
        for split in ["train", *self.eval_split_names]:
            self._build_split(split)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokenized splits this stage needs."""
        needed = ["train", *self.eval_split_names] if stage in (None, "fit") else list(self.eval_split_names)
        for split in needed:
            if split not in self.datasets:
                self.datasets[split] = self._build_split(split)

    # ------------------------------------------------------------------ loaders
    def _collator(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, padded per batch."""
        return resumable_loader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self._collator(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader per validation split (two for MNLI: matched, mismatched)."""
        loaders = [
            DataLoader(
                self.datasets[s],
                batch_size=self.eval_batch_size,
                shuffle=False,
                collate_fn=self._collator(),
                num_workers=self.num_workers,
            )
            for s in self.eval_split_names
        ]
        return loaders[0] if len(loaders) == 1 else loaders


class GLUEDataModule(TextClassificationDataModule):
    """One of the eight GLUE tasks, from a local folder in the GLUE layout or from the hub.

    Args:
        task: ``cola``, ``sst2``, ``mrpc``, ``stsb``, ``qqp``, ``mnli``, ``qnli`` or ``rte``.
        data_dir: the GLUE root folder (with ``SST-2/train.tsv`` ...) or the task folder. When
            ``None`` the task is loaded from the Hugging Face hub (``nyu-mll/glue``) via ``datasets``;
            offline without a cached copy that fails with a message asking for ``data_dir``.
        model_name_or_path, max_length, batch_size, eval_batch_size, num_workers,
        max_train_samples, max_eval_samples, seed, cache_dir: as in
            :class:`TextClassificationDataModule`.

    MNLI has two validation dataloaders, matched then mismatched.
    """

    def __init__(
        self,
        task: str,
        data_dir: str | None = None,
        model_name_or_path: str = DEFAULT_MODEL,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 42,
        cache_dir: str | None = None,
    ) -> None:
        self.task: GLUETask = get_task(task)
        super().__init__(
            text_columns=self.task.text_columns,
            label_column=self.task.label_column,
            label_list=list(self.task.label_names) if self.task.label_names else None,
            is_regression=self.task.is_regression,
            model_name_or_path=model_name_or_path,
            max_length=max_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_train_samples=max_train_samples,
            max_eval_samples=max_eval_samples,
            seed=seed,
            cache_dir=cache_dir,
        )
        self.data_dir = data_dir
        self.task_name = self.task.name
        self._files: dict[str, Path] | None = None
        if data_dir is not None:  # fail early on a wrong folder
            self._files = glue_split_files(resolve_task_dir(data_dir, self.task), self.task)

    @property
    def eval_split_names(self) -> list[str]:
        """``["val"]``, or ``["val_matched", "val_mismatched"]`` for MNLI."""
        return list(self.task.eval_splits)

    def _split_source(self, split: str) -> str:
        if self._files is not None:
            files = sorted(file_fingerprint(p) for p in self._files.values())
            return json.dumps(["glue-local", self.task.name, split, files])
        return json.dumps(["glue-hub", self.task.name, self._hub_split(split)])

    def _hub_split(self, split: str) -> str:
        return "train" if split == "train" else self.task.eval_splits[split][1]

    def _read_split(self, split: str):
        if self._files is not None:
            return read_glue_split(self._files, split, self.task)
        return read_hub_split(self.task, self._hub_split(split))


def _label_key(y: Any) -> str:
    if isinstance(y, float) and y.is_integer():
        y = int(y)
    return str(y).strip()


def _sorted_labels(raw: Sequence[Any]) -> list[str]:
    keys = sorted({_label_key(y) for y in raw})
    try:
        return sorted(keys, key=float)
    except ValueError:
        return keys
