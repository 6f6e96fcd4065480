"""Parameter groups added to a swapped :class:`~lightning_adarank.AdaRankGrad` during training.

Lightning's fine-tuning callbacks (``BaseFinetuning.unfreeze_and_add_param_group``, ``BackboneFinetuning``) add
the parameters they unfreeze as a new group, ``{"params": [...], "lr": ...}``, without ``param_names``; torch
refuses such a group in an optimizer whose groups are named. :class:`AddedGroups`, installed by
:class:`~lightning_adarank.integrations.swap.OptimizerSwap` on the optimizer it builds, makes that work the
way the swap treats the module's own groups:

* **names** are filled in from the module (``model.named_parameters()``);
* **the projection rule** is the swap's: the group is split into the weights ``target_modules`` selects
  (``low_rank=True``) and the rest (``low_rank=False``), in that order; a group that sets ``low_rank`` itself is
  kept whole;
* **the halves stay one group** for whoever changes it later: before each step, a hyperparameter (``lr``,
  ``weight_decay``, ``betas``, ``eps``, ``initial_lr``) changed on one half is copied to the other.
  ``BackboneFinetuning`` sets ``param_groups[-1]["lr"]`` every epoch, which is the dense half: the projected
  half follows;
* **replaced groups**: ``BaseFinetuning`` restores its groups on a resumed fit by assigning
  ``optimizer.param_groups`` (not through ``add_param_group``); the optimizer's parameter index (its random
  seeds) and group lookup are rebuilt before the next step, in the order the groups were added, so a resumed
  run draws the same subspaces as an uninterrupted one.

Lightning 2.6's ``BaseFinetuning`` does not restore ``requires_grad`` of the modules it had unfrozen when a fit
resumes after the unfreeze epoch (``freeze_before_training`` runs again; Lightning issue #21901): they stay in
the optimizer and never train, with plain AdamW as with AdaRankGrad. That is warned about at the first step of
such a run, with the fix (unfreeze again in ``finetune_function`` for every epoch past the unfreeze epoch).
"""

from __future__ import annotations

import weakref
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from ..optim.optimizer import AdaRankGrad
from ..optim.targets import target_parameter_names

__all__ = ["AddedGroups", "LINK_KEY", "resync_param_groups"]

#: group key shared by the two halves of one added group (their hyperparameters are kept equal)
LINK_KEY = "added_group"
#: the hyperparameters the halves of an added group keep equal
LINKED_SETTINGS = ("lr", "initial_lr", "weight_decay", "betas", "eps")


def resync_param_groups(optimizer: AdaRankGrad) -> None:
    """Rebuild ``optimizer``'s parameter lookup after ``optimizer.param_groups`` was replaced wholesale.

    New parameters get the next indices (the seed of their subspaces) in group order, as
    ``add_param_group`` would have given them.
    """
    optimizer.context.register(optimizer.param_groups)


