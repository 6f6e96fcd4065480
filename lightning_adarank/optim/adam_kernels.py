"""The Adam kernels of :class:`~lightning_adarank.AdaRankGrad`, mixed into it: torch's own functional AdamW
(fused where the device has it, else foreach) on fp32 or low-bit stored moments (:mod:`.quant`), the exact
AdamW of the unprojected parameters, and the batched norms every step reads at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_kernel
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from . import quant
from .rounding import WEIGHT_KIND, assign_stochastic_

__all__ = ["AdamKernels"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdamKernels:
    """Mixin: the Adam calls and norms (needs the optimizer's ``state``, ``config`` and warning helpers)."""

    def uses_fused(self, device: torch.device) -> bool:
        """Whether Adam steps on ``device`` use torch's fused kernel (the ``fused`` setting, else where supported)."""
        if self.fused is not None:
            return self.fused
        return device.type in _get_fused_kernels_supported_devices()

    @staticmethod
    def _norms(tensors: list[Tensor]) -> list[float]:
        """Euclidean norms (fp32) of ``tensors`` with one host synchronisation for the whole list.

        On CPU a BLAS dot product per tensor (about twice as fast there as torch's norm kernel); elsewhere
        torch's multi-tensor norm (one launch for the whole list).
        """
        device = tensors[0].device
        if device.type == "cpu" and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
            flat = [t.reshape(-1) for t in tensors]
            return torch.stack([torch.dot(v, v) for v in flat]).sqrt_().tolist()
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        return torch.stack([n.to(device) for n in norms]).tolist()

    def weight_rounding(self, p: Tensor, group: dict, step: Tensor) -> dict:
        """``salt`` and ``kind`` of the stochastic rounding of ``p``'s 16-bit weight at ``step`` (its step counter,
        read on the device) for :func:`~lightning_adarank.optim.rounding.add_stochastic_`; ``salt=None`` (round to
        nearest) when the group's ``stochastic_rounding`` setting is off."""
        on = group.get("stochastic_rounding", True)
        return {"salt": step if on else None, "kind": WEIGHT_KIND + self._index.get(id(p), 0)}

    def step_counter(self, p: Tensor, fused: bool) -> Tensor:
        """A new Adam step counter for ``p``: a 0-d fp32 tensor on ``p``'s device for the fused kernel, else on CPU."""
        return torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")

    def adam_kernel(self, params, grads, exp_avgs, exp_avg_sqs, steps, group, *, lr, weight_decay, found_inf=None):
        """torch's AdamW kernel (fused where :meth:`uses_fused`, else foreach) with ``group``'s betas and eps on
        fp32 moments; returns the step counters (moved where the kernel wants them). Every path's Adam step (the
        loop, the grouped step, the layer-wise mode and FSDP2) goes through it."""
        fused = self.uses_fused(params[0].device) and all(p.dtype in _FUSED_DTYPES for p in params)
        for i, s in enumerate(steps):  # keep step counters where the chosen kernel wants them
            want = params[i].device if fused else torch.device("cpu")
            if s.device != want:
                steps[i] = s.to(want)
        beta1, beta2 = group["betas"]
        if isinstance(lr, Tensor) and not fused:  # torch's foreach kernel takes a tensor lr only when capturable
            lr = float(lr)
        _adamw_kernel(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=not fused,
            fused=fused or None,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=weight_decay,
            eps=group["eps"],
            maximize=False,
            **({"found_inf": found_inf} if found_inf is not None else {}),
        )
        return steps

    # [state_bits] ------------------------------------------------------------------------------------------
    def _adamw_stored(
        self, params, grads, states, shapes, group, bits, *, lr, weight_decay, found_inf=None, rotated=1.0
    ) -> list[Tensor]:
        """Adam on moments stored at ``bits`` (:mod:`.quant`): fp32 moments in one batched kernel call, as
        before; low-bit ones one parameter at a time (load → Adam → store), so that at most one parameter's
        fp32 moments exist at once.

        Low-bit moments: torch's kernel runs on a zero "virtual parameter", giving the direction
        ``d = −m̂/(√v̂+ε)`` of the decoded moments; ``d`` is clamped to Adam's own bound
        (:func:`~lightning_adarank.optim.quant.adam_ratio_bound`, times ``rotated`` where moments may have been
        carried into a new subspace), then ``p ← p·(1 − lr·wd) + lr·d`` (AdamW's order). Exact moments never
        reach the bound, so the clamp acts only where quantization broke ``|m| ≤ C·√v`` (a ``v`` rounded down
        under a sizeable ``m``)."""
        if bits == 32 and all(quant.is_fp32(st["exp_avg"]) for st in states):
            return self.adam_kernel(
                params,
                grads,
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [st["step"] for st in states],
                group,
                lr=lr,
                weight_decay=weight_decay,
                found_inf=found_inf,
            )
        beta1, beta2 = group["betas"]
        steps = []
        for p, g, st, shape in zip(params, grads, states, shapes):
            m, v = quant.load(st["exp_avg"], shape), quant.load(st["exp_avg_sq"], shape)
            d = torch.zeros_like(p, dtype=torch.float32)
            steps += self.adam_kernel(
                [d], [g.float()], [m], [v], [st["step"]], group, lr=1.0, weight_decay=0.0, found_inf=found_inf
            )
            bound = (quant.adam_ratio_bound(steps[-1], beta1, beta2) * rotated).to(d.device)
            torch.clamp(d, min=-bound, max=bound, out=d)
            decay = 1.0 - lr * weight_decay
            if found_inf is not None and weight_decay:  # a skipped step leaves the weight as it was
                decay = torch.where(found_inf > 0, 1.0, decay).to(p.device)
            if isinstance(decay, Tensor) or decay != 1.0:
                p.mul_(decay)
            p.add_(d.to(p.dtype), alpha=lr)
            st["exp_avg"] = quant.store(st["exp_avg"], m, bits, signed=True, salt=steps[-1])
            st["exp_avg_sq"] = quant.store(st["exp_avg_sq"], v, bits, signed=False, salt=steps[-1])
        return steps

    # [/state_bits] -----------------------------------------------------------------------------------------

    def update_dense(self, params: list[Tensor], grads: list[Tensor], group: dict, check_finite: bool = False) -> None:
        """Exact AdamW (torch's kernel) for parameters that are not projected; fp32 math for fp16/bf16.

        ``check_finite``: skip on the device when a gradient is not finite (the fused kernel's skip flag: all
        of ``params`` skip this step), counted and warned about at the next read; without the fused kernel the
        check is a host read, and only the non-finite parameters skip.
        """
        fused = self.uses_fused(params[0].device)
        found_inf = None
        if check_finite:
            if fused and all(p.dtype in _FUSED_DTYPES for p in params):
                dev = params[0].device
                norms = [
                    n if n.device == dev else n.to(dev) for n in torch._foreach_norm(grads, 2, dtype=torch.float32)
                ]
                bad = ~torch.isfinite(torch.stack(norms))
                found_inf = bad.any().float()
                self._unread_skips.append(found_inf * len(params))
            else:
                ok = [i for i, n in enumerate(self._norms(grads)) if math.isfinite(n)]
                if len(ok) < len(params):
                    self._warn_skipped(len(params) - len(ok))
                    params, grads = [params[i] for i in ok], [grads[i] for i in ok]
                    if not params:
                        return
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st["step"] = self.step_counter(p, fused)
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
        steps = self._adamw_stored(  # [state_bits]
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
