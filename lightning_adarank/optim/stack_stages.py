"""The stages of the grouped step on one chunk: pure tensor functions on a stack of ``B`` oriented gradients
``(B, s, l)`` (projected side first), which :class:`~lightning_adarank.optim.grouped.ShapeStore` calls around
torch's Adam kernel, and which ``compile=True`` hands to :func:`torch.compile` as they are.

A chunk's members may have different ranks. Their state is stored at its exact rank (moments ``(r, l)``, bases
``Pᵀ`` as ``(r, s)`` rows, concatenated over the members: ``Σr`` rows), and the chunk is stepped at its largest
rank ``R``: the rows are laid into a zero-padded ``(B, R, ·)`` stack by :func:`padded`, so one ``bmm`` projects
every member and one ``baddbmm`` projects back. ``rows`` (``(Σr,)``, the members' rows in the ``B·R`` layout)
is ``None`` when every rank is ``R`` (the stored rows are the stack as they are).

* :func:`before_adam`: projection ``PᵀG`` into the Adam workspace, the moment sketch's average, the refresh
  test's inputs and the finite mask;
* torch's Adam kernel (the caller's, on the workspace views: :mod:`~lightning_adarank.optim.adam_kernels`);
* :func:`after_adam`: a non-finite member's moments restored and its direction zeroed, then the direction as the
  padded stack the back-projection takes, with each member's rank factor applied;
* :func:`refresh_test`: the refresh test of every store of a parameter group (on one device) at once.

No stage reads a value on the host, and none writes a weight (those in-place writes stay outside any compiled
graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import sketch_ema
from .refresh_test import captured_share, refresh_statistics

__all__ = ["padded", "before_adam", "after_adam", "refresh_test", "Stages", "stages"]


def padded(flat: Tensor, rows: Tensor | None, rank: int, batch: int) -> Tensor:
    """``flat`` ``(Σr, cols)`` as the ``(batch, rank, cols)`` stack, zero rows above each member's rank (a view
    when ``rows`` is ``None``: every rank is ``rank``)."""
    cols = flat.shape[-1]
    if rows is None:
        return flat.view(batch, rank, cols)
    return flat.new_zeros(batch * rank, cols).index_copy_(0, rows, flat).view(batch, rank, cols)


def before_adam(
    g: Tensor,
    bases: Tensor,
    rows: Tensor | None,
    rank: int,
    low: Tensor,
    moments: Tensor,
    sketch: Tensor | None,
    omega: Tensor | None,
    beta1: float,
    sketch_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Projection, sketch and the refresh test's inputs of a chunk, before its Adam step.

    ``g`` ``(B, s, l)`` the stacked gradients; ``bases`` ``(Σr, s)`` the members' ``Pᵀ`` rows; ``low`` ``(Σr, l)``
    the workspace that receives ``PᵀG`` (Adam's gradient); ``moments`` ``(2, Σr·l)``, cloned so that a
    non-finite member's state can be restored after Adam (:func:`after_adam`); ``sketch`` ``(B, s, k)`` the
    moment sketches, ``Y ← β1·Y + (1−β1)·G Ω`` in place (kept where the new value is not finite, or where
    ``sketch_mask`` is false), or ``None`` with ``subspace_source="gradient"``.

    Returns ``(Pᵀ stack (B, R, s), ‖PᵀY‖² (or ‖PᵀG‖²), ‖Y‖² (or ‖G‖²), finite (B,), the moments' copy)``.
    """
    batch = g.shape[0]
    bases_t = padded(bases, rows, rank, batch)
    if rows is None:  # PᵀG straight into the workspace
        proj = torch.bmm(bases_t, g, out=low.view(batch, rank, -1))
    else:  # the padded rows project to zero and are not gathered
        proj = torch.bmm(bases_t, g)
        torch.index_select(proj.view(batch * rank, -1), 0, rows, out=low)
    proj2 = proj.square().sum(dim=(1, 2))
    if sketch is None:  # the share needs ‖G‖ every step
        total2 = g.square().sum(dim=(1, 2))
        return bases_t, proj2, total2, torch.isfinite(proj2 + total2), moments.clone()
    new = sketch_ema(sketch, torch.matmul(g, omega), beta1)
    keep = torch.isfinite(new).all(dim=(1, 2))
    if sketch_mask is not None:
        keep = keep & sketch_mask
    torch.where(keep.view(-1, 1, 1), new, sketch, out=sketch)
    pn2 = torch.bmm(bases_t, sketch).square().sum(dim=(1, 2))  # the refresh test reads the sketch
    return bases_t, pn2, sketch.square().sum(dim=(1, 2)), torch.isfinite(proj2), moments.clone()


