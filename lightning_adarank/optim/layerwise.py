"""Layer-wise AdaRankGrad: each parameter is updated inside backward, as soon as its gradient is ready.

Full-size gradients then never all exist at once: a parameter's gradient is consumed (projected, or used for
an AdamW step) and freed the moment autograd has finished accumulating it. This module is pure PyTorch; the
Lightning strategy drives it through :meth:`LayerwiseUpdater.begin_micro_batch` /
:meth:`LayerwiseUpdater.end_micro_batch`, and plain-PyTorch users call :meth:`LayerwiseUpdater.backward`.

**Gradient accumulation in low rank.** Over a window of ``k`` micro-batches, each micro-batch's gradient of a
projected matrix is projected into the matrix's current subspace and added to a small accumulator (``r × n``
or ``m × r``); the full gradient is freed at once. The update happens when the last micro-batch's gradient
arrives. Because the projection is linear, ``Σ PᵀG_i = Pᵀ(Σ G_i)``: with a fixed subspace this is *exactly*
the update of accumulating full gradients. The difference is at a **refresh**: the new subspace is found
from the **first micro-batch's gradient** of the window (the subspace must be fixed before anything is
projected into the accumulator; using the sum would mean keeping a full-size accumulator, the very memory
this mode saves). One micro-batch's gradient is noisier than the window's sum, so the subspace is chosen from
a noisier sample; rank selection then sees a slightly flatter spectrum. The captured-share statistic of the
refresh test becomes the mean over micro-batches of ``‖PᵀG_i‖²/‖G_i‖²``, consistently at refresh time and
after. Unprojected parameters (biases, norms) accumulate their small full gradients as usual.

**DDP.** Post-accumulate-grad hooks fire before DDP's all-reduce, so under DDP the updater registers a DDP
communication hook instead (:meth:`LayerwiseUpdater.attach` with the ``DistributedDataParallel`` module):
each bucket is all-reduced (averaged), then the parameters in it are stepped with the reduced gradient.
Every rank sees the same reduced gradient and derives the same subspace, so ranks stay bit-identical. With
accumulation, every micro-batch is all-reduced (no ``no_sync``): the refresh needs the same gradient on all
ranks. DDP keeps its own full-size gradient buckets, so under DDP the mode does not reduce gradient memory;
it overlaps the updates with communication and keeps accumulation working.

**Gradient clipping** by global norm needs every gradient before any update, which this mode does not have;
the Lightning strategy refuses ``gradient_clip_val`` in layer-wise mode.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .optimizer import AdaRankGrad
from .refresh_test import captured_share

__all__ = ["LayerwiseUpdater", "check_layerwise_params"]


def check_layerwise_params(optimizer: AdaRankGrad, who: str) -> None:
    """Refuse layer-wise mode on FSDP2 (DTensor) parameters.

    FSDP2 does call a sharded parameter's post-accumulate-grad hooks once its reduce-scattered gradient shard is
    in ``p.grad`` (torch 2.13, ``_fsdp_collectives.foreach_reduce``), so the hook would see the shard. But the
    layer-wise accumulation of projected gradients over micro-batches runs the single-process projection
    (``project_grad``/``update_projected``), which does not know about shards, and a per-parameter sharded step
    would issue its all-reduces one matrix at a time inside backward, between FSDP2's own reduce-scatters.
    """
    from .optimizer import _is_dtensor  # noqa: PLC0415

    if any(_is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            f"{who}: layer-wise mode is not supported with FSDP2 (fully_shard) parameters: its per-micro-batch"
            " projected accumulation does not run on shards yet. Use layerwise=False (FSDP2 already frees each"
            " unsharded gradient after its reduce-scatter)."
        )


class LayerwiseUpdater:
    """Runs :class:`AdaRankGrad` updates inside backward, per parameter.

    Args:
        optimizer: the AdaRankGrad instance whose parameters are updated.
        accumulate_grad_batches: micro-batches per optimizer step (``k``); the loss of each micro-batch
            should be divided by ``k``, as Lightning does.

    Plain PyTorch::

        opt = AdaRankGrad(param_groups(model), lr=1e-3)
        updater = LayerwiseUpdater(opt, accumulate_grad_batches=4).attach(model)
        for batch in loader:
            loss = model(batch).loss / 4
            if updater.backward(loss):  # True when this backward completed an optimizer step
                scheduler.step()

    After each backward every ``p.grad`` is ``None``; ``opt.step()`` has nothing left to do.
    """

    def __init__(self, optimizer: AdaRankGrad, accumulate_grad_batches: int = 1) -> None:
        if not isinstance(optimizer, AdaRankGrad):
            raise TypeError(f"LayerwiseUpdater needs an AdaRankGrad optimizer, got {type(optimizer).__name__}")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}")
        self.optimizer = optimizer
        self.accumulate_grad_batches = accumulate_grad_batches
        self._handles: list[Any] = []
        self._ddp: nn.Module | None = None
        self._micro = 0  # micro-batches seen in the current window
        self._is_last = accumulate_grad_batches == 1
        self._acc: dict[Tensor, Tensor] = {}  # parameter -> accumulated (projected or full) gradient
        self._share: dict[Tensor, float] = {}  # parameter -> summed captured share over micro-batches
        self._count: dict[Tensor, int] = {}
        self._bad: set[Tensor] = set()
        self.steps = 0

    # ------------------------------------------------------------------ wiring
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def attach(self, module: nn.Module | None = None) -> LayerwiseUpdater:
        """Start updating in backward. Pass the ``DistributedDataParallel`` module under DDP (a comm hook
        is registered); otherwise each parameter gets a post-accumulate-grad hook."""
        if self._handles or self._ddp is not None:
            raise RuntimeError("LayerwiseUpdater is already attached")
        check_layerwise_params(self.optimizer, "LayerwiseUpdater")
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if isinstance(module, DistributedDataParallel):
            module.register_comm_hook(None, self._ddp_comm_hook)
            self._ddp = module
        else:
            self._handles = [p.register_post_accumulate_grad_hook(self._grad_hook) for p in self._params()]
        return self

    def detach(self) -> None:
        """Remove the post-accumulate-grad hooks (a DDP comm hook cannot be removed; drop the DDP module)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ micro-batch protocol
    def begin_micro_batch(self, is_last: bool) -> None:
        """Call before each backward: ``is_last`` is True for the micro-batch that completes the step."""
        self._is_last = is_last

    def end_micro_batch(self) -> bool:
        """Call after each backward. Returns True when an optimizer step was completed.

        On the last micro-batch, parameters whose gradient did not arrive in that backward but did earlier in
        the window are stepped now with what they accumulated.
        """
        stepped = self._is_last
        if self._is_last:
            for p in list(self._acc):
                self._step(p)
            if self._bad:
                warnings.warn(
                    f"LayerwiseUpdater: skipped the step of {len(self._bad)} parameter(s) with non-finite gradients",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._bad.clear()
            self._micro = 0
            self.steps += 1
        else:
            self._micro += 1
        if self._ddp is not None:  # DDP wrote the reduced gradients back; they are consumed already
            for p in self._params():
                p.grad = None
        return stepped

    def backward(self, loss: Tensor, backward_fn: Callable[[Tensor], Any] | None = None) -> bool:
        """Backward of one micro-batch of the window; True when it completed an optimizer step.

        ``backward_fn`` replaces ``loss.backward()``, e.g. ``fabric.backward``.
        """
        self.begin_micro_batch(self._micro + 1 >= self.accumulate_grad_batches)
        (backward_fn or Tensor.backward)(loss)
        return self.end_micro_batch()

    # ------------------------------------------------------------------ gradient arrival
    def _grad_hook(self, p: Tensor) -> None:
        grad = p.grad
        if grad is not None:
            self._consume(p, grad)
        p.grad = None

    def _ddp_comm_hook(self, state, bucket):  # no annotations: DDP checks them against dist.GradBucket
        import torch.distributed as dist  # noqa: PLC0415

        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size())
        fut = dist.all_reduce(buffer, async_op=True).get_future()

        def step_bucket(fut: torch.futures.Future) -> Tensor:
            reduced = fut.value()[0]
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                self._consume(p, g)
            return reduced

        return fut.then(step_bucket)

    @torch.no_grad()
    def _consume(self, p: Tensor, grad: Tensor) -> None:
        """One micro-batch's gradient of ``p`` has arrived (all-reduced under DDP)."""
        opt = self.optimizer
        group = opt.context.group_of(p)
        if grad.is_sparse:
            raise TypeError("AdaRankGrad does not support sparse gradients (use nn.Embedding(sparse=False))")
        gsq = float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
        if not math.isfinite(gsq):
            self._bad.add(p)
        if p in self._bad:
            self._acc.pop(p, None)
            return
        if opt.is_projected(p, group):
            # a pending refresh uses this, the window's first; later micro-batches add to the moment sketch.
            # One micro-batch of several is not a step's gradient: its deviation from the sketch's average
            # would overstate the noise floor (``noise_floor`` setting), so windows of several go without it.
            low = opt.project_grad(
                p, grad, group, gsq, new_step=p not in self._acc, measure_noise=self.accumulate_grad_batches == 1
            )
            pn2 = float(torch.linalg.vector_norm(low)) ** 2
            share = float(captured_share(pn2, gsq))
            if p in self._acc:
                self._acc[p].add_(low)
                self._share[p] += share
                self._count[p] += 1
            else:
                self._acc[p], self._share[p], self._count[p] = low, share, 1
        elif p in self._acc:
            self._acc[p].add_(grad)
        else:
            self._acc[p] = grad if self._is_last else grad.detach().clone()
        if self._is_last:
            self._step(p)

    def _step(self, p: Tensor) -> None:
        opt = self.optimizer
        group = opt.context.group_of(p)
        acc = self._acc.pop(p)
        if opt.is_projected(p, group):
            share = self._share.pop(p) / self._count.pop(p)
            opt.update_projected([p], [acc], group, shares=[share if opt.share_due(p) else None])
        else:
            opt.update_dense([p], [acc], group)
