"""Layer-wise mode through Lightning: AdaRankGradStrategy(layerwise=True) equals the normal strategy without
accumulation, steps the LR schedule once per optimizer step with accumulate_grad_batches, refuses gradient
clipping, and stays bit-identical across 2 DDP processes; the Fabric helper equals a plain loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from scripts.tiny import TinyModule, loader, make_data, make_net, trainer_kwargs
from torch import nn

from lightning_adarank import AdaRankGrad, AdaRankGradStrategy, layerwise_updater, param_groups

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


class Record(Callback):
    """Whether every gradient was None after each backward, and the lr at every optimizer step."""

    def __init__(self):
        self.grads_none, self.lrs = [], []

    def on_after_backward(self, trainer, pl_module):
        self.grads_none.append(all(p.grad is None for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))


def _fit(strategy, steps=12, **kw):
    module, rec = TinyModule(scheduler="hf_linear_warmup"), Record()
    trainer = L.Trainer(strategy=strategy, max_steps=steps, callbacks=[rec], **trainer_kwargs(**kw))
    trainer.fit(module, loader(make_data(), 16))
    return module, trainer, rec


def test_layerwise_strategy_equals_normal_strategy():
    ref, ref_trainer, _ = _fit(AdaRankGradStrategy())
    lw, trainer, rec = _fit(AdaRankGradStrategy(layerwise=True))
    assert all(rec.grads_none) and len(rec.grads_none) == 12
    for (n, a), b in zip(ref.named_parameters(), lw.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    assert trainer.optimizers[0].ranks() == ref_trainer.optimizers[0].ranks()


def test_layerwise_accumulation_steps_schedule_once_per_optimizer_step():
    _, ref_trainer, ref_rec = _fit(AdaRankGradStrategy(), steps=6, accumulate_grad_batches=3)
    lw, trainer, rec = _fit(AdaRankGradStrategy(layerwise=True), steps=6, accumulate_grad_batches=3)
    assert trainer.global_step == ref_trainer.global_step == 6
    assert len(rec.grads_none) == 18 and all(rec.grads_none)
    assert rec.lrs == ref_rec.lrs  # same lr at every micro-batch: the scheduler follows optimizer steps
    assert trainer.strategy._layerwise is None  # detached at teardown
    initial = dict(make_net().named_parameters())
    assert not torch.equal(lw.net[0].weight, initial["0.weight"])


def test_layerwise_refuses_gradient_clipping():
    with pytest.raises(ValueError, match="gradient_clip_val"):
        _fit(AdaRankGradStrategy(layerwise=True), steps=2, gradient_clip_val=1.0)


def test_fabric_layerwise_equals_plain_loop():
    def batches():
        return list(loader(make_data(), 16))[:8]

    ref = make_net()
    ref_opt = AdaRankGrad(param_groups(ref), lr=1e-2, max_rank=6, min_gap=2, max_gap=4)
    for x, y in batches():
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    fabric = L.Fabric(accelerator="cpu", devices=1)
    net = make_net()
    model, opt = fabric.setup(net, AdaRankGrad(param_groups(net), lr=1e-2, max_rank=6, min_gap=2, max_gap=4))
    updater = layerwise_updater(model, opt)
    for x, y in batches():
        assert updater.backward(nn.functional.cross_entropy(model(x), y), fabric.backward)
    for a, b in zip(ref.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_layerwise_ddp_with_accumulation_matches_single_process(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "layerwise", str(tmp_path), "--steps", "5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    module = TinyModule()
    trainer = L.Trainer(
        strategy=AdaRankGradStrategy(layerwise=True), max_steps=5, accumulate_grad_batches=2, **trainer_kwargs()
    )
    trainer.fit(module, loader(make_data(), 16))
    single = {n: p.detach() for n, p in module.named_parameters()}
    for name in single:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        torch.testing.assert_close(r0["params"][name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    assert r0["ranks"] == r1["ranks"] == trainer.optimizers[0].ranks()
