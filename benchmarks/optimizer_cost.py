"""Optimizer cost on real model shapes: step time (normal, refresh, amortized), state bytes, peak memory.

Compares, in one process and on the same gradients: ``torch.optim.AdamW(fused=True)``, peft LoRA (rank r,
fused AdamW on the adapters and the classifier head), ``galore_torch.GaLoreAdamW`` (rank r, SVD refresh), and
``AdaRankGrad`` (``max_rank=r``) with the embeddings left to AdamW (GaLore's recipe) and with them projected.

    python benchmarks/optimizer_cost.py --quick          # BERT-base, r=8, few repeats (a few minutes, 2 cores)
    python benchmarks/optimizer_cost.py                  # every model, r in 4 8 16 (+128 for LLaMA)
    python benchmarks/optimizer_cost.py --device cuda    # GPU mode (CUDA events, max_memory_allocated)

Method (also written into the output header):

* models are built from configs (random init, fp32, no downloads); gradients come from ONE real
  forward/backward on random token ids (batch ``--batch`` × ``--seq``), then ``opt.step()`` alone is timed
  on those gradients, re-used for every step and every optimizer;
* normal step: warm-up steps excluded, median of ``--repeats``; refresh step: AdaRankGrad with every
  projected matrix ``pending``; GaLore with its step counter set to a multiple of ``update_proj_gap`` (when
  ``GaLoreProjector.project`` recomputes the SVD); the optimizer's first step (state allocation + first
  subspace) is the refresh warm-up;
* amortized = (normal·(gap−1) + refresh)/gap at gap 200 (GaLore's default ``update_proj_gap``) and at
  gap 20 (AdaRankGrad's ``min_gap``: the most often it can refresh, its worst case);
* state bytes: every tensor in ``optimizer.state`` (GaLore's projector matrices included) after the first
  real step, so AdaRankGrad's adaptive rank is chosen from a real gradient;
* peak memory of a whole training step (forward + backward + step, two steps so that one refresh and one
  normal step are included): each optimizer in a fresh subprocess; peak RSS on CPU (includes the Python/torch
  runtime, see the "fwd+bwd only" row), ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

from cost_setup import (  # noqa: E402
    ALL_MODELS,
    GENEFORMER_CONFIG,
    GPU_MODELS,
    LLAMA_EXTRA_RANK,
    Variant,
    arm,
    build_model,
    count_ops,
    forward_backward,
    lora_model,
    make_batch,
    make_optimizer,
    rank_summary,
    variants,
)


@dataclass
class Row:
    v: Variant
    trainable: int = 0
    state: int | None = None
    first: float | None = None
    normal: float | None = None
    refresh: float | None = None
    ranks: str = ""
    peak: int | None = None
    ops: int | None = None
    extra: dict = field(default_factory=dict)


def time_variant(model, v: Variant, device, args, ops: bool | None = None) -> Row:
    from lightning_adarank import optimizer_state_bytes  # noqa: PLC0415

    opt = make_optimizer(model, v)
    row = Row(v, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    row.first = C.time_ms(opt.step, device, repeats=1, warmup=0)[0]
    row.state = optimizer_state_bytes(opt)
    if v.key.startswith("adarank"):
        row.ranks = rank_summary(opt)
    stat = min if args.stat == "min" else C.median
    row.normal = stat(
        C.time_ms(opt.step, device, repeats=args.repeats, warmup=args.warmup, before=lambda: arm(opt, v, False))
    )
    if args.ops if ops is None else ops:
        arm(opt, v, False)
        row.ops = count_ops(opt.step, device)
    if v.key == "galore" or v.key.startswith("adarank"):
        row.refresh = stat(
            C.time_ms(
                opt.step,
                device,
                repeats=args.refresh_repeats,
                warmup=args.refresh_warmup,
                before=lambda: arm(opt, v, True),
            )
        )
    opt = None  # free the state before the next variant (the timing lambdas close over the name)
    gc.collect()
    return row


def measure_model(name: str, ranks: list[int], device, args) -> list[Row]:
    model, kind, vocab, head = build_model(name)
    model.to(device).train()
    batch = make_batch(kind, vocab, args.batch, args.seq, device)
    forward_backward(model, batch)  # the gradients every full-model optimizer steps on
    rows = []
    for v in variants(ranks, loop=args.loop):
        if args.peers and v.key not in args.peers:
            continue
        print(f"  [{name}] timing {v.label} ...", file=sys.stderr, flush=True)
        if v.key == "lora":
            lm = lora_model(model, v.rank, head)
            forward_backward(lm, batch)
            rows.append(time_variant(lm, v, device, args))
            del lm
            gc.collect()
        else:
            rows.append(time_variant(model, v, device, args))
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def child_peak(spec: dict) -> None:
    """Fresh process: build, (wrap), optimizer, ``steps`` whole training steps; report peak memory."""
    device = torch.device(spec["device"])
    C.set_threads(spec["threads"])
    model, kind, vocab, head = build_model(spec["model"])
    v = Variant(spec["opt"], spec["rank"])
    if v.key == "lora":
        model = lora_model(model, v.rank, head)
    model.to(device).train()
    batch = make_batch(kind, vocab, spec["batch"], spec["seq"], device)
    opt = None if v.key == "none" else make_optimizer(model, v)
    C.reset_peak(device)
    for _ in range(spec["steps"]):
        forward_backward(model, batch)
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
    C.emit_result({"peak": C.peak_bytes(device)})


def measure_peaks(name: str, ranks: list[int], rows: list[Row], device, threads: int, args) -> int | None:
    """Fill ``row.peak`` from fresh subprocesses; return the fwd+bwd-only peak."""
    base = dict(model=name, device=str(device), threads=threads, batch=args.batch, seq=args.seq, steps=2)
    script = str(Path(__file__).resolve())
    specs = [{**base, "opt": "none", "rank": None}] + [{**base, "opt": r.v.key, "rank": r.v.rank} for r in rows]
    print(
        f"  [{name}] peak memory: {len(specs)} fresh processes, {args.jobs} at a time ...", file=sys.stderr, flush=True
    )
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # peak memory is per process: parallel is safe
        peaks = list(pool.map(lambda s: C.run_child([script, "--child", json.dumps(s)])["peak"], specs))
    for row, peak in zip(rows, peaks[1:]):
        row.peak = peak
    return peaks[0]


# ----------------------------------------------------------------------------- tables
def model_table(name: str, rows: list[Row], none_peak: int | None, gaps=(200, 20)) -> str:
    with_ops = any(r.ops is not None for r in rows)
    heads = [
        "optimizer",
        "trainable params",
        "state MiB",
        "normal step ms",
        "refresh step ms",
        *[f"amortized ms (gap {g})" for g in gaps],
        "first step ms",
        "ranks mean (min–max)",
        "peak train-step MiB",
        "peak − fwd/bwd-only MiB",
    ] + (["ops / normal step"] if with_ops else [])
    out = []
    if none_peak is not None:
        out.append(
            [Variant("none").label, "—", "—", "—", "—", *["—" for _ in gaps], "—", "", C.mib(none_peak), "0.0"]
            + (["—"] if with_ops else [])
        )
    for r in rows:
        amort = [C.ms(C.amortized(r.normal, r.refresh if r.refresh is not None else r.normal, g)) for g in gaps]
        out.append(
            [
                r.v.label,
                f"{r.trainable / 1e6:.1f}M",
                C.mib(r.state),
                C.ms(r.normal),
                C.ms(r.refresh),
                *amort,
                C.ms(r.first),
                r.ranks,
                C.mib(r.peak),
                C.mib(r.peak - none_peak) if (r.peak is not None and none_peak is not None) else "—",
            ]
            + ([str(r.ops) if r.ops is not None else "—"] if with_ops else [])
        )
    return f"### {name}\n\n" + C.markdown_table(heads, out)


def ratio_table(name: str, rows: list[Row]) -> str:
    """AdaRankGrad / peer for every rank (below 1×: AdaRankGrad is faster or smaller)."""
    by = {(r.v.key, r.v.rank): r for r in rows}
    adamw = by.get(("adamw", None))
    heads = [
        "AdaRankGrad variant",
        "peer",
        "normal step",
        "refresh step",
        "amortized (gap 200)",
        "state bytes",
        "peak train-step",
    ]
    out = []
    for (key, rank), a in by.items():
        if not key.startswith("adarank"):
            continue
        for peer in (adamw, by.get(("galore", rank)), by.get(("lora", rank))):
            if peer is None:
                continue
            pa = C.amortized(peer.normal, peer.refresh or peer.normal, 200)
            out.append(
                [
                    a.v.label,
                    peer.v.label,
                    C.ratio(a.normal, peer.normal),
                    C.ratio(a.refresh, peer.refresh) if peer.refresh is not None else "—",
                    C.ratio(C.amortized(a.normal, a.refresh, 200), pa),
                    C.ratio(a.state, peer.state),
                    C.ratio(a.peak, peer.peak),
                ]
            )
    return f"#### {name}: ratios AdaRankGrad / peer (below 1× = AdaRankGrad faster or smaller)\n\n" + C.markdown_table(
        heads, out
    )


# ----------------------------------------------------------------------------- depth scaling (operators per step)
DEPTH_VARIANTS = ("adamw", "galore", "adarank_emb_grouped", "adarank_emb_compiled", "adarank_emb_loop")


def depth_section(device, args) -> str:
    """Operators and step times at ``--depth-layers`` layers of one BERT width: does the step grow with depth?"""
    rows = {}
    for layers in args.depth_layers:
        name = f"bert-w{args.depth_width}-L{layers}"
        model, kind, vocab, _ = build_model(name)
        model.to(device).train()
        forward_backward(model, make_batch(kind, vocab, args.batch, args.seq, device))
        for key in DEPTH_VARIANTS:
            v = Variant(key, None if key == "adamw" else args.depth_rank)
            print(f"  [{name}] {v.label} ...", file=sys.stderr, flush=True)
            rows[(layers, key)] = time_variant(model, v, device, args, ops=True)
        del model
        gc.collect()
    lo, hi = min(args.depth_layers), max(args.depth_layers)
    unit = "CUDA kernels + memory ops" if device.type == "cuda" else "top-level aten operators"
    heads = [
        "optimizer",
        *[f"ops @ {n} layers" for n in args.depth_layers],
        f"ops {hi}L / {lo}L",
        *[f"normal ms @ {n}L" for n in args.depth_layers],
        *[f"refresh ms @ {n}L" for n in args.depth_layers],
        f"normal / AdamW @ {hi}L",
        f"refresh / normal @ {hi}L",
    ]
    out = []
    for key in DEPTH_VARIANTS:
        r = {n: rows[(n, key)] for n in args.depth_layers}
        adamw = rows[(hi, "adamw")]
        out.append(
            [
                r[hi].v.label,
                *[str(r[n].ops) for n in args.depth_layers],
                C.ratio(r[hi].ops, r[lo].ops),
                *[C.ms(r[n].normal) for n in args.depth_layers],
                *[C.ms(r[n].refresh) for n in args.depth_layers],
                C.ratio(r[hi].normal, adamw.normal),
                C.ratio(r[hi].refresh, r[hi].normal),
            ]
        )
    title = (
        f"### Depth scaling: BERT width {args.depth_width}, {' and '.join(map(str, args.depth_layers))} layers, "
        f"r≤{args.depth_rank}, embeddings projected\n\nops = {unit} issued by one normal step (torch.profiler); "
        "'grouped' = grouped=True (the default on GPUs), 'compile=True' = its per-chunk math through torch.compile "
        "(compiled before the timings), 'per-matrix loop' = grouped=False (the default on CPU)\n\n"
    )
    return title + C.markdown_table(heads, out)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="BERT-base, r=8, few repeats (a few minutes on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="tiny model, seconds (tests only)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--models", nargs="+", default=None, help=f"subset of {', '.join(ALL_MODELS)}")
    p.add_argument("--ranks", nargs="+", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed normal steps (median)")
    p.add_argument("--warmup", type=int, default=None, help="untimed normal steps first")
    p.add_argument("--refresh-repeats", type=int, default=None, help="timed refresh steps (median)")
    p.add_argument(
        "--refresh-warmup", type=int, default=None, help="untimed refresh steps besides the first step (which is one)"
    )
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="statistic of the timed steps (min: robust on a shared machine, where load only adds time)",
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="peak-memory subprocesses run at a time (each measures only itself; >1 needs the RAM)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out-dir", default=None, help="where the .md goes (default benchmarks/results)")
    p.add_argument("--ops", action="store_true", help="count the operators (CUDA: kernels) of one normal step")
    p.add_argument("--loop", action="store_true", help="add AdaRankGrad's per-matrix loop (grouped=False)")
    p.add_argument(
        "--peers",
        nargs="+",
        default=None,
        help="subset of optimizer keys: adamw lora galore adarank adarank_emb adarank_emb_loop "
        "adarank_emb_grouped (adarank*: grouped=None, the device's default)",
    )
    p.add_argument("--depth", action="store_true", help="add the depth-scaling table (operators per step)")
    p.add_argument("--depth-only", action="store_true", help="only the depth-scaling table")
    p.add_argument("--depth-width", type=int, default=256)
    p.add_argument("--depth-layers", nargs="+", type=int, default=[6, 12])
    p.add_argument("--depth-rank", type=int, default=8)
    p.add_argument(
        "--gpu-run",
        action="store_true",
        help="issue 13's CUDA table in one short run: BERT-base, RoBERTa-base, Geneformer-12L-30M, "
        "LLaMA-130M/350M at r=8; AdamW, GaLore, AdaRankGrad grouped and per-matrix; operator counts; "
        "depth scaling; no peak-memory subprocesses",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.models = a.models or ["tiny-bert"]
        a.ranks = a.ranks or [4]
        a.batch, a.seq, a.no_memory = 2, 16, True
        a.out_dir = a.out_dir or str(Path(tempfile.gettempdir()) / "adarank_bench_smoke")
    defaults = (
        dict(repeats=3, warmup=1, refresh_repeats=1, refresh_warmup=0)
        if (a.quick or a.smoke)
        else dict(repeats=10, warmup=3, refresh_repeats=3, refresh_warmup=1)
    )
    for k, val in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, val)
    if a.quick:
        a.models = a.models or ["bert-base"]
        a.ranks = a.ranks or [8]
    if a.gpu_run:
        a.device = "cuda" if a.device == "auto" else a.device
        a.models = a.models or list(GPU_MODELS)
        a.ranks = a.ranks or [8]
        a.peers = a.peers or ["adamw", "galore", "adarank", "adarank_emb_grouped", "adarank_emb_loop"]
        a.loop = a.ops = a.depth = a.no_memory = True
        a.refresh_repeats, a.refresh_warmup = min(a.refresh_repeats, 2), 0  # GaLore's SVD refresh is seconds
    if a.smoke:
        a.depth_layers, a.depth_width = [1, 2], 64
    a.models = a.models or list(ALL_MODELS)
    a.extra_llama_rank = a.ranks is None  # r=128 for the LLaMA shapes in the default full run
    a.ranks = a.ranks or [4, 8, 16]
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_peak(json.loads(args.child))
        return
    device = C.pick_device(args.device)
    threads = C.set_threads(args.threads)
    notes = [
        f"gradients: one real forward/backward on random token ids, batch {args.batch} × seq {args.seq}, fp32, "
        "re-used for every timed step",
        f"normal step: {args.stat} of {args.repeats} after {args.warmup} warm-up; refresh step: {args.stat} of "
        f"{args.refresh_repeats} after the first step + {args.refresh_warmup} warm-up",
        "amortized = (normal·(gap−1) + refresh)/gap; gap 200 = GaLore's default; gap 20 = AdaRankGrad's min_gap "
        "(its most frequent refresh)",
        "state = all tensors in optimizer.state after the first step; '+emb' = embeddings projected too "
        "(include_embeddings=True); without it embeddings get AdamW, as in GaLore's recipe",
        "every optimizer projects/adapts the same nn.Linear weights (all-linear; LoRA keeps the classifier "
        "head fully trainable); GaLore: galore_torch.GaLoreAdamW (per-parameter Python loop, unfused Adam), "
        "scale 0.25, gap 200",
        "peak: whole training step (fwd+bwd+step, 2 steps) in a fresh process per row; "
        + ("CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS (includes ~the Python/torch runtime)"),
    ]
    text = C.header("Optimizer cost on real model shapes", device, threads, notes)
    print(text)
    tag = (
        "optimizer_cost"
        + ("_quick" if args.quick else "")
        + ("_gpu_run" if args.gpu_run else "")
        + ("_depth" if args.depth_only else "")
    )
    if args.depth or args.depth_only:
        part = depth_section(device, args) + "\n"
        print(part, flush=True)
        text += part
        C.save(tag, device, text, args.out_dir)
    for name in [] if args.depth_only else args.models:
        if name == "geneformer-12L-30M" and not GENEFORMER_CONFIG.exists():
            msg = f"skipped {name}: {GENEFORMER_CONFIG} not found\n"
            print(msg)
            text += msg + "\n"
            continue
        ranks = list(args.ranks) + ([LLAMA_EXTRA_RANK] if name.startswith("llama") and args.extra_llama_rank else [])
        rows = measure_model(name, ranks, device, args)
        none_peak = None if args.no_memory else measure_peaks(name, ranks, rows, device, threads, args)
        part = model_table(name, rows, none_peak) + "\n" + ratio_table(name, rows) + "\n"
        print(part, flush=True)
        text += part
        C.save(tag, device, text, args.out_dir)  # partial results
    path = C.save(tag, device, text, args.out_dir)
    print(f"written {path}")


if __name__ == "__main__":
    main()
