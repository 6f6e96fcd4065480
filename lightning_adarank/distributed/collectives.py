"""Batched sums over the ranks of a process group: many local tensors, one ``all_reduce``.

A sharded step needs several partial sums per matrix (sketch pieces, projected gradients, sums of squares);
:class:`SumBuffer` packs them into one flat buffer per dtype so that a step issues one collective however many
matrices it updates, the way :meth:`~lightning_adarank.optim.adam_kernels.AdamKernels.norms` reads every norm
with one host synchronisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["SumBuffer", "all_gather_rows"]


class SumBuffer:
    """Collect local tensors with :meth:`add`, sum them over ``group`` with :meth:`reduce` (one all-reduce per dtype),
    then read each sum by the handle :meth:`add` returned."""

    def __init__(self, group: object) -> None:
        self.group = group
        self._parts: list[Tensor] = []
        self._out: list[Tensor] | None = None

    def add(self, t: Tensor) -> int:
        """Queue ``t`` for summation; returns its handle."""
        self._parts.append(t)
        return len(self._parts) - 1

    def add_square_sum(self, t: Tensor) -> int:
        """Queue ``Σ t²`` (fp32, a 1-element tensor): the squared Frobenius norm once summed over the shards."""
        v = t.reshape(-1).float()
        return self.add(torch.dot(v, v).reshape(1))

    def reduce(self) -> None:
        """Sum every queued tensor over the group: one ``all_reduce`` per dtype (usually one)."""
        out: list[Tensor | None] = [None] * len(self._parts)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(self._parts):
            by_dtype.setdefault(t.dtype, []).append(i)
        for idx in by_dtype.values():
            flat = torch.cat([self._parts[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, group=self.group)
            pos = 0
            for i in idx:
                n = self._parts[i].numel()
                out[i] = flat[pos : pos + n].view(self._parts[i].shape)
                pos += n
        self._out = out  # type: ignore[assignment]

    def __getitem__(self, handle: int) -> Tensor:
        assert self._out is not None, "SumBuffer: reduce() first"
        return self._out[handle]

    def __len__(self) -> int:
        return len(self._parts)


def all_gather_rows(t: Tensor, group: object) -> tuple[Tensor, int]:
    """Stack every rank's ``t`` (same trailing shape, any number of rows, possibly none) in rank order; also
    returns the row at which this rank's ``t`` starts."""
    world = dist.get_world_size(group)
    rows = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(counts, rows, group=group)
    counts_i = [int(c) for c in counts]
    most = max(counts_i)
    pad = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(parts, pad, group=group)
    start = sum(counts_i[: dist.get_rank(group)])
    return torch.cat([p[:c] for p, c in zip(parts, counts_i)]), start
