"""Going back to AdamW: an AdaRankGrad state as a ``torch.optim.AdamW`` state, with AdamW-shaped moments.

An AdaRankGrad checkpoint cannot be loaded into AdamW as it is: a projected matrix ``W`` (``m × n``) keeps its
moments in its subspace (``r × n`` or ``m × r``) with a basis ``P``, and the group layout differs (each group is
split in a projected and a dense part). torch's ``AdamW.load_state_dict`` then fails on the group count, or,
when the counts happen to match, loads and fails at the first step ("The size of tensor a (6) must match the size
of tensor b (32)").

:func:`adamw_state_dict` (a live optimizer) and :func:`convert_state_dict` (a saved state dict, e.g. a Lightning
checkpoint's ``optimizer_states[0]``) write the state AdamW would load:

* a projected matrix's moments are brought back to the weight's shape with the moment transform into the
  identity basis (:func:`~lightning_adarank.optim.linalg.moment_transform` with ``P_new = I``):
  ``M = P·M_low`` and ``V = (P∘P)·V_low`` (the diagonal approximation the transform already makes); its step
  count is kept (the bias correction of those moments);
* every other parameter's state is AdamW's already (dequantized when stored in 8 or 16 bits);
* the groups are the target optimizer's (``like``), each taking the learning rate, betas, eps and weight decay
  of the AdaRankGrad group its parameters were in (a resumed run continues at the same point of its schedule).

A matrix still waiting for its first subspace has no moments and starts fresh. Outside ``P``'s span ``M`` is 0
and ``V`` holds only what the diagonal approximation spreads there, so the first AdamW steps in those directions
are large: ``benchmarks/continue_adamw.py`` measures the loss curve after the switch against dropping the moments
and against staying on AdaRankGrad. In Lightning, :class:`~lightning_adarank.ContinueWithAdamW` does the
conversion while a checkpoint is restored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..optim import quant
from ..optim.checkpoint import STATE_KEY
from ..optim.linalg import moment_transform, projected_shape, projection_side

__all__ = ["adamw_state_dict", "convert_state_dict", "full_moments", "is_adarank_state"]

#: the hyperparameters a converted group takes from the AdaRankGrad group its parameters were in
CARRIED = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def is_adarank_state(state_dict: Any) -> bool:
    """Whether ``state_dict`` is an AdaRankGrad optimizer state (its format tag, or ``low_rank`` groups)."""
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict:
        return False
    return STATE_KEY in state_dict or any("low_rank" in g for g in state_dict["param_groups"])


@torch.no_grad()
def full_moments(state: Mapping[str, Any], shape: torch.Size | tuple[int, ...]) -> dict[str, Tensor] | None:
    """One parameter's AdaRankGrad state as AdamW's ``{"step", "exp_avg", "exp_avg_sq"}`` (fp32), or ``None``
    when it has no moments yet."""
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        return None
    shape = torch.Size(shape)
    if "basis" in state:
        rank = int(state["rank"])
        low = projected_shape(shape, rank)
        basis = quant.load(state["basis"], (min(shape), rank)).float()
        eye = torch.eye(min(shape), dtype=basis.dtype, device=basis.device)
        m, v = moment_transform(
            basis,
            eye,
            quant.load(state["exp_avg"], low).float(),
            quant.load(state["exp_avg_sq"], low).float(),
            projection_side(shape),
        )
    else:
        m, v = quant.load(state["exp_avg"], shape).float(), quant.load(state["exp_avg_sq"], shape).float()
    if m.shape != shape or v.shape != shape:
        raise ValueError(
            f"AdaRankGrad state: moments of shape {tuple(m.shape)} for a parameter of shape {tuple(shape)}"
        )
    step = float(state["step"]) if "step" in state else 0.0
    return {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": m.clone(), "exp_avg_sq": v.clamp_min(0).clone()}


def _adamw_group_defaults() -> dict[str, Any]:
    probe = torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return {k: v for k, v in probe.state_dict()["param_groups"][0].items() if k != "params"}


def convert_state_dict(
    saved: Mapping[str, Any],
    params: Mapping[str, Tensor],
    like: Optimizer | None = None,
) -> tuple[dict[str, Any], list[int]]:
    """An AdaRankGrad state dict as the state dict of an AdamW over the same parameters.

    Args:
        saved: the AdaRankGrad state dict (``optimizer.state_dict()``, or a checkpoint's); its groups must carry
            ``param_names`` (:func:`~lightning_adarank.param_groups`, the Lightning callback and strategy all
            name them).
        params: the model's parameters by name (``dict(model.named_parameters())``): their shapes, and the names
            of ``like``'s parameters.
        like: the optimizer the run continues with (``torch.optim.AdamW`` or ``Adam``): the result has its groups
            and parameter order, for ``like.load_state_dict``. ``None``: one AdamW group per AdaRankGrad group.

    Returns:
        the state dict, and for each of its groups the index of the AdaRankGrad group its hyperparameters came
        from (to remap an LR scheduler's per-group lists).

    Raises:
        ValueError: ``saved`` is not an AdaRankGrad state, has unnamed groups, or names a parameter ``params``
            does not have; ``like`` trains a parameter without a name in ``params``.
        TypeError: ``like`` is not Adam or AdamW (other optimizers keep other state).
    """
    if not is_adarank_state(saved):
        raise ValueError("convert_state_dict: not an AdaRankGrad state dict (no format tag, no low_rank groups)")
    if like is not None and not isinstance(like, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"convert_state_dict: AdaRankGrad's moments continue into torch.optim.AdamW or Adam, not"
            f" {type(like).__name__}"
        )
    where: dict[str, tuple[int, Any]] = {}  # name -> (saved group index, saved param id)
    for gi, group in enumerate(saved["param_groups"]):
        names = group.get("param_names")
        if not names or len(names) != len(group["params"]):
            raise ValueError(
                f"convert_state_dict: parameter group {gi} of the AdaRankGrad state has no param_names;"
                " build the optimizer from named parameters (param_groups(model) names them)"
            )
        for name, pid in zip(names, group["params"]):
            if name not in params:
                raise ValueError(f"convert_state_dict: the AdaRankGrad state names {name!r}, which the model lacks")
            where[name] = (gi, pid)
    if like is None:
        defaults = _adamw_group_defaults()
        layout = [[n for n in g["param_names"]] for g in saved["param_groups"]]
        base_groups = [dict(defaults) for _ in layout]
    else:
        name_of = {id(p): n for n, p in params.items()}
        layout = []
        for gi, group in enumerate(like.param_groups):
            missing = [i for i, p in enumerate(group["params"]) if id(p) not in name_of]
            if missing:
                raise ValueError(
                    f"convert_state_dict: parameter {missing[0]} of the target optimizer's group {gi} is"
                    " not among the named parameters given"
                )
            layout.append([name_of[id(p)] for p in group["params"]])
        base_groups = [{k: v for k, v in g.items() if k != "params"} for g in like.state_dict()["param_groups"]]
    state: dict[int, dict[str, Tensor]] = {}
    groups, origin = [], []
    index = 0
    for names, base in zip(layout, base_groups):
        known = [where[n][0] for n in names if n in where]
        source = saved["param_groups"][known[0]] if known else None
        group = dict(base)
        if source is not None:
            group.update({k: (tuple(source[k]) if k == "betas" else source[k]) for k in CARRIED if k in source})
        if like is None:
            group["param_names"] = list(names)
        ids = []
        for name in names:
            if name in where:
                converted = full_moments(saved["state"].get(where[name][1], {}), params[name].shape)
                if converted is not None:
                    state[index] = converted
            ids.append(index)
            index += 1
        group["params"] = ids
        groups.append(group)
        origin.append(known[0] if known else 0)
    return {"state": state, "param_groups": groups}, origin


def adamw_state_dict(optimizer: Any, like: Optimizer | None = None) -> dict[str, Any]:
    """The state of a live :class:`~lightning_adarank.AdaRankGrad` as an AdamW state dict (see the module
    docstring): ``torch.optim.AdamW(...).load_state_dict(adamw_state_dict(opt, like=...))``.

    ``like``: the AdamW to load it into (its groups and parameter order); ``None``: an AdamW built over
    ``opt``'s groups, ``AdamW([{"params": g["params"], ...} for g in opt.param_groups])``.
    """
    params = {n: p for g in optimizer.param_groups for n, p in zip(g.get("param_names") or [], g["params"])}
    return convert_state_dict(optimizer.state_dict(), params, like)[0]
