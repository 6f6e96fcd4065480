"""Train/validation/test splits of cells: stratified by label, and group-aware (no donor in two splits)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["split_indices"]


def _stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, rng: np.random.Generator):
    train, val, test = [], [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = max(1, round(len(idx) * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(len(idx) * val_fraction)) if val_fraction > 0 else 0
        test.extend(idx[:n_test])
        val.extend(idx[n_test : n_test + n_val])
        train.extend(idx[n_test + n_val :])
    return np.sort(train), np.sort(val), np.sort(test)


def _group_fold(labels, groups, fraction, seed, what):
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    n_splits = max(2, round(1.0 / fraction))
    if n_groups < n_splits:
        n_splits = n_groups
    if n_splits < 2:
        raise ValueError(f"only {n_groups} group(s) left; cannot hold out a {what} split by group")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" warnings: reported below
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        rest, held = next(folds.split(np.zeros(len(labels)), labels, groups))
    return rest, held


def split_indices(
    labels: Sequence,
    groups: Sequence | None = None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 42,
    val_groups: Sequence[str] | None = None,
    test_groups: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/val/test indices, stratified by label; with ``groups`` no group appears in two splits.

    Without groups every class gets at least one cell in each non-empty split. With groups the held-out
    groups are chosen by ``StratifiedGroupKFold`` (about ``fraction`` of the cells), or given explicitly
    by ``val_groups`` / ``test_groups`` (as Geneformer's cardiomyopathy example assigns individuals).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if groups is None:
        if val_groups or test_groups:
            raise ValueError("val_groups/test_groups need a group column")
        return _stratified_split(labels, val_fraction, test_fraction, rng)
    groups = np.asarray(groups).astype(str)
    all_idx = np.arange(len(labels))
    if test_groups is not None:
        test = all_idx[np.isin(groups, list(map(str, test_groups)))]
    elif test_fraction > 0:
        _, test = _group_fold(labels, groups, test_fraction, seed, "test")
    else:
        test = all_idx[:0]
    rest = np.setdiff1d(all_idx, test)
    if val_groups is not None:
        val = rest[np.isin(groups[rest], list(map(str, val_groups)))]
    elif val_fraction > 0:
        _, held = _group_fold(
            labels[rest], groups[rest], val_fraction / max(1e-9, 1 - test_fraction), seed + 1, "validation"
        )
        val = rest[held]
    else:
        val = all_idx[:0]
    train = np.setdiff1d(rest, val)
    for name, part in (("train", train), ("validation", val), ("test", test)):
        missing = sorted(set(labels.tolist()) - set(labels[part].tolist()))
        if len(part) and missing:
            warnings.warn(
                f"group-aware split: class(es) {missing} have no cells in the {name} split (too few groups)",
                stacklevel=2,
            )
    if len(train) == 0:
        raise ValueError("group-aware split left no training cells; lower val/test fractions or add groups")
    return np.sort(train), np.sort(val), np.sort(test)
