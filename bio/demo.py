"""``python -m bio demo``: the real pipeline end to end, offline, in a few minutes on 2 CPU cores.

scanpy's bundled ``pbmc68k_reduced`` (700 real PBMCs; 10 cell types in ``bulk_labels``; counts recovered as
``expm1(.raw.X)``) is tokenized with Geneformer's gc30M dictionaries; a small Geneformer-architecture BERT
(the gf-6L-30M config shrunk to 2 layers; full 25,426-gene embedding table) is pre-trained briefly by
masked-gene modeling and then fine-tuned to classify the cell types, with AdaRankGrad (max rank 16; by the
default embedding rule the gene-embedding table gets dense Adam in both stages) and lightning_adarank's
``EffectiveRankMonitor`` and ``MemoryMonitor``.
pbmc68k has no donor column, so the split is a plain stratified one (the data module supports a group
column such as ``individual`` for real data).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

__all__ = ["main", "run_demo", "average_logged", "small_config_overrides", "default_config_path"]

REPO = Path(__file__).resolve().parents[1]


def default_config_path(dictionary_dir: Path) -> Path:
    """``gf-6L-30M-i2048_config.json`` next to the dictionary folder (``.../geneformer/configs``)."""
    return Path(dictionary_dir).parent / "configs" / "gf-6L-30M-i2048_config.json"


def small_config_overrides(hidden: int = 128, layers: int = 2, max_length: int = 256) -> dict:
    """A small Geneformer-architecture model (same vocab, activation, dropout as gf-6L-30M)."""
    return {
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": 4,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": max(max_length, 64),
    }


def average_logged(metrics_csv: str | Path, column: str) -> float | None:
    """Mean of a column of a CSVLogger ``metrics.csv`` (e.g. ``adarank/avg_rank``); ``None`` if never logged."""
    import csv

    path = Path(metrics_csv)
    if not path.exists():
        return None
    with open(path, newline="") as fh:
        values = [float(r[column]) for r in csv.DictReader(fh) if r.get(column)]
    return sum(values) / len(values) if values else None


def run_demo(
    dictionary_dir: str | Path | None = None,
    output_dir: str | Path = "demo_runs/bio",
    optimizer: str = "adarankgrad",
    rank: int = 16,
    max_length: int = 64,
    hidden: int = 128,
    pretrain_epochs: int = 1,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 1e-3,
    pretrain_lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run tokenize -> pre-train (MLM) -> fine-tune -> test; return a summary dict."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from .data import BUILTIN_PBMC, CellClassificationDataModule, default_dictionary_dir, load_cells
    from .model import GeneformerClassifier
    from .pretrain import GeneformerPretrainer
    from .pretrain_data import MaskedGeneDataModule

    dictionary_dir = Path(dictionary_dir) if dictionary_dir else default_dictionary_dir()
    if not dictionary_dir.is_dir():
        raise SystemExit(
            f"Geneformer dictionaries not found at {dictionary_dir}.\nThe demo needs the gc30M folder "
            "(token_dictionary_gc30M.pkl, gene_median_dictionary_gc30M.pkl, gene_name_id_dict_gc30M.pkl), e.g. "
            "Geneformer's geneformer/gene_dictionaries_30m; pass it with --dictionary-dir."
        )
    config = default_config_path(dictionary_dir)
    if not config.exists():
        raise SystemExit(f"model config not found: {config} (pass --model-config)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = small_config_overrides(hidden, 2, max_length)
    t0 = time.time()
    cells = load_cells(
        h5ad=BUILTIN_PBMC, dictionary_dir=str(dictionary_dir), obs_columns=["bulk_labels"], progress=progress
    )
    trainer_kw = dict(
        accelerator="cpu",
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )

    # 1) brief masked-gene pre-training on all cells (no labels used)
    L.seed_everything(seed, verbose=False)
    mlm_dm = MaskedGeneDataModule.from_dataset(
        cells,
        dictionary_dir=str(dictionary_dir),
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        val_fraction=0.0,
    )
    pre = GeneformerPretrainer(
        model_config=str(config),
        config_overrides=overrides,
        optimizer=optimizer,
        rank=rank,
        lr=pretrain_lr,
        warmup_steps=5,
        save_dir=str(out / "pretrained"),
        rank_monitor=False,
        memory_monitor=False,
    )
    pre_trainer = L.Trainer(
        max_epochs=pretrain_epochs, logger=CSVLogger(out, name="pretrain"), limit_val_batches=0, **trainer_kw
    )
    pre_trainer.fit(pre, datamodule=mlm_dm)
    mlm_loss = float(pre_trainer.callback_metrics.get("train/mlm_loss_epoch", float("nan")))

    # 2) fine-tune the cell-type classifier from the pre-trained weights
    L.seed_everything(seed, verbose=False)
    dm = CellClassificationDataModule.from_dataset(
        cells, label_column="bulk_labels", group_column=None, batch_size=batch_size, max_length=max_length, seed=seed
    )
    model = GeneformerClassifier(
        dm.label_names, pretrained=str(out / "pretrained"), optimizer=optimizer, rank=rank, lr=lr, warmup_steps=10
    )
    logger = CSVLogger(out, name="finetune")
    trainer = L.Trainer(max_epochs=epochs, logger=logger, **trainer_kw)
    trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    export = model.save_pretrained(Path(logger.log_dir) / "hf_model")
    rank_plot = None
    for cb in trainer.callbacks:
        if type(cb).__name__ == "EffectiveRankMonitor":
            path = cb.plot_path or Path(trainer.log_dir) / cb.plot_filename
            rank_plot = str(path) if Path(path).exists() else None
    from lightning_adarank import optimizer_state_bytes

    summary = {
        "cells": len(cells),
        "classes": len(dm.label_names),
        "split_sizes": {k: len(v) for k, v in dm.splits.items()},
        "optimizer": optimizer,
        "pretrain_mlm_loss": mlm_loss,
        "val_per_epoch": model.history,
        "test_macro_f1": test["test/f1_macro"],
        "test_accuracy": test["test/accuracy"],
        "majority_baseline": dm.majority_baseline("test"),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers[0]),
        "rank_plot": rank_plot,
        "avg_effective_rank": average_logged(Path(logger.log_dir) / "metrics.csv", "adarank/avg_rank"),
        "confusion_matrix_csv": str(Path(logger.log_dir) / f"confusion_test_epoch{model.current_epoch}.csv"),
        "metrics_csv": str(Path(logger.log_dir) / "metrics.csv"),
        "model_dir": str(export),
        "wall_s": round(time.time() - t0, 1),
    }
    (Path(logger.log_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    """``python -m bio demo [--dictionary-dir DIR] [--output-dir DIR] [--optimizer NAME] ...``"""
    p = argparse.ArgumentParser(
        prog="python -m bio demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dictionary-dir",
        default=None,
        help="Geneformer gc30M dictionary folder (default: <repo>/../shared/data/geneformer/gc30M)",
    )
    p.add_argument("--output-dir", default=str(REPO / "demo_runs" / "bio"))
    p.add_argument("--optimizer", default="adarankgrad", choices=["adarankgrad", "galore", "adamw"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="genes per cell (top-ranked) fed to the model")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (AdamW-sized updates)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is fastest for this tiny model on a shared 2-core machine)",
    )
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    s = run_demo(
        a.dictionary_dir,
        a.output_dir,
        a.optimizer,
        a.rank,
        a.max_length,
        a.hidden,
        a.pretrain_epochs,
        a.epochs,
        a.batch_size,
        a.lr,
        a.pretrain_lr,
        a.seed,
        not a.no_progress,
    )
    base = s["majority_baseline"]
    print("\n=== bio demo: Geneformer-architecture model on pbmc68k_reduced (bulk_labels) ===")
    print(f"cells {s['cells']}, classes {s['classes']}, splits {s['split_sizes']}, optimizer {s['optimizer']}")
    print(f"pre-training (masked genes) loss: {s['pretrain_mlm_loss']:.3f}")
    for h in s["val_per_epoch"]:
        print(f"  epoch {h['epoch']}: val macro-F1 {h['val/f1_macro']:.3f}  accuracy {h['val/accuracy']:.3f}")
    print(f"test macro-F1 {s['test_macro_f1']:.3f}  accuracy {s['test_accuracy']:.3f}")
    print(
        f"majority-class baseline ({base['class']}): macro-F1 {base['macro_f1']:.3f}  accuracy {base['accuracy']:.3f}"
    )
    print(f"optimizer state: {s['optimizer_state_bytes'] / 2**20:.2f} MiB")
    if s["avg_effective_rank"] is not None:
        print(f"average effective rank (parameter-weighted, max {a.rank}): {s['avg_effective_rank']:.2f}")
    print(f"rank plot: {s['rank_plot']}")
    print(f"confusion matrix: {s['confusion_matrix_csv']}")
    print(f"model: {s['model_dir']}   wall time {s['wall_s']} s")
    return s
