"""Choosing which weights AdaRankGrad projects: ``param_groups(model, target_modules=...)``."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

__all__ = ["param_groups", "target_parameter_names"]


def _matches(module_name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.search(target_modules, module_name) is not None
    for key in target_modules:
        if module_name == key or module_name.endswith("." + key) or re.fullmatch(key, module_name):
            return True
    return False


def target_parameter_names(
    model: nn.Module, target_modules: str | Sequence[str] = "all-linear", include_embeddings: bool = False
) -> list[str]:
    """Names of the weight matrices selected by ``target_modules`` (see :func:`param_groups`)."""
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be 'all-linear', a regex or a list of names, got {target_modules!r}")
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    names: list[str] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        if w is None or id(w) not in trainable or id(w) in seen or w.dim() != 2:
            continue
        seen.add(id(w))  # a tied weight (e.g. an MLM decoder tied to the embeddings) is decided by its first owner
        if isinstance(module, nn.Embedding):
            chosen = include_embeddings
        elif target_modules == "all-linear":
            chosen = isinstance(module, nn.Linear)
        else:
            chosen = isinstance(module, nn.Linear) and _matches(mname, target_modules)
        if chosen:
            names.append(trainable[id(w)])
    return names


def param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    include_embeddings: bool = False,
    **overrides,
) -> list[dict]:
    """Parameter groups for :class:`~lightning_adarank.AdaRankGrad`, in the spirit of the HF Trainer's
    ``optim_target_modules``.

    Args:
        model: the model; only parameters with ``requires_grad`` are included.
        target_modules: ``"all-linear"`` (every ``nn.Linear`` weight), a regular expression searched in the
            module name (e.g. ``r"attention|mlp"``), or a list of module names, each matching a module whose
            name equals it, ends with ``"." + name``, or fully matches it as a regex (e.g.
            ``["query", "value"]``).
        include_embeddings: also project ``nn.Embedding`` tables (for BERT-base they hold most of the
            optimizer state GaLore keeps, since GaLore leaves them to full Adam).
        **overrides: optimizer settings for the projected group (e.g. ``max_rank=16``).

    Returns:
        ``[{"params", "param_names", "low_rank": True, **overrides}, {"params", "param_names", "low_rank":
        False}]`` (a group is left out when empty). Every trainable parameter appears exactly once.

    Raises:
        ValueError: when ``target_modules`` selects nothing (a silent plain-AdamW run would be wrong).
    """
    targets = set(target_parameter_names(model, target_modules, include_embeddings))
    if not targets:
        raise ValueError(
            f"param_groups: target_modules={target_modules!r} matched no nn.Linear"
            f"{' or nn.Embedding' if include_embeddings else ''} weight of {type(model).__name__}"
        )
    low = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n in targets]
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in targets]
    groups = [
        {"params": [p for _, p in low], "param_names": [n for n, _ in low], "low_rank": True, **overrides},
    ]
    if rest:
        groups.append({"params": [p for _, p in rest], "param_names": [n for n, _ in rest], "low_rank": False})
    return groups
