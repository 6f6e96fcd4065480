"""The rank plot of the paper's Figures 3–4 for your own run: rank per layer over steps and the average rank.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, works headless).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_rank_history"]


def plot_rank_history(history: Any, path: str | Path, title: str | None = None, max_labels: int = 40) -> Path:
    """Save a PNG with a heat map (layers × recorded steps, colour = rank) above the average-rank curve.

    Args:
        history: a :class:`~lightning_adarank.RankHistory` (or its ``state_dict()``).
        path: the PNG to write (parent folders are created).
        title: figure title.
        max_labels: at most this many layer names on the y axis (every k-th one for bigger models).

    Returns:
        the path written.

    Raises:
        ValueError: the history is empty.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from .history import RankHistory  # noqa: PLC0415

    if isinstance(history, dict):
        h = RankHistory()
        h.load_state_dict(history)
        history = h
    if not len(history) or not history.layers:
        raise ValueError("plot_rank_history: the history holds no recorded step")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mat, steps, layers = history.matrix(), history.steps, history.layers
    n_layers = len(layers)
    fig = Figure(
        figsize=(max(6.0, min(16.0, 4 + 0.05 * len(steps))), 3.0 + min(10.0, 0.18 * n_layers)), layout="constrained"
    )
    FigureCanvasAgg(fig)
    ax_map, ax_avg = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(2, min(6, n_layers / 6)), 1.5]})
    x0, x1 = steps[0], steps[-1]
    half = (x1 - x0) / (2 * max(1, len(steps) - 1)) if len(steps) > 1 else 0.5
    vmax = max(history.max_ranks) if history.max_ranks else None
    im = ax_map.imshow(
        [[v if not math.isnan(v) else float("nan") for v in row] for row in mat],
        aspect="auto",
        interpolation="nearest",
        origin="upper",
        cmap="viridis",
        vmin=0,
        vmax=vmax,
        extent=(x0 - half, x1 + half, n_layers - 0.5, -0.5),
    )
    every = max(1, math.ceil(n_layers / max_labels))
    ax_map.set_yticks(range(0, n_layers, every))
    ax_map.set_yticklabels([layers[j] for j in range(0, n_layers, every)], fontsize=7)
    ax_map.set_ylabel("layer")
    fig.colorbar(im, ax=[ax_map, ax_avg], label="rank")
    ax_avg.plot(steps, history.average(), color="C1", marker="." if len(steps) < 60 else None)
    ax_avg.set_xlabel("step")
    ax_avg.set_ylabel("avg rank\n(param-weighted)")
    ax_avg.grid(alpha=0.3)
    if vmax:
        ax_avg.set_ylim(0, vmax * 1.05)
    fig.suptitle(title or "AdaRankGrad: rank per layer")
    fig.savefig(path, dpi=110)
    return path