def after_adam(
    ok: Tensor,
    old: Tensor,
    moments: Tensor,
    direction: Tensor,
    sizes: Tensor,
    skipped: Tensor,
    rows: Tensor | None,
    rank: int,
    scale: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """After a chunk's Adam step: where ``ok`` is false the moments get ``old`` back, the direction is zeroed and
    ``skipped`` counts the step. Returns the direction ``(Σr, l)`` as the ``(B, R, l)`` stack of the update, times
    each member's rank factor ``scale`` ``(B, 1, 1)`` when given (members of different ranks), and the skipped
    members ``~ok`` (the caller takes their Adam step counters back).

    ``sizes`` ``(B,)``: elements of each member's moments (``r·l``).
    """
    bad = ~ok
    bad_elem = bad.repeat_interleave(sizes, output_size=old.shape[1])
    torch.where(bad_elem, old, moments, out=moments)
    direction.masked_fill_(bad_elem.view_as(direction), 0.0)
    skipped.add_(bad)
    out = padded(direction, rows, rank, ok.shape[0])
    return (out.mul_(scale) if scale is not None else out), bad


def refresh_test(
    stats: list[Tensor],
    since: list[Tensor],
    pn2: list[Tensor],
    total2: list[Tensor],
    ok: list[Tensor],
    flags: list[Tensor],
    tol: float,
    min_gap: int,
) -> None:
    """:func:`~lightning_adarank.optim.refresh_test.refresh_statistics` of several stores at once (one entry per
    store: its ``(N, 6)`` statistics and ``(N,)`` subspace steps, updated in place; this step's ``‖PᵀY‖²``,
    ``‖Y‖²`` and finite mask, from :func:`before_adam`), raising each store's sticky ``(N,)`` int ``flags`` where
    the test fired."""
    one = len(stats) == 1
    st, sn, p2, t2, fine = (x[0] if one else torch.cat(x) for x in (stats, since, pn2, total2, ok))
    fired = refresh_statistics(
        st, sn, p2.sqrt(), captured_share(p2, t2), torch.ones_like(fine), fine, tol=tol, min_gap=min_gap
    ).int()
    if one:  # the statistics were updated in place
        flags[0].bitwise_or_(fired)
        return
    sizes = [x.shape[0] for x in stats]  # back into each store: one split and one foreach call per buffer
    torch._foreach_copy_(stats, st.split(sizes))
    torch._foreach_copy_(since, sn.split(sizes))
    torch._foreach_maximum_(flags, fired.split(sizes))


class Stages(NamedTuple):
    """The stages a store calls around Adam and the refresh test: as written, or compiled."""

    before_adam: object
    after_adam: object
    refresh_test: object


_COMPILED: Stages | None = None


def stages(compiled: bool) -> Stages:
    """:func:`before_adam` and :func:`after_adam` as written, or (``compiled``) through :func:`torch.compile`: made
    once per process and shared by every store, so a new chunk shape or rank is a recompile of the same functions
    (dynamo makes the sizes symbolic after the first), not a new compilation cache."""
    global _COMPILED
    if not compiled:
        return Stages(before_adam, after_adam, refresh_test)
    if _COMPILED is None:
        _COMPILED = Stages(torch.compile(before_adam), torch.compile(after_adam), torch.compile(refresh_test))
    return _COMPILED
