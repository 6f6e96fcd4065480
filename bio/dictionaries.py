"""Loading Geneformer's gene dictionaries (token ids, gene medians, symbol -> Ensembl ID).

The dictionaries are pickles of numpy scalars published with Geneformer (``ctheodoris/Geneformer``).
They are *not* shipped with this package: pass the folder that holds them (e.g. Geneformer's
``gene_dictionaries_30m`` folder, or ``shared/data/geneformer/gc30M`` in this project's checkout).
Pickles are read with a restricted unpickler that only accepts numpy scalar / dtype globals, so a
tampered file cannot execute code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GeneDictionaries", "load_dictionaries", "safe_load_pickle", "gene_tokenizer"]

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"


class _NumpyScalarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle global {module}.{name}: Geneformer dictionaries only contain numpy scalars"
        )


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle that may only reference numpy scalar/dtype globals."""
    with open(path, "rb") as fh:
        return _NumpyScalarUnpickler(fh).load()


def _find_one(directory: Path, stem: str) -> Path | None:
    hits = sorted(directory.glob(f"{stem}*.pkl"))
    return hits[0] if hits else None


@dataclass
class GeneDictionaries:
    """Geneformer's dictionaries for one model family (gc30M or gc95M).

    Attributes:
        token_dict: token string (Ensembl ID or special token) -> token id (plain ``int``).
        gene_medians: Ensembl ID -> non-zero median expression over the pre-training corpus.
        gene_name_id: gene symbol -> Ensembl ID.
        ensembl_mapping: optional upper-case symbol / Ensembl ID -> Ensembl ID (gc95M style).
        directory: where the files were found.
    """

    token_dict: dict[str, int]
    gene_medians: dict[str, float]
    gene_name_id: dict[str, str] = field(default_factory=dict)
    ensembl_mapping: dict[str, str] = field(default_factory=dict)
    directory: Path | None = None

    @property
    def pad_token_id(self) -> int:
        return self.token_dict[PAD]

    @property
    def mask_token_id(self) -> int:
        return self.token_dict[MASK]

    @property
    def has_special_tokens(self) -> bool:
        """True for dictionaries with ``<cls>``/``<eos>`` (the 95M models)."""
        return CLS in self.token_dict and EOS in self.token_dict

    @property
    def vocab_size(self) -> int:
        return max(self.token_dict.values()) + 1


def load_dictionaries(dictionary_dir: str | Path) -> GeneDictionaries:
    """Load Geneformer's token, gene-median, gene-name and (optional) Ensembl-mapping dictionaries.

    ``dictionary_dir`` must contain ``token_dictionary*.pkl`` and ``gene_median_dictionary*.pkl``;
    ``gene_name_id_dict*.pkl`` and ``ensembl_mapping_dict*.pkl`` are used when present.
    """
    directory = Path(dictionary_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Geneformer dictionary folder not found: {directory}. Pass the folder holding "
            "token_dictionary*.pkl and gene_median_dictionary*.pkl (e.g. Geneformer's gene_dictionaries_30m)."
        )
    token_path = _find_one(directory, "token_dictionary")
    median_path = _find_one(directory, "gene_median_dictionary")
    missing = [
        n for n, p in (("token_dictionary*.pkl", token_path), ("gene_median_dictionary*.pkl", median_path)) if p is None
    ]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {', '.join(missing)}")
    token_dict = {str(k): int(v) for k, v in safe_load_pickle(token_path).items()}
    gene_medians = {str(k): float(v) for k, v in safe_load_pickle(median_path).items()}
    name_path = _find_one(directory, "gene_name_id_dict")
    gene_name_id = {str(k): str(v) for k, v in safe_load_pickle(name_path).items()} if name_path else {}
    mapping_path = _find_one(directory, "ensembl_mapping_dict")
    ensembl_mapping = {str(k): str(v) for k, v in safe_load_pickle(mapping_path).items()} if mapping_path else {}
    if PAD not in token_dict or MASK not in token_dict:
        raise ValueError(f"{token_path} has no {PAD}/{MASK} entries; is it a Geneformer token dictionary?")
    return GeneDictionaries(token_dict, gene_medians, gene_name_id, ensembl_mapping, directory)


def gene_tokenizer(dictionaries: GeneDictionaries):
    """A ``PreTrainedTokenizerFast`` over the gene vocabulary (word-level, one token per Ensembl ID).

    Cells are already token ids, so it is only used for padding and by
    ``DataCollatorForLanguageModeling`` (which needs pad/mask ids, the vocabulary size and the
    special-token mask).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = dict(dictionaries.token_dict)
    specials = {PAD: "pad_token", MASK: "mask_token", CLS: "cls_token", EOS: "sep_token"}
    kwargs = {attr: tok for tok, attr in specials.items() if tok in vocab}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token=PAD))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, model_input_names=["input_ids", "attention_mask"], **kwargs)
    tok.model_max_length = 1_000_000
    return tok
