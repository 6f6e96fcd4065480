"""The grouped step's driver (the GPU default of :class:`~lightning_adarank.AdaRankGrad`), on the optimizer's
:class:`~lightning_adarank.optim.step_context.StepContext`: refresh the pending matrices in batches, step every projected matrix of a group
through the :class:`~lightning_adarank.optim.grouped.ShapeStore` of its shape, read the device-side flags every
``refresh_check_every`` calls.

**The flag cadence is part of the state.** A refresh flagged on the device is acted on at the next read, and the
reads come every ``refresh_check_every`` grouped steps of a parameter group, counted from the start of training
(not from the last rebuild). Whenever flags must be read off-cadence (a store is rebuilt, or ``state_dict()``
is taken) they are *parked* in the host state (``flagged``, ``unread_skips``) and acted on at the next regular
read, so that reading them changes nothing; the counter of each group is saved in the state dict. A run that is
saved and resumed at any step is therefore bit-identical to one that was not.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .grouped import ShapeStore, oriented_shape, refresh_test_stores
from .projected import ProjectedStep
from .refresh import refresh_batched
from .step_context import StepContext

__all__ = ["GroupedStep"]


class GroupedStep:
    """The grouped step of every parameter group and its bookkeeping: the stores and the flag-read cadence.

    Args:
        ctx: the optimizer's step context.
        projected: the per-matrix step, whose moment sketch update the refreshes reuse.
    """

    def __init__(self, ctx: StepContext, projected: ProjectedStep) -> None:
        self.ctx = ctx
        self.projected = projected
        self.stores: dict[tuple, ShapeStore] = {}  # (group, device, shape, dtype) → store
        self.calls: dict[int, int] = {}  # group index → grouped steps taken (the flag-read cadence)

    def reset(self, flag_reads: list[int]) -> None:
        """Drop every store (a loaded state) and set each group's count of grouped steps (the flag cadence)."""
        self.stores = {}
        self.calls = {i: int(c) for i, c in enumerate(flag_reads)}
        self.ctx.unread_skips.clear()

    def flag_reads(self, n_groups: int) -> list[int]:
        """Each group's count of grouped steps, for the state dict."""
        return [self.calls.get(i, 0) for i in range(n_groups)]

    @torch.no_grad()
    def step(self, params: list[Tensor], group: dict, grads: list[Tensor], group_index: int) -> None:
        """The grouped step (:mod:`~lightning_adarank.optim.grouped`): no host synchronisation on a normal step.

        Pending matrices are refreshed first (:func:`~lightning_adarank.optim.refresh.refresh_batched`, one
        host read per shape; with ``subspace_source="moment"`` their sketches take this gradient first, as in
        the per-matrix step); then every projected matrix takes its store's batched step and the unprojected
        parameters one fused AdamW call whose skip flag is set on the device when a gradient is not finite.
        """
        ctx = self.ctx
        projected = [ctx.is_projected(p, group) for p in params]
        low = [i for i, is_low in enumerate(projected) if is_low]
        dense = [i for i, is_low in enumerate(projected) if not is_low]
        skipped = 0
        pending, noises = [], []
        moment = group["subspace_source"] == "moment"
        for i in low:
            if ctx.new_matrix_state(params[i])["pending"]:
                pending.append(i)
        refreshed: set[int] = set()
        if pending:
            ids = {id(params[i]) for i in pending}  # their stores' unread flags go to the host before they change
            self._park([s for s in self._group_stores(group) if ids & set(s.ids)])
            for i in pending:
                st = ctx.state[params[i]]
                noises.append(
                    self.projected.update_sketch(params[i], grads[i].float(), group, st, True) if moment else None
                )
            done = refresh_batched(
                [params[i] for i in pending],
                [grads[i] for i in pending],
                [ctx.state[params[i]] for i in pending],
                group,
                ctx.subspace_seed,
                noises,
            )
            bad = {i for i, ok in zip(pending, done) if not ok}
            skipped += len(bad)
            low = [i for i in low if i not in bad]
            refreshed = {id(params[i]) for i, ok in zip(pending, done) if ok}
        if dense:  # first, so that its skip count is read with the projected matrices' flags
            ctx.update_dense([params[i] for i in dense], [grads[i] for i in dense], group, check_finite=True)
        by_key: dict[tuple, list[int]] = {}
        for i in low:
            p = params[i]
            by_key.setdefault((p.device, oriented_shape(p.shape), p.dtype), []).append(i)
        stepped, results = [], []
        for key, idx in by_key.items():
            store = self._store(group, key, [params[i] for i in idx])
            mask = None
            if moment and refreshed & set(store.ids):  # their sketches took this gradient already (a refresh step)
                mask = torch.tensor([id(p) not in refreshed for p in store.params], device=store.device)
            results.append(
                store.step(
                    {id(params[i]): grads[i] for i in idx},
                    group,
                    ctx.kernels.adam_kernel,
                    ctx.test_matrix,
                    mask,
                    ctx.weight_rounding,
                )
            )
            stepped.append(store)
            for st in store.states:  # host rule: never staler than max_gap (no read needed)
                if st["since_refresh"] >= group["max_gap"]:
                    st["pending"] = True
        if stepped:
            refresh_test_stores(stepped, results, group)
        self.calls[group_index] = self.calls.get(group_index, 0) + 1
        if self.calls[group_index] % self._check_every(params[0].device) == 0:
            skipped += self._drain(group)
        if skipped:
            ctx.warn_skipped(skipped)

    def _group_stores(self, group: dict) -> list[ShapeStore]:
        return [s for key, s in self.stores.items() if key[0] == id(group)]

    def _store(self, group: dict, key: tuple, params: list[Tensor]) -> ShapeStore:
        """The bound store of ``params`` (built, and a stale one parked, when membership or state changed)."""
        full = (id(group), *key)
        store = self.stores.get(full)
        if store is not None and store.is_bound(params, self.ctx.state, group):
            return store
        if store is not None:
            self._park([store])
        device = key[0]
        step_device = device if self.ctx.kernels.uses_fused(device) else torch.device("cpu")
        store = self.stores[full] = ShapeStore(
            params,
            [self.ctx.state[p] for p in params],
            group,
            step_device=step_device,
            compiled=self.ctx.config.compile,
        )
        return store

    def _check_every(self, device: torch.device) -> int:
        k = self.ctx.config.refresh_check_every
        return k if k is not None else (1 if device.type == "cpu" else 8)

    def _park(self, stores: list[ShapeStore], *, dense_skips: bool = False) -> int:
        """One host read of ``stores``' device flags and skip counts, moved into the host state (no action).

        ``dense_skips``: the unprojected parameters' unread skip counts come in the same read; returns their sum.
        """
        parts = [s.device_flags() for s in stores]
        unread = self.ctx.unread_skips
        if dense_skips and unread:
            dev = parts[0].device if parts else unread[0].device
            parts.append(torch.stack([t.reshape(()).to(dev) for t in unread]).int())
            unread.clear()
        if not parts:
            return 0
        values = torch.cat(parts).tolist()
        at = 0
        for s in stores:
            n = 2 * len(s.params)
            s.park(values[at : at + n])
            at += n
        return int(sum(values[at:]))

    def _drain(self, group: dict) -> int:
        """The regular read (one host synchronisation): flags become pending refreshes, skip counts correct the
        host's step counts; returns the number of skipped parameter steps to warn about."""
        stores = self._group_stores(group)
        skipped = self._park(stores, dense_skips=True)
        for store in stores:
            for st in store.states:
                if st.pop("flagged", False):
                    st["pending"] = True
                n = st.pop("unread_skips", 0)
                if n:
                    st["since_refresh"] -= n  # the host counted the skipped steps
                    skipped += n
        return skipped

    def park_all(self) -> None:
        """Park every store's flags (``state_dict()``): the saved state then holds everything not yet read."""
        n = self._park(list(self.stores.values()), dense_skips=True)
        if n:  # only a warning depends on these: give it now
            self.ctx.warn_skipped(n)
