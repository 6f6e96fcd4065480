"""2-process CPU DDP (gloo) with the layer-wise updater and gradient accumulation, plus the single-process
reference over the same global batches. Usage: python layerwise_ddp.py OUT_DIR (writes rank{0,1}.pt, single.pt)."""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_adarank import AdaRankGrad, param_groups
from lightning_adarank.optim.layerwise import LayerwiseUpdater

K, WINDOWS, WORLD = 2, 6, 2
SETTINGS = dict(lr=5e-3, max_rank=4, min_gap=2, max_gap=3, weight_decay=0.01, seed=11)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 5))


def global_batch(step, micro):
    g = torch.Generator().manual_seed(step * 100 + micro)
    return torch.randn(8 * WORLD, 12, generator=g), torch.randint(0, 5, (8 * WORLD,), generator=g)


def train(net, updater, shard=None):
    for step in range(WINDOWS):
        for micro in range(K):
            x, y = global_batch(step, micro)
            if shard is not None:
                x, y = x[shard::WORLD], y[shard::WORLD]
            updater.backward(nn.functional.cross_entropy(net(x), y) / K)


def worker(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("LW_PORT", "29533"))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    net = model()
    ddp = DistributedDataParallel(net, bucket_cap_mb=0.002)  # several buckets
    opt = AdaRankGrad(param_groups(net), **SETTINGS)
    train(ddp, LayerwiseUpdater(opt, accumulate_grad_batches=K).attach(ddp), shard=rank)
    torch.save({n: p.detach() for n, p in net.named_parameters()}, os.path.join(out, f"rank{rank}.pt"))
    # both ranks leave together: a rank tearing gloo down while the other is still in it can abort the other
    # ("terminate called without an active exception", seen once in a full-suite run)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out = sys.argv[1]
    torch.save({n: p.detach().clone() for n, p in model().named_parameters()}, os.path.join(out, "init.pt"))
    mp.spawn(worker, args=(out,), nprocs=WORLD, join=True)
    net = model()
    opt = AdaRankGrad(param_groups(net), **SETTINGS)
    train(net, LayerwiseUpdater(opt, accumulate_grad_batches=K).attach(net))
    torch.save({n: p.detach() for n, p in net.named_parameters()}, os.path.join(out, "single.pt"))
