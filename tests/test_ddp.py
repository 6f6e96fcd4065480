"""Two CPU processes (gloo): Trainer(strategy="adarank_ddp"), Trainer(strategy="ddp") with a module that returns
AdaRankGrad itself, and Fabric(strategy="ddp"). After N steps the parameters must be bit-identical across the
ranks and equal (to float rounding) to one process training on the same global batches.

Lightning's DDP launcher re-runs the launching command for the second rank, so the runs go through
``tests/scripts/ddp_train.py`` in a subprocess rather than pytest itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from scripts.tiny import ADARANK, TinyModule, loader, make_data, make_net, trainer_kwargs
from torch import nn

from lightning_adarank import AdaRankGrad, AdaRankGradCallback, AdaRankGradStrategy, param_groups

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
STEPS = 10
GLOBAL_BATCH = 16  # the script's ranks take 8 each


def _launch(mode: str, out: Path) -> dict[int, dict]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out), "--steps", str(STEPS)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)}


def _check(runs: dict[int, dict], single: dict[str, torch.Tensor], single_ranks: dict[str, int]) -> None:
    p0, p1 = runs[0]["params"], runs[1]["params"]
    assert p0.keys() == p1.keys() == single.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"{name} differs across ranks"
        torch.testing.assert_close(p0[name], single[name], rtol=1e-4, atol=1e-5, msg=f"{name} vs single process")
    assert runs[0]["ranks"] == runs[1]["ranks"] == single_ranks
    initial = dict(make_net().named_parameters())
    assert not torch.equal(p0["net.0.weight"], initial["0.weight"])  # it did train


def _single_trainer(module, strategy, callbacks=()) -> tuple[dict, dict]:
    trainer = L.Trainer(strategy=strategy, max_steps=STEPS, callbacks=list(callbacks), **trainer_kwargs())
    trainer.fit(module, loader(make_data(), GLOBAL_BATCH))
    return {n: p.detach().clone() for n, p in module.named_parameters()}, trainer.optimizers[0].ranks()


@pytest.mark.slow
def test_trainer_adarank_ddp_matches_single_process(tmp_path):
    runs = _launch("trainer", tmp_path)
    assert runs[0]["strategy"] == "AdaRankGradDDPStrategy"
    single, ranks = _single_trainer(TinyModule(), AdaRankGradStrategy())
    _check(runs, single, ranks)


@pytest.mark.slow
def test_callback_under_ddp_matches_single_process(tmp_path):
    """Trainer(strategy="ddp", callbacks=[AdaRankGradCallback()]) on the module's AdamW: ranks bit-identical and
    equal to one process with the callback on the same global batches."""
    runs = _launch("callback", tmp_path)
    assert runs[0]["strategy"] == "DDPStrategy"
    single, ranks = _single_trainer(TinyModule(), "auto", callbacks=[AdaRankGradCallback()])
    _check(runs, single, ranks)


@pytest.mark.slow
def test_plain_ddp_with_module_returning_adarank(tmp_path):
    runs = _launch("plain", tmp_path)
    assert runs[0]["strategy"] == "DDPStrategy"
    single, ranks = _single_trainer(TinyModule(adarank=True), "auto")
    _check(runs, single, ranks)


@pytest.mark.slow
def test_fabric_ddp_matches_single_process(tmp_path):
    runs = _launch("fabric", tmp_path)
    net = make_net()
    opt = AdaRankGrad(param_groups(net), lr=1e-2, weight_decay=0.01, **ADARANK)
    batches = list(loader(make_data(), GLOBAL_BATCH))
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    single = {f"net.{n}": p.detach() for n, p in net.named_parameters()}
    runs = {r: {**v, "params": {f"net.{n}": t for n, t in v["params"].items()}} for r, v in runs.items()}
    _check(runs, single, opt.ranks())
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["history"]["steps"] == list(range(2, STEPS + 1, 2))
    assert max(s.refreshes for s in opt.subspaces().values()) > 1  # the comparison covers subspace refreshes
    ckpt = torch.load(tmp_path / "fabric.ckpt", weights_only=True)  # fabric.save of model, optimizer, monitor
    assert ckpt["monitor"]["step"] == STEPS and ckpt["optimizer"]["state"]
