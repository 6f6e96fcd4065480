"""Scaling: refresh and step time of AdaRankGrad vs GaLore as one weight matrix grows (hidden 256 → 4096).

One ``(h, 4h)`` matrix (the shape of a transformer MLP weight), rank ``r`` (default 8):

* **refresh**: AdaRankGrad's :func:`lightning_adarank.optim.linalg.low_rank_basis` (randomized range finder with
  ``oversample`` 4 and 1 power iteration + adaptive rank) vs GaLore's ``GaLoreProjector.get_orthogonal_matrix``
  (``torch.linalg.svd`` of the full gradient, as galore-torch does);
* **normal step**: ``opt.step()`` of ``AdaRankGrad`` / ``galore_torch.GaLoreAdamW`` / ``torch.optim.AdamW
  (fused=True)`` on that one parameter, no refresh.

Fitted log-log slopes against ``h``: the range finder costs ``O(m·n·k)`` = ``O(h²)`` at fixed rank, the full
SVD ``O(m·n·min(m, n))`` = ``O(h³)``.

    python benchmarks/scaling.py --quick     # h up to 2048
    python benchmarks/scaling.py             # h up to 4096
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
LONG_CALL_MS = 2000.0  # a call this long is timed once (after no warm-up): see the header note


def gradient(h: int, device, seed: int = 0) -> torch.Tensor:
    """Low-rank-ish gradient: rank-32 signal with a decaying spectrum plus 10 % Gaussian noise, ``(h, 4h)``."""
    g = torch.Generator().manual_seed(seed)
    k = 32
    u = torch.randn(h, k, generator=g) * (0.8 ** torch.arange(k, dtype=torch.float32))
    x = u @ torch.randn(k, 4 * h, generator=g) / k**0.5
    x += 0.1 * x.std() * torch.randn(h, 4 * h, generator=g)
    return x.to(device)


def timed(fn, device, repeats: int, warmup: int, before=None) -> float:
    """Median ms; a first call longer than ``LONG_CALL_MS`` is taken as the measurement (no repeats)."""
    first = C.time_ms(fn, device, repeats=1, warmup=0, before=before)[0]
    if first > LONG_CALL_MS:
        return first
    return C.median(C.time_ms(fn, device, repeats=repeats, warmup=max(0, warmup - 1), before=before))


def measure(h: int, rank: int, device, args) -> dict:
    from galore_torch import GaLoreAdamW  # noqa: PLC0415
    from galore_torch.galore_projector import GaLoreProjector  # noqa: PLC0415

    from lightning_adarank import AdaRankGrad  # noqa: PLC0415
    from lightning_adarank.optim.linalg import low_rank_basis  # noqa: PLC0415

    g = gradient(h, device)
    gen = torch.Generator(device=device)
    out = {"h": h, "shape": (h, 4 * h)}

    def ada_refresh():
        gen.manual_seed(0)
        low_rank_basis(g, "left", energy=0.9, min_rank=1, max_rank=rank, oversample=4, power_iters=1, generator=gen)

    projector = GaLoreProjector(rank, update_proj_gap=200, scale=0.25, proj_type="std")
    out["ada_refresh"] = timed(ada_refresh, device, args.repeats, args.warmup)
    out["galore_refresh"] = timed(
        lambda: projector.get_orthogonal_matrix(g, rank, "left"), device, args.repeats, args.warmup
    )

    def param():
        p = torch.nn.Parameter(torch.zeros(h, 4 * h, device=device))
        p.grad = g
        return p

    p = param()
    ada = AdaRankGrad([p], lr=1e-4, max_rank=rank)
    ada.step()

    def ada_normal():
        for st in ada.state.values():
            st["pending"] = False

    out["ada_step"] = timed(ada.step, device, args.repeats, args.warmup, before=ada_normal)
    out["ada_rank"] = next(iter(ada.ranks().values()))
    ada = None  # free the state (ada_normal closes over the name)
    p = param()
    gal = GaLoreAdamW(
        [{"params": [p], "rank": rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
        lr=1e-4,
        no_deprecation_warning=True,
    )
    gal.step()

    def gal_normal():
        for st in gal.state.values():
            st["step"] = 1

    out["galore_step"] = timed(gal.step, device, args.repeats, args.warmup, before=gal_normal)
    gal = None  # free the state (gal_normal closes over the name)
    p = param()
    adamw = torch.optim.AdamW([p], lr=1e-4, fused=True)
    adamw.step()
    out["adamw_step"] = timed(adamw.step, device, args.repeats, args.warmup)
    return out


SERIES = [
    ("ada_refresh", "AdaRankGrad refresh (range finder + rank)", 2),
    ("galore_refresh", "GaLore refresh (full SVD)", 3),
    ("ada_step", "AdaRankGrad normal step", 2),
    ("galore_step", "GaLore normal step", 2),
    ("adamw_step", "AdamW (fused) step", 2),
]


def slope(hs, ys) -> float:
    return float(np.polyfit(np.log(hs), np.log(ys), 1)[0])


def plot(results: list[dict], rank: int, path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    hs = [r["h"] for r in results]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, label, _ in SERIES:
        ys = [r[key] for r in results]
        ax.loglog(hs, ys, "o-" if "refresh" in key else "s--", label=f"{label} (slope {slope(hs, ys):.2f})")
    ax.set_xlabel("h (matrix h × 4h)")
    ax.set_ylabel("ms (median)")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(hs, [str(h) for h in hs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="h up to 2048, 3 repeats")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (tests only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sizes", nargs="+", type=int, default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out-dir", default=None)
    p.add_argument(
        "--replot",
        default=None,
        metavar="RESULTS.md",
        help="only redraw the PNG beside a results file written by this script",
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes = a.sizes or [32, 64, 128]
        a.rank = min(a.rank, 4)
        a.out_dir = a.out_dir or str(Path(tempfile.gettempdir()) / "adarank_bench_smoke")
    a.sizes = a.sizes or ([256, 512, 1024, 2048] if a.quick else [256, 512, 1024, 2048, 4096])
    a.repeats = a.repeats or (3 if (a.quick or a.smoke) else 7)
    return a


def replot(md: Path) -> Path:
    """Redraw ``<md>.png`` from the table in a results file (no measurement)."""
    cols = {"ada_refresh": 2, "galore_refresh": 3, "ada_step": 5, "galore_step": 6, "adamw_step": 7}
    results, rank, title = [], 8, md.stem
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            results.append({"h": int(cells[0]), **{k: float(cells[i].replace(",", "")) for k, i in cols.items()}})
        elif line.startswith("- one (h × 4h) fp32 matrix, rank "):
            rank = int(line.split("rank ")[1].split(";")[0])
        elif line.startswith("- machine:"):
            dev = line.split("device `")[1].split("`")[0]
            thr = line.rsplit("= ", 1)[1]
            title = f"AdaRankGrad vs GaLore, rank {rank}, {dev}, {thr} threads"
    png = md.with_suffix(".png")
    plot(results, rank, png, title)
    return png


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        print(f"written {replot(Path(args.replot))}")
        return
    device = C.pick_device(args.device)
    threads = C.set_threads(args.threads)
    notes = [
        f"one (h × 4h) fp32 matrix, rank {args.rank}; gradient = rank-32 signal with decaying spectrum + 10 % noise",
        f"median of {args.repeats} after {args.warmup} warm-up; a call longer than {LONG_CALL_MS / 1e3:.0f} s "
        "is timed once, cold (the full SVD at large h on CPU)",
        "slopes: np.polyfit of log(ms) on log(h) over all sizes (and over the largest three); expected 2 for the "
        "range finder (m·n·k at fixed k), 3 for the full SVD (m·n·min(m,n))",
    ]
    text = C.header("Scaling with the matrix size", device, threads, notes)
    print(text, flush=True)
    results = []
    for h in args.sizes:
        print(f"  h={h} ...", file=sys.stderr, flush=True)
        results.append(measure(h, args.rank, device, args))
    heads = [
        "h",
        "matrix",
        "AdaRankGrad refresh ms",
        "GaLore SVD refresh ms",
        "refresh ratio Ada/GaLore",
        "AdaRankGrad step ms",
        "GaLore step ms",
        "AdamW fused step ms",
        "step ratio Ada/GaLore",
        "step ratio Ada/AdamW",
        "Ada rank",
    ]
    rows = [
        [
            r["h"],
            f"{r['h']}×{4 * r['h']}",
            C.ms(r["ada_refresh"]),
            C.ms(r["galore_refresh"]),
            C.ratio(r["ada_refresh"], r["galore_refresh"]),
            C.ms(r["ada_step"]),
            C.ms(r["galore_step"]),
            C.ms(r["adamw_step"]),
            C.ratio(r["ada_step"], r["galore_step"]),
            C.ratio(r["ada_step"], r["adamw_step"]),
            r["ada_rank"],
        ]
        for r in results
    ]
    table = C.markdown_table(heads, rows)
    hs = [r["h"] for r in results]
    srows = []
    for key, label, expected in SERIES:
        ys = [r[key] for r in results]
        tail = slope(hs[-3:], ys[-3:]) if len(hs) > 3 else float("nan")
        srows.append(
            [
                label,
                f"{slope(hs, ys):.2f}",
                "—" if tail != tail else f"{tail:.2f}",
                expected if "refresh" in key else f"{expected} (memory-bound, ∝ m·n)",
            ]
        )
    slopes = C.markdown_table(["series", "slope (all h)", "slope (largest 3 h)", "expected"], srows)
    name = "scaling" + ("_quick" if args.quick else "")
    png = Path(args.out_dir or C.RESULTS) / f"{name}_{device.type}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.rank, png, f"AdaRankGrad vs GaLore, rank {args.rank}, {device.type}, {threads} threads")
    part = f"{table}\nFitted growth exponents (time ∝ h^slope):\n\n{slopes}\n![scaling]({png.name})\n"
    print(part)
    path = C.save(name, device, text + part, args.out_dir)
    print(f"written {path} and {png}")


if __name__ == "__main__":
    main()
