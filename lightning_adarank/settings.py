"""Checking and normalising what users pass to :class:`~lightning_adarank.AdaRankGrad`.

Every setting error is a ``ValueError``/``TypeError`` that names the setting.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

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
    for gi, group in enumerate(groups):
        group = dict(group)
        ps = group["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        if _is_named(ps):
            group["param_names"] = [n for n, _ in ps]
            ps = [p for _, p in ps]
        group["params"] = ps
        out.append(group)
    return out


def _check_range(name: str, value: float, low: float, high: float, *, low_open=False, high_open=False) -> None:
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok) or math.isnan(value):
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"AdaRankGrad: {name}={value!r} must be in {lb}{low}, {high}{rb}")


def validate_group(group: dict) -> None:
    for key in ("lr", "eps", "weight_decay", "scale", "tol"):
        if not isinstance(group[key], (int, float)) or isinstance(group[key], bool):
            raise TypeError(f"AdaRankGrad: {key} must be a number, got {type(group[key]).__name__}")
    _check_range("lr", group["lr"], 0.0, math.inf)
    _check_range("eps", group["eps"], 0.0, math.inf)
    _check_range("weight_decay", group["weight_decay"], 0.0, math.inf)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"AdaRankGrad: betas must be a pair of floats, got {betas!r}")
    for i, b in enumerate(betas):
        _check_range(f"betas[{i}]", float(b), 0.0, 1.0, high_open=True)
    _check_range("energy", group["energy"], 0.0, 1.0, low_open=True)
    _check_range("tol", group["tol"], 0.0, 1.0, low_open=True, high_open=True)
    for key in ("max_rank", "min_rank", "min_gap", "max_gap", "oversample", "power_iters"):
        if not isinstance(group[key], int) or isinstance(group[key], bool):
            raise TypeError(f"AdaRankGrad: {key} must be an int, got {group[key]!r}")
    if group["min_rank"] < 1:
        raise ValueError(f"AdaRankGrad: min_rank={group['min_rank']} must be >= 1")
    if group["max_rank"] < group["min_rank"]:
        raise ValueError(f"AdaRankGrad: max_rank={group['max_rank']} must be >= min_rank={group['min_rank']}")
    if group["min_gap"] < 1 or group["max_gap"] < group["min_gap"]:
        raise ValueError(
            f"AdaRankGrad: need 1 <= min_gap <= max_gap, got min_gap={group['min_gap']}, max_gap={group['max_gap']}"
        )
    if group["oversample"] < 0 or group["power_iters"] < 0:
        raise ValueError("AdaRankGrad: oversample and power_iters must be >= 0")
    if not group["scale"] > 0:
        raise ValueError(f"AdaRankGrad: scale={group['scale']} must be > 0")
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"AdaRankGrad: params must be tensors, got {type(p).__name__}")
        if p.is_complex():
            raise TypeError("AdaRankGrad does not support complex parameters (view them as real with torch.view_as_real)")
        if not p.is_floating_point():
            raise TypeError(f"AdaRankGrad: parameter of dtype {p.dtype} is not floating point")
