"""The refresh test (the paper's Algorithm 3, block 3, calibrated) and the bookkeeping of a new subspace: one
implementation for every path. The grouped step runs :func:`refresh_statistics` on device vectors of a whole
shape; the per-matrix paths (the loop, the layer-wise mode, FSDP2) run the same function through
:func:`run_refresh_tests` on the matrices they stepped. Every path starts a subspace with :func:`mark_refreshed`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "EMA",
    "STAT_KEYS",
    "refresh_statistics",
    "captured_share",
    "reset_statistics",
    "mark_refreshed",
    "run_refresh_tests",
    "stat_column",
]

EMA = 0.9  # smoothing of ‖PᵀG‖ and of the share in the refresh test (about ten steps of memory)
#: the refresh-test statistics of a matrix (calibration sums and counts, moving averages), in the column order
#: of the store's ``(N, 6)`` statistics buffer; the same keys as the per-matrix test's plain numbers
STAT_KEYS = ("ref_norm", "ref_count", "ref_share", "ref_share_count", "ema_norm", "ema_share")


@torch.no_grad()
def refresh_statistics(
    stats: Tensor, since: Tensor, pn: Tensor, share: Tensor, due: Tensor, ok: Tensor, *, tol: float, min_gap: int
) -> Tensor:
    """The calibrated refresh test of :class:`~lightning_adarank.AdaRankGrad` for ``N`` matrices, on the device.

    The same rule as the per-matrix ``AdaRankGrad._refresh_test``, as tensor operations: ``stats`` ``(N, 6)``
    (columns :data:`STAT_KEYS`) and ``since`` ``(N,)`` (the step ``j`` of the subspace, 0 = the refresh step)
    are updated in place where ``ok``. From ``j = 1`` ``pn`` (and ``share`` where ``due``: where it was
    measured) enter the moving averages (β = :data:`EMA`; a negative average takes the first value); steps
    ``1 … K`` (``K = max(1, min_gap − 1)``) also add to the reference sums and counts. Returns the ``(N,)``
    bool test: ``j + 1 >= min_gap``, the calibration complete, and either average at or below ``tol`` × its
    reference mean. ``max_gap`` is the caller's (host) rule.
    """
    calib = max(1, min_gap - 1)
    # the two statistics side by side, (N, 2): ‖PᵀG‖ and the share; the sums and counts of STAT_KEYS interleave
    sums, counts, ema = stats[:, 0:4:2], stats[:, 1:4:2], stats[:, 4:6]
    value = torch.stack((pn, share), dim=1)
    moves = ok & (since >= 1)
    active = torch.stack((moves, moves & due), dim=1)  # the share moves only where it was measured
    incal = active & (since <= calib)[:, None]
    new_ema = torch.where(ema < 0, value, ema * EMA + value * (1 - EMA))
    sums.add_(torch.where(incal, value, 0.0))
    counts.add_(incal)
    torch.where(active, new_ema, ema, out=ema)
    since.add_(ok)
    fell = ((ema <= tol * sums / counts.clamp(min=1)) & (counts > 0)).any(dim=1)
    return fell & (since >= min_gap) & (counts[:, 0] >= calib) & ok


def captured_share(pn2: Tensor, gn2: Tensor) -> Tensor:
    """``‖PᵀG‖²/‖G‖²`` (1 where ``‖G‖ = 0``); elementwise, for tensors or (through ``torch.as_tensor``) numbers."""
    pn2, gn2 = torch.as_tensor(pn2), torch.as_tensor(gn2)
    return torch.where(gn2 > 0, pn2 / torch.where(gn2 > 0, gn2, 1.0), 1.0)


def reset_statistics(st: dict, device: torch.device) -> None:
    """Refresh-test statistics of a fresh subspace, as 0-d device tensors (empty calibration sums and counts,
    moving averages not started)."""
    zero = torch.zeros(4, device=device)
    st["ref_norm"], st["ref_count"], st["ref_share"], st["ref_share_count"] = zero.clone().unbind(0)
    st["ema_norm"], st["ema_share"] = torch.full((2,), -1.0, device=device).unbind(0)


def mark_refreshed(st: dict, rank: int, kept: float, device: torch.device) -> None:
    """The bookkeeping of a new subspace, on every path: rank, kept share, counters, the refresh test restarted
    (and any parked flag or skip count of the old subspace dropped)."""
    st["rank"] = rank
    st["energy_kept"] = kept
    st["refreshes"] += 1
    st["pending"] = False
    st["since_refresh"] = 0
    st.pop("flagged", None)
    st.pop("unread_skips", None)
    reset_statistics(st, device)


def stat_column(values: list, device: torch.device) -> Tensor:
    """``(N,)`` fp32 on ``device`` from the per-matrix values of one statistic: 0-d tensors (one ``stack``) or
    numbers (one ``tensor``; a checkpoint from before the statistics were tensors)."""
    if all(isinstance(v, Tensor) for v in values):
        return torch.stack(values).to(device, torch.float32)
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


@torch.no_grad()
def run_refresh_tests(states: list[dict], group: dict, proj_norms: list[float], shares: list[float | None]) -> None:
    """:func:`refresh_statistics` for matrices stepped one by one (host norms): updates each state's statistics,
    advances ``since_refresh`` and sets ``pending`` where the test fired or ``max_gap`` is reached.

    ``shares[i]`` is ``None`` when the captured share was not measured this step (that statistic does not move).
    A constant number of operators for any number of matrices: the new statistics are one ``(N, 6)`` tensor and
    each state's entries become 0-d views of it.
    """
    if not states:
        return
    first = states[0].get("ref_norm")
    device = first.device if isinstance(first, Tensor) else torch.device("cpu")
    stats = torch.stack([stat_column([st[k] for st in states], device) for k in STAT_KEYS], dim=1)
    since = torch.tensor([float(st["since_refresh"]) for st in states], device=device)
    due = torch.tensor([s is not None for s in shares], device=device)
    values = torch.tensor(
        [[float(pn), 0.0 if sh is None else float(sh)] for pn, sh in zip(proj_norms, shares)],
        dtype=torch.float32,
        device=device,
    )
    fired = refresh_statistics(
        stats, since, values[:, 0], values[:, 1], due, torch.ones_like(due), tol=group["tol"], min_gap=group["min_gap"]
    )
    columns = [col.unbind(0) for col in stats.unbind(1)]
    for j, (st, test) in enumerate(zip(states, fired.tolist())):
        for k, col in zip(STAT_KEYS, columns):
            st[k] = col[j]
        st["since_refresh"] += 1
        st["pending"] = bool(test) or st["since_refresh"] >= group["max_gap"]
