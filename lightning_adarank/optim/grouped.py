"""Grouped execution of the projected step: the cost of a normal step is flat in the number of matrices.

:class:`ProjectedStore` holds the optimizer state of every projected matrix of one parameter group on one
device in a few flat buffers, and steps them together:

* **storage** — the moments ``M``, ``V``, the bases ``P``, the step counters and the refresh-test statistics
  live in flat device buffers; each parameter's ``optimizer.state[p]`` entries are *views* into them, so
  ``state_dict()``, :meth:`~lightning_adarank.AdaRankGrad.subspaces` and the per-matrix (layer-wise) code see
  ordinary tensors. The moments are read and written at one place (:meth:`ProjectedStore.moments`), where a
  quantized storage (issue 15) can decode/encode them;
* **buckets** — matrices are ordered by a key ``(shape, dtype, side, rank)``; same-shape matrices form a
  *shape group* (one ``torch.stack`` of their gradients, one batched ``‖G‖``), and within it same-rank matrices
  form a *bucket* (one ``bmm`` to project, one ``bmm`` to project back). Ranks are kept exact, not padded: a
  padded bucket would cut the operators of a shape group from one per distinct rank to one, but store every
  matrix at its group's largest rank — the state memory that adaptive rank saves. The number of buckets is
  bounded by ``shapes × distinct ranks``, which does not grow with depth;
* **one fused Adam call** for all matrices of the store (torch's fused kernel on lists of views; per-matrix
  step counters, so a skipped matrix keeps its own bias correction);
* **the moment sketch** (``subspace_source="moment"``): ``Y ← β1·Y + (1−β1)·A Ω`` for a whole shape group in
  one product (``Ω`` is shared by the group), and the refresh test's ``‖PᵀY‖``, ``‖Y‖`` batched;
* **no host synchronisation**: the refresh-test inputs (``‖PᵀY‖``/``‖Y‖``, or ``‖PᵀG‖``/``‖G‖``) are device
  vectors, the test runs on them on the device and leaves a sticky per-matrix flag; the optimizer reads the flags once every
  ``refresh_check_every`` steps. A matrix whose gradient is not finite is skipped on the device
  (``torch.where`` restores its moments, step counter and statistics; its update is masked to zero and its
  weight decay to one), and counted; the count is read with the flags.

The placement of a store is ``(param group, device)``; sharded parameters (DTensor, issue 14) would add their
placement to the key and keep the same per-matrix math on local shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import projection_side, rank_factor

__all__ = ["ProjectedStore", "refresh_statistics", "captured_share", "STAT_KEYS", "EMA"]

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
    ref_n, ref_c, ref_s, ref_sc, ema_n, ema_s = stats.unbind(1)
    active = ok & (since >= 1)
    incal = active & (since <= calib)
    sh_act, sh_cal = active & due, incal & due
    new_ema_n = torch.where(ema_n < 0, pn, ema_n * EMA + pn * (1 - EMA))
    new_ema_s = torch.where(ema_s < 0, share, ema_s * EMA + share * (1 - EMA))
    new = torch.stack((
        ref_n + torch.where(incal, pn, 0.0), ref_c + incal.float(),
        ref_s + torch.where(sh_cal, share, 0.0), ref_sc + sh_cal.float(),
        torch.where(active, new_ema_n, ema_n), torch.where(sh_act, new_ema_s, ema_s),
    ), dim=1)
    stats.copy_(new)
    since.add_(ok.to(since.dtype))
    ref_n, ref_c, ref_s, ref_sc, ema_n, ema_s = stats.unbind(1)
    fell = (ema_n <= tol * ref_n / ref_c.clamp(min=1)) | ((ref_sc > 0) & (ema_s <= tol * ref_s / ref_sc.clamp(min=1)))
    return fell & (since >= min_gap) & (ref_c >= calib) & ok


def captured_share(pn2: Tensor, gn2: Tensor) -> Tensor:
    """``‖PᵀG‖²/‖G‖²`` (1 where ``‖G‖ = 0``)."""
    return torch.where(gn2 > 0, pn2 / torch.where(gn2 > 0, gn2, 1.0), 1.0)


def _vector(values: list, device: torch.device) -> Tensor:
    """``(N,)`` fp32 on ``device`` from floats or 0-d tensors (one copy, not one per element)."""
    if all(isinstance(v, Tensor) for v in values):
        return torch.stack([v.reshape(()).to(device, torch.float32) for v in values])
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


@dataclass
class _Bucket:
    """Matrices ``lo:hi`` of the store (same shape, dtype, side and rank)."""

    lo: int
    hi: int
    rank: int
    bases: Tensor  # (B, s, r) view of the basis buffer
    low: Tensor  # (B, r, n) or (B, m, r): view of the projected-gradient workspace
    direction: Tensor  # same, view of the direction workspace (-m̂/(√v̂+ε))
    scale: float  # c of the update lr·α·c·P N (√(s/r) with scale_mode="rms", else 1)


@dataclass
class _ShapeGroup:
    """Matrices ``lo:hi`` of the store with the same shape and dtype (their gradients are stacked once)."""

    lo: int
    hi: int
    shape: tuple[int, int]
    dtype: torch.dtype
    side: str
    buckets: list[_Bucket]
    sketch: Tensor | None  # (B, s, k) view of the sketch buffer (subspace_source="moment")


def _layout(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    """Shape of a projected gradient / moment (:func:`~.linalg.project`'s layout)."""
    m, n = shape
    return (rank, n) if m <= n else (m, rank)


def _flat(tensors: list[Tensor], dev: torch.device) -> Tensor:
    return torch.cat([t.reshape(-1).to(dev, torch.float32) for t in tensors])


class ProjectedStore:
    """Flat device state and the batched normal step of the projected matrices of one group on one device.

    Built from (and bound into) the per-parameter state dicts, which must hold ``basis``, ``exp_avg``,
    ``exp_avg_sq``, ``step``, the statistics of :data:`STAT_KEYS` (numbers or 0-d tensors), ``sketch`` when
    ``sketch=True``, and the host integers ``since_refresh`` and ``rank``. After binding, the tensor entries
    and the statistics are views into the store.
    """

    def __init__(self, params: list[Tensor], states: list[dict], group: dict, *, step_device: torch.device) -> None:
        order = sorted(range(len(params)), key=lambda i: (tuple(params[i].shape), str(params[i].dtype),
                                                          int(states[i]["rank"]), i))
        self.params = [params[i] for i in order]
        self.states = [states[i] for i in order]
        self.ids = [id(p) for p in self.params]
        self.device = dev = self.params[0].device
        self.uses_sketch = group["subspace_source"] == "moment"
        scale_mode = group["scale_mode"]
        n = len(self.params)
        shapes = [tuple(p.shape) for p in self.params]
        ranks = [int(st["rank"]) for st in self.states]
        sizes = [math_prod(_layout(sh, r)) for sh, r in zip(shapes, ranks)]
        self.sizes = torch.tensor(sizes, dtype=torch.int64, device=dev)
        self.total = sum(sizes)
        # flat buffers: fp32 moments, bases, sketches; one step counter and six statistics per matrix
        self.exp_avg = _flat([st["exp_avg"] for st in self.states], dev)
        self.exp_avg_sq = _flat([st["exp_avg_sq"] for st in self.states], dev)
        self.basis = _flat([st["basis"] for st in self.states], dev)
        self.sketch = _flat([st["sketch"] for st in self.states], dev) if self.uses_sketch else None
        self.step_counts = _vector([st["step"] for st in self.states], step_device)
        self.stats = torch.stack([_vector([st[k] for st in self.states], dev) for k in STAT_KEYS], dim=1)
        self.since = torch.tensor([float(st["since_refresh"]) for st in self.states], dtype=torch.float32, device=dev)
        self.flag = torch.zeros(n, dtype=torch.bool, device=dev)
        self.skipped = torch.zeros(n, dtype=torch.int32, device=dev)
        self._low = torch.zeros(self.total, dtype=torch.float32, device=dev)  # workspace: PᵀG of every matrix
        self._dir = torch.zeros(self.total, dtype=torch.float32, device=dev)  # workspace: the directions
        self.all_true = torch.ones(n, dtype=torch.bool, device=dev)
        # per-matrix views, bound into the state dicts
        self.m_views, self.v_views, self.low_views, self.dir_views, self.basis_views = [], [], [], [], []
        self.sketch_views: list[Tensor] = []
        off = boff = koff = 0
        for st, sh, r, size in zip(self.states, shapes, ranks, sizes):
            shape = _layout(sh, r)
            self.m_views.append(self.exp_avg[off:off + size].view(shape))
            self.v_views.append(self.exp_avg_sq[off:off + size].view(shape))
            self.low_views.append(self._low[off:off + size].view(shape))
            self.dir_views.append(self._dir[off:off + size].view(shape))
            self.basis_views.append(self.basis[boff:boff + min(sh) * r].view(min(sh), r))
            off += size
            boff += min(sh) * r
            if self.uses_sketch:
                kshape = tuple(st["sketch"].shape)
                self.sketch_views.append(self.sketch[koff:koff + math_prod(kshape)].view(kshape))
                koff += math_prod(kshape)
        self.step_views = list(self.step_counts.unbind(0))
        self.stat_views = [list(row.unbind(0)) for row in self.stats.unbind(0)]
        self._bind()
        # shape groups and buckets (consecutive runs of the sort key)
        self.groups: list[_ShapeGroup] = []
        i = off = boff = koff = 0
        while i < n:
            shape, dtype = shapes[i], self.params[i].dtype
            j = i
            while j < n and shapes[j] == shape and self.params[j].dtype == dtype:
                j += 1
            buckets, k = [], i
            while k < j:
                r, h = ranks[k], k
                while h < j and ranks[h] == r:
                    h += 1
                lshape = _layout(shape, r)
                cnt, bcnt = (h - k) * math_prod(lshape), (h - k) * min(shape) * r
                buckets.append(_Bucket(
                    k, h, r, self.basis[boff:boff + bcnt].view(h - k, min(shape), r),
                    self._low[off:off + cnt].view(h - k, *lshape), self._dir[off:off + cnt].view(h - k, *lshape),
                    rank_factor(scale_mode, min(shape), r)))
                off, boff, k = off + cnt, boff + bcnt, h
            sk = None
            if self.uses_sketch:
                kshape = tuple(self.sketch_views[i].shape)
                kcnt = (j - i) * math_prod(kshape)
                sk = self.sketch[koff:koff + kcnt].view(j - i, *kshape)
                koff += kcnt
            self.groups.append(_ShapeGroup(i, j, shape, dtype, projection_side(shape), buckets, sk))
            i = j

    # ------------------------------------------------------------------ binding
    def _bind(self) -> None:
        for i, st in enumerate(self.states):
            st["exp_avg"], st["exp_avg_sq"], st["basis"] = self.m_views[i], self.v_views[i], self.basis_views[i]
            st["step"] = self.step_views[i]
            if self.uses_sketch:
                st["sketch"] = self.sketch_views[i]
            for k, view in zip(STAT_KEYS, self.stat_views[i]):
                st[k] = view

    def is_bound(self, params: list[Tensor], state: dict, group: dict) -> bool:
        """Whether ``params`` are exactly this store's members and their state entries are still its views."""
        if len(params) != len(self.ids) or {id(p) for p in params} != set(self.ids) \
                or self.uses_sketch != (group["subspace_source"] == "moment"):
            return False
        for i, p in enumerate(self.params):
            st = state.get(p)
            if st is not self.states[i] or st.get("exp_avg") is not self.m_views[i] \
                    or st.get("exp_avg_sq") is not self.v_views[i] or st.get("basis") is not self.basis_views[i] \
                    or st.get("step") is not self.step_views[i] or st.get("pending") \
                    or any(st.get(k) is not v for k, v in zip(STAT_KEYS, self.stat_views[i])) \
                    or (self.uses_sketch and st.get("sketch") is not self.sketch_views[i]):
                return False
        return True

    def moments(self) -> tuple[list[Tensor], list[Tensor]]:
        """The per-matrix first and second moments, as the Adam kernel reads and writes them.

        The single load/store point of the moments: a quantized storage would decode here and encode in
        :meth:`store_moments`.
        """
        return self.m_views, self.v_views

    def store_moments(self) -> None:
        """Counterpart of :meth:`moments` (fp32 storage: the kernel wrote in place, nothing to do)."""

    # ------------------------------------------------------------------ the normal step
    @torch.no_grad()
    def step(
        self,
        grads: dict[int, Tensor],
        group: dict,
        adamw: Callable[..., list[Tensor]],
        test_matrix: Callable[[int, int, torch.device], Tensor] | None = None,
        sketch_mask: Tensor | None = None,
    ) -> None:
        """One normal step of every member: ``grads`` maps ``id(param)`` to its gradient.

        ``adamw(params, grads, exp_avgs, exp_avg_sqs, steps, group, lr=, weight_decay=)`` is the optimizer's
        call into torch's Adam kernel; ``test_matrix(rows, cols, device)`` its fixed ``Ω`` of the moment
        sketches; ``sketch_mask`` ``(N,)`` bool (member order) where the sketch takes this step's gradient
        (default all: a matrix refreshed this step already took it).
        """
        beta1 = group["betas"][0]
        stacks, gn2_parts, pn2_parts, yn2_parts = [], [], [], []
        for sg in self.groups:
            # a shape of one matrix is not stacked (no copy of G): a view with a batch dimension of one
            g = torch.stack([grads[id(p)] for p in self.params[sg.lo:sg.hi]]) if sg.hi - sg.lo > 1 \
                else grads[id(self.params[sg.lo])].unsqueeze(0)
            if g.dtype != torch.float32:
                g = g.float()
            stacks.append(g)
            for b in sg.buckets:
                gb = g[b.lo - sg.lo:b.hi - sg.lo]
                if sg.side == "left":
                    torch.bmm(b.bases.mT, gb, out=b.low)
                else:
                    torch.bmm(gb, b.bases, out=b.low)
            if self.uses_sketch:  # Y ← β1·Y + (1−β1)·A Ω, A = G or Gᵀ; a non-finite update leaves Y as it was
                y = sg.sketch
                omega = test_matrix(max(sg.shape), y.shape[2], self.device)
                fresh = torch.matmul(g, omega) if sg.side == "left" else torch.matmul(omega.mT, g).mT
                new = fresh.mul_(1.0 - beta1).add_(y, alpha=beta1)
                keep = torch.isfinite(new).all(dim=(1, 2))
                if sketch_mask is not None:
                    keep &= sketch_mask[sg.lo:sg.hi]
                torch.where(keep[:, None, None], new, y, out=y)
                for b in sg.buckets:  # the refresh test reads the sketch: ‖PᵀY‖ and ‖Y‖
                    pn2_parts.append(torch.bmm(b.bases.mT, y[b.lo - sg.lo:b.hi - sg.lo]).square().sum(dim=(1, 2)))
                yn2_parts.append(y.square().sum(dim=(1, 2)))
            else:  # the batch's share needs ‖G‖ every step
                gn2_parts.append(torch.linalg.vector_norm(g, dim=(1, 2)).square())
        low2 = torch.segment_reduce(self._low.square(), "sum", lengths=self.sizes)  # ‖PᵀG‖² per matrix
        if self.uses_sketch:
            ok = torch.isfinite(low2)
            pn2, total2 = torch.cat(pn2_parts), torch.cat(yn2_parts)
        else:
            gn2 = torch.cat(gn2_parts)
            ok = torch.isfinite(low2 + gn2)
            pn2, total2 = low2, gn2
        # Adam on the projected gradients; a matrix with a non-finite gradient gets its state back afterwards
        m_old, v_old = self.exp_avg.clone(), self.exp_avg_sq.clone()
        self._dir.zero_()
        m_list, v_list = self.moments()
        steps = adamw(self.dir_views, self.low_views, m_list, v_list, list(self.step_views), group, lr=1.0,
                      weight_decay=0.0)
        if any(s is not v for s, v in zip(steps, self.step_views)):
            raise RuntimeError("AdaRankGrad: step counters moved device inside the Adam kernel")
        bad = ~ok
        bad_elem = bad.repeat_interleave(self.sizes, output_size=self.total)
        torch.where(bad_elem, m_old, self.exp_avg, out=self.exp_avg)
        torch.where(bad_elem, v_old, self.exp_avg_sq, out=self.exp_avg_sq)
        self._dir.masked_fill_(bad_elem, 0.0)
        self.store_moments()
        self.step_counts.sub_(bad.to(self.step_counts.device, self.step_counts.dtype))
        self.skipped.add_(bad.int())
        # back-projection and decoupled weight decay: W ← decay·W + lr·α·c·P N (decay 1 where skipped)
        lr, wd = group["lr"], group["weight_decay"]
        alpha = lr * group["scale"]
        decays = list(torch.where(ok, 1.0 - lr * wd, 1.0).unbind(0)) if wd else None
        for sg, g in zip(self.groups, stacks):
            if sg.hi - sg.lo == 1 and sg.dtype == torch.float32:  # one matrix: update W in place (no delta buffer)
                p, b = self.params[sg.lo], sg.buckets[0]
                if decays is not None:
                    p.mul_(decays[sg.lo])
                if sg.side == "left":
                    p.addmm_(b.bases[0], b.direction[0], alpha=alpha * b.scale)
                else:
                    p.addmm_(b.direction[0], b.bases[0].mT, alpha=alpha * b.scale)
                continue
            delta = torch.empty(g.shape, dtype=torch.float32, device=self.device)
            for b in sg.buckets:
                out = delta[b.lo - sg.lo:b.hi - sg.lo]
                if sg.side == "left":
                    torch.baddbmm(out, b.bases, b.direction, beta=0.0, alpha=alpha * b.scale, out=out)
                else:
                    torch.baddbmm(out, b.direction, b.bases.mT, beta=0.0, alpha=alpha * b.scale, out=out)
            params = self.params[sg.lo:sg.hi]
            if decays is not None:
                torch._foreach_mul_(params, decays[sg.lo:sg.hi])
            if sg.dtype == torch.float32:
                torch._foreach_add_(params, list(delta.unbind(0)))
            else:
                torch._foreach_add_(params, list(delta.to(sg.dtype).unbind(0)))
        test = refresh_statistics(self.stats, self.since, pn2.sqrt(), captured_share(pn2, total2), self.all_true,
                                  ok, tol=group["tol"], min_gap=group["min_gap"])
        self.flag.logical_or_(test)
        for st in self.states:
            st["since_refresh"] += 1

    # ------------------------------------------------------------------ host reads
    def read_flags(self) -> tuple[list[bool], list[int]]:
        """One host read of the sticky refresh flags and the skip counts (then reset to zero)."""
        both = torch.cat((self.flag.int(), self.skipped)).tolist()
        self.flag.zero_()
        self.skipped.zero_()
        n = len(self.params)
        return [bool(x) for x in both[:n]], both[n:]


def math_prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
