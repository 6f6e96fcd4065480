"""``python -m nlp export-lora`` and ``python -m bio export-lora``: a real Lightning fine-tune's checkpoint, the
CLI in a subprocess, the adapter loaded with peft on a fresh base reproduces the fine-tuned classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from sst2_minilm import SST2, minilm_path, needs_sst2

REPO = Path(__file__).resolve().parents[1]
peft = pytest.importorskip("peft")
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _cli(package: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", package, "export-lora", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _summary(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_sst2
@pytest.mark.slow
def test_nlp_export_lora_cli(tmp_path):
    import lightning as L

    from nlp import GLUEDataModule, GLUETransformer

    path = minilm_path()
    L.seed_everything(0)
    dm = GLUEDataModule(
        "sst2",
        data_dir=str(SST2.parent),
        model_name_or_path=path,
        max_length=24,
        batch_size=8,
        eval_batch_size=32,
        max_train_samples=48,
        max_eval_samples=32,
        cache_dir=str(tmp_path / "c"),
    )
    model = GLUETransformer(path, task="sst2", optimizer="adarankgrad", learning_rate=1e-4, rank=4)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, **QUIET)
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    out = tmp_path / "adapter"
    summary = _summary(_cli("nlp", "--ckpt", str(ckpt), "--energy", "0.999", "--out", str(out)))
    assert summary["total_rank"] > 0 and summary["rel_error"] <= (1 - 0.999) ** 0.5 + 1e-4
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer_config.json").is_file()

    from nlp.hub import load_classifier

    torch.manual_seed(7)
    loaded = peft.PeftModel.from_pretrained(load_classifier(path, 2), str(out)).eval()
    tuned = model.model.eval()
    batch = next(iter(dm.val_dataloader()))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        lt, la = tuned(**batch).logits, loaded(**batch).logits
    assert float((la - lt).norm() / lt.norm()) < 0.05
    assert torch.equal(la.argmax(-1), lt.argmax(-1))


@pytest.mark.slow
def test_bio_export_lora_cli(tmp_path):
    import lightning as L
    from transformers import BertConfig, BertForMaskedLM

    from bio.model import GeneformerClassifier

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=32,
    )
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "pre")
    module = GeneformerClassifier(
        ["a", "b"],
        pretrained=str(tmp_path / "pre"),
        optimizer="adarankgrad",
        lr=1e-3,
        rank=4,
        rank_monitor=False,
        memory_monitor=False,
    )
    ids = torch.randint(1, 64, (32, 16))
    labels = (ids[:, 0] > 32).long()
    data = [
        {"input_ids": ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": labels[i]}
        for i in range(32)
    ]
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, **QUIET)
    trainer.fit(module, train_dataloaders=loader)
    ckpt = tmp_path / "cells.ckpt"
    trainer.save_checkpoint(ckpt)

    out = tmp_path / "adapter"
    summary = _summary(_cli("bio", "--ckpt", str(ckpt), "--energy", "0.999", "--out", str(out)))
    assert summary["total_rank"] > 0
    assert json.loads((out / "label_mapping.json").read_text())["label_names"] == ["a", "b"]

    from transformers import BertForSequenceClassification

    torch.manual_seed(7)
    fresh = BertForSequenceClassification.from_pretrained(tmp_path / "pre", num_labels=2)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        lt = module.model.eval()(input_ids=ids).logits
        la = loaded(input_ids=ids).logits
    assert float((la - lt).norm() / lt.norm()) < 0.05

    # a classifier trained from scratch has no base to be relative to: refused with a clear message
    scratch = GeneformerClassifier(
        ["a", "b"], model_config=cfg.to_dict(), optimizer="adarankgrad", rank_monitor=False, memory_monitor=False
    )
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **QUIET)
    trainer.fit(scratch, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "scratch.ckpt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bio",
            "export-lora",
            "--ckpt",
            str(tmp_path / "scratch.ckpt"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode != 0 and "trained from scratch" in proc.stderr
