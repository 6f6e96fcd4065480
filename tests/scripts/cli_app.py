"""A LightningCLI app for tests/test_lightning_cli.py: the tiny module (AdamW + a cosine schedule) and its data.

    python cli_app.py fit [LightningCLI options]

After fit it prints one line ``RESULT {json}``: the strategy and optimizer classes, the optimizer's settings
per group and the current ranks (what the test checks against the options given).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ (for scripts.tiny)

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from scripts.tiny import TinyModule, loader, make_data  # noqa: E402


class CosineModule(TinyModule):
    """TinyModule whose configure_optimizers returns AdamW (decay / no-decay groups) and a cosine schedule."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(scheduler="cosine", lr=lr)


class TinyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return loader(make_data(), self.batch_size)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(CosineModule, TinyData, save_config_kwargs={"overwrite": True}, args=args, run=run)


if __name__ == "__main__":
    cli = main()
    if cli.subcommand == "fit":
        opt = cli.trainer.optimizers[0]
        keys = ("lr", "betas", "weight_decay", "max_rank", "energy", "min_gap", "low_rank")
        print(
            "RESULT "
            + json.dumps(
                {
                    "strategy": type(cli.trainer.strategy).__name__,
                    "optimizer": type(opt).__name__,
                    "groups": [{k: g.get(k) for k in keys} for g in opt.param_groups],
                    "ranks": opt.ranks() if hasattr(opt, "ranks") else None,
                    "callbacks": [type(c).__name__ for c in cli.trainer.callbacks],
                }
            )
        )
