"""Which parameters are sharded, and how: FSDP2's ``Shard(0)`` DTensors on a 1-D device mesh.

``fully_shard`` (``torch.distributed.fsdp``) turns every parameter into a DTensor whose rows are split over the
ranks of a 1-D mesh in ``torch.chunk`` order (the first ranks get ``ceil(m / world)`` rows, the last ones fewer,
possibly none). :func:`shard_layout` reads that layout from the DTensor itself (global shape, this rank's row
offset and row count, the process group); :func:`sharded_like` builds optimizer state that is sharded the same
way, as a DTensor, so ``torch.distributed.checkpoint`` saves and reshards it like the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ShardLayout", "is_dtensor", "local", "shard_layout", "sharded_like"]


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (False when torch.distributed is unavailable)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (the local shard of a DTensor, which shares its storage; ``t`` itself otherwise)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardLayout:
    """The row split of one FSDP2 parameter: ``rows`` rows starting at global row ``offset`` on this rank."""

    shape: tuple[int, ...]
    offset: int
    rows: int
    mesh: object
    group: object

    @property
    def world(self) -> int:
        return self.mesh.size()  # type: ignore[attr-defined]


def shard_layout(p: Tensor) -> ShardLayout:
    """The layout of a DTensor parameter; refuses anything but ``Shard(0)`` on a 1-D mesh (FSDP2's default).

    Raises:
        NotImplementedError: other placements (``Replicate``, ``Shard(1)``: tensor parallelism; a 2-D mesh:
            HSDP), naming the placement.
    """
    from torch.distributed.tensor import Shard  # noqa: PLC0415
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(
            f"AdaRankGrad steps DTensor parameters sharded as FSDP2 does (Shard(0) on a 1-D device mesh); got"
            f" placements {placements} on a {mesh.ndim}-D mesh (tensor parallelism and HSDP are not supported)"
        )
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return ShardLayout(
        tuple(p.shape), int(offset[0]) if p.dim() else 0, int(local_shape[0]) if p.dim() else 0, mesh, mesh.get_group()
    )


def sharded_like(local_rows: Tensor, layout: ShardLayout) -> Tensor:
    """A DTensor whose rows are split like the parameter of ``layout`` (``local_rows``: this rank's rows).

    The global shape is ``(layout.shape[0], *local_rows.shape[1:])``; uneven splits are given explicitly, so the
    DTensor agrees with FSDP2's ``torch.chunk`` layout on every rank.
    """
    from torch.distributed.tensor import DTensor, Shard  # noqa: PLC0415

    shape = (layout.shape[0], *local_rows.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_rows, layout.mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
