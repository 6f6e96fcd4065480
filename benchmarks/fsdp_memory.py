"""Per-rank memory and step time of a small LLaMA under FSDP2: AdamW vs AdaRankGrad.

    python benchmarks/fsdp_memory.py                 # CPU: 2 gloo processes, llama_tiny
    python benchmarks/fsdp_memory.py --smoke         # seconds (tests)
    python benchmarks/fsdp_memory.py --device cuda   # every visible GPU (NCCL; world size 1 still runs FSDP2)

Each method runs in its own ``torchrun`` launch (so that each process's peak RSS is its own): a
``transformers`` LLaMA (preset of ``nlp.pretrain.LLAMA_PRESETS``, vocabulary ``--vocab``), every decoder layer
and the root wrapped by ``fully_shard``, random tokens (memory and time do not depend on the data), ``--steps``
steps of ``--batch`` sequences of ``--seq`` tokens per rank. ``adarankgrad`` projects the attention and MLP linears
(GaLore's choice) at ``max_rank=--rank``; embeddings, ``lm_head`` and norms get its exact AdamW, on their shards.
``adarankgrad_emb`` projects the embedding and ``lm_head`` too (tall matrices: right side, moments sharded).

Reported per rank (the worst rank): optimizer state bytes held by the rank (local shards + replicated pieces),
peak memory (CPU: peak RSS of the process; CUDA: ``max_memory_allocated``) and its growth over the memory in use
just before the first step (model shards and the process's baseline excluded), and the median time of
``optimizer.step()`` and of a whole step (forward + backward + step) after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402

METHODS = ("adamw", "adarankgrad", "adarankgrad_emb")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    from lightning_adarank import AdaRankGrad, param_groups  # noqa: PLC0415
    from nlp.pretrain import llama_config  # noqa: PLC0415

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    mesh = init_device_mesh(device.type, (world,))
    torch.manual_seed(0)
    cfg = llama_config(args.vocab, args.model, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).to(device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if args.method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif args.method == "adarankgrad":
        opt = AdaRankGrad(param_groups(model, r"self_attn|mlp"), lr=1e-3, max_rank=args.rank)
    else:  # also the embedding and lm_head (tall: right side, moments sharded with the rows)
        opt = AdaRankGrad(param_groups(model, "all-linear", include_embeddings=True), lr=1e-3, max_rank=args.rank)
    gen = torch.Generator().manual_seed(rank)
    step_ms, total_ms = [], []
    common.reset_peak(device)
    start = common.current_bytes(device)
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
        common.sync(device)
        t0 = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        common.sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync(device)
        t2 = time.perf_counter()
        if i >= args.warmup:
            step_ms.append((t2 - t1) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
    if isinstance(opt, AdaRankGrad):
        state = opt.state_bytes()
    else:
        state = sum(
            v.to_local().numel() * v.element_size() if hasattr(v, "to_local") else v.numel() * v.element_size()
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
    peak = common.peak_bytes(device)
    mine = {
        "rank": rank,
        "state": state,
        "peak": peak,
        "growth": peak - start,
        "opt_ms": statistics.median(step_ms),
        "step_ms": statistics.median(total_ms),
        "params": sum(p.numel() for p in model.parameters()),
        "ranks": sorted(set(opt.ranks().values())) if isinstance(opt, AdaRankGrad) else [],
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        common.emit_result({"world": world, "ranks": everyone})
    dist.destroy_process_group()


def launch(args: argparse.Namespace, method: str) -> dict:
    world = max(1, torch.cuda.device_count()) if args.device == "cuda" else args.world
    argv = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(world),
        __file__,
        "--worker",
        "--method",
        method,
        *sys.argv[1:],
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(common.REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=3600, cwd=common.REPO, env=env
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(common._RESULT_TAG):
            return json.loads(line[len(common._RESULT_TAG) :])
    raise RuntimeError(f"{method} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="llama_tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--world", type=int, default=2, help="CPU processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU process")
    ap.add_argument("--smoke", action="store_true", help="a few seconds (tests)")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.vocab, args.seq, args.batch, args.steps, args.warmup, args.rank = 512, 16, 2, 2, 1, 8
    if args.worker:
        worker(args)
        return
    results = {m: launch(args, m) for m in METHODS}
    device = torch.device(args.device)
    rows = []
    for m in METHODS:
        per = results[m]["ranks"]
        worst = {k: max(r[k] for r in per) for k in ("state", "peak", "growth", "opt_ms", "step_ms")}
        results[m]["worst"] = worst
        ranks = per[0]["ranks"]
        rows.append(
            [
                m,
                results[m]["world"],
                f"{per[0]['params'] / 1e6:.2f}M",
                common.mib(worst["state"]),
                common.mib(worst["peak"]),
                common.mib(worst["growth"]),
                common.ms(worst["opt_ms"]),
                common.ms(worst["step_ms"]),
                f"{min(ranks)}–{max(ranks)}" if ranks else "—",
            ]
        )
    b = results["adamw"]["worst"]
    for m in METHODS[1:]:
        a = results[m]["worst"]
        rows.append(
            [
                f"{m} / adamw",
                "",
                "",
                *(common.ratio(a[k], b[k]) for k in ("state", "peak", "growth", "opt_ms", "step_ms")),
                "",
            ]
        )
    notes = [
        f"{args.model}, vocabulary {args.vocab}, {args.batch}×{args.seq} tokens per rank, {args.steps} steps after"
        f" {args.warmup} warm-up; AdaRankGrad max_rank={args.rank} on self_attn|mlp (adarankgrad_emb: every linear, the embedding and lm_head too); per-rank numbers are the"
        " worst rank's; peak memory: "
        + (
            "CUDA max_memory_allocated"
            if args.device == "cuda"
            else "peak RSS of the process (model, activations, state, communication buffers)"
        )
    ]
    text = common.header("FSDP2 per-rank memory and step time", device, args.threads, notes) + "\n"
    text += common.markdown_table(
        [
            "optimizer",
            "world",
            "params",
            "state / rank (MiB)",
            "peak / rank (MiB)",
            "peak − RSS before step 1 (MiB)",
            "optimizer.step (ms)",
            "whole step (ms)",
            "ranks",
        ],
        rows,
    )
    print(text)
    if not args.smoke:
        print("saved", common.save("fsdp_memory", device, text, args.out_dir))


if __name__ == "__main__":
    main()
