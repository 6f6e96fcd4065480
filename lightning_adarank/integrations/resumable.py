"""Training data loaders that Lightning resumes exactly from a mid-epoch checkpoint.

Lightning saves and restores the position of any train loader with ``state_dict``/``load_state_dict``, e.g.
torchdata's ``StatefulDataLoader``. Two details decide whether the resumed run sees the same batches:

* **the shuffle's generator belongs to the sampler**, not to the loader: torchdata (0.11) also draws the
  workers' base seed from ``DataLoader(generator=...)``, a draw it does not replay on restore, so with a shared
  generator the *next* epoch is shuffled differently;
* **under DDP the sampler's state holds the epoch**: Lightning creates the resumed epoch's iterator before it
  calls ``set_epoch``, so a ``DistributedSampler`` would start from epoch 0's permutation. Lightning leaves a
  loader alone whose sampler is a ``DistributedSampler`` already.

:func:`resumable_loader` builds such a loader; the package's data modules (``nlp``, ``bio``) use it.

Known limit (Lightning 2.6 + torchdata 0.11): a *step* checkpoint that falls exactly on an epoch's last batch
resumes with Lightning first finishing that epoch's empty rest, which it counts as one more epoch: on one
device the batches and parameters still match but ``current_epoch`` runs one ahead; under DDP the shuffle
follows the epoch and the runs diverge. Epoch-end checkpoints and step checkpoints anywhere else are exact.
Replaying the exhausted state on load would fix that case but break epoch-end checkpoints (the loader cannot
tell the two apart), so it is not done.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler, StatefulDistributedSampler

__all__ = ["ResumableDistributedSampler", "resumable_loader"]


class ResumableDistributedSampler(StatefulDistributedSampler):
    """torchdata's ``StatefulDistributedSampler`` whose state also holds the epoch (see the module docstring)."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.epoch = int(state_dict.get("epoch", self.epoch))


def resumable_loader(
    dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int | None = None, **kwargs: Any
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` whose position Lightning restores exactly from any checkpoint, mid-epoch included.

    Args:
        dataset: a map-style dataset.
        batch_size: batch size (per process under DDP).
        shuffle: shuffle every epoch.
        seed: the shuffle's seed. ``None``: drawn from torch's global RNG when the loader is built (so
            ``seed_everything`` fixes it); under DDP, Lightning's global seed (``PL_GLOBAL_SEED``) as Lightning's own
            ``DistributedSampler`` uses.
        **kwargs: other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...); not ``sampler``,
            ``shuffle`` or ``generator``.

    Under an initialised ``torch.distributed`` process group with several processes it shards the data with a
    :class:`ResumableDistributedSampler` (``drop_last=False``, as Lightning's); otherwise it shuffles with a sampler
    that owns its generator.
    """
    for key in ("sampler", "shuffle", "generator", "batch_sampler"):
        if key in kwargs:
            raise TypeError(f"resumable_loader chooses the sampler itself; do not pass {key}=")
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sd = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        sampler: Any = ResumableDistributedSampler(dataset, shuffle=shuffle, seed=sd)
    elif shuffle:
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=gen)
    else:
        sampler = None
    return StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
