"""FSDP2 launch script for tests/test_fsdp.py (raw torch: ``fully_shard`` + ``AdaRankGrad``, CPU gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp_train.py OUT_DIR [--steps N] [--resume-at K]

One launch runs every raw-torch check, each rank writing ``OUT_DIR/rank{r}.pt``:

* ``train``: ``STEPS`` steps on this rank's half of each global batch; the full parameters (gathered), the
  ranks after every step, every basis (gathered when sharded) and the per-rank state bytes, split into sharded
  (DTensor) and replicated (plain) tensors;
* ``dcp``: ``K`` steps, ``torch.distributed.checkpoint`` save of the sharded model and optimizer state dicts, a
  fresh model and optimizer loaded from it, ``STEPS − K`` more steps: the final parameters;
* ``full``: the same through full state dicts (``StateDictOptions(full_state_dict=True)``), saved by rank 0
  with ``torch.save`` and loaded with ``weights_only=True``;
* ``linalg``: the distributed CholeskyQR2 basis of a row-sharded matrix (well conditioned, and rank-deficient:
  the gather fallback), with the gathered matrix, for a comparison with ``torch.linalg.svd``;
* ``nonfinite``: ``inf`` in rank 0's gradient rows of a right-side, a left-side and a dense parameter: the
  parameters before and after the step (every rank must skip those three, and only those);
* ``errors``: the messages of what is refused on DTensor parameters (``subspace_source="gradient"``,
  ``state_bits=8``, layer-wise mode).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from scripts.fsdp_model import RAW_SETTINGS as SETTINGS  # noqa: E402
from scripts.fsdp_model import TinyLM, batches, shard
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_adarank import AdaRankGrad, LayerwiseUpdater, param_groups  # noqa: E402
from lightning_adarank.distributed import sharded_left_singular  # noqa: E402

BAD = ("up.weight", "down.weight", "norm.weight")  # right side, left side, dense


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def build(mesh):
    model = shard(TinyLM(), mesh)
    return model, AdaRankGrad(param_groups(model, include_embeddings=True), **SETTINGS)


def train(model, opt, data, rank, world, steps, ranks=None):
    for tokens in data[:steps]:
        per = tokens.shape[0] // world
        model.loss(tokens[rank * per : (rank + 1) * per]).backward()
        opt.step()
        opt.zero_grad()
        if ranks is not None:
            ranks.append(opt.ranks())


def params(model):
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def state_bytes(opt):
    sharded = replicated = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, DTensor):
                sharded += v.to_local().numel() * v.element_size()
            elif isinstance(v, torch.Tensor):
                replicated += v.numel() * v.element_size()
    return {"sharded": sharded, "replicated": replicated, "total": opt.state_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--resume-at", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    data = batches(args.steps)
    out: dict = {}

    model, opt = build(mesh)
    ranks: list = []
    train(model, opt, data, rank, world, args.steps, ranks)
    out["train"] = {
        "params": params(model),
        "ranks": ranks,
        "state": state_bytes(opt),
        "bases": {
            name: full(opt.state[p]["basis"]).clone() for name, p in model.named_parameters() if "basis" in opt.state[p]
        },
        "refreshes": {n: s.refreshes for n, s in opt.subspaces().items()},
        "sharded_keys": {
            name: sorted(k for k, v in opt.state[p].items() if isinstance(v, DTensor))
            for name, p in model.named_parameters()
            if opt.state[p]
        },
    }

    # distributed checkpoint (sharded state dicts), resumed in a fresh model and optimizer
    ckpt = os.path.join(args.out, "dcp")
    model, opt = build(mesh)
    train(model, opt, data, rank, world, args.resume_at)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    model, opt = build(mesh)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    out["dcp_ranks_after_load"] = opt.ranks()
    train(model, opt, data[args.resume_at :], rank, world, args.steps - args.resume_at)
    out["dcp"] = params(model)

    # full state dicts: rank 0 writes one torch.save file, every rank loads it (weights_only=True)
    path = os.path.join(args.out, "full.pt")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, opt = build(mesh)
    train(model, opt, data, rank, world, args.resume_at)
    state = {
        "model": get_model_state_dict(model, options=opts),
        "optim": get_optimizer_state_dict(model, opt, options=opts),
    }
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    loaded = torch.load(path, weights_only=True)
    model, opt = build(mesh)
    set_model_state_dict(model, loaded["model"], options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, opt, loaded["optim"], options=StateDictOptions(full_state_dict=True))
    train(model, opt, data[args.resume_at :], rank, world, args.steps - args.resume_at)
    out["full"] = params(model)

    # the distributed basis against the gathered matrix
    g = torch.Generator().manual_seed(3)
    cases = {
        "well": torch.randn(13, 8, generator=g) @ torch.diag(torch.logspace(0, -2, 8)),
        "deficient": torch.randn(13, 3, generator=g) @ torch.randn(3, 8, generator=g),
    }
    out["linalg"] = {}
    for name, y in cases.items():
        rows = torch.arange(13).chunk(world)[rank]
        u, sv, gathered = sharded_left_singular(y[rows], dist.group.WORLD)
        parts = [None] * world
        dist.all_gather_object(parts, u)
        out["linalg"][name] = {"y": y, "u": torch.cat(parts), "sv": sv, "gathered": gathered}
    # a non-finite gradient in rank 0's shard only: every rank skips that parameter (the decision is all-reduced)
    model, opt = build(mesh)
    train(model, opt, data, rank, world, 1)
    before = params(model)
    per = data[1].shape[0] // world
    model.loss(data[1][rank * per : (rank + 1) * per]).backward()
    if rank == 0:
        named = dict(model.named_parameters())
        for name in BAD:
            named[name].grad.to_local()[0].fill_(float("inf"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out["nonfinite"] = {
        "before": before,
        "after": params(model),
        "skipped": sum(
            int(m.group(1)) for w in caught if (m := re.search(r"skipped the step of (\d+) parameter", str(w.message)))
        ),
    }

    # what is refused on DTensor parameters, with the message
    out["errors"] = {}
    for name, kw in (("gradient", {"subspace_source": "gradient"}), ("bits8", {"state_bits": 8})):
        model = shard(TinyLM(), mesh)
        opt = AdaRankGrad(param_groups(model, include_embeddings=True), **{**SETTINGS, **kw})
        model.loss(data[0][:4]).backward()
        try:
            opt.step()
        except NotImplementedError as err:
            out["errors"][name] = str(err)
    try:
        LayerwiseUpdater(opt).attach(model)
    except ValueError as err:
        out["errors"]["layerwise"] = str(err)
    torch.save(out, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
