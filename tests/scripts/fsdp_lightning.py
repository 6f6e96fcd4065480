"""FSDP2 through Lightning and Fabric (launched by torchrun, 2 CPU gloo processes) for tests/test_fsdp_lightning.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_lightning.py MODE OUT_DIR [--steps N]

MODE:
  ``callback``: ``Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
  callbacks=[AdaRankGradCallback(...)])`` on a module whose ``configure_model`` applies ``fully_shard`` and whose
  ``configure_optimizers`` returns AdamW;
  ``strategy``: ``Trainer(strategy=AdaRankGradModelParallelStrategy(...))`` on the same module;
  ``fabric``: ``Fabric(strategy=ModelParallelStrategy(parallelize_fn=...))`` with ``AdaRankGrad``.
Each mode runs ``N`` steps uninterrupted, then ``K`` steps, a checkpoint (``save_distributed_checkpoint`` True,
then False), and a resume to ``N`` in a fresh Trainer/Fabric; rank r writes ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from scripts.fsdp_model import SETTINGS, TinyLM, batches, shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_adarank import AdaRankGrad, AdaRankGradCallback, AdaRankGradModelParallelStrategy, param_groups  # noqa: E402

ADARANK = {k: v for k, v in SETTINGS.items() if k not in ("lr", "weight_decay")}


class LM(L.LightningModule):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.net = TinyLM()
        self.data = batches(steps)

    def configure_model(self):
        shard(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        tokens = self.data[self.global_step]
        per = tokens.shape[0] // self.trainer.world_size
        return self.net.loss(tokens[self.global_rank * per : (self.global_rank + 1) * per])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.arange(len(self.data)), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])


def full_params(module):
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()
    }


def fit(mode, steps, total, ckpt=None, save=None, distributed=True):
    module = LM(total)
    kw = dict(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=distributed)
    if mode == "callback":
        strategy, callbacks = ModelParallelStrategy(**kw), [AdaRankGradCallback(include_embeddings=True, **ADARANK)]
    else:
        strategy, callbacks = AdaRankGradModelParallelStrategy(include_embeddings=True, **kw, **ADARANK), []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    opt = trainer.optimizers[0]
    assert type(opt) is AdaRankGrad, type(opt)
    return full_params(module.net), opt.ranks(), trainer.global_rank


def fabric_run(steps, total, out, load=None, save=None, distributed=True):
    strategy = FabricModelParallel(
        parallelize_fn=lambda m, mesh: shard(m, mesh["data_parallel"]),
        data_parallel_size=2,
        tensor_parallel_size=1,
        save_distributed_checkpoint=distributed,
    )
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = fabric.setup(TinyLM())
    opt = fabric.setup_optimizers(AdaRankGrad(param_groups(model, include_embeddings=True), **SETTINGS))
    state = {"model": model, "optimizer": opt, "step": 0}
    if load:
        fabric.load(load, state)
    data = batches(total)
    while state["step"] < steps:
        tokens = data[state["step"]]
        per = tokens.shape[0] // fabric.world_size
        fabric.backward(model.loss(tokens[fabric.global_rank * per : (fabric.global_rank + 1) * per]))
        opt.step()
        opt.zero_grad()
        state["step"] += 1
    if save:
        fabric.save(save, state)
    return full_params(model), opt.optimizer.ranks() if hasattr(opt, "optimizer") else opt.ranks(), fabric.global_rank


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["callback", "strategy", "fabric"])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--resume-at", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, k, out = args.steps, args.resume_at, args.out
    result: dict = {}
    run = (
        (lambda *a, **kw: fabric_run(*a, out, **kw))
        if args.mode == "fabric"
        else (lambda *a, **kw: fit(args.mode, *a, **kw))
    )
    result["params"], result["ranks"], rank = run(n, n)
    for distributed in (True, False):
        path = os.path.join(out, f"ckpt_{'dcp' if distributed else 'full'}" + ("" if distributed else ".ckpt"))
        run(k, n, save=path, distributed=distributed)
        if args.mode == "fabric":
            params, ranks, _ = run(n, n, load=path, distributed=distributed)
        else:
            params, ranks, _ = run(n, n, ckpt=path, distributed=distributed)
        result["dcp" if distributed else "full"] = params
        result[f"kind_{distributed}"] = "dir" if os.path.isdir(path) else "file"
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # tear gloo down together: a rank that exits while the other still holds the group can abort with
    # "terminate called without an active exception" (seen once in a full-suite run)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
