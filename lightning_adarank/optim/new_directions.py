"""Adam's second moment for the directions a subspace refresh brings in.

After a refresh the moments are carried into the new basis (``M ← R M``, ``V ← (R∘R) V`` with
``R = P_newᵀ P_old``: :func:`~lightning_adarank.optim.linalg.moment_transform`). A new direction ``p_i`` that
lies partly outside the old subspace keeps only the part of the old statistics that lies inside it: its row of
``V`` holds ``‖R_i‖² = Σ_j R_ij²`` of the averaging mass a carried row holds, and none at all for a direction
orthogonal to the old subspace (the same holds when the moments are restarted at zero because the rank changed
with ``transform_moments=False``). The step counter, and with it Adam's bias correction ``1 − β2^t``, carries
on (≈ 1 after a few hundred steps), so the direction's ``v̂`` is then ``1 − β2^k`` of what it should be, ``k``
steps after the refresh: its first steps were ``(1 − β1^k)/√(1 − β2^k)`` times a warmed-up direction's, 3.2×
at ``k = 1``, 6.5× at ``k = 10``, still 3.2× at ``k = 100`` (``v`` warms up over ``1/(1 − β2)`` steps).

:func:`fill_new_directions` gives each new direction the mass it misses, at the old subspace's average second
moment, column by column:

``V_new[i, c] = Σ_j R_ij²·V_old[j, c] + (1 − Σ_j R_ij²)₊ · mean_j V_old[j, c]``

so every row of ``V`` holds the same averaging mass as a carried one and the global bias correction is right
for all of them. A carried direction (``R_i`` a unit vector) is unchanged; a partly new one is a convex
combination of the old rows and their mean. The missing part of the *first* moment stays zero (its best
estimate: the mean of the new part is unknown, its sign too), so a new direction's momentum warms up over
about ``1/(1 − β1)`` steps and its steps grow from ``(1 − β1)`` times a warmed-up step instead of starting
3× above it. Why the old subspace's average, column by column: it is the second moment of the gradient in that
layer, at that input feature, over the directions the optimizer has been following (noise averaged over
``1/(1 − β2)`` steps); a direction that newly enters the subspace has at most the energy of the ones that were
kept, so the prior errs towards smaller steps, and the real statistics replace it at Adam's own rate ``β2``.
It needs no per-direction counters (the state dict's schema does not change) and no work on a normal step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import Side

__all__ = ["fill_new_directions", "known_share"]


def known_share(rot: Tensor) -> Tensor:
    """``Σ_j R_ij²``: the share of each new direction ``p_i`` (rows of ``R = P_newᵀ P_old``) inside the old subspace."""
    return rot.square().sum(dim=1)


@torch.no_grad()
def fill_new_directions(exp_avg_sq: Tensor, old_exp_avg_sq: Tensor, known: Tensor | None, side: Side) -> Tensor:
    """Add the averaging mass each new direction misses to the carried second moment (module docstring).

    ``exp_avg_sq``: the second moment in the new basis (``(R∘R) V_old``, or zeros when it was restarted), in
    :func:`~lightning_adarank.optim.linalg.projected_shape`'s layout (``(r, l)`` on the left side, ``(l, r)``
    on the right); ``old_exp_avg_sq``: the old subspace's, same layout at the old rank; ``known``: the share of
    each new direction inside the old subspace (:func:`known_share`; ``None``: none, the moments were
    restarted). Returns ``V_new + (1 − known)₊ ⊗ mean_j V_old[j]`` (a new tensor, fp32).
    """
    axis = 0 if side == "left" else 1  # the direction axis
    r = exp_avg_sq.shape[axis]
    if known is None:
        known = torch.zeros(r, device=exp_avg_sq.device)
    missing = (1.0 - known.float()).clamp_(min=0.0)
    prior = old_exp_avg_sq.float().mean(dim=axis, keepdim=True)  # (1, l) or (l, 1)
    missing = missing.reshape(r, 1) if side == "left" else missing.reshape(1, r)
    return exp_avg_sq.float() + missing * prior
