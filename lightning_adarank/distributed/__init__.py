"""The distribution layer: AdaRankGrad on FSDP2-sharded (DTensor) parameters.

It sits between the optimizer step (:mod:`lightning_adarank.optim`, which hands DTensor parameters to
:func:`~lightning_adarank.distributed.step.step_sharded` and its state dicts to
:mod:`~lightning_adarank.distributed.checkpoint`) and the Lightning/Fabric integrations. The math on shards is
in :mod:`~lightning_adarank.distributed.linalg` (distributed CholeskyQR2 basis) and
:mod:`~lightning_adarank.distributed.collectives` (one all-reduce per step); the layout of a shard in
:mod:`~lightning_adarank.distributed.layout`.
"""

from .layout import ShardLayout, is_dtensor, shard_layout
from .linalg import sharded_left_singular, sharded_sketch_basis
from .step import step_sharded

__all__ = ["ShardLayout", "is_dtensor", "shard_layout", "sharded_left_singular", "sharded_sketch_basis", "step_sharded"]
