"""What every step path of :class:`~lightning_adarank.AdaRankGrad` shares, in one object passed explicitly: the
optimizer's per-parameter state, which group holds each parameter and its index (the seed of its subspaces), the
Adam kernels, the sketches' test matrices, the stochastic-rounding salt of each weight, the skip accounting, and
the exact AdamW of the unprojected parameters.

The per-matrix step (:mod:`.projected`), the grouped step (:mod:`.grouped_step`), the layer-wise mode
(:mod:`.layerwise`) and the FSDP2 step (:mod:`lightning_adarank.distributed.step`) each take this context
(``optimizer.context``) instead of reaching into the optimizer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from . import quant
from .adam_kernels import _FUSED_DTYPES, AdamKernels
from .config import AdaRankGradConfig
from .linalg import subspace_seed
from .rounding import WEIGHT_KIND, assign_stochastic_

__all__ = ["StepContext"]


class StepContext:
    """The state and bookkeeping shared by every step path (see the module docstring).

    Args:
        config: the optimizer's settings.
        state: the optimizer's per-parameter state (``optimizer.state``; :meth:`bind` again when torch replaces it).
    """

    def __init__(self, config: AdaRankGradConfig, state: dict) -> None:
        self.config = config
        self.seed = config.seed
        self.kernels = AdamKernels(config.fused)
        self.state = state
        self.index: dict[int, int] = {}  # id(p) → p's index: the seed of its subspaces and its rounding salt
        self.groups: dict[int, dict] = {}  # id(p) → the group holding p
        self.unread_skips: list[Tensor] = []  # device counts of skipped unprojected parameters (grouped step)
        self._test_matrices: dict[tuple, Tensor] = {}  # Ω of the moment sketches, by (rows, cols, device)

    def bind(self, state: dict) -> None:
        """Use ``state`` as the per-parameter state (torch's ``load_state_dict`` builds a new one)."""
        self.state = state

    def register(self, groups: Iterable[dict]) -> None:
        """Look up each parameter's group; new parameters get the next indices, in group order."""
        self.groups = {}
        for group in groups:
            for p in group["params"]:
                self.index.setdefault(id(p), len(self.index))
                self.groups[id(p)] = group

    # ------------------------------------------------------------------ lookups
    def group_of(self, p: Tensor) -> dict:
        """The parameter group holding ``p``."""
        try:
            return self.groups[id(p)]
        except KeyError:
            raise KeyError("parameter is not managed by this optimizer") from None

    @staticmethod
    def is_projected(p: Tensor, group: dict) -> bool:
        """Whether ``p`` gets a low-rank projection under ``group``'s settings."""
        return bool(group["low_rank"]) and p.dim() == 2 and min(p.shape) > group["max_rank"]

    def share_due(self, p: Tensor) -> bool:
        """Whether this step of ``p`` needs the batch's captured share ``‖PᵀG‖²/‖G‖²`` (a pass over ``G``).

        Every step with ``subspace_source="gradient"``; never with ``"moment"``, whose refresh test reads the
        moment sketch instead.
        """
        return self.group_of(p)["subspace_source"] != "moment"

    def subspace_seed(self, p: Tensor, refresh: int) -> int:
        """The seed of ``p``'s ``refresh``-th random range finder (the same on every data-parallel rank)."""
        return subspace_seed(self.seed, self.index[id(p)], refresh)

    def test_matrix(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """The fixed Gaussian ``Ω`` (``rows × cols``) of the moment sketches; depends only on (seed, shape).

        Shared by every matrix with the same long side, never stored in the state: it is regenerated
        bit-identically from the seed after a resume, and agrees across data-parallel ranks.
        """
        key = (rows, cols, str(device))
        omega = self._test_matrices.get(key)
        if omega is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(subspace_seed(self.seed, -1 - rows, cols))
            omega = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
            self._test_matrices[key] = omega
        return omega

    def weight_rounding(self, p: Tensor, group: dict, step: Tensor) -> dict:
        """``salt`` and ``kind`` of the stochastic rounding of ``p``'s 16-bit weight at ``step`` (its step counter,
        read on the device) for :func:`~lightning_adarank.optim.rounding.add_stochastic_`; ``salt=None`` (round to
        nearest) when the group's ``stochastic_rounding`` setting is off."""
        on = group.get("stochastic_rounding", True)
        return {"salt": step if on else None, "kind": WEIGHT_KIND + self.index.get(id(p), 0)}

    def new_matrix_state(self, p: Tensor) -> dict:
        """``p``'s state, started (a step counter and a pending first refresh) if ``p`` has none yet."""
        st = self.state[p]
        if not st:
            st["step"] = self.kernels.step_counter(p, self.kernels.uses_fused(p.device))
            st["refreshes"] = 0
            st["pending"] = True
        return st

    @staticmethod
    def warn_skipped(n: int, stacklevel: int = 4) -> None:
        """The one warning of every path about parameters whose step was skipped (non-finite gradients)."""
        warnings.warn(
            f"AdaRankGrad: skipped the step of {n} parameter(s) with non-finite gradients",
            RuntimeWarning,
            stacklevel=stacklevel,
        )

    # ------------------------------------------------------------------ the unprojected parameters
    def update_dense(self, params: list[Tensor], grads: list[Tensor], group: dict, check_finite: bool = False) -> None:
        """Exact AdamW (torch's kernel) for parameters that are not projected; fp32 math for fp16/bf16.

        ``check_finite``: skip on the device when a gradient is not finite (the fused kernel's skip flag: all
        of ``params`` skip this step), counted and warned about at the next read; without the fused kernel the
        check is a host read, and only the non-finite parameters skip.
        """
        kernels = self.kernels
        fused = kernels.uses_fused(params[0].device)
        found_inf = None
        if check_finite:
            if fused and all(p.dtype in _FUSED_DTYPES for p in params):
                dev = params[0].device
                norms = [
                    n if n.device == dev else n.to(dev) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)
                ]
                bad = ~torch.isfinite(torch.stack(norms))
                found_inf = bad.any().float()
                self.unread_skips.append(found_inf * len(params))
            else:
                ok = [i for i, n in enumerate(kernels.norms(grads)) if math.isfinite(n)]
                if len(ok) < len(params):
                    self.warn_skipped(len(params) - len(ok))
                    params, grads = [params[i] for i in ok], [grads[i] for i in ok]
                    if not params:
                        return
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = kernels.step_counter(p, fused)
                st["exp_avg"] = torch.zeros_like(
                    p,
                    dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype,
                    memory_format=torch.preserve_format,
                )
                st["exp_avg_sq"] = torch.zeros_like(st["exp_avg"])
                if group.get("dense_state_bits", 32) != 32:  # [state_bits] low-bit storage (quant.py)
                    st["exp_avg"] = quant.zeros(tuple(p.shape), group["dense_state_bits"], signed=True, device=p.device)
                    st["exp_avg_sq"] = quant.zeros(
                        tuple(p.shape), group["dense_state_bits"], signed=False, device=p.device
                    )
        low_prec = [p.dtype in (torch.float16, torch.bfloat16) for p in params]
        work = [p.float() if lp else p for p, lp in zip(params, low_prec)]
        wgrads = [g.float() if lp else g for g, lp in zip(grads, low_prec)]
        steps = kernels.adamw_stored(  # [state_bits]
            work,
            wgrads,
            states,
            [p.shape for p in params],
            group,
            group.get("dense_state_bits", 32),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            found_inf=found_inf,
        )
        for p, w, st, s, lp in zip(params, work, states, steps, low_prec):
            st["step"] = s
            if lp:  # the fp32 result written back with stochastic rounding (round to nearest loses small steps)
                assign_stochastic_(p, w, **self.weight_rounding(p, group, s))
