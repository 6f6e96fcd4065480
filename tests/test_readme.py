"""The README's Lightning section runs as written: its ```python blocks, in order, as one script (the later
blocks use the first one's ``Classifier`` and ``data``), in a fresh process and folder."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### PyTorch Lightning, Fabric and multi-GPU (DDP)"


def lightning_section_code() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n### ", start + len(SECTION))
    blocks = re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)
    assert len(blocks) >= 4, "the Lightning section lost its examples"
    return "\n\n".join(blocks)


def _columns(path: Path) -> set[str]:
    with open(path) as f:
        return set(next(csv.reader(f)))


@pytest.mark.slow
def test_readme_lightning_section_runs_as_written(tmp_path):
    script = tmp_path / "readme_lightning.py"
    script.write_text(lightning_section_code())
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^AdaRankGrad \{'net\.0\.weight': \d+", proc.stdout, flags=re.M), proc.stdout[-2000:]
    run = tmp_path / "logs" / "lightning_logs"
    # the callback run and the strategy run log the rank and memory series; the callback run plots
    assert {"adarank/avg_rank", "optimizer/state_bytes", "memory/peak_bytes", "train_loss"} <= _columns(
        run / "version_0" / "metrics.csv")
    assert (run / "version_0" / "adarank_ranks.png").stat().st_size > 0
    assert "adarank/avg_rank" in _columns(run / "version_1" / "metrics.csv")
    fabric_run = tmp_path / "fabric_logs" / "lightning_logs" / "version_0"
    assert {"adarank/avg_rank", "optimizer/state_bytes", "train_loss"} <= _columns(fabric_run / "metrics.csv")
    assert (fabric_run / "adarank_ranks.png").is_file() and (tmp_path / "ckpt.pt").is_file()
