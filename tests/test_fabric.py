"""AdaRankGrad under Lightning Fabric (one device): setup, FabricRankMonitor as a Fabric callback, save/load resume."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.loggers import CSVLogger
from scripts.tiny import ADARANK, loader, make_data, make_net
from torch import nn

from lightning_adarank import AdaRankGrad, FabricRankMonitor, param_groups


def _train(fabric, model, optimizer, batches, start, stop):
    for step in range(start, stop):
        x, y = batches[step % len(batches)]
        fabric.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()


def _setup(tmp_path, name, steps_every=2):
    logger = CSVLogger(tmp_path, name=name)
    monitor = FabricRankMonitor(loggers=logger, log_every_n_steps=steps_every, per_layer=True)
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=logger, callbacks=[monitor])
    net = make_net()
    model, optimizer = fabric.setup(net, AdaRankGrad(param_groups(net), lr=1e-2, weight_decay=0.01, **ADARANK))
    return fabric, monitor, net, model, optimizer, logger


def test_fabric_matches_plain_loop_and_monitor_logs(tmp_path):
    batches = list(loader(make_data(), 16))
    fabric, monitor, net, model, optimizer, logger = _setup(tmp_path, "fabric")
    assert isinstance(optimizer, AdaRankGrad)
    _train(fabric, model, optimizer, batches, 0, 8)
    # the same training without Fabric
    ref = make_net()
    opt = AdaRankGrad(param_groups(ref), lr=1e-2, weight_decay=0.01, **ADARANK)
    for step in range(8):
        x, y = batches[step]
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
    for (n, a), (_, b) in zip(net.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    assert optimizer.ranks() == opt.ranks() and monitor.step == 8
    assert monitor.history.steps == [2, 4, 6, 8]
    logger.finalize("success")
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = next(r for r in rows if r["step"] == "8" and r.get("adarank/avg_rank"))
    assert float(last["adarank/rank/0.weight"]) == opt.ranks()["0.weight"]
    assert float(last["optimizer/state_bytes"]) == opt.state_bytes()
    path = monitor.save_plot()
    assert path is not None and path.parent == Path(logger.log_dir) and path.stat().st_size > 1000


def test_fabric_save_load_resume_is_bit_identical(tmp_path):
    batches = list(loader(make_data(), 16))
    fabric, monitor, net, model, optimizer, _ = _setup(tmp_path, "full")
    _train(fabric, model, optimizer, batches, 0, 14)

    fabric, monitor1, _, model1, optimizer1, _ = _setup(tmp_path, "part")
    _train(fabric, model1, optimizer1, batches, 0, 7)
    ckpt = tmp_path / "fabric.ckpt"
    fabric.save(ckpt, {"model": model1, "optimizer": optimizer1, "monitor": monitor1})
    assert torch.load(ckpt, weights_only=True)["monitor"]["step"] == 7

    fabric, monitor2, net2, model2, optimizer2, _ = _setup(tmp_path, "resumed")
    fabric.load(ckpt, {"model": model2, "optimizer": optimizer2, "monitor": monitor2})
    assert optimizer2.subspaces() == optimizer1.subspaces() and monitor2.history.steps == [2, 4, 6]
    _train(fabric, model2, optimizer2, batches, 7, 14)
    for (n, a), (_, b) in zip(net.named_parameters(), net2.named_parameters()):
        assert torch.equal(a, b), n
    assert monitor2.history.state_dict() == monitor.history.state_dict()


def test_monitor_rejects_bad_interval():
    with pytest.raises(ValueError):
        FabricRankMonitor(log_every_n_steps=0)
