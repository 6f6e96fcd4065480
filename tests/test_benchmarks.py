"""Smoke test of the benchmark scripts: each runs its tiny mode (``--smoke``) in a subprocess on CPU and
prints Markdown tables with the expected rows and numeric columns. The numbers themselves are not checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NUM = re.compile(r"^-?[\d,]+(\.\d+)?×?$")

pytest.importorskip("galore_torch")
pytestmark = pytest.mark.slow  # ~20 s of CPU for both scripts (transformers import + a tiny BERT)


def _run(script: str, tmp_path: Path) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / script),
            "--smoke",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _rows(text: str, first_header: str) -> list[list[str]]:
    """Body rows of the Markdown table whose first header cell is ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_optimizer_cost_smoke(tmp_path):
    out = _run("optimizer_cost.py", tmp_path)
    assert "torch.get_num_threads() = 1" in out and "command: `python benchmarks/optimizer_cost.py --smoke" in out
    rows = {r[0]: r for r in _rows(out, "optimizer")}
    for label in ("AdamW (fused)", "LoRA r=4 (fused AdamW)", "GaLore r=4", "AdaRankGrad r≤4", "AdaRankGrad r≤4 +emb"):
        row = rows[label]
        assert all(NUM.match(row[i]) for i in (2, 3, 5, 6)), row  # state MiB, normal ms, amortized ms
    for label in ("GaLore r=4", "AdaRankGrad r≤4", "AdaRankGrad r≤4 +emb"):
        assert NUM.match(rows[label][4]), rows[label]  # refresh ms
    ratios = _rows(out, "AdaRankGrad variant")
    assert {(r[0], r[1]) for r in ratios} >= {("AdaRankGrad r≤4", "GaLore r=4"), ("AdaRankGrad r≤4", "AdamW (fused)")}
    assert all(NUM.match(r[2]) for r in ratios)
    assert (tmp_path / "optimizer_cost_cpu.md").read_text().count("| AdaRankGrad r≤4") >= 2


def test_scaling_smoke(tmp_path):
    out = _run("scaling.py", tmp_path)
    rows = _rows(out, "h")
    assert [r[0] for r in rows] == ["32", "64", "128"]
    assert all(NUM.match(c) for r in rows for c in r[2:10]), rows
    slopes = {r[0]: r for r in _rows(out, "series")}
    assert NUM.match(slopes["GaLore refresh (full SVD)"][1])
    assert (tmp_path / "scaling_cpu.png").stat().st_size > 1000


def test_llama_pretrain_smoke(tmp_path):
    """benchmarks/llama_pretrain.py --smoke (two methods; torchao's AdamW8bit compiles for minutes on CPU, so it
    and the GaLore peers are left to the real run): a table row per method with numbers, and the plot."""
    sst2 = REPO.parent / "shared" / "data" / "glue" / "SST-2"
    if not (sst2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 not found under {sst2}")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "llama_pretrain.py"),
            "--smoke",
            "--methods",
            "adamw,adarankgrad8",
            "--jobs",
            "1",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(proc.stdout, "method")
    assert [r[0] for r in rows] == ["adamw", "adarankgrad8"]
    for r in rows:
        assert all(NUM.match(c) for c in r[1:5]), r
    assert (tmp_path / "llama_pretrain_smoke_cpu.png").is_file()


def test_fsdp_memory_smoke(tmp_path):
    """benchmarks/fsdp_memory.py --smoke: 2 gloo processes per method; a row per method with numbers, and ratio rows
    (the per-rank state of AdaRankGrad with every matrix projected is below AdamW's: a property, not a number)."""
    out = _run("fsdp_memory.py", tmp_path)
    rows = {r[0]: r for r in _rows(out, "optimizer")}
    for label in ("adamw", "adarankgrad", "adarankgrad_emb"):
        assert rows[label][1] == "2" and all(NUM.match(rows[label][i]) for i in (3, 4, 5, 6, 7)), rows[label]
    for label in ("adarankgrad / adamw", "adarankgrad_emb / adamw"):
        assert all(NUM.match(rows[label][i]) for i in (3, 4, 5, 6, 7)), rows[label]
    assert float(rows["adarankgrad_emb / adamw"][3].rstrip("×")) < 1.0
