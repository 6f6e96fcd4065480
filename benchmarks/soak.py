"""Soak run: many AdaRankGrad steps of a small model on CPU, watching memory, ranks and refreshes.

    python benchmarks/soak.py --steps 10000 --every 100 --out benchmarks/results/soak_cpu

Every ``--every`` steps it records the process RSS, the optimizer's state bytes, the ranks (mean, min, max) and
the total number of subspace refreshes; it writes ``<out>.csv``, ``<out>.png`` and prints a summary with the
RSS/state growth after warm-up (the first ``--warmup`` steps). Settings make refreshes frequent (``min_gap=2``,
``max_gap=10``) and the data drift, so ranks keep changing.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import time
from pathlib import Path

import torch
from torch import nn

from lightning_adarank import AdaRankGrad, param_groups


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(steps: int, every: int, width: int = 64, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 8))
    opt = AdaRankGrad(param_groups(net), lr=1e-3, max_rank=8, min_gap=2, max_gap=10, tol=0.9, energy=0.9)
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 8, generator=g)
    rows = []
    for step in range(1, steps + 1):
        x = torch.randn(32, 32, generator=g)
        drift = torch.sin(torch.tensor(step / 500.0))  # the target moves: subspaces and ranks keep changing
        y = x @ (teacher * (1 + drift)) + 0.1 * torch.randn(32, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if step % every == 0:
            gc.collect()
            ranks = list(opt.ranks().values())
            rows.append(
                {
                    "step": step,
                    "rss_mb": rss_bytes() / 2**20,
                    "state_bytes": opt.state_bytes(),
                    "rank_mean": sum(ranks) / len(ranks),
                    "rank_min": min(ranks),
                    "rank_max": max(ranks),
                    "refreshes": sum(s.refreshes for s in opt.subspaces().values()),
                }
            )
    return rows


def growth(rows: list[dict], warmup: int) -> dict[str, float]:
    """RSS (MB) and state bytes: max after warm-up minus the value at the end of warm-up."""
    after = [r for r in rows if r["step"] >= warmup]
    base = after[0]
    return {
        "rss_mb": max(r["rss_mb"] for r in after) - base["rss_mb"],
        "state_bytes": max(r["state_bytes"] for r in after) - base["state_bytes"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    ax[0].plot(steps, [r["rss_mb"] for r in rows])
    ax[0].set_ylabel("RSS (MB)")
    ax[1].plot(steps, [r["state_bytes"] / 1024 for r in rows])
    ax[1].set_ylabel("optimizer state (KiB)")
    ax[2].plot(steps, [r["rank_mean"] for r in rows], label="mean rank")
    ax[2].fill_between(steps, [r["rank_min"] for r in rows], [r["rank_max"] for r in rows], alpha=0.3, label="min-max")
    ax2 = ax[2].twinx()
    ax2.plot(steps, [r["refreshes"] for r in rows], "k--", lw=0.8)
    ax2.set_ylabel("refreshes")
    ax[2].set_ylabel("rank")
    ax[2].set_xlabel("step")
    ax[2].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=1000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak_cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = soak(args.steps, args.every, args.width)
    wall = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out.with_suffix(".png"))
    gr = growth(rows, args.warmup)
    first, last = rows[0], rows[-1]
    print(f"steps {args.steps}, wall {wall:.0f} s, refreshes {last['refreshes']}")
    print(
        f"RSS MB: first {first['rss_mb']:.1f}, after warm-up {[r for r in rows if r['step'] >= args.warmup][0]['rss_mb']:.1f},"
        f" last {last['rss_mb']:.1f}, max growth after warm-up {gr['rss_mb']:.2f}"
    )
    print(
        f"state bytes: min {min(r['state_bytes'] for r in rows)}, max {max(r['state_bytes'] for r in rows)},"
        f" max growth after warm-up {gr['state_bytes']}"
    )
    print(f"rank: min {min(r['rank_min'] for r in rows)}, max {max(r['rank_max'] for r in rows)}")


if __name__ == "__main__":
    main()
