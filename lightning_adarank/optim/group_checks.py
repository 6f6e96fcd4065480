"""Normalising and checking the parameter groups users pass to :class:`~lightning_adarank.AdaRankGrad`.

Every setting error is a ``ValueError``/``TypeError`` that names the setting.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .config import check_group_settings

__all__ = ["normalize_params", "validate_group"]


def _is_named(items: list) -> bool:
    return bool(items) and isinstance(items[0], tuple) and len(items[0]) == 2 and isinstance(items[0][0], str)


def normalize_params(params: Any) -> list[dict]:
    """Tensors, named tensors or group dicts (whose params may be named) → groups with ``param_names``."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a Tensor")
    items = list(params)
    if not items:
        raise ValueError("AdaRankGrad got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out = []
    for group in groups:
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        if _is_named(ps):
            group["param_names"] = [n for n, _ in ps]
            ps = [p for _, p in ps]
        group["params"] = ps
        out.append(group)
    return out


def validate_group(group: dict) -> None:
    """Check a parameter group: its settings (:func:`~.config.check_group_settings`) and its tensors."""
    check_group_settings(group)
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"AdaRankGrad: params must be tensors, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError(
                "AdaRankGrad does not support complex parameters (view them as real with torch.view_as_real)"
            )
        if not p.is_floating_point():
            raise TypeError(f"AdaRankGrad: parameter of dtype {p.dtype} is not floating point")
