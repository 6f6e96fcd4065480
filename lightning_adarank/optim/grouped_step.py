"""The grouped step's driver, mixed into :class:`~lightning_adarank.AdaRankGrad` (kept apart from the per-matrix
code in ``optimizer.py``): refresh the pending matrices in batches, step every projected matrix of a group
through its :class:`~lightning_adarank.optim.grouped.ProjectedStore`, read the device-side flags every
``refresh_check_every`` calls.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .grouped import ProjectedStore
from .linalg import subspace_seed
from .refresh import refresh_batched

__all__ = ["GroupedStep"]


class GroupedStep:
    """Mixin: ``_step_params_grouped`` and its bookkeeping (needs the optimizer's state, settings and kernels)."""

    def _init_grouped(self) -> None:
        self._stores: dict[tuple[int, torch.device], ProjectedStore] = {}  # (group, device) → store
        self._calls: dict[tuple, int] = {}
        self._unread_skips: list[Tensor] = []  # device counts of skipped unprojected parameters

    @torch.no_grad()
    def _step_params_grouped(self, params: list[Tensor], group: dict, grads: list[Tensor]) -> None:
        """The grouped step (:mod:`~lightning_adarank.optim.grouped`): no host synchronisation on a normal step.

        Pending matrices are refreshed first (:func:`~lightning_adarank.optim.refresh.refresh_batched`, one
        host read per shape; with ``subspace_source="moment"`` their sketches take this gradient first, as in
        the per-matrix step); then every projected matrix takes its store's batched step and the unprojected
        parameters one fused AdamW call whose skip flag is set on the device when a gradient is not finite.
        """
        projected = [self.is_projected(p, group) for p in params]
        low = [i for i, is_low in enumerate(projected) if is_low]
        dense = [i for i, is_low in enumerate(projected) if not is_low]
        skipped = 0
        pending, noises = [], []
        moment = group["subspace_source"] == "moment"
        for i in low:
            st = self.state[params[i]]
            if not st:
                st["step"] = self._step_tensor(params[i], self._use_fused(params[i].device))
                st["refreshes"] = 0
                st["pending"] = True
            if st["pending"]:
                pending.append(i)
                noises.append(self._update_sketch(params[i], grads[i].float(), group, st, True) if moment else None)
        refreshed: set[int] = set()
        if pending:
            done = refresh_batched([params[i] for i in pending], [grads[i] for i in pending],
                                   [self.state[params[i]] for i in pending], group,
                                   lambda p, refresh: subspace_seed(self.seed, self._index[id(p)], refresh), noises)
            bad = {i for i, ok in zip(pending, done) if not ok}
            skipped += len(bad)
            low = [i for i in low if i not in bad]
            refreshed = {id(params[i]) for i, ok in zip(pending, done) if ok}
        if dense:  # first, so that its skip count is read with the projected matrices' flags
            self.update_dense([params[i] for i in dense], [grads[i] for i in dense], group, check_finite=True)
        by_device: dict[torch.device, list[int]] = {}
        for i in low:
            by_device.setdefault(params[i].device, []).append(i)
        for device, idx in by_device.items():
            store = self._store(group, device, [params[i] for i in idx])
            mask = None
            if moment and refreshed:  # their sketches took this gradient already (a refresh step: H2D is fine)
                mask = torch.tensor([id(p) not in refreshed for p in store.params], device=device)
            store.step({id(params[i]): grads[i] for i in idx}, group, self._adamw, self._test_matrix, mask)
            self._after_step(group, store)
        if not by_device and self._unread_skips:  # no store to read with: keep the same cadence
            key = (id(group), None)
            self._calls[key] = self._calls.get(key, 0) + 1
            if self._calls[key] % self._check_every(self._unread_skips[0].device) == 0:
                skipped += int(sum(int(t) for t in self._unread_skips))
                self._unread_skips.clear()
        if skipped:
            self._warn_skipped(skipped)

    def _store(self, group: dict, device: torch.device, params: list[Tensor]) -> ProjectedStore:
        """The bound store of ``params`` (built, and any stale one drained, when membership or state changed)."""
        key = (id(group), device)
        store = self._stores.get(key)
        if store is not None and store.is_bound(params, self.state, group):
            return store
        if store is not None:
            self._drain(store)
        step_device = device if self._use_fused(device) else torch.device("cpu")
        store = self._stores[key] = ProjectedStore(params, [self.state[p] for p in params], group,
                                                   step_device=step_device)
        self._calls[key] = 0
        return store

    def _check_every(self, device: torch.device) -> int:
        k = self.config.refresh_check_every
        return k if k is not None else (1 if device.type == "cpu" else 8)

    def _after_step(self, group: dict, store: ProjectedStore) -> None:
        key = (id(group), store.device)
        self._calls[key] = self._calls.get(key, 0) + 1
        max_gap = group["max_gap"]
        for st in store.states:  # host rule: never staler than max_gap (no read needed)
            if st["since_refresh"] >= max_gap:
                st["pending"] = True
        if self._calls[key] % self._check_every(store.device) == 0:
            self._drain(store)

    def _drain(self, store: ProjectedStore) -> None:
        """Read ``store``'s refresh flags and skip counts (one host synchronisation) and act on them."""
        flags, skips = store.read_flags()
        skipped = 0
        for st, flag, n in zip(store.states, flags, skips):
            if n:
                st["since_refresh"] -= n  # the host counted the skipped steps
                skipped += n
            if flag:
                st["pending"] = True
        if self._unread_skips:
            skipped += int(sum(int(t) for t in self._unread_skips))
            self._unread_skips.clear()
        if skipped:
            self._warn_skipped(skipped)

    @staticmethod
    def _warn_skipped(n: int) -> None:
        warnings.warn(f"AdaRankGrad: skipped the step of {n} parameter(s) with non-finite gradients",
                      RuntimeWarning, stacklevel=4)
