"""Causal-LM pre-training (``nlp.pretrain``, ``nlp.lm_data``, ``python -m nlp pretrain``) on real SST-2 text."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "glue" / "SST-2"
CONFIGS = REPO / "nlp" / "configs" / "pretrain"
needs_sst2 = pytest.mark.skipif(
    not (SST2 / "train.tsv").is_file(), reason=f"SST-2 not found under {SST2} (../shared/data/glue next to the repo)"
)


def test_pack_tokens_is_the_concatenation_cut_in_blocks():
    from nlp.lm_data import pack_tokens

    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    blocks = list(pack_tokens(docs, 4, eos_id=0))
    stream = [t for d in docs for t in (*d, 0)]  # 15 tokens → 3 full blocks, tail of 3 dropped
    assert blocks == [stream[i : i + 4] for i in range(0, 12, 4)]


def test_read_documents_formats(tmp_path):
    from nlp.lm_data import read_documents

    (tmp_path / "a.txt").write_text("first line\n\n second \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    (tmp_path / "c.tsv").write_text("sentence\tlabel\nhello there\t1\nbye\t0\n")
    assert read_documents(tmp_path / "a.txt") == ["first line", "second"]
    assert read_documents(tmp_path / "b.jsonl") == ["x y", "z"]
    assert read_documents(tmp_path / "c.tsv", "sentence") == ["hello there", "bye"]
    with pytest.raises(KeyError, match="sentence"):
        read_documents(tmp_path / "b.jsonl", "sentence")
    with pytest.raises(FileNotFoundError):
        read_documents(tmp_path / "missing.txt")


def test_llama_presets_are_galores_sizes():
    """LLaMA-60M/130M/350M/1B built from config only: parameter counts of GaLore's models at vocab 32000."""
    from transformers import LlamaForCausalLM

    from nlp.pretrain import llama_config

    def count(name):
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(llama_config(32000, name)).parameters())

    assert 55e6 < count("llama_60m") < 62e6
    assert 125e6 < count("llama_130m") < 140e6


def test_shipped_configs_parse():
    from nlp.pretrain import LLAMA_PRESETS

    for size, steps in (("60m", 10000), ("130m", 20000), ("350m", 60000), ("1b", 100000)):
        cfg = yaml.safe_load((CONFIGS / f"llama_{size}.yaml").read_text())
        assert cfg["model"]["model"] in LLAMA_PRESETS
        assert cfg["trainer"]["max_steps"] == steps
        assert cfg["data"]["batch_size"] * cfg["trainer"]["accumulate_grad_batches"] == 512


def test_cosine_schedule():
    from nlp.pretrain import cosine_with_warmup

    assert cosine_with_warmup(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_with_warmup(100, 10, 100, 0.1) == pytest.approx(0.1)


@needs_sst2
@pytest.mark.slow
def test_cli_pretrain_perplexity_falls(tmp_path):
    """``python -m nlp pretrain fit``: a 3.3M-parameter LLaMA, 300 steps of 8-bit AdaRankGrad on SST-2's training
    sentences (BPE of 4,096 trained on them); validation perplexity on SST-2's dev sentences falls from about the
    vocabulary size (uniform logits at init) to under a fifth of it (measured: about a ninth), and the
    rank/memory monitors log."""
    from nlp.lm_data import PackedTextDataModule
    from nlp.pretrain import CausalLMPretrainer

    data = dict(
        train_files=[str(SST2 / "train.tsv")],
        val_files=[str(SST2 / "dev.tsv")],
        text_column="sentence",
        vocab_size=4096,
        block_size=32,
        batch_size=8,
        max_val_blocks=64,
    )
    config = {
        "trainer": {
            "max_steps": 300,
            "val_check_interval": 100,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 8,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 25,
            "enable_progress_bar": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
        },
        "model": {
            "model": "llama_tiny",
            "optimizer": "adarankgrad",
            "learning_rate": 0.005,
            "rank": 32,
            "warmup_steps": 30,
            "adarank": {"state_bits": 8},
        },
        "data": data,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "nlp", "pretrain", "fit", "--config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # perplexity at initialisation, on the same validation blocks (same seed → same weights as the CLI's model)
    dm = PackedTextDataModule(**data)
    model = CausalLMPretrainer(vocab_size=dm.vocab_size, model="llama_tiny").eval()
    with torch.no_grad():
        losses = [model(**b).loss for b in list(dm.val_dataloader())[:8]]
    start = math.exp(torch.stack(losses).mean().item())
    assert 0.5 * dm.vocab_size < start < 2 * dm.vocab_size

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    ppl = [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]
    assert len(ppl) == 3
    assert ppl[-1] < start / 5, (start, ppl)  # measured: ~4,100 → ~450
    assert ppl[-1] < ppl[0]
    cols = set(rows[0])
    assert {"adarank/avg_rank", "optimizer/state_bytes", "memory/peak_bytes", "train/loss"} <= cols
