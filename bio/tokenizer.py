"""Geneformer rank-value encoding of single-cell transcriptomes, straight from AnnData.

For every cell: counts / the cell's total counts * ``target_sum`` / the gene's corpus median, drop zeros,
sort genes by that value (descending), map Ensembl IDs to token ids, truncate to the model input size
(2048 for the 30M models; 4094 plus ``<cls>`` ... ``<eos>`` for the 95M models).  This is the algorithm of
Geneformer's ``TranscriptomeTokenizer``; the output columns (``input_ids``, ``length`` and metadata
columns) match Geneformer's tokenized ``.dataset`` folders, so either can feed the data modules.

The implementation is vectorized and sparse-aware: cells are processed in chunks of CSR rows; gene
selection (and summing of duplicate genes that map to the same Ensembl ID) is one sparse matrix product,
normalisation is row/column scaling, and the per-cell ranking is a single ``lexsort`` over the non-zeros
of the chunk. Ties (equal normalised values within a cell) keep the genes' column order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.sparse as sp

from .dictionaries import CLS, EOS, GeneDictionaries, load_dictionaries

__all__ = [
    "tokenize_anndata",
    "tokenize_anndata_with_report",
    "tokenize_h5ad",
    "TokenizationReport",
    "map_genes",
    "counts_matrix",
]

log = logging.getLogger(__name__)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")


@dataclass
class TokenizationReport:
    """What the tokenizer did: gene matching, cells kept and dropped, lengths."""

    n_genes: int
    n_genes_matched: int
    n_tokens_used: int
    n_cells: int
    n_cells_kept: int
    n_cells_empty: int
    mean_length: float
    n_truncated: int
    counts_source: str
    unmatched_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pct = 100.0 * self.n_genes_matched / max(self.n_genes, 1)
        text = (
            f"matched {self.n_genes_matched}/{self.n_genes} genes ({pct:.1f}%) to {self.n_tokens_used} Geneformer tokens; "
            f"kept {self.n_cells_kept}/{self.n_cells} cells (dropped {self.n_cells_empty} empty); "
            f"mean length {self.mean_length:.1f}, {self.n_truncated} truncated; counts from {self.counts_source}"
        )
        if self.unmatched_examples:
            text += f"; unmatched e.g. {', '.join(self.unmatched_examples[:5])}"
        return text


def _as_csr(x) -> sp.csr_matrix:
    if sp.issparse(x):
        return x.tocsr() if not sp.isspmatrix_csr(x) else x
    # h5py / backed datasets and dense arrays
    return sp.csr_matrix(np.asarray(x))


def counts_matrix(adata, counts: str = "auto", undo_log1p: bool = False):
    """Pick the raw-count matrix of ``adata``: ``"X"``, ``"raw"`` (``adata.raw.X``), a layer name, or
    ``"auto"`` (layer ``"counts"`` if present, else ``X``). Returns ``(matrix, var_names_frame, source)``
    where ``var_names_frame`` is the ``var`` table aligned with the matrix columns."""
    if counts == "auto":
        counts = "counts" if "counts" in adata.layers else "X"
    if counts == "X":
        matrix, var, source = adata.X, adata.var, ".X"
    elif counts == "raw":
        if adata.raw is None:
            raise ValueError("counts='raw' but adata.raw is None; use counts='X' or a layer name")
        matrix, var, source = adata.raw.X, adata.raw.var, ".raw.X"
    elif counts in adata.layers:
        matrix, var, source = adata.layers[counts], adata.var, f".layers[{counts!r}]"
    else:
        raise ValueError(
            f"counts={counts!r} is neither 'auto', 'X', 'raw' nor a layer; layers are {list(adata.layers.keys())}"
        )
    if matrix is None:
        raise ValueError(f"adata{source} is empty")
    if undo_log1p:
        source = f"expm1({source})"
    return matrix, var, source


def _check_counts(sample: np.ndarray, source: str, undo_log1p: bool) -> None:
    """Refuse matrices that are not (possibly depth-normalised) counts: negative or log-scaled values."""
    if sample.size == 0:
        return
    if np.isnan(sample).any():
        raise ValueError(f"{source} contains NaN; Geneformer needs raw counts")
    vmin = float(sample.min())
    if vmin < 0:
        raise ValueError(
            f"{source} has negative values (min {vmin:.3g}): these are not counts (scaled / z-scored data?). "
            "Point `counts` at raw counts: a layer (counts='counts'), .X or .raw (counts='raw')."
        )
    if undo_log1p:
        return
    nonint = not np.allclose(sample, np.round(sample))
    vmax = float(sample.max())
    if nonint and vmax < 30:
        raise ValueError(
            f"{source} looks log-transformed (non-integer values, max {vmax:.3g}); Geneformer needs counts. "
            "Use raw counts (a 'counts' layer, or counts='raw' if adata.raw holds counts), or pass "
            "undo_log1p=True to use expm1 of these values (valid for log1p of counts or of normalised counts)."
        )


def map_genes(gene_names: Sequence[str], dictionaries: GeneDictionaries):
    """Map gene identifiers (Ensembl IDs, with or without version, or gene symbols) to Geneformer genes.

    Returns ``(columns, targets, genes)``: for each matched column ``columns[i]`` of the matrix, the
    index ``targets[i]`` into ``genes`` (unique Ensembl IDs that have both a token and a median).
    Several columns may map to the same gene (their counts are summed, as Geneformer does).
    """
    tokens, medians = dictionaries.token_dict, dictionaries.gene_medians
    name_id, mapping = dictionaries.gene_name_id, dictionaries.ensembl_mapping
    columns, targets, genes, index = [], [], [], {}
    for col, raw_name in enumerate(gene_names):
        name = str(raw_name)
        gid = None
        if _ENSEMBL.match(name):
            cand = name.split(".")[0]
            gid = cand if cand in tokens else mapping.get(cand.upper())
        else:
            gid = name_id.get(name)
            if gid is None or gid not in tokens:
                gid = mapping.get(name.upper(), gid)
        if gid is None or gid not in tokens or gid not in medians:
            continue
        if gid not in index:
            index[gid] = len(genes)
            genes.append(gid)
        columns.append(col)
        targets.append(index[gid])
    return np.asarray(columns, dtype=np.int64), np.asarray(targets, dtype=np.int64), genes


def _obs_column(adata, name: str):
    values = adata.obs[name]
    if hasattr(values, "cat"):
        values = values.astype(str)
    return values.to_numpy()


def tokenize_anndata_with_report(
    adata,
    dictionary_dir: str | Path | GeneDictionaries,
    *,
    model_input_size: int = 2048,
    special_tokens: bool = False,
    counts: str = "auto",
    undo_log1p: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | Mapping[str, str] | None = None,
    n_counts_column: str | None = None,
    target_sum: float = 10_000.0,
    chunk_size: int = 4096,
    on_empty: Literal["drop", "error"] = "drop",
    progress: bool = True,
):
    """Like :func:`tokenize_anndata` but returns ``(dataset, TokenizationReport)``."""
    import datasets
    import pyarrow as pa
    from tqdm.auto import tqdm

    dicts = dictionary_dir if isinstance(dictionary_dir, GeneDictionaries) else load_dictionaries(dictionary_dir)
    if special_tokens and not dicts.has_special_tokens:
        raise ValueError(
            f"special_tokens=True but the token dictionary in {dicts.directory} has no {CLS}/{EOS} "
            "(the 30M dictionaries have none; use the gc95M dictionaries, or special_tokens=False)"
        )
    if dicts.has_special_tokens and not special_tokens:
        log.warning("the gc95M-style dictionary has <cls>/<eos>; Geneformer's 95M models expect special_tokens=True")
    body = model_input_size - 2 if special_tokens else model_input_size
    if body < 1:
        raise ValueError(f"model_input_size={model_input_size} is too small")

    matrix, var, source = counts_matrix(adata, counts, undo_log1p)
    if gene_id_column is None:
        names = list(map(str, var.index))
    else:
        if gene_id_column not in var.columns:
            raise ValueError(f"gene_id_column={gene_id_column!r} is not a column of var ({list(var.columns)})")
        names = list(map(str, var[gene_id_column]))
    columns, targets, genes = map_genes(names, dicts)
    n_cells, n_vars = adata.n_obs, len(names)
    if len(genes) == 0:
        raise ValueError(
            f"none of the {n_vars} genes (e.g. {', '.join(names[:5])}) matched the Geneformer dictionary in "
            f"{dicts.directory}. var names must be Ensembl IDs or gene symbols; set gene_id_column to the var "
            "column that holds them."
        )
    matched = np.zeros(n_vars, dtype=bool)
    matched[columns] = True
    unmatched = [names[i] for i in np.flatnonzero(~matched)[:10]]
    selector = sp.csr_matrix((np.ones(len(columns)), (columns, targets)), shape=(n_vars, len(genes)))
    inv_median = 1.0 / np.array([dicts.gene_medians[g] for g in genes], dtype=np.float64)
    token_ids = np.array([dicts.token_dict[g] for g in genes], dtype=np.int32)
    totals_obs = None
    if n_counts_column is not None:
        if n_counts_column not in adata.obs.columns:
            raise ValueError(f"n_counts_column={n_counts_column!r} is not a column of obs")
        totals_obs = adata.obs[n_counts_column].to_numpy(dtype=np.float64)

    meta: dict[str, str] = {}
    if obs_columns:
        meta = dict(obs_columns) if isinstance(obs_columns, Mapping) else {c: c for c in obs_columns}
        missing = [c for c in meta if c not in adata.obs.columns]
        if missing:
            raise ValueError(f"obs column(s) {missing} not found; obs has {list(adata.obs.columns)}")

    list_chunks, length_chunks, keep_chunks = [], [], []
    n_truncated, checked = 0, False
    cls_id, eos_id = dicts.token_dict.get(CLS), dicts.token_dict.get(EOS)
    starts = range(0, n_cells, chunk_size)
    for start in tqdm(starts, desc="tokenizing cells", unit="chunk", disable=not progress, total=len(starts)):
        stop = min(start + chunk_size, n_cells)
        x = _as_csr(matrix[start:stop]).astype(np.float64)
        if not checked:
            _check_counts(x.data[:200_000], f"adata{source}" if not undo_log1p else source, undo_log1p)
            checked = True
        elif x.data.size and x.data.min() < 0:
            raise ValueError(f"adata{source} has negative values in cells {start}..{stop}: not counts")
        if undo_log1p:
            x.data = np.expm1(x.data)
        totals = totals_obs[start:stop] if totals_obs is not None else np.asarray(x.sum(axis=1)).ravel()
        sel = (x @ selector).tocsr()
        with np.errstate(divide="ignore", invalid="ignore"):
            row_scale = np.where(totals > 0, target_sum / totals, 0.0)
        sel = sp.diags(row_scale) @ sel @ sp.diags(inv_median)
        sel = sp.csr_matrix(sel)
        sel.eliminate_zeros()
        nnz_per_row = np.diff(sel.indptr)
        rows = np.repeat(np.arange(stop - start), nnz_per_row)
        order = np.lexsort((sel.indices, -sel.data, rows))  # by cell, then value desc, then column
        ranked = token_ids[sel.indices[order]]
        position = np.arange(ranked.size) - sel.indptr[rows]
        ranked = ranked[position < body]
        lengths = np.minimum(nnz_per_row, body)
        n_truncated += int((nnz_per_row > body).sum())
        keep = lengths > 0
        if special_tokens:
            kept_rows = rows[position < body]
            pos = position[position < body]
            out_len = lengths + 2
            offsets = np.concatenate([[0], np.cumsum(out_len)])
            out = np.empty(int(offsets[-1]), dtype=np.int32)
            out[offsets[:-1]] = cls_id
            out[offsets[1:] - 1] = eos_id
            out[offsets[kept_rows] + 1 + pos] = ranked
            ranked, lengths = out, out_len
        else:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
        lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ranked.astype(np.int32)))
        list_chunks.append(lists.filter(pa.array(keep)))
        length_chunks.append(lengths[keep].astype(np.int64))
        keep_chunks.append(keep)

    keep_all = np.concatenate(keep_chunks) if keep_chunks else np.zeros(0, dtype=bool)
    n_empty = int((~keep_all).sum())
    if n_empty and on_empty == "error":
        raise ValueError(
            f"{n_empty} cells have no counts in the {len(genes)} matched genes (empty cells); "
            "filter them (e.g. sc.pp.filter_cells(adata, min_genes=1)) or pass on_empty='drop'"
        )
    if n_empty == n_cells:
        raise ValueError(f"all {n_cells} cells are empty after gene matching; check the counts source ({source})")
    if n_empty:
        log.warning("dropped %d empty cells (no counts in matched genes)", n_empty)
    columns_out = {
        "input_ids": pa.chunked_array(list_chunks, type=pa.list_(pa.int32())),
        "length": pa.chunked_array([pa.array(c) for c in length_chunks], type=pa.int64()),
    }
    for obs_name, out_name in meta.items():
        values = _obs_column(adata, obs_name)[keep_all]
        columns_out[out_name] = pa.array(values.tolist())
    dataset = datasets.Dataset(pa.table(columns_out))
    lengths_all = np.concatenate(length_chunks)
    report = TokenizationReport(
        n_genes=n_vars,
        n_genes_matched=int(matched.sum()),
        n_tokens_used=len(genes),
        n_cells=n_cells,
        n_cells_kept=int(keep_all.sum()),
        n_cells_empty=n_empty,
        mean_length=float(lengths_all.mean()) if lengths_all.size else 0.0,
        n_truncated=n_truncated,
        counts_source=source,
        unmatched_examples=unmatched,
    )
    return dataset, report


def tokenize_anndata(
    adata,
    dictionary_dir: str | Path | GeneDictionaries,
    *,
    model_input_size: int = 2048,
    special_tokens: bool = False,
    counts: str = "auto",
    undo_log1p: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | Mapping[str, str] | None = None,
    n_counts_column: str | None = None,
    target_sum: float = 10_000.0,
    chunk_size: int = 4096,
    on_empty: Literal["drop", "error"] = "drop",
    progress: bool = True,
):
    """Rank-value encode the cells of ``adata`` into a Geneformer-compatible ``datasets.Dataset``.

    Args:
        adata: an ``AnnData`` (sparse or dense; cells x genes).
        dictionary_dir: folder with Geneformer's ``token_dictionary*.pkl``, ``gene_median_dictionary*.pkl``
            and ``gene_name_id_dict*.pkl`` (e.g. the gc30M folder), or loaded :class:`GeneDictionaries`.
        model_input_size: maximum number of tokens per cell (2048 for the 30M models, 4096 for 95M).
        special_tokens: add ``<cls>`` first and ``<eos>`` last (95M models; genes truncated to size - 2).
        counts: where the raw counts are: ``"auto"`` (layer ``counts`` if present, else ``X``), ``"X"``,
            ``"raw"`` or a layer name. Negative or log-scaled values raise a ``ValueError``.
        undo_log1p: apply ``expm1`` first (for data that only holds ``log1p`` of (normalised) counts;
            the per-cell normalisation makes the ranking identical to that of the counts).
        gene_id_column: ``var`` column with Ensembl IDs or symbols (default: ``var_names``). Symbols are
            mapped to Ensembl IDs with the gene-name dictionary.
        obs_columns: ``obs`` columns to keep (a list, or a mapping ``obs name -> output name``).
        n_counts_column: ``obs`` column with per-cell total counts (default: row sums of the matrix).
        target_sum: normalisation target (10,000 as in Geneformer).
        chunk_size: cells per vectorized chunk (one progress-bar step).
        on_empty: ``"drop"`` (with a warning) or ``"error"`` for cells without counts in matched genes.
        progress: show a tqdm progress bar.

    Returns:
        ``datasets.Dataset`` with ``input_ids`` (list of int32 token ids), ``length`` and the requested
        metadata columns. The gene-matching report is logged (see :func:`tokenize_anndata_with_report`).
    """
    dataset, report = tokenize_anndata_with_report(
        adata,
        dictionary_dir,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        counts=counts,
        undo_log1p=undo_log1p,
        gene_id_column=gene_id_column,
        obs_columns=obs_columns,
        n_counts_column=n_counts_column,
        target_sum=target_sum,
        chunk_size=chunk_size,
        on_empty=on_empty,
        progress=progress,
    )
    log.info(report.summary())
    return dataset


def tokenize_h5ad(
    h5ad: str | Path,
    dictionary_dir: str | Path,
    output_dir: str | Path,
    *,
    model_input_size: int = 2048,
    special_tokens: bool = False,
    counts: str = "auto",
    undo_log1p: bool = False,
    gene_id_column: str | None = None,
    obs_columns: list[str] | None = None,
    n_counts_column: str | None = None,
    chunk_size: int = 4096,
    on_empty: Literal["drop", "error"] = "drop",
) -> TokenizationReport:
    """Tokenize an ``.h5ad`` file and save the result as a Geneformer-style ``.dataset`` folder
    (``datasets.Dataset.save_to_disk``). Returns the :class:`TokenizationReport`."""
    import anndata

    adata = anndata.read_h5ad(h5ad)
    dataset, report = tokenize_anndata_with_report(
        adata,
        dictionary_dir,
        model_input_size=model_input_size,
        special_tokens=special_tokens,
        counts=counts,
        undo_log1p=undo_log1p,
        gene_id_column=gene_id_column,
        obs_columns=obs_columns,
        n_counts_column=n_counts_column,
        chunk_size=chunk_size,
        on_empty=on_empty,
    )
    dataset.save_to_disk(str(output_dir))
    return report
