"""The Adam kernels every step path of :class:`~lightning_adarank.AdaRankGrad` calls: torch's own functional
AdamW (fused where the device has it, else foreach) on fp32 or low-bit stored moments (:mod:`.quant`), and the
batched norms every step reads at once. Stateless apart from the ``fused`` setting.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_kernel
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from . import quant

__all__ = ["AdamKernels"]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdamKernels:
    """torch's AdamW kernels and the batched norms; ``fused``: the setting (``None``: fused where supported)."""

    def __init__(self, fused: bool | None) -> None:
        self.fused = fused

    def uses_fused(self, device: torch.device) -> bool:
        """Whether Adam steps on ``device`` use torch's fused kernel (the ``fused`` setting, else where supported)."""
        if self.fused is not None:
            return self.fused
        return device.type in _get_fused_kernels_supported_devices()

    @staticmethod
    def norms(tensors: list[Tensor]) -> list[float]:
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
    def adamw_stored(
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
