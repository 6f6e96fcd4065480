"""2,000-step soak of AdaRankGrad on a small model: memory stays flat after warm-up while ranks change and
subspaces refresh hundreds of times (the 10,000-step run is ``benchmarks/soak.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
RSS_BOUND_MB = 8.0  # after warm-up; one refresh's temporaries here are ~0.1 MB, a leak per step would exceed it


@pytest.mark.slow
def test_memory_is_flat_over_2000_steps():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = soak.soak(steps=2000, every=100, width=48)
    finally:
        torch.set_num_threads(n)
    grow = soak.growth(rows, warmup=500)
    assert rows[-1]["refreshes"] > 300  # thousands of steps, hundreds of refreshes (3 matrices)
    assert len({r["rank_mean"] for r in rows}) > 1  # ranks did change
    assert grow["rss_mb"] < RSS_BOUND_MB, grow
    # optimizer state follows the ranks only: its swing is at most rank 1 -> 8 on both projected matrices
    width = 48
    swing = 4 * 7 * ((32 + 2 * width) + (width + 2 * width))
    assert grow["state_bytes"] <= swing, grow
