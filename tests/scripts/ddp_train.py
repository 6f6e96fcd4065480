"""DDP launch script for tests/test_ddp.py (Lightning's launchers re-run this script once per extra rank).

    python ddp_train.py MODE OUT_DIR [--steps N] [--devices D]

MODE:
  ``trainer``: ``Trainer(strategy="adarank_ddp")`` on the module's AdamW (swapped for AdaRankGrad, defaults);
  ``plain``:   ``Trainer(strategy="ddp")`` on a module whose configure_optimizers returns AdaRankGrad;
  ``fabric``:  ``Fabric(strategy="ddp")`` with ``fabric.setup(model, AdaRankGrad(...))`` and FabricRankMonitor;
  ``callback``: ``Trainer(strategy="ddp", callbacks=[AdaRankGradCallback()])`` on the module's AdamW;
  ``layerwise``: ``AdaRankGradDDPStrategy(layerwise=True)`` with ``accumulate_grad_batches=2``.
Every rank trains on its own shard of each global batch (``PER_RANK`` samples, rank r takes the r-th slice)
and writes its parameters and ranks to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (for scripts.tiny)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from scripts.tiny import ADARANK, TinyModule, loader, make_data, make_net, trainer_kwargs  # noqa: E402
from torch import nn  # noqa: E402

import lightning_adarank.integrations.strategy  # noqa: E402,F401  (registers "adarank_ddp")
from lightning_adarank import AdaRankGrad, AdaRankGradCallback, AdaRankGradDDPStrategy, FabricRankMonitor, param_groups  # noqa: E402

PER_RANK = 8


class ShardedModule(TinyModule):
    def train_dataloader(self):
        return loader(make_data(), PER_RANK, rank=self.global_rank, world=self.trainer.world_size)


def save(out, rank, named_params, ranks, extra=None):
    state = {"params": {n: p.detach().cpu().clone() for n, p in named_params}, "ranks": dict(ranks), **(extra or {})}
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["trainer", "plain", "fabric", "layerwise", "callback"])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode == "layerwise":  # layer-wise updates in backward, accumulation 2, DDP comm hook
        module = ShardedModule()
        trainer = L.Trainer(
            strategy=AdaRankGradDDPStrategy(layerwise=True),
            max_steps=args.steps,
            accumulate_grad_batches=2,
            use_distributed_sampler=False,
            **trainer_kwargs(devices=args.devices),
        )
        trainer.fit(module)
        save(
            args.out,
            trainer.global_rank,
            module.named_parameters(),
            trainer.optimizers[0].ranks(),
            {"strategy": type(trainer.strategy).__name__},
        )
        return
    if args.mode in ("trainer", "plain", "callback"):
        module = ShardedModule(adarank=args.mode == "plain")
        trainer = L.Trainer(
            strategy="adarank_ddp" if args.mode == "trainer" else "ddp",
            max_steps=args.steps,
            callbacks=[AdaRankGradCallback()] if args.mode == "callback" else [],
            use_distributed_sampler=False,
            **trainer_kwargs(devices=args.devices),
        )
        trainer.fit(module)
        opt = trainer.optimizers[0]
        assert type(opt) is AdaRankGrad, type(opt)
        save(
            args.out,
            trainer.global_rank,
            module.named_parameters(),
            opt.ranks(),
            {"strategy": type(trainer.strategy).__name__},
        )
        return
    fabric = L.Fabric(
        accelerator="cpu", devices=args.devices, strategy="ddp", callbacks=[FabricRankMonitor(log_every_n_steps=2)]
    )
    fabric.launch()
    monitor = fabric._callbacks[0]
    net = make_net()
    model, optimizer = fabric.setup(net, AdaRankGrad(param_groups(net), lr=1e-2, weight_decay=0.01, **ADARANK))
    data = fabric.setup_dataloaders(
        loader(make_data(), PER_RANK, rank=fabric.global_rank, world=fabric.world_size), use_distributed_sampler=False
    )
    step = 0
    while step < args.steps:
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    fabric.save(os.path.join(args.out, "fabric.ckpt"), {"model": model, "optimizer": optimizer, "monitor": monitor})
    save(
        args.out,
        fabric.global_rank,
        net.named_parameters(),
        optimizer.ranks(),
        {"history": monitor.history.state_dict()},
    )


if __name__ == "__main__":
    main()
