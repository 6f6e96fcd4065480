"""The distribution layer: AdaRankGrad on FSDP2-sharded (DTensor) parameters.

It sits between the optimizer step (:mod:`lightning_adarank.optim`) and the Lightning/Fabric integrations.
On import it registers :func:`~lightning_adarank.distributed.step.step_sharded` and the checkpoint padding of
:mod:`~lightning_adarank.distributed.checkpoint` with the optimizer
(:func:`~lightning_adarank.optim.optimizer.register_sharded_support`), which hands DTensor parameters and its
state dicts to them; so the optimizer never imports this layer. The math on shards is
in :mod:`~lightning_adarank.distributed.linalg` (distributed CholeskyQR2 basis) and
:mod:`~lightning_adarank.distributed.collectives` (one all-reduce per step); the layout of a shard in
:mod:`~lightning_adarank.distributed.layout`.
"""

from ..optim.optimizer import register_sharded_support
from .checkpoint import pad_states, unpad_states
from .layout import ShardLayout, is_dtensor, shard_layout
from .linalg import sharded_left_singular, sharded_sketch_basis
from .step import step_sharded

register_sharded_support(step=step_sharded, pad_states=pad_states, unpad_states=unpad_states)

__all__ = ["ShardLayout", "is_dtensor", "shard_layout", "sharded_left_singular", "sharded_sketch_basis", "step_sharded"]
