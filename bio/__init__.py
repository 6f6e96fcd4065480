"""Geneformer single-cell classification and pre-training with AdaRankGrad.

Public API:
    tokenize_anndata          rank-value encode an AnnData into a Geneformer-compatible datasets.Dataset
    load_dictionaries         Geneformer token / median / gene-name dictionaries (restricted unpickler)
    CellClassificationDataModule, GeneformerClassifier          fine-tuning (LightningDataModule / Module)
    MaskedGeneDataModule, GeneformerPretrainer                  masked-gene pre-training
Command line: ``python -m bio tokenize|pretrain|fit|validate|test|demo``.
"""

from .data import CellClassificationDataModule, split_indices
from .dictionaries import GeneDictionaries, load_dictionaries
from .model import GeneformerClassifier
from .pretrain import GeneformerPretrainer
from .pretrain_data import MaskedGeneDataModule
from .tokenizer import TokenizationReport, tokenize_anndata, tokenize_anndata_with_report, tokenize_h5ad

__all__ = [
    "CellClassificationDataModule",
    "MaskedGeneDataModule",
    "GeneformerClassifier",
    "GeneformerPretrainer",
    "split_indices",
    "GeneDictionaries",
    "load_dictionaries",
    "TokenizationReport",
    "tokenize_anndata",
    "tokenize_anndata_with_report",
    "tokenize_h5ad",
]
