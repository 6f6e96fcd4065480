"""Tables and plot of ``memory_frontier.py``'s JSON lines: measured peaks against the memory model, per method and
model size, the model's predictions where nothing was run, and the 7B recipe at larger ranks.

    python benchmarks/memory_frontier_report.py runs.jsonl --out benchmarks/results/memory_frontier

writes ``<out>.md`` (tables) and ``<out>.png`` (peak against model size: measured points, the model's lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import memory_model  # noqa: E402

SIZES = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_3b", "llama_7b", "llama_13b")


def _gb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e9:.2f}"


def load(paths: list[Path]) -> list[dict]:
    """Every JSON line of ``paths``; a later measurement of the same (model, method) replaces an earlier one."""
    runs: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                d = json.loads(line)
                key = (d["model"], d["method"])
                if "peak_bytes" in d or key not in runs:
                    runs[key] = d
    return list(runs.values())


def repredict(runs: list[dict]) -> None:
    """Recompute every measured run's prediction with the current model (and the run's measured runtime)."""
    from nlp.pretrain import LLAMA_PRESETS

    for d in runs:
        if "peak_bytes" in d and d["model"] in LLAMA_PRESETS:
            p = memory_model.predict(
                LLAMA_PRESETS[d["model"]],
                d["method"],
                batch=d["batch"],
                seq=d["seq"],
                max_rank=d["max_rank"],
                runtime_bytes=d["predicted"]["runtime"],
                checkpointing=d.get("activation_checkpointing", True),
                rank=max(1, round(d["mean_rank"])) if d.get("mean_rank") else None,
            )
            d["predicted_bytes"] = p["total"]
            d["predicted"] = {k: v for k, v in p.items() if k not in ("total", "params")}
            d["model_error"] = d["peak_bytes"] / p["total"] - 1


def measured_table(runs: list[dict]) -> str:
    rows = [
        "| model | method | params | peak GB | model GB | model error | state MB | grads peak MB | s/step | loss first → last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(memory_model.METHODS)}
    for d in sorted(
        runs, key=lambda d: (SIZES.index(d["model"]) if d["model"] in SIZES else -1, order.get(d["method"], 99))
    ):
        if "peak_bytes" not in d:
            continue
        rows.append(
            f"| {d['model']} | {d['method']} | {d['params'] / 1e6:,.0f}M | {_gb(d['peak_bytes'])} | "
            f"{_gb(d['predicted_bytes'])} | {100 * d['model_error']:+.1f} % | {d['state_bytes'] / 1e6:,.1f} | "
            f"{d['grad_bytes_peak'] / 1e6:,.0f} | {d['seconds_per_step']:.1f} | {d['loss_first']:.3f} → {d['loss_last']:.3f} |"
        )
    return "\n".join(rows) + "\n"


def failures(runs: list[dict]) -> str:
    bad = [d for d in runs if "error" in d]
    return "".join(f"- {d['model']} {d['method']}: {d['error']}\n" for d in bad)


def runtimes(runs: list[dict]) -> dict[str, int]:
    """Each method's measured runtime (the probe's baseline), from its runs."""
    out: dict[str, int] = {}
    for d in runs:
        if "predicted" in d:
            out.setdefault(d["method"], d["predicted"]["runtime"])
    return out


def prediction_table(runs: list[dict], batch: int, seq: int, rank: int) -> str:
    from nlp.pretrain import LLAMA_PRESETS

    rt = runtimes(runs)
    methods = [m for m in memory_model.METHODS if m in rt]
    rows = ["| method | " + " | ".join(SIZES[3:]) + " |", "|---|" + "---|" * len(SIZES[3:])]
    for m in methods:
        cells = []
        for size in SIZES[3:]:
            p = memory_model.predict(LLAMA_PRESETS[size], m, batch=batch, seq=seq, max_rank=rank, runtime_bytes=rt[m])
            cells.append(_gb(p["total"]))
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def rank_table(runs: list[dict], batch: int, seq: int) -> str:
    from nlp.pretrain import LLAMA_PRESETS

    rt = runtimes(runs).get("adarankgrad8_layerwise", 0)
    rows = ["| max_rank | state GB | peak GB (model) | peak / bf16 weights |", "|---|---|---|---|"]
    for r in (128, 256, 512, 1024):
        p = memory_model.predict(
            LLAMA_PRESETS["llama_7b"], "adarankgrad8_layerwise", batch=batch, seq=seq, max_rank=r, runtime_bytes=rt
        )
        rows.append(f"| {r} | {_gb(p['state'])} | {_gb(p['total'])} | {p['total'] / p['weights']:.3f}× |")
    return "\n".join(rows) + "\n"


def plot(runs: list[dict], path: Path, batch: int, seq: int, rank: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nlp.pretrain import LLAMA_PRESETS

    rt = runtimes(runs)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, m in enumerate(x for x in memory_model.METHODS if x in rt):
        color = f"C{i}"
        pts = [
            memory_model.predict(LLAMA_PRESETS[s], m, batch=batch, seq=seq, max_rank=rank, runtime_bytes=rt[m])
            for s in SIZES
        ]
        ax.plot(
            [p["params"] for p in pts],
            [p["total"] / 1e9 for p in pts],
            "-",
            color=color,
            alpha=0.6,
            label=f"{m} (model)",
        )
        meas = [d for d in runs if d["method"] == m and "peak_bytes" in d]
        ax.plot([d["params"] for d in meas], [d["peak_bytes"] / 1e9 for d in meas], "o", color=color)
    ax.axhline(16, color="k", ls=":", lw=1)
    ax.text(6e7, 16.5, "16 GB", fontsize=8)
    ax.axhline(22, color="r", ls=":", lw=1)
    ax.text(6e7, 22.5, "22 GB: runs predicted above are skipped", fontsize=8, color="r")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak memory of a training step (GB)")
    ax.set_title(f"LLaMA, bf16 weights, batch {batch} × {seq}, max_rank {rank}: points measured, lines the model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory_frontier")
    ap.add_argument("--header", type=Path, default=None, help="Markdown put before the tables")
    args = ap.parse_args()
    runs = load(args.runs)
    repredict(runs)
    ref = next((d for d in runs if "peak_bytes" in d), {"batch": 1, "seq": 256, "max_rank": 128})
    batch, seq, rank = ref["batch"], ref["seq"], ref["max_rank"]
    text = args.header.read_text() if args.header else ""
    text += "\n## Measured (one fresh process per run)\n\n" + measured_table(runs)
    if failures(runs):
        text += "\nRuns that did not complete:\n\n" + failures(runs)
    text += f"\n## The model's predictions (GB; batch {batch} × {seq}, max_rank {rank})\n\n" + prediction_table(
        runs, batch, seq, rank
    )
    text += (
        "\n## LLaMA-7B, adarankgrad8_layerwise, larger ranks (the model; state at rank = max_rank, an upper bound)\n\n"
    )
    text += rank_table(runs, batch, seq)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    plot(runs, args.out.with_suffix(".png"), batch, seq, rank)
    print(text)


if __name__ == "__main__":
    main()
