"""Choosing which weights AdaRankGrad projects: ``param_groups(model, target_modules=...)``.

The rule (:func:`target_parameter_names`), the same for tied and untied models:

* ``"all-linear"`` is PEFT's ``"all-linear"``: every ``nn.Linear`` weight (and transformers' ``Conv1D``, GPT-2's
  linear layer) **except the output layer** (the language-model head);
* ``include_embeddings=True`` adds every ``nn.Embedding`` table (word, position and token-type embeddings alike)
  **and the output layer**, whether its weight is tied to the word embeddings or not;
* a regex or a list of names selects the ``nn.Linear``/``Conv1D`` modules it names (the output layer too, when
  named); embeddings only with ``include_embeddings=True``.

Only 2-D weights are projected: convolution kernels (``nn.Conv1d``/``nn.Conv2d``: 3-D/4-D) and 1-D parameters get
dense AdamW.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["check_low_rank_shapes", "output_layers", "param_groups", "target_parameter_names"]

#: what the projection rule calls a linear layer (a message names them when nothing matches)
LINEAR_KINDS = "nn.Linear (or transformers' Conv1D)"


def _matches(module_name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.search(target_modules, module_name) is not None
    for key in target_modules:
        if module_name == key or module_name.endswith("." + key) or re.fullmatch(key, module_name):
            return True
    return False


def _is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (a linear layer with a transposed 2-D weight; duck-typed so that
    this module does not import transformers)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def output_layers(model: nn.Module) -> set[int]:
    """``id``s of the output-layer modules of ``model`` (what ``"all-linear"`` leaves out, as PEFT does).

    The output layer of every Hugging Face model inside ``model`` (its ``get_output_embeddings()``: ``lm_head``,
    BERT's MLM ``decoder``, ...); in a model without one, its last linear layer when that layer maps the
    hidden size to the vocabulary, i.e. has the shape of the largest ``nn.Embedding`` table (a hand-written
    GPT's untied ``lm_head``).
    """
    found: set[int] = set()
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter) and isinstance(module, nn.Module):
            try:
                out = getter()
            except (NotImplementedError, AttributeError):
                out = None
            if isinstance(out, nn.Module):
                found.add(id(out))
    if found:
        return found
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    linears = [m for m in model.modules() if _is_linear(m)]
    if embeddings and linears:
        vocab = max(embeddings, key=lambda e: e.num_embeddings)
        last = linears[-1]
        if isinstance(last, nn.Linear) and last.weight.shape == vocab.weight.shape:
            found.add(id(last))
    return found


def target_parameter_names(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    include_embeddings: bool = False,
    *,
    only_trainable: bool = True,
) -> list[str]:
    """Names of the weight matrices selected by ``target_modules`` (the rule is in :func:`param_groups`).

    ``only_trainable=False`` also names frozen weights (``requires_grad=False``) the rule selects: an optimizer
    may hold them (a fine-tuning callback freezes and unfreezes modules whose parameters stay in it).
    """
    if not isinstance(target_modules, (str, list, tuple)):
        raise TypeError(f"target_modules must be 'all-linear', a regex or a list of names, got {target_modules!r}")
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad or not only_trainable}
    outputs = output_layers(model) if target_modules == "all-linear" else set()
    tied_to_embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names: list[str] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, Tensor) or id(w) not in trainable or id(w) in seen or w.dim() != 2:
            continue
        if isinstance(module, nn.Embedding) or id(w) in tied_to_embedding:
            chosen = include_embeddings  # a tied head is its embedding: decided once, whichever module comes first
        elif not _is_linear(module):
            chosen = False
        elif target_modules == "all-linear":
            chosen = id(module) not in outputs or include_embeddings
        else:
            chosen = _matches(mname, target_modules)
        seen.add(id(w))
        if chosen:
            names.append(trainable[id(w)])
    return names


def explain_no_match(model: nn.Module, target_modules: str | Sequence[str], include_embeddings: bool) -> str:
    """Why ``target_modules`` selects nothing, for an error message: the modules it names that are not linear
    layers (a convolution, ...), and what does qualify."""
    named = []
    if target_modules != "all-linear" and isinstance(target_modules, (str, list, tuple)):
        named = [
            f"{n} ({type(m).__name__})"
            for n, m in model.named_modules()
            if n
            and _matches(n, target_modules)
            and not _is_linear(m)
            and not isinstance(m, nn.Embedding)
            and isinstance(getattr(m, "weight", None), Tensor)
        ]
    what = f"only {LINEAR_KINDS} weights{', and nn.Embedding tables,' if include_embeddings else ''} are projected"
    if named:
        more = "; ..." if len(named) > 6 else ""
        return (
            f"it names {', '.join(named[:6])}{more}, but {what} (a convolution's 3-D/4-D kernel gets dense AdamW;"
            " name the model's nn.Linear modules instead)"
        )
    if target_modules == "all-linear":
        return f"{what}, and {type(model).__name__} has no trainable one outside its output layer"
    return f"{what}; check the module names (model.named_modules())"


def check_low_rank_shapes(group: dict, owner: str = "AdaRankGrad") -> None:
    """Warn when a ``low_rank`` group holds weights of more than 2 dimensions (convolution kernels): only 2-D
    weights are projected, so those get dense AdamW. 1-D parameters (biases, norms) are expected there and
    pass silently."""
    if not group.get("low_rank", True):
        return
    names = group.get("param_names") or [f"param{i}" for i in range(len(group["params"]))]
    big = [f"{n} {tuple(p.shape)}" for n, p in zip(names, group["params"]) if p.dim() > 2]
    if big:
        warnings.warn(
            f"{owner}: {len(big)} parameter(s) of more than 2 dimensions in a low_rank group get dense AdamW, not a"
            f" projection (only 2-D weights are projected; convolution kernels are not): {', '.join(big[:6])}"
            f"{'; ...' if len(big) > 6 else ''}. Put them in a group with low_rank=False to silence this.",
            stacklevel=3,
        )


def param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    include_embeddings: bool = False,
    **overrides,
) -> list[dict]:
    """Parameter groups for :class:`~lightning_adarank.AdaRankGrad`, in the spirit of the HF Trainer's
    ``optim_target_modules`` and PEFT's ``target_modules``.

    Args:
        model: the model; only parameters with ``requires_grad`` are included.
        target_modules: ``"all-linear"`` (PEFT's meaning: every ``nn.Linear`` weight, transformers' ``Conv1D``
            included, except the output layer, tied or not; see :func:`output_layers`), a regular expression
            searched in the module name (e.g. ``r"attention|mlp"``), or a list of module names, each matching a
            module whose name equals it, ends with ``"." + name``, or fully matches it as a regex (e.g.
            ``["query", "value"]``). A regex or list selects the output layer when it names it.
        include_embeddings: also project every ``nn.Embedding`` table (word, position and token-type
            embeddings: for BERT-base they hold most of the optimizer state GaLore keeps, since GaLore leaves them
            to full Adam) and the output layer (a tied head is the word embedding itself).
        **overrides: optimizer settings for the projected group (e.g. ``max_rank=16``).

    Returns:
        ``[{"params", "param_names", "low_rank": True, **overrides}, {"params", "param_names", "low_rank":
        False}]`` (a group is left out when empty). Every trainable parameter appears exactly once.

    Raises:
        ValueError: when ``target_modules`` selects nothing (a silent plain-AdamW run would be wrong); the
            message says why (e.g. it names convolutions, which are not projected).
    """
    targets = set(target_parameter_names(model, target_modules, include_embeddings))
    if not targets:
        raise ValueError(
            f"param_groups: target_modules={target_modules!r} matched no weight of {type(model).__name__}: "
            + explain_no_match(model, target_modules, include_embeddings)
        )
    low = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n in targets]
    rest = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in targets]
    groups = [
        {"params": [p for _, p in low], "param_names": [n for n, _ in low], "low_rank": True, **overrides},
    ]
    if rest:
        groups.append({"params": [p for _, p in rest], "param_names": [n for n, _ in rest], "low_rank": False})
    return groups
