"""Real Lightning runs on tokenized pbmc68k_reduced (real cells, real gc30M dictionaries)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "geneformer"
pytestmark = pytest.mark.skipif(
    not (SHARED / "gc30M").is_dir(),
    reason=f"Geneformer dictionaries not found at {SHARED} (shared data folder missing)",
)
CONFIG = SHARED / "configs" / "gf-6L-30M-i2048_config.json"
SMALL = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids oversubscribing the shared 2 cores (10x faster here)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cells():
    from bio.data import BUILTIN_PBMC, load_cells

    return load_cells(
        h5ad=BUILTIN_PBMC, dictionary_dir=str(SHARED / "gc30M"), obs_columns=["bulk_labels", "phase"], progress=False
    )


def _trainer(tmp_path, epochs, **kw):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=5,
        **kw,
    )


def test_group_aware_split_keeps_individuals_apart(cells):
    from bio.data import CellClassificationDataModule

    donors = [f"donor{i % 9}" for i in range(len(cells))]  # synthetic donors (pbmc68k has none)
    ds = cells.add_column("individual", donors)
    dm = CellClassificationDataModule.from_dataset(
        ds, label_column="bulk_labels", group_column="individual", val_fraction=0.2, test_fraction=0.2
    )
    g = dm.split_groups
    assert not (set(g["train"]) & set(g["val"])) and not (set(g["train"]) & set(g["test"]))
    assert not (set(g["val"]) & set(g["test"]))
    assert sum(len(s) for s in dm.splits.values()) == len(ds)
    plain = CellClassificationDataModule.from_dataset(cells, label_column="bulk_labels", group_column=None)
    for split in plain.splits.values():  # stratified: every class (smallest has 8 cells) in every split
        assert len(set(split["label"])) == 10


def test_bad_columns_and_rare_classes_are_reported(cells):
    from bio.data import CellClassificationDataModule

    with pytest.raises(ValueError, match="label_column='disease'"):
        CellClassificationDataModule.from_dataset(cells, label_column="disease", group_column=None).setup()
    with pytest.raises(ValueError, match="group_column='individual'.*group_column: null"):
        CellClassificationDataModule.from_dataset(cells, label_column="bulk_labels").setup()
    with pytest.raises(ValueError, match=r"fewer than 20 cells.*CD34\+"):
        CellClassificationDataModule.from_dataset(
            cells, label_column="bulk_labels", group_column=None, min_cells_per_class=20
        ).setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = CellClassificationDataModule.from_dataset(
            cells, label_column="bulk_labels", group_column=None, min_cells_per_class=20, drop_rare_classes=True
        )
        assert dm.num_labels == 7 and "CD34+" not in dm.label_names


@pytest.mark.slow
def test_finetune_adarankgrad_beats_majority_baseline(cells, tmp_path):
    import lightning as L

    from bio import CellClassificationDataModule, GeneformerClassifier
    from lightning_adarank import AdaRankGrad

    L.seed_everything(0, verbose=False)
    dm = CellClassificationDataModule.from_dataset(
        cells, label_column="bulk_labels", group_column=None, batch_size=32, max_length=64, seed=0
    )
    model = GeneformerClassifier(
        dm.label_names,
        model_config=str(CONFIG),
        config_overrides=SMALL,
        optimizer="adarankgrad",
        rank=16,
        lr=3e-3,
        warmup_steps=5,
    )
    # lr 3e-3: the update no longer shrinks with √(r/s) (issue 12); the old 1e-2 took steps √(16/128) ≈ 0.35× as big
    trainer = _trainer(tmp_path, 3)
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    baseline = dm.majority_baseline("test")
    assert isinstance(trainer.optimizers[0], AdaRankGrad)
    assert result["test/f1_macro"] > baseline["macro_f1"] + 0.05, (result, baseline)
    assert len(model.history) == 3  # per-epoch validation metrics
    cm = np.asarray(model.confusion_matrices["test"])
    assert cm.shape == (10, 10) and cm.sum() == len(dm.splits["test"])
    # label mapping travels with the exported model
    export = model.save_pretrained(tmp_path / "hf")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(export).id2label[0] == dm.label_names[0]


@pytest.mark.slow
def test_mlm_pretraining_lowers_loss_and_loads_into_classifier(cells, tmp_path):
    import lightning as L
    import torch

    from bio import GeneformerClassifier, GeneformerPretrainer, MaskedGeneDataModule

    L.seed_everything(0, verbose=False)
    sub = cells.select(range(320))
    dm = MaskedGeneDataModule.from_dataset(
        sub, dictionary_dir=str(SHARED / "gc30M"), batch_size=32, max_length=48, val_fraction=0.0
    )
    model = GeneformerPretrainer(
        model_config=str(CONFIG),
        config_overrides=SMALL,
        optimizer="adarankgrad",
        lr=3e-3,
        save_dir=str(tmp_path / "pre"),
        rank_monitor=False,
        memory_monitor=False,
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    masked = batch["labels"] != -100
    assert 0.08 < masked.float()[batch["attention_mask"].bool()].mean() < 0.25  # ~15% of genes
    with torch.no_grad():
        before = float(model(**batch))
    trainer = _trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    with torch.no_grad():
        after = float(model(**batch))
    assert after < before - 0.5, (before, after)
    clf = GeneformerClassifier(["a", "b"], pretrained=str(tmp_path / "pre"), optimizer="adamw")
    emb = clf.model.bert.embeddings.word_embeddings.weight
    assert torch.equal(emb, model.model.bert.embeddings.word_embeddings.weight)


@pytest.mark.slow
def test_cli_fit_links_labels_tests_and_exports(tmp_path):
    import json

    from bio.cli import main

    main(
        [
            "fit",
            "--data.h5ad",
            "scanpy:pbmc68k_reduced",
            "--data.dictionary_dir",
            str(SHARED / "gc30M"),
            "--data.label_column",
            "bulk_labels",
            "--data.group_column",
            "null",
            "--data.max_length",
            "32",
            "--data.batch_size",
            "32",
            "--model.model_config",
            str(CONFIG),
            "--model.config_overrides",
            json.dumps(SMALL),
            "--model.optimizer",
            "galore",
            "--model.lr",
            "1e-2",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "4",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    run = tmp_path / "lightning_logs" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["label_names"]) == 10 and "test/f1_macro" in summary["test"]
    exported = json.loads((run / "hf_model" / "config.json").read_text())
    assert list(exported["id2label"].values()) == summary["label_names"]
    assert (run / "config.yaml").exists()
