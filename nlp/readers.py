"""Readers that turn GLUE folders, hub datasets and users' own files into plain records.

A record is ``{"text_a": str, "label": int | float}`` plus ``"text_b"`` for sentence pairs.
Labels are already label ids (classification) or floats (regression), and every reader checks
them against the allowed set so bad data fails here with the file and line, not as a CUDA assert
or a silent NaN later.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlp.tasks import GLUETask

__all__ = [
    "DataError",
    "resolve_task_dir",
    "glue_split_files",
    "read_glue_file",
    "read_glue_split",
    "read_hub_split",
    "read_table",
    "file_fingerprint",
]

log = logging.getLogger(__name__)

# Some GLUE fields (QQP, MNLI) are longer than csv's default 128 KiB limit.
csv.field_size_limit(min(2**31 - 1, 2**63 - 1))


class DataError(ValueError):
    """Bad or missing input data (file, column or label); the message says what and where."""


def resolve_task_dir(data_dir: str | os.PathLike, task: GLUETask) -> Path:
    """Find the task's folder under ``data_dir``.

    ``data_dir`` may be the GLUE root (containing ``SST-2/``, ``CoLA/`` ...; the hub-style
    lower-case names ``sst2/`` also work) or the task folder itself.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data_dir {str(root)!r} does not exist or is not a folder.")
    candidates = [root / task.dir_name, root / task.name, root / task.dir_name.lower(), root]
    for cand in candidates:
        if (cand / "train.tsv").is_file() or (cand / "msr_paraphrase_train.txt").is_file():
            return cand
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"No GLUE {task.dir_name} files found: looked for train.tsv in {looked}. "
        f"data_dir should be the GLUE root (with a {task.dir_name}/ folder in the layout "
        "download_glue_data.py writes) or the task folder itself."
    )


def glue_split_files(task_dir: Path, task: GLUETask) -> dict[str, Path]:
    """Map ``"train"`` and each eval split name to its file in ``task_dir``, checking they exist."""
    files = {"train": task_dir / "train.tsv"}
    for split, (fname, _hub) in task.eval_splits.items():
        files[split] = task_dir / fname
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing and task.name == "mrpc" and (task_dir / "msr_paraphrase_train.txt").is_file():
        # Raw MSR release: train/dev are carved out of msr_paraphrase_train.txt by dev_ids.tsv.
        return {"train": task_dir / "msr_paraphrase_train.txt", "val": task_dir / "dev_ids.tsv"}
    if missing:
        raise DataError(f"Missing GLUE {task.dir_name} file(s): {', '.join(missing)}.")
    return files


def _label_to_id(value: str, task: GLUETask, where: str) -> int | float:
    value = value.strip()
    if task.is_regression:
        try:
            x = float(value)
        except ValueError:
            raise DataError(f"{where}: label {value!r} is not a number ({task.name} is a regression task).") from None
        lo, hi = task.regression_range or (-math.inf, math.inf)
        if not (lo <= x <= hi) or math.isnan(x):
            raise DataError(f"{where}: score {x} outside {task.name}'s range [{lo}, {hi}].")
        return x
    assert task.file_label_values is not None
    if value not in task.file_label_values:
        raise DataError(f"{where}: label {value!r} is not one of {task.name}'s labels {list(task.file_label_values)}.")
    return task.file_label_values.index(value)


