"""The README's examples run as written: every block not marked ``not-run`` (see ``doc_blocks``), in order, each
``python`` block in a fresh namespace (so each defines every name it uses), in a fresh folder; then what they
promise to write is there."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from doc_blocks import REPO, blocks, run_page

README = REPO / "README.md"


def _columns(path: Path) -> set[str]:
    with open(path) as f:
        return set(next(csv.reader(f)))


def test_readme_has_every_door_as_a_block():
    text = README.read_text(encoding="utf-8")
    doors = [
        "## One callback on a Lightning Trainer",
        "## The strategy, LightningCLI and YAML",
        "## FSDP2",
        "## Fabric",
        "## The Hugging Face Trainer",
        "## Plain PyTorch",
    ]
    positions = [text.index(d) for d in doors]
    assert positions == sorted(positions), "the doors are out of the order users come through them"
    python = [b for b in blocks(README) if b.lang == "python"]
    assert len(python) >= 6


@pytest.mark.slow  # four short trainings (Lightning, LightningCLI x3, Fabric, HF Trainer) and plain PyTorch
def test_readme_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the Hugging Face block needs the hf extra")
    last = run_page(README, tmp_path, monkeypatch)
    # the plain-PyTorch block (the last one) trained and saved its state
    assert last["opt"].ranks() and (tmp_path / "opt.pt").stat().st_size > 0
    run = tmp_path / "logs" / "lightning_logs" / "version_0"
    assert {"adarank/avg_rank", "optimizer/state_bytes", "memory/peak_bytes", "train_loss"} <= _columns(
        run / "metrics.csv"
    )
    assert (run / "adarank_ranks.png").stat().st_size > 0
    fabric_run = tmp_path / "fabric_logs" / "lightning_logs" / "version_0"
    assert {"adarank/avg_rank", "optimizer/state_bytes", "train_loss"} <= _columns(fabric_run / "metrics.csv")
    assert (fabric_run / "adarank_ranks.png").is_file() and (tmp_path / "ckpt.pt").is_file()
