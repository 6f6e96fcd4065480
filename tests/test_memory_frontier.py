"""``benchmarks/memory_frontier.py`` and its memory model: the smoke run prints one JSON line per run with the
measurement and the model's prediction; the model's parameter count and AdaRankGrad state bytes agree with a real
model and a real optimizer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SST2 = REPO.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"

import memory_model  # noqa: E402

KEYS = (
    "model",
    "method",
    "params",
    "peak_bytes",
    "weights_bytes",
    "state_bytes",
    "grad_bytes_peak",
    "seconds_per_step",
    "loss_first",
    "loss_last",
)


@pytest.mark.skipif(not SST2.is_file(), reason=f"SST-2 not found at {SST2}")
def test_smoke_run_prints_measurement_and_prediction():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "memory_frontier.py"), "--model", "llama_tiny"]
    cmd += ["--method", "adarankgrad8_layerwise,adamw", "--steps", "1", "--seq", "64", "--threads", "1"]
    cmd += ["--runtime-bytes", "400000000"]  # no probe processes: the smoke run stays short
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [d["method"] for d in lines] == ["adarankgrad8_layerwise", "adamw"]
    for d in lines:
        assert all(k in d for k in KEYS), (set(KEYS) - set(d), d.get("error"))
        assert d["model"] == "llama_tiny" and d["params"] == d["weights_bytes"] // 2  # bf16 weights
        assert d["peak_bytes"] > d["baseline_bytes"] > 0 and d["predicted_bytes"] > 0
        assert set(d["predicted"]) == {"runtime", "weights", "gradients", "state", "activations", "workspace"}
        assert math.isfinite(d["loss_first"]) and math.isfinite(d["model_error"])
    lw, adamw = lines
    assert lw["grad_bytes_peak"] < adamw["grad_bytes_peak"] == adamw["weights_bytes"]  # every gradient at once
    assert lw["state_bytes"] < adamw["state_bytes"]
    # a run the model puts over the limit is skipped with its prediction, never started
    proc = subprocess.run(
        [*cmd[:2], "--model", "llama_13b", "--method", "adamw", "--runtime-bytes", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    skipped = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "skipped" in skipped and skipped["predicted_bytes"] > 22e9


def test_model_counts_the_parameters_of_the_real_llama():
    from transformers import LlamaForCausalLM

    from nlp.pretrain import LLAMA_PRESETS, llama_config

    for name in ("llama_60m", "llama_1b", "llama_7b"):
        with torch.device("meta"):
            real = LlamaForCausalLM(llama_config(memory_model.VOCAB, name)).num_parameters()
        pred = memory_model.predict(LLAMA_PRESETS[name], "adamw", batch=1, seq=256, max_rank=128, runtime_bytes=0)
        assert pred["params"] == real, name


@pytest.mark.parametrize("bits", [32, 8])
def test_model_state_is_the_optimizers_own_accounting_at_full_rank(bits):
    """With ``energy=1`` every projected matrix takes ``max_rank``: the formula's state bytes must then be the
    optimizer's measured ``state_bytes()`` after a step of a real (tiny) LLaMA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_adarank import AdaRankGrad, param_groups

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg)
    opt = AdaRankGrad(
        param_groups(model, include_embeddings=True), max_rank=8, energy=1.0, state_bits=bits, dense_state_bits=bits
    )
    x = torch.randint(0, 1000, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert all(s.rank == 8 for s in opt.subspaces().values())
    shapes = memory_model.Shapes(64, 172, 2, 4, vocab=1000)
    assert memory_model._adarank_state(shapes, bits, 8, 4, project_emb=True) == opt.state_bytes()