class AddedGroups:
    """Lets code add parameter groups to a swapped AdaRankGrad during training (see the module docstring).

    Args:
        optimizer: the swapped optimizer.
        strategy: the Lightning strategy (for the module's parameter names and the trainer).
        target_modules, include_embeddings: the swap's projection rule.
        owner: the callback or strategy the user built, for messages.
        layerwise: the swap runs layer-wise (groups cannot be added then: their parameters would have no hook).
    """

    def __init__(
        self,
        optimizer: AdaRankGrad,
        strategy: Any,
        target_modules: Any,
        include_embeddings: bool,
        owner: str,
        layerwise: bool = False,
    ) -> None:
        self._opt = weakref.ref(optimizer)
        self._strategy = weakref.ref(strategy)
        self.target_modules = target_modules
        self.include_embeddings = include_embeddings
        self.owner = owner
        self.layerwise = layerwise
        self._groups_seen: tuple[int, int] = (id(optimizer.param_groups), len(optimizer.param_groups))
        self._linked: dict[int, dict[str, Any]] = {}  # link id -> the hyperparameters at the last sync
        self._checked_frozen = False

    def install(self) -> AddedGroups:
        """Route ``optimizer.add_param_group`` through :meth:`add_param_group` and check the groups before each step."""
        opt = self._opt()
        opt.add_param_group = self.add_param_group  # type: ignore[method-assign]
        opt.register_step_pre_hook(self._before_step)
        return self

    # ------------------------------------------------------------------ adding
    def _module(self) -> nn.Module:
        return self._strategy().lightning_module

    def add_param_group(self, param_group: dict) -> None:
        """Add ``param_group`` to the optimizer: names from the module, split by the projection rule."""
        opt = self._opt()
        if self.layerwise:
            raise ValueError(
                f"{self.owner}(layerwise=True) cannot take a parameter group added during training (e.g. by"
                " BaseFinetuning.unfreeze_and_add_param_group): its parameters would never be updated. Use"
                " layerwise=False, or put every parameter in configure_optimizers' optimizer from the start."
            )
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if params and isinstance(params[0], tuple):
            group["param_names"] = [n for n, _ in params]
            params = [p for _, p in params]
        module = self._module()
        names = {id(p): n for n, p in module.named_parameters()}
        if "param_names" not in group:
            group["param_names"] = [
                names.get(id(p), f"group{len(opt.param_groups)}.param{i}") for i, p in enumerate(params)
            ]
        if "low_rank" in group:
            AdaRankGrad.add_param_group(opt, {**group, "params": params})
            return
        targets = set(
            target_parameter_names(module, self.target_modules, self.include_embeddings, only_trainable=False)
        )
        halves = []
        for low_rank in (True, False):
            picked = [(n, p) for n, p in zip(group["param_names"], params) if (names.get(id(p)) in targets) == low_rank]
            if picked:
                halves.append(
                    {
                        **group,
                        "params": [p for _, p in picked],
                        "param_names": [n for n, _ in picked],
                        "low_rank": low_rank,
                    }
                )
        if len(halves) == 2:
            link = max([g.get(LINK_KEY, -1) for g in opt.param_groups], default=-1) + 1
            for half in halves:
                half[LINK_KEY] = link
        for half in halves:
            AdaRankGrad.add_param_group(opt, half)
        self._groups_seen = (id(opt.param_groups), len(opt.param_groups))

    # ------------------------------------------------------------------ before each step
    def _before_step(self, optimizer: AdaRankGrad, args: Any, kwargs: Any) -> None:
        if self._groups_seen != (id(optimizer.param_groups), len(optimizer.param_groups)):
            resync_param_groups(optimizer)
            self._groups_seen = (id(optimizer.param_groups), len(optimizer.param_groups))
        self.sync_linked(optimizer)
        if not self._checked_frozen:
            self._checked_frozen = True
            self._warn_frozen_after_resume(optimizer)

    def sync_linked(self, optimizer: AdaRankGrad) -> None:
        """Copy a hyperparameter changed on one half of an added group to the other half."""
        by_link: dict[int, list[dict]] = {}
        for group in optimizer.param_groups:
            if LINK_KEY in group:
                by_link.setdefault(group[LINK_KEY], []).append(group)
        for link, halves in by_link.items():
            last = self._linked.get(link)
            values = {}
            for key in LINKED_SETTINGS:
                present = [g for g in halves if key in g]
                if not present:
                    continue
                changed = [g for g in present if last is None or g[key] != last.get(key)]
                source = changed[-1] if changed else present[-1]  # both changed: the later group wins
                values[key] = source[key]
                for g in present:
                    g[key] = source[key]
            self._linked[link] = values

    def _warn_frozen_after_resume(self, optimizer: AdaRankGrad) -> None:
        from lightning.pytorch.callbacks import BaseFinetuning  # noqa: PLC0415

        trainer = getattr(self._module(), "_trainer", None)
        if trainer is None or not trainer.ckpt_path:
            return
        if not any(isinstance(cb, BaseFinetuning) for cb in trainer.callbacks):
            return
        frozen = [
            n
            for g in optimizer.param_groups
            for n, p in zip(g.get("param_names") or [], g["params"])
            if not p.requires_grad
        ]
        if frozen:
            rank_zero_warn(
                f"{self.owner}: {len(frozen)} parameter(s) in the optimizer are frozen (requires_grad=False) after"
                f" resuming from {trainer.ckpt_path}: {', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''}."
                " Lightning's BaseFinetuning restores the parameter groups it added but not requires_grad (Lightning"
                " issue #21901), so they will not train, with any optimizer. Unfreeze them again in finetune_function"
                " for every epoch past the unfreeze epoch, e.g. `elif epoch > N: self.make_trainable(module)`."
            )
