"""``AdaRankGradConfig``: the one typed home of every AdaRankGrad setting.

The optimizer, the Lightning callback and strategy, and the task CLIs all take their settings from this
dataclass, so each setting is typed, defaulted, documented and checked once. A bad value fails when the
config is built (``ValueError``/``TypeError`` naming the setting), not at the first step.

Per-group settings (everything except ``seed`` and ``fused``) may also be overridden in a parameter group
dict; such overrides go through the same checks (:func:`check_group_settings`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AdaRankGradConfig", "GROUP_SETTINGS", "check_group_settings"]


@dataclass(frozen=True)
class AdaRankGradConfig:
    """Settings of :class:`~lightning_adarank.AdaRankGrad` (arXiv 2410.17881).

    Args:
        lr: learning rate, as :class:`torch.optim.AdamW`.
        betas: Adam's moment decay rates ``(β1, β2)``, each in ``[0, 1)``.
        eps: Adam's ``ε`` (added to ``√v̂``).
        weight_decay: decoupled weight decay; applied to the full weight of projected matrices too.
        max_rank: largest rank of a projection; matrices with ``min(shape) <= max_rank`` are not projected
            (they get plain AdamW).
        min_rank: smallest rank of a projection (``>= 1``).
        energy: the fraction η of ``‖G‖²_F`` a subspace must keep (adaptive rank; the paper's Algorithm 2),
            in ``(0, 1]``.
        scale: α, a multiplier on the projected update (GaLore's ``scale``), ``> 0``.
        min_gap: a matrix's subspace is refreshed no more often than every ``min_gap`` steps.
        max_gap: ... and at least every ``max_gap`` steps (never staler than GaLore's fixed schedule).
        tol: refresh threshold in ``(0, 1)``: between ``min_gap`` and ``max_gap`` a subspace is refreshed when
            its smoothed projected-gradient norm, or the share of the gradient it captures, falls to ``tol``
            of its reference (see :class:`~lightning_adarank.AdaRankGrad`).
        oversample: extra sketch columns of the randomized range finder (``k = max_rank + oversample``).
        power_iters: power iterations of the range finder.
        transform_moments: carry Adam's moments into a new subspace (``M ← R M``, ``V ← (R∘R) V`` with
            ``R = P_newᵀ P_old``); ``False`` keeps them as they are, as GaLore does.
        state_bits: storage of the projected matrices' Adam moments: ``32`` fp32 (exact), ``16`` bf16 with
            stochastic rounding, ``8`` torchao's blockwise 8-bit (one fp32 scale per 256 elements; moments under
            256 elements stay fp32). Below 32 the projection basis is held in bf16 too. Math stays fp32: each
            moment is dequantized for its step and its refresh transform and re-quantized after (see
            :mod:`lightning_adarank.optim.quant`).
        dense_state_bits: the same choice for the parameters that get plain AdamW (biases, norms, unprojected
            matrices); ``32`` keeps them exact (torch's AdamW, bit for bit).
        seed: the random test matrices depend only on ``(seed, parameter index, refresh count)``, so
            data-parallel ranks agree without communication and a resumed run is bit-identical.
        fused: torch's fused Adam kernel (``None``: where the device supports it), else foreach.
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_rank: int = 8
    min_rank: int = 1
    energy: float = 0.9
    scale: float = 1.0
    min_gap: int = 10
    max_gap: int = 200
    tol: float = 0.7
    oversample: int = 4
    power_iters: int = 1
    transform_moments: bool = True
    state_bits: int = 32
    dense_state_bits: int = 32
    seed: int = 0
    fused: bool | None = field(default=None)

    def __post_init__(self) -> None:
        betas = self.betas
        if isinstance(betas, list):  # YAML/JSON give lists
            object.__setattr__(self, "betas", tuple(betas))
        check_group_settings(self.group_defaults())
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"AdaRankGrad: seed must be an int, got {self.seed!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"AdaRankGrad: fused must be True, False or None, got {self.fused!r}")

    def group_defaults(self) -> dict[str, Any]:
        """The per-group settings as a dict (the optimizer's ``defaults``)."""
        return {name: getattr(self, name) for name in GROUP_SETTINGS}

    def replace(self, **changes: Any) -> AdaRankGradConfig:
        """A copy with ``changes`` applied (and checked); unknown names raise ``TypeError`` naming them."""
        unknown = set(changes) - SETTING_NAMES
        if unknown:
            raise TypeError(f"unknown AdaRankGrad setting(s) {sorted(unknown)}; valid: {sorted(SETTING_NAMES)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, as plain Python values (for hyper-parameter logging)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: every setting's name
SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(AdaRankGradConfig))
#: settings a parameter group may override (``seed`` and ``fused`` are optimizer-wide)
GROUP_SETTINGS = tuple(f.name for f in dataclasses.fields(AdaRankGradConfig) if f.name not in ("seed", "fused"))


def _check_range(name: str, value: float, low: float, high: float, *, low_open=False, high_open=False) -> None:
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok) or math.isnan(value):
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"AdaRankGrad: {name}={value!r} must be in {lb}{low}, {high}{rb}")


def check_group_settings(group: dict[str, Any]) -> None:
    """Check the per-group settings in ``group``; raises ``TypeError``/``ValueError`` naming the bad one."""
    for key in ("lr", "eps", "weight_decay", "scale", "tol", "energy"):
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
    for key in ("state_bits", "dense_state_bits"):
        bits = group.get(key, 32)
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise TypeError(f"AdaRankGrad: {key} must be an int (32, 16 or 8), got {bits!r}")
        if bits not in (32, 16, 8):
            raise ValueError(f"AdaRankGrad: {key}={bits} must be 32 (fp32), 16 (bf16) or 8 (blockwise 8-bit)")
    if not isinstance(group["transform_moments"], bool):
        raise TypeError(f"AdaRankGrad: transform_moments must be a bool, got {group['transform_moments']!r}")