def _read_tsv_rows(path: Path) -> list[list[str]]:
    # utf-8-sig strips MRPC's BOM; QUOTE_NONE because RTE/STS-B/MNLI contain unbalanced quotes.
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def read_glue_file(path: str | os.PathLike, task: GLUETask, keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read one GLUE ``.tsv`` file (original layout and quirks) into records.

    Rows with too few fields (a handful of malformed lines in QQP) are skipped with a warning.
    ``keep`` names extra columns to copy into each record (used for MRPC's id columns).
    """
    path = Path(path)
    rows = _read_tsv_rows(path)
    if task.header:
        if not rows:
            raise DataError(f"{path} is empty.")
        header, body, first_line = [h.strip() for h in rows[0]], rows[1:], 2
    else:
        header, body, first_line = list(task.columns or ()), rows, 1
    wanted = [*task.text_columns, task.label_column, *keep]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the header has {header}.")
    idx = [header.index(c) for c in wanted]
    need = max(idx) + 1
    records, skipped = [], 0
    for lineno, row in enumerate(body, start=first_line):
        if len(row) < need or not any(row):
            skipped += 1
            continue
        texts = [row[i] for i in idx[: len(task.text_columns)]]
        rec: dict[str, Any] = {"text_a": texts[0]}
        if task.is_pair:
            rec["text_b"] = texts[1]
        rec["label"] = _label_to_id(row[idx[len(task.text_columns)]], task, f"{path}:{lineno}")
        for name, i in zip(keep, idx[len(task.text_columns) + 1 :]):
            rec[name] = row[i]
        records.append(rec)
    if skipped:
        log.warning("%s: skipped %d malformed line(s) with fewer than %d fields.", path, skipped, need)
    if not records:
        raise DataError(f"{path}: no usable rows.")
    return records


def read_glue_split(files: dict[str, Path], split: str, task: GLUETask) -> list[dict[str, Any]]:
    """Read ``split`` from the files :func:`glue_split_files` returned (handles raw MRPC)."""
    if files["train"].name != "msr_paraphrase_train.txt":
        return read_glue_file(files[split], task)
    # Raw MRPC: split msr_paraphrase_train.txt by the (id1, id2) pairs listed in dev_ids.tsv.
    dev_ids = {tuple(r[:2]) for r in _read_tsv_rows(files["val"]) if len(r) >= 2}
    recs = read_glue_file(files["train"], task, keep=("#1 ID", "#2 ID"))
    out = []
    for r in recs:
        is_dev = (r.pop("#1 ID"), r.pop("#2 ID")) in dev_ids
        if is_dev == (split != "train"):
            out.append(r)
    return out


def read_hub_split(task: GLUETask, hub_split: str, cache_dir: str | None = None):
    """Load one split of ``nyu-mll/glue`` through ``datasets`` and rename its columns.

    Returns a ``datasets.Dataset`` with ``text_a`` (``text_b``) and ``label``. Raises
    :class:`DataError` telling the user to pass ``data_dir`` when the hub cannot be reached
    (offline, ``HF_HUB_OFFLINE=1``, and no cached copy).
    """
    import datasets
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    try:
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=hub_split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any failure here has the same remedy
        why = "you are offline (HF_HUB_OFFLINE=1) and it is not in the local datasets cache" if offline else str(err)
        raise DataError(
            f"Could not load GLUE {task.name!r} ({hub_split}) from the Hugging Face hub: {why}. "
            f"Pass data_dir=<folder in the GLUE layout, with {task.dir_name}/train.tsv> "
            "(e.g. --data.init_args.data_dir /path/to/glue) to read local files instead."
        ) from err
    rename = {src: dst for src, dst in zip(task.hub_text_columns, ("text_a", "text_b"))}
    ds = ds.rename_columns(rename)
    keep = ["text_a", "text_b", "label"] if task.is_pair else ["text_a", "label"]
    return ds.remove_columns([c for c in ds.column_names if c not in keep])


def read_table(
    path: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str,
    *,
    delimiter: str | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Read a user's CSV / TSV / JSON / JSON-lines file.

    Returns ``(records_without_label_ids, raw_labels)``: texts are mapped to ``text_a``/``text_b``;
    raw labels are returned as read so the caller can map them to ids.
    """
    import pandas as pd

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Data file {str(path)!r} not found.")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        lines = suffix == ".jsonl" or _looks_like_jsonl(path)
        df = pd.read_json(path, lines=lines, dtype=False)
    elif suffix in (".csv", ".tsv", ".txt"):
        sep = delimiter or ("\t" if suffix in (".tsv", ".txt") else ",")
        quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
        df = pd.read_csv(path, sep=sep, quoting=quoting, keep_default_na=False, dtype=str, encoding="utf-8-sig")
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv, .json or .jsonl.")
    if len(text_columns) not in (1, 2):
        raise DataError(f"text_columns must name one or two columns, got {list(text_columns)}.")
    missing = [c for c in (*text_columns, label_column) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; available columns: {list(df.columns)}.")
    recs: list[dict[str, Any]] = []
    cols = [df[c].astype(str).tolist() for c in text_columns]
    for i in range(len(df)):
        rec = {"text_a": cols[0][i]}
        if len(cols) == 2:
            rec["text_b"] = cols[1][i]
        recs.append(rec)
    return recs, df[label_column].tolist()


def _looks_like_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return not head.startswith("[")


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a file's current contents: absolute path, size and mtime."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
