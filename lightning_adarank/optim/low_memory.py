"""The low-memory recipe in one call: what it takes for a full-parameter step to hold little more than the
16-bit weights themselves (a 7B LLaMA step at 256 tokens in ≤ 16 GB; ``docs/benchmarks/memory.md``).

* **bf16 weights, updated with stochastic rounding** (:mod:`.rounding`): no fp32 master copy;
* **layer-wise updates** (:class:`~lightning_adarank.optim.layerwise.LayerwiseUpdater`): each gradient is
  consumed and freed inside backward, the embedding and the output layer included, so no full gradient set
  ever exists;
* **8-bit state** for the projected and the dense parameters (``state_bits=8``, ``dense_state_bits=8``);
* **embeddings and the output layer projected** (``include_embeddings=True``): their state is low-rank too
  (measured against dense 8-bit state in ``benchmarks/results/memory_frontier.md``);
* **activation checkpointing**: ``gradient_checkpointing_enable()`` on every Hugging Face model inside the
  module. Other models must wrap their blocks in :func:`torch.utils.checkpoint.checkpoint` themselves (a
  warning says so).

Plain PyTorch::

    opt = low_memory_adarank(model, lr=1e-5)          # casts model to bf16, turns checkpointing on
    updater = LayerwiseUpdater(opt).attach(model)
    for batch in loader:
        updater.backward(model(**batch).loss)          # steps inside backward; no opt.step()

Fabric: ``Fabric(precision="bf16-true")``, ``opt = low_memory_adarank(model, dtype=None)``, ``fabric.setup``, then
:func:`~lightning_adarank.integrations.fabric.layerwise_updater`. Lightning: the
:class:`~lightning_adarank.integrations.low_memory.LowMemoryAdaRankGrad` callback.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .optimizer import AdaRankGrad
from .targets import param_groups

__all__ = ["LOW_MEMORY_SETTINGS", "enable_activation_checkpointing", "low_memory_adarank"]

#: the optimizer settings of the recipe (a caller's own settings override them)
LOW_MEMORY_SETTINGS: dict[str, Any] = {"state_bits": 8, "dense_state_bits": 8, "stochastic_rounding": True}


def enable_activation_checkpointing(model: nn.Module) -> list[str]:
    """Turn on activation checkpointing in every outermost Hugging Face model inside ``model`` (its
    ``gradient_checkpointing_enable()``, non-reentrant); returns their names (``""`` for ``model`` itself).

    Warns when there is none: such a model must checkpoint its blocks itself
    (``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` in its ``forward``)."""
    done: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(d + ".") or d == "" for d in done):
            continue
        enable = getattr(module, "gradient_checkpointing_enable", None)
        if callable(enable) and getattr(module, "supports_gradient_checkpointing", True):
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            done.append(name)
    if not done:
        warnings.warn(
            f"{type(model).__name__} has no gradient_checkpointing_enable(): activations are not checkpointed. "
            "Wrap its blocks with torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) in forward.",
            UserWarning,
            stacklevel=2,
        )
    return done


def low_memory_adarank(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    activation_checkpointing: bool = True,
    target_modules: str | list[str] = "all-linear",
    project_embeddings: bool = True,
    **settings: Any,
) -> AdaRankGrad:
    """An :class:`~lightning_adarank.AdaRankGrad` configured for the low-memory recipe (module docstring), with
    ``model`` prepared for it: cast to ``dtype`` (``None``: leave it, e.g. when Fabric's ``precision="bf16-true"``
    casts it) and activation checkpointing on. Attach a
    :class:`~lightning_adarank.optim.layerwise.LayerwiseUpdater` to it (the updates then run in backward).

    ``project_embeddings=False``: the embedding and the output layer get dense AdamW on 8-bit state instead of a
    projection. ``settings``: any AdaRankGrad setting (``lr``, ``max_rank``, ...); they override :data:`LOW_MEMORY_SETTINGS`.
    """
    if dtype is not None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"low_memory_adarank: dtype must be torch.bfloat16, torch.float16 or None, got {dtype}")
        model.to(dtype)
    else:
        wide = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype.itemsize > 2})
        if wide:
            warnings.warn(
                f"low_memory_adarank(dtype=None): the model has {', '.join(wide)} parameters; the recipe's memory "
                "assumes 16-bit weights (cast them, or use precision='bf16-true')",
                UserWarning,
                stacklevel=2,
            )
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    groups = param_groups(model, target_modules=target_modules, include_embeddings=project_embeddings)
    return AdaRankGrad(groups, **{**LOW_MEMORY_SETTINGS, **settings})
