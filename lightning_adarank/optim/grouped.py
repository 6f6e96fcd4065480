"""Grouped execution of the projected step: a normal step's operators do not grow with the number of matrices,
its transient memory is bounded, and it never reads a value on the host.

:class:`ShapeStore` holds the optimizer state of every projected matrix of one ``(parameter group, device, oriented
shape, dtype)`` in a few flat buffers and steps them together:

* **orientation** — a matrix is stepped as ``W`` when ``m <= n`` and as ``Wᵀ`` (a view) otherwise, so its projected
  side is always the rows: ``R = PᵀG``, ``W ← W + α·P N``, one code path. ``(768, 3072)`` and ``(3072, 768)``
  share a store; their moments are stored ``(r, l)`` and bound into the state dicts in the parameter's layout
  (``(m, r)`` for ``m > n``, a transposed view), so checkpoints and the per-matrix code are unchanged;

* **storage** — the moments ``M``, ``V``, the bases ``P``, the moment sketches ``Y``, the step counters and the
  refresh-test statistics live in flat device buffers; each parameter's ``optimizer.state[p]`` entries are
  *views* into them, so ``state_dict()``, :meth:`~lightning_adarank.AdaRankGrad.subspaces` and the per-matrix
  (layer-wise) code see ordinary tensors. A store holds one shape, so a refresh (which changes a matrix's rank,
  hence its storage) rebuilds only the store of that shape;
* **ranks** — ranks are exact in storage (moments ``(r, l)``, bases ``Pᵀ`` as ``(r, s)`` rows; padding them would
  store every matrix at its shape's largest rank: the state memory adaptive rank saves). A chunk is stepped at its
  largest rank ``R`` instead: its bases are laid into a zero-padded ``(B, R, s)`` stack (one ``index_copy_``), so
  one ``bmm`` projects every member and one ``baddbmm`` projects back, whatever the mix of ranks; the padded rows
  project to zero and are never stored. A chunk of one rank uses its stored bases as they are;
* **chunks** — the gradients of a store are stacked (one fp32 copy) a *chunk* at a time: consecutive members
  whose stacked gradients fit in ``stack_bytes`` (:data:`STACK_BYTES`; at least one matrix). Each chunk is
  projected, sketched, stepped by one fused Adam call and written back before the next is stacked, and the
  back-projected update of a chunk is written into that same stack buffer. **Bound**: the step's transient
  memory is one chunk's stack, at most ``max(stack_bytes, 4·m·n)`` bytes, plus its padded bases and projected
  stack (``R/l`` and ``R/s`` of it, ``R`` the chunk's largest rank) and state-sized workspaces (the projected
  gradients and directions, ``r × n`` per matrix). A one-matrix fp32 chunk is not copied at all;
* **no host synchronisation** — the refresh-test inputs (``‖PᵀY‖``/``‖Y‖``, or ``‖PᵀG‖``/``‖G‖``) are device
  vectors; the test runs on them on the device and leaves a sticky per-matrix flag, which the optimizer reads
  once every ``refresh_check_every`` steps. A matrix whose gradient is not finite is skipped on the device
  (``torch.where`` restores its moments, step counter and statistics; its update is masked to zero and its
  weight decay to one), and counted; the count is read with the flags.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import stack_stages
from .linalg import projection_side, rank_factor
from .refresh_test import STAT_KEYS, stat_column
from .rounding import add_stochastic_

__all__ = ["ShapeStore", "oriented_shape", "refresh_test_stores", "STACK_BYTES"]

#: default byte budget of one chunk's stacked fp32 gradients (the grouped step's transient memory)
STACK_BYTES = 64 * 2**20


def oriented_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """``(s, l)``: the shape a matrix is stepped in, projected side first (``W`` if ``m <= n``, else ``Wᵀ``)."""
    return (min(shape), max(shape))


def _orient(t: Tensor, flipped: bool) -> Tensor:
    """``t`` or its transpose (a view): between a parameter's layout and the store's oriented one."""
    return t.mT if flipped else t


def _scalar_alpha(direction: Tensor, alpha: float | Tensor) -> float:
    """The ``alpha`` of a fused multiply-add: a float as it is; a tensor (a tensor lr) is folded into
    ``direction`` on the device instead (no host read), leaving ``1``."""
    if isinstance(alpha, Tensor):
        direction.mul_(alpha)
        return 1.0
    return alpha


def _flat(tensors: list[Tensor], dev: torch.device) -> Tensor:
    return torch.cat([t.reshape(-1).to(dev, torch.float32) for t in tensors])


@dataclass
class _Chunk:
    """A chunk's members and its views of the store's buffers (made once per store)."""

    lo: int
    hi: int
    rank: int  # R: the chunk's largest rank (its members are stepped at R, padded with zero rows)
    rows: Tensor | None  # (Σr,) the members' rows in the padded (B·R) layout; None when every rank is R
    bases_t: Tensor  # (Σr, s): the members' Pᵀ rows as stored
    low: Tensor  # (Σr, l): the projected-gradient workspace (PᵀG per member, in Adam's layout)
    factor: float  # c of lr·α·c·P N when every member has rank R
    factors: Tensor | None  # (B, 1, 1): each member's c when their ranks differ
    params: list[Tensor]  # oriented views of the weights (Wᵀ for a flipped member)
    ids: list[int]
    flipped: list[bool]
    sizes: Tensor  # (B,) elements of each member's moments
    moments: Tensor  # (2, Σr·l): the members' first and second moments
    direction: Tensor  # (Σr, l): the direction workspace (-m̂/(√v̂+ε) per member)
    steps: Tensor
    skipped: Tensor
    sketch: Tensor | None
    dir_views: list[Tensor]
    low_views: list[Tensor]
    m_views: list[Tensor]
    v_views: list[Tensor]
    step_views: list[Tensor]


def refresh_test_stores(stores: list[ShapeStore], results: list[tuple[Tensor, Tensor, Tensor]], group: dict) -> None:
    """The refresh test of every store of a parameter group in one call of
    :func:`~lightning_adarank.optim.stack_stages.refresh_test` per device: ``results`` are the stores'
    :meth:`ShapeStore.step` returns; the statistics and step indices are updated in place and the sticky flags
    raised where the test fired."""
    by_device: dict[torch.device, list[int]] = {}
    for k, store in enumerate(stores):
        by_device.setdefault(store.device, []).append(k)
    for ks in by_device.values():
        pn2, total2, ok = (list(c) for c in zip(*(results[k] for k in ks)))
        stores[ks[0]].stages.refresh_test(
            [stores[k].stats for k in ks],
            [stores[k].since for k in ks],
            pn2,
            total2,
            ok,
            [stores[k].flag for k in ks],
            group["tol"],
            group["min_gap"],
        )


class ShapeStore:
    """Flat device state and the batched normal step of the projected matrices of one shape and dtype.

    Built from (and bound into) the per-parameter state dicts, which must hold ``basis``, ``exp_avg``,
    ``exp_avg_sq``, ``step``, the statistics of :data:`STAT_KEYS` (numbers or 0-d tensors), ``sketch`` when
    ``sketch=True``, and the host integers ``since_refresh`` and ``rank`` (and, when parked,
    ``unread_skips``). After binding, the tensor entries and the statistics are views into the store.
    """

    def __init__(
        self,
        params: list[Tensor],
        states: list[dict],
        group: dict,
        *,
        step_device: torch.device,
        stack_bytes: int = STACK_BYTES,
        compiled: bool = False,
    ) -> None:
        order = sorted(range(len(params)), key=lambda i: (int(states[i]["rank"]), i))
        self.params = [params[i] for i in order]
        self.states = [states[i] for i in order]
        self.ids = [id(p) for p in self.params]
        self.device = dev = self.params[0].device
        self.shape: tuple[int, int] = oriented_shape(self.params[0].shape)
        self.dtype = self.params[0].dtype
        if any(oriented_shape(p.shape) != self.shape or p.dtype != self.dtype for p in self.params):
            raise ValueError("ShapeStore: every member must have the same oriented shape (s, l) and dtype")
        self.flipped = [projection_side(p.shape) == "right" for p in self.params]  # stored as Wᵀ
        self.uses_sketch = group["subspace_source"] == "moment"
        self.stages = stack_stages.stages(compiled)
        n = len(self.params)
        s, l = self.shape
        ranks = [int(st["rank"]) for st in self.states]
        sizes = [r * l for r in ranks]
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        # flat buffers: fp32 moments, bases, sketches; one step counter and six statistics per matrix
        # the two moments as the rows of one buffer: a skipped step restores both with one clone and one where
        self.moments = torch.stack(
            [
                _flat([_orient(st[k], t) for st, t in zip(self.states, self.flipped)], dev)
                for k in ("exp_avg", "exp_avg_sq")
            ]
        )
        self.exp_avg, self.exp_avg_sq = self.moments.unbind(0)
        self.basis = _flat([st["basis"].mT for st in self.states], dev)  # Pᵀ of each member: (r, s) rows
        self.sketch = (
            torch.stack([st["sketch"].to(dev, torch.float32) for st in self.states]) if self.uses_sketch else None
        )
        self.step_counts = stat_column([st["step"] for st in self.states], step_device)
        self.stats = torch.stack([stat_column([st[k] for st in self.states], dev) for k in STAT_KEYS], dim=1)
        self.since = torch.tensor(
            [float(st["since_refresh"] - st.get("unread_skips", 0)) for st in self.states],
            dtype=torch.float32,
            device=dev,
        )
        self.flag = torch.zeros(n, dtype=torch.int32, device=dev)  # sticky: 1 once the refresh test fired
        self.skipped = torch.zeros(n, dtype=torch.int32, device=dev)
        self._low = torch.zeros(self.offsets[-1], dtype=torch.float32, device=dev)  # workspace: PᵀG per matrix
        self._dir = torch.zeros(self.offsets[-1], dtype=torch.float32, device=dev)  # workspace: the directions
        # per-matrix views: oriented (r, l) for the Adam kernel, in the parameter's layout for its state dict
        self.m_views, self.v_views, self.low_views, self.dir_views, self.basis_views = [], [], [], [], []
        self.m_state, self.v_state = [], []
        boff = 0
        for i, r in enumerate(ranks):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            self.m_views.append(self.exp_avg[lo:hi].view(r, l))
            self.v_views.append(self.exp_avg_sq[lo:hi].view(r, l))
            self.m_state.append(_orient(self.m_views[-1], self.flipped[i]))
            self.v_state.append(_orient(self.v_views[-1], self.flipped[i]))
            self.low_views.append(self._low[lo:hi].view(r, l))
            self.dir_views.append(self._dir[lo:hi].view(r, l))
            self.basis_views.append(self.basis[boff : boff + r * s].view(r, s).mT)
            boff += r * s
        self.step_views = list(self.step_counts.unbind(0))
        self.stat_views = [list(row.unbind(0)) for row in self.stats.unbind(0)]
        self.sketch_views = list(self.sketch.unbind(0)) if self.uses_sketch else []
        self._bind()
        # chunks: consecutive members whose stacked fp32 gradients fit in stack_bytes (at least one)
        per = max(1, stack_bytes // (4 * self.shape[0] * self.shape[1]))
        self.chunks = [(lo, min(lo + per, n)) for lo in range(0, n, per)]
        self.ranks = ranks
        self.rank_factors = [rank_factor(group["scale_mode"], s, r) for r in ranks]
        self._chunk_views: list[_Chunk] | None = None  # made at the first step (after binding)

    # ------------------------------------------------------------------ binding
    def _bind(self) -> None:
        for i, st in enumerate(self.states):
            st["exp_avg"], st["exp_avg_sq"], st["basis"] = self.m_state[i], self.v_state[i], self.basis_views[i]
            st["step"] = self.step_views[i]
            if self.uses_sketch:
                st["sketch"] = self.sketch_views[i]
            for k, view in zip(STAT_KEYS, self.stat_views[i]):
                st[k] = view

    def is_bound(self, params: list[Tensor], state: dict, group: dict) -> bool:
        """Whether ``params`` are exactly this store's members and their state entries are still its views."""
        if (
            len(params) != len(self.ids)
            or {id(p) for p in params} != set(self.ids)
            or self.uses_sketch != (group["subspace_source"] == "moment")
        ):
            return False
        for i, p in enumerate(self.params):
            st = state.get(p)
            if (
                st is not self.states[i]
                or st.get("exp_avg") is not self.m_state[i]
                or st.get("exp_avg_sq") is not self.v_state[i]
                or st.get("basis") is not self.basis_views[i]
                or st.get("step") is not self.step_views[i]
                or st.get("pending")
                or any(st.get(k) is not v for k, v in zip(STAT_KEYS, self.stat_views[i]))
                or (self.uses_sketch and st.get("sketch") is not self.sketch_views[i])
            ):
                return False
        return True

    # ------------------------------------------------------------------ the normal step
    def _views(self, c: int) -> _Chunk:
        """Chunk ``c``'s views of the persistent buffers, made once per store (a normal step slices only its stack)."""
        lo, hi = self.chunks[c]
        s, l = self.shape
        ranks = self.ranks[lo:hi]
        big = max(ranks)
        r0, r1 = sum(self.ranks[:lo]), sum(self.ranks[:hi])
        m0, m1 = self.offsets[lo], self.offsets[hi]
        rows = None
        if any(r != big for r in ranks):
            rows = torch.tensor([j * big + k for j, r in enumerate(ranks) for k in range(r)], device=self.device)
        factors = self.rank_factors[lo:hi]
        per_member = None
        if any(f != factors[0] for f in factors):
            per_member = torch.tensor(factors, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        return _Chunk(
            lo,
            hi,
            big,
            rows,
            self.basis.view(-1, s)[r0:r1],
            self._low.view(-1, l)[r0:r1],
            factors[0],
            per_member,
            [_orient(p, t) for p, t in zip(self.params[lo:hi], self.flipped[lo:hi])],
            self.ids[lo:hi],
            self.flipped[lo:hi],
            torch.tensor([r * l for r in ranks], device=self.device),
            self.moments[:, m0:m1],
            self._dir.view(-1, l)[r0:r1],
            self.step_counts[lo:hi],
            self.skipped[lo:hi],
            self.sketch[lo:hi] if self.uses_sketch else None,
            self.dir_views[lo:hi],
            self.low_views[lo:hi],
            self.m_views[lo:hi],
            self.v_views[lo:hi],
            self.step_views[lo:hi],
        )

    @torch.no_grad()
    def step(
        self,
        grads: dict[int, Tensor],
        group: dict,
        adamw: Callable[..., list[Tensor]],
        test_matrix: Callable[[int, int, torch.device], Tensor] | None = None,
        sketch_mask: Tensor | None = None,
        rounding: Callable[[Tensor, dict, Tensor], dict] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One normal step of every member: ``grads`` maps ``id(param)`` to its gradient.

        ``adamw(params, grads, exp_avgs, exp_avg_sqs, steps, group, lr=, weight_decay=)`` is the optimizer's
        call into torch's Adam kernel; ``test_matrix(rows, cols, device)`` its fixed ``Ω`` of the moment
        sketches; ``sketch_mask`` ``(N,)`` bool (member order) where the sketch takes this step's gradient
        (default all: a matrix refreshed this step already took it). Returns the refresh test's inputs
        ``(‖PᵀY‖², ‖Y‖², finite)`` as ``(N,)`` device vectors, for :func:`refresh_test_stores`.
        ``rounding(param, group, step)``: the stochastic rounding of 16-bit weights (the optimizer's
        ``weight_rounding``; ``None``: round to nearest).
        """
        if self._chunk_views is None:
            self._chunk_views = [self._views(c) for c in range(len(self.chunks))]
        parts = [
            self._step_chunk(ch, grads, group, adamw, test_matrix, sketch_mask, rounding) for ch in self._chunk_views
        ]
        for st in self.states:
            st["since_refresh"] += 1
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(col) for col in zip(*parts))  # type: ignore[return-value]

    def _step_chunk(
        self,
        ch: _Chunk,
        grads: dict[int, Tensor],
        group: dict,
        adamw: Callable[..., list[Tensor]],
        test_matrix: Callable | None,
        sketch_mask: Tensor | None,
        rounding: Callable | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Members ``ch.lo:ch.hi``: stack (or view) their gradients, project, sketch, Adam, update; the stack is
        freed on return. Returns the refresh test's ``‖PᵀY‖²`` (or ``‖PᵀG‖²``), ``‖Y‖²`` (or ``‖G‖²``) and the
        finite mask."""
        beta1 = group["betas"][0]
        lr, wd = group["lr"], group["weight_decay"]  # a 0-d tensor lr stays on the device: no read, capture-ready
        alpha = lr * group["scale"]
        if ch.hi - ch.lo == 1:  # one matrix: a view with a batch dimension of one (no copy of an fp32 G)
            g = _orient(grads[ch.ids[0]], ch.flipped[0])
            own = g.dtype != torch.float32
            g = (g.float() if own else g).unsqueeze(0)
        else:
            g, own = torch.stack([_orient(grads[i], t) for i, t in zip(ch.ids, ch.flipped)]), True
            g = g if g.dtype == torch.float32 else g.float()
        omega = test_matrix(self.shape[1], ch.sketch.shape[2], self.device) if self.uses_sketch else None
        mask = sketch_mask[ch.lo : ch.hi] if sketch_mask is not None else None
        bases_t, pn2, total2, ok, old = self.stages.before_adam(
            g, ch.bases_t, ch.rows, ch.rank, ch.low, ch.moments, ch.sketch, omega, beta1, mask
        )
        ch.direction.zero_()  # Adam on the projected gradients (torch's kernel, lr 1): the directions -m̂/(√v̂+ε)
        steps = adamw(
            ch.dir_views, ch.low_views, ch.m_views, ch.v_views, ch.step_views, group, lr=1.0, weight_decay=0.0
        )
        if any(s is not v for s, v in zip(steps, ch.step_views)):
            raise RuntimeError("AdaRankGrad: step counters moved device inside the Adam kernel")
        direction, bad = self.stages.after_adam(
            ok, old, ch.moments, ch.direction, ch.sizes, ch.skipped, ch.rows, ch.rank, ch.factors
        )
        ch.steps.sub_(bad.to(ch.steps.device, ch.steps.dtype))  # a skipped matrix's counter goes back
        # back-projection and decoupled weight decay: W ← decay·W + lr·α·c·P N (decay 1 where skipped)
        decays = list(torch.where(ok, 1.0 - lr * wd, 1.0).unbind(0)) if wd else [1.0] * len(ch.params)
        if wd and self.dtype == torch.float32:
            torch._foreach_mul_(ch.params, decays)
        a = _scalar_alpha(direction, alpha if ch.factors is not None else alpha * ch.factor)
        if not own:  # the stack is a view of an fp32 gradient: add into the weight directly
            ch.params[0].addmm_(bases_t[0].mT, direction[0], alpha=a)
            return pn2, total2, ok
        torch.baddbmm(g, bases_t.mT, direction, beta=0.0, alpha=a, out=g)  # the update, into the chunk's own stack
        if self.dtype == torch.float32:
            torch._foreach_add_(ch.params, list(g.unbind(0)))
        else:  # 16-bit weights: decay and update in fp32, written with stochastic rounding
            for i, (p, d) in enumerate(zip(ch.params, g.unbind(0))):
                r = rounding(self.params[ch.lo + i], group, ch.step_views[i]) if rounding else {"salt": None, "kind": 0}
                add_stochastic_(p, d, decay=decays[i], **r)
        return pn2, total2, ok

    # ------------------------------------------------------------------ host reads
    def device_flags(self) -> Tensor:
        """The sticky refresh flags and skip counts as one ``(2N,)`` int device vector (read with the others)."""
        return torch.cat((self.flag, self.skipped))

    def park(self, values: list[int]) -> None:
        """Move the flags and skip counts just read (``values``, from :meth:`device_flags`) into the host state:
        ``flagged`` and ``unread_skips`` of each member; the device vectors restart at zero."""
        n = len(self.params)
        for st, flag, skips in zip(self.states, values[:n], values[n:]):
            if flag:
                st["flagged"] = True
            if skips:
                st["unread_skips"] = st.get("unread_skips", 0) + int(skips)
        self.flag.zero_()
        self.skipped.zero_()
