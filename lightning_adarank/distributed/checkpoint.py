"""Fixed-shape optimizer state for distributed checkpoints.

``torch.distributed.checkpoint`` (DCP) loads *into* tensors that already exist: ``get_optimizer_state_dict``
builds the skeleton from the live optimizer (after a dummy zero-gradient step when it has no state yet,
``_init_optim_state``), and DCP fills it in place, so every saved tensor must have the shape the skeleton has.
An adaptive rank breaks that (the skeleton's rank is whatever the dummy step chose). So in a state dict the
per-rank tensors of a projected FSDP2 matrix are **zero-padded to ``max_rank``**: the basis to ``s × max_rank``,
the moments to ``max_rank × n`` (left side) or ``m × max_rank`` (right side); the true rank is the state's
``"rank"`` entry and :func:`unpad_states` cuts the padding off after a load. The padded columns are zeros and never
enter a step. The sketch has a fixed width ``k`` already.

Sharded pieces stay DTensors with the parameter's mesh and ``Shard(0)`` placement (DCP treats a plain tensor
under the same key on every rank as replicated, so a plain local shard would be silently overwritten by rank
0's): right-side moments, left-side basis and sketch, the moments of unprojected parameters (torch's
``zeros_like`` of the DTensor parameter). Replicated pieces are plain tensors: right-side basis and sketch,
left-side moments, the step counters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .layout import is_dtensor, local, shard_layout, sharded_like

__all__ = ["pad_states", "unpad_states"]

_PADDED = ("basis", "exp_avg", "exp_avg_sq")


def _pad_cols(t: Tensor, width: int) -> Tensor:
    out = torch.zeros((t.shape[0], width), dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


def _pad_rows(t: Tensor, height: int) -> Tensor:
    out = torch.zeros((height, t.shape[1]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def pad_states(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """Pad, in ``state_dict["state"]`` (keyed as torch's ``Optimizer.state_dict`` keys it), the rank-sized tensors of
    every projected DTensor parameter to ``max_rank`` (new tensors; the live state is untouched)."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            saved = state_dict["state"].get(index)
            index += 1
            if not saved or "basis" not in saved or not is_dtensor(p):
                continue
            width = min(int(group["max_rank"]), min(p.shape))
            if int(saved["rank"]) == width:
                continue
            lay = shard_layout(p)
            left = p.shape[0] <= p.shape[1]
            for key in _PADDED:
                t = saved[key]
                if key == "basis":
                    padded = _pad_cols(local(t), width)
                    saved[key] = sharded_like(padded, lay) if is_dtensor(t) else padded
                elif left:  # replicated r × n moments
                    saved[key] = _pad_rows(t, width)
                else:  # sharded m × r moments
                    saved[key] = sharded_like(_pad_cols(local(t), width), lay)


def unpad_states(optimizer: Any) -> None:
    """Cut every loaded state back to its ``"rank"`` (padded by :func:`pad_states`, possibly on another layout)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if not st or "basis" not in st or "rank" not in st:
                continue
            r = int(st["rank"])
            if st["basis"].shape[1] == r:
                continue
            left = p.shape[0] <= p.shape[1]
            for key in _PADDED:
                t = st[key]
                cut_rows = key != "basis" and left
                if is_dtensor(t):
                    part = local(t)[:r] if cut_rows else local(t)[:, :r]
                    st[key] = sharded_like(part.contiguous(), shard_layout(p))
                else:
                    st[key] = (t[:r] if cut_rows else t[:, :r]).contiguous()
