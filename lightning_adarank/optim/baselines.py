"""One constructor for AdaRankGrad and the peers it is compared with (AdamW, GaLore, LoRA).

Used by the task modules' ``configure_optimizers`` and by the benchmarks, so that every comparison builds
its optimizers the same way. galore-torch and peft are imported only when asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import AdaRankGradConfig
from .optimizer import AdaRankGrad
from .quant import state_nbytes
from .targets import param_groups, target_parameter_names

__all__ = ["OPTIMIZER_CHOICES", "adarank_overrides", "build_optimizer", "apply_lora", "optimizer_state_bytes"]

OPTIMIZER_CHOICES = ("adarankgrad", "galore", "adamw", "lora")


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    rank: int = 8,
    scale: float | None = None,
    target_modules: str | Sequence[str] = "all-linear",
    include_embeddings: bool = False,
    galore_update_proj_gap: int = 200,
    **adarank_settings,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` for ``model``'s trainable parameters.

    Args:
        name: ``"adarankgrad"`` (:class:`AdaRankGrad` with ``max_rank=rank``), ``"galore"`` (galore-torch's
            ``GaLoreAdamW`` at fixed ``rank``, refresh every ``galore_update_proj_gap`` steps), ``"adamw"``
            (``torch.optim.AdamW``, fused where the device allows), or ``"lora"`` (``torch.optim.AdamW`` over the trainable parameters: wrap
            the model with :func:`apply_lora` first).
        rank: AdaRankGrad's ``max_rank``, GaLore's rank (LoRA's rank is set in :func:`apply_lora`).
        scale: the projected update's scale α; ``None`` keeps each optimizer's default (AdaRankGrad 1.0,
            GaLore 0.25).
        target_modules, include_embeddings: which matrices are projected (see :func:`param_groups`); GaLore
            gets the same matrices.
        **adarank_settings: any other :class:`AdaRankGrad` setting (energy, tol, min_gap, ...).
    """
    if name not in OPTIMIZER_CHOICES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_CHOICES)}")
    if adarank_settings and name != "adarankgrad":
        raise ValueError(f"settings {sorted(adarank_settings)} apply to adarankgrad only, not {name!r}")
    if name in ("adamw", "lora"):
        params = [p for p in model.parameters() if p.requires_grad]
        if name == "lora" and not any(hasattr(m, "lora_A") for m in model.modules()):
            raise ValueError("optimizer 'lora' needs a model wrapped by apply_lora(model, rank) first")
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=_fusable(params))
    if name == "adarankgrad":
        if scale is not None:
            adarank_settings["scale"] = scale
        groups = param_groups(model, target_modules, include_embeddings)
        return AdaRankGrad(groups, lr=lr, betas=betas, weight_decay=weight_decay, max_rank=rank, **adarank_settings)
    from galore_torch import GaLoreAdamW  # noqa: PLC0415 - optional peer

    groups = param_groups(model, target_modules, include_embeddings)
    groups[0].update(
        rank=rank, update_proj_gap=galore_update_proj_gap, scale=0.25 if scale is None else scale, proj_type="std"
    )
    groups[0].pop("low_rank")
    for g in groups[1:]:
        g.pop("low_rank")
    for g in groups:
        g.pop("param_names")
    return GaLoreAdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, no_deprecation_warning=True)


def adarank_overrides(
    value: AdaRankGradConfig | Mapping[str, Any] | None, reserved: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The settings of ``value`` that differ from :class:`AdaRankGradConfig`'s defaults, as a plain dict.

    For task modules that take a typed ``adarank: AdaRankGradConfig`` next to their own ``lr``/``rank``/...
    arguments: the dict is what they save in their hyper-parameters (plain values, loads with
    ``weights_only=True``) and pass on to :func:`build_optimizer`. A mapping is checked by building the config.

    Args:
        reserved: ``{setting: argument}`` for settings the task sets through its own argument (e.g.
            ``{"max_rank": "rank"}``); giving one in ``value`` raises ``ValueError`` naming the argument to use.
    """
    if value is None:
        return {}
    config = value if isinstance(value, AdaRankGradConfig) else AdaRankGradConfig(**dict(value))
    default = AdaRankGradConfig()
    out = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != getattr(default, f.name)
    }
    for name, argument in (reserved or {}).items():
        if name in out:
            raise ValueError(f"adarank.{name}={out[name]!r}: set it with the module's own argument {argument!r}")
    return out


def _fusable(params: list[torch.Tensor]) -> bool | None:
    """torch's fused AdamW where every parameter allows it (the fair baseline), else its default."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices  # noqa: PLC0415

    ok = all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point() for p in params)
    return True if ok and params else None


def apply_lora(
    model: nn.Module,
    rank: int,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters of rank ``rank`` on the same matrices AdaRankGrad would project.

    ``alpha`` defaults to ``2 * rank``. ``modules_to_save`` (e.g. ``["classifier"]``) stay fully trainable and
    get no adapter. Returns the peft model (only adapters and saved modules require grad).
    """
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - optional peer

    save = list(modules_to_save or [])
    names = target_parameter_names(model, target_modules)
    modules = [n.rsplit(".", 1)[0] for n in names]
    modules = [m for m in modules if not any(m == s or m.endswith("." + s) or m.startswith(s + ".") for s in save)]
    if not modules:
        raise ValueError(f"apply_lora: target_modules={target_modules!r} matched no nn.Linear outside modules_to_save")
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=modules,
        modules_to_save=save or None,
    )
    return get_peft_model(model, config)


def _tensor_bytes(value, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return state_nbytes(value)  # as stored (a tensor subclass, e.g. torchao's 8-bit state: its codes/scales)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):  # e.g. GaLore's projector object
        return sum(_tensor_bytes(v, seen) for v in vars(value).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` as stored (:func:`~lightning_adarank.optim.quant.state_nbytes`),
    including those held inside objects (GaLore's projector); an optimizer with its own ``state_bytes()``
    (:class:`~lightning_adarank.AdaRankGrad`) is asked for it, so both figures are one accounting."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a Lightning/Fabric wrapper
    if callable(getattr(inner, "state_bytes", None)):
        return int(inner.state_bytes())
    seen: set[int] = set()
    return sum(_tensor_bytes(st, seen) for st in inner.state.values())
