"""Tokenizer checks against an independent, per-cell computation on real pbmc68k_reduced cells with
the real Geneformer dictionaries (../shared/data/geneformer)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer"
pytestmark = pytest.mark.skipif(
    not (SHARED / "gc30M").is_dir(),
    reason=f"Geneformer dictionaries not found at {SHARED} (shared data folder missing)",
)

sc = pytest.importorskip("scanpy")


class _NumpyOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if name in ("scalar", "dtype") and module.startswith("numpy"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(name)


def _load(path):
    with open(path, "rb") as fh:
        return _NumpyOnly(fh).load()


@pytest.fixture(scope="module")
def pbmc():
    return sc.datasets.pbmc68k_reduced()


def _reference(adata, folder: Path, tag: str, max_genes: int, n_cells: int):
    """Straightforward per-cell rank-value encoding (dense, Python sort), independent of bio/."""
    tokens = {str(k): int(v) for k, v in _load(folder / f"token_dictionary_{tag}.pkl").items()}
    medians = {str(k): float(v) for k, v in _load(folder / f"gene_median_dictionary_{tag}.pkl").items()}
    names = {str(k): str(v) for k, v in _load(folder / f"gene_name_id_dict_{tag}.pkl").items()}
    counts = np.expm1(adata.raw.X[:n_cells].toarray().astype(np.float64))
    symbols = list(adata.raw.var_names)
    out = []
    for row in counts:
        total = row.sum()
        scored = []
        for j, sym in enumerate(symbols):
            gid = names.get(sym)
            if gid in tokens and gid in medians and row[j] > 0:
                scored.append((-(row[j] / total * 10_000 / medians[gid]), j, tokens[gid]))
        scored.sort()
        out.append([t for _, _, t in scored][:max_genes])
    return out


def test_rank_value_encoding_matches_independent_computation(pbmc):
    from bio import tokenize_anndata_with_report

    ds, report = tokenize_anndata_with_report(
        pbmc, SHARED / "gc30M", counts="raw", undo_log1p=True, obs_columns=["bulk_labels"], progress=False
    )
    assert len(ds) == 700
    assert 650 <= report.n_genes_matched <= 765  # "about 690" symbols map through gene_name_id_dict
    ref = _reference(pbmc, SHARED / "gc30M", "gc30M", 2048, 40)
    for i in range(40):
        got = ds[i]["input_ids"]
        assert got == ref[i], f"cell {i}: first tokens {got[:5]} vs {ref[i][:5]}"
        assert ds[i]["length"] == len(ref[i])
    assert ds["bulk_labels"][:5] == list(pbmc.obs["bulk_labels"].astype(str)[:5])
    # the pad/mask ids never appear inside a cell
    assert min(min(x) for x in ds["input_ids"]) >= 2


def test_truncation_and_dense_input_agree(pbmc):
    from bio import tokenize_anndata

    dense = pbmc.raw.to_adata()
    dense.X = np.expm1(dense.X.toarray())  # dense, non-integer normalised counts (accepted: max > 30)
    ds = tokenize_anndata(dense, SHARED / "gc30M", model_input_size=64, progress=False, chunk_size=97)
    ref = _reference(pbmc, SHARED / "gc30M", "gc30M", 64, 25)
    assert [ds[i]["input_ids"] for i in range(25)] == ref
    assert max(ds["length"]) == 64


def test_ensembl_ids_in_var_column_give_same_tokens(pbmc):
    from bio import load_dictionaries, tokenize_anndata

    d = load_dictionaries(SHARED / "gc30M")
    ad = pbmc.raw.to_adata()
    ad.X = sp.csr_matrix(np.expm1(ad.X.toarray()))
    ad.var["ensembl"] = [d.gene_name_id.get(s, "none") + ".7" for s in ad.var_names]  # versioned IDs
    by_id = tokenize_anndata(ad, d, gene_id_column="ensembl", progress=False)
    by_symbol = tokenize_anndata(ad, d, progress=False)
    assert by_id["input_ids"] == by_symbol["input_ids"]


def test_gc95m_special_tokens_and_truncation(pbmc):
    from bio import load_dictionaries, tokenize_anndata

    d = load_dictionaries(SHARED / "gc95M")
    cls_id, eos_id = d.token_dict["<cls>"], d.token_dict["<eos>"]
    ds = tokenize_anndata(
        pbmc, d, counts="raw", undo_log1p=True, special_tokens=True, model_input_size=100, progress=False
    )
    full = tokenize_anndata(
        pbmc, d, counts="raw", undo_log1p=True, special_tokens=True, model_input_size=4096, progress=False
    )
    for i in range(20):
        ids, ids_full = ds[i]["input_ids"], full[i]["input_ids"]
        assert ids[0] == cls_id and ids[-1] == eos_id and ids_full[0] == cls_id and ids_full[-1] == eos_id
        assert ds[i]["length"] == len(ids) == min(len(ids_full) - 2, 98) + 2
        assert ids[1:-1] == ids_full[1 : len(ids) - 1]  # truncation keeps the top-ranked genes
    with pytest.raises(ValueError, match="no <cls>/<eos>"):
        tokenize_anndata(pbmc, SHARED / "gc30M", counts="raw", undo_log1p=True, special_tokens=True, progress=False)


def test_bad_inputs_have_clear_messages(pbmc):
    from bio import tokenize_anndata

    with pytest.raises(ValueError, match="negative values"):
        tokenize_anndata(pbmc, SHARED / "gc30M", progress=False)  # .X is z-scored
    with pytest.raises(ValueError, match="log-transformed"):
        tokenize_anndata(pbmc, SHARED / "gc30M", counts="raw", progress=False)
    nomatch = pbmc.raw.to_adata()
    nomatch.X = np.expm1(nomatch.X.toarray())
    nomatch.var_names = [f"gene{i}" for i in range(nomatch.n_vars)]
    with pytest.raises(ValueError, match="none of the 765 genes"):
        tokenize_anndata(nomatch, SHARED / "gc30M", progress=False)
    empty = pbmc.raw.to_adata()
    x = np.expm1(empty.X.toarray())
    x[:3] = 0
    empty.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match="3 cells have no counts"):
        tokenize_anndata(empty, SHARED / "gc30M", on_empty="error", progress=False)
    assert len(tokenize_anndata(empty, SHARED / "gc30M", progress=False)) == 697
    with pytest.raises(ValueError, match="obs column"):
        tokenize_anndata(empty, SHARED / "gc30M", obs_columns=["donor"], progress=False)
    with pytest.raises(FileNotFoundError):
        tokenize_anndata(empty, SHARED / "nope", progress=False)
