"""Tiny models and data shared by the Lightning/Fabric tests and the DDP launch scripts."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adarank import AdaRankGrad, param_groups

ADARANK = dict(max_rank=6, min_gap=2, max_gap=4, tol=0.9, energy=0.8)


def make_data(n: int = 192, d: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """A learnable synthetic classification set (labels from a random linear map of the inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int, rank: int | None = None, world: int = 1) -> DataLoader:
    """Without ``rank``: plain sequential batches of ``batch_size``. With ``rank``: this rank's share of every
    global batch of ``batch_size * world`` samples (so the union over ranks of step k equals global batch k)."""
    if rank is None:
        return DataLoader(ds, batch_size=batch_size, shuffle=False)
    gb = batch_size * world
    idx = [
        i for start in range(0, len(ds), gb) for i in range(start + rank * batch_size, start + (rank + 1) * batch_size)
    ]
    return DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, shuffle=False)


def make_net(d: int = 16, hidden: int = 24, classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


class TinyModule(L.LightningModule):
    """An MLP classifier whose ``configure_optimizers`` returns AdamW with a decay / no-decay split and an optional
    scheduler, or (``adarank=True``) an AdaRankGrad it builds itself."""

    def __init__(
        self, scheduler: str | None = None, adarank: bool = False, lr: float = 1e-2, by_step: bool = False
    ) -> None:
        super().__init__()
        self.net = make_net()
        self.scheduler, self.adarank, self.lr = scheduler, adarank, lr
        # by_step: the batch is a function of the global step, not of the loader position (a resumed run then
        # sees the same data whatever Lightning does with a non-stateful loader's position)
        self.by_step = by_step
        self._batches = list(loader(make_data(), 16)) if by_step else None

    def training_step(self, batch, batch_idx):
        x, y = self._batches[self.global_step % len(self._batches)] if self.by_step else batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.adarank:
            return AdaRankGrad(param_groups(self), lr=self.lr, weight_decay=0.01, **ADARANK)
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.85, 0.98),
            eps=1e-7,
        )
        if self.scheduler is None:
            return opt
        if self.scheduler == "hf_linear_warmup":
            from transformers import get_linear_schedule_with_warmup

            sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12)
        elif self.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
        elif self.scheduler == "sequential":
            sched = torch.optim.lr_scheduler.SequentialLR(
                opt,
                [
                    torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=3),
                    torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8),
                ],
                milestones=[3],
            )
        else:
            raise ValueError(self.scheduler)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer_kwargs(**kw):
    """Quiet, deterministic CPU Trainer settings."""
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    base.update(kw)
    return base
