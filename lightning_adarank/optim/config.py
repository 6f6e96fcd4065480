"""``AdaRankGradConfig``: the one typed home of every AdaRankGrad setting.

The optimizer, the Lightning callback and strategy, and the task CLIs all take their settings from this
dataclass, so each setting is typed, defaulted, documented and checked once. A bad value fails when the
config is built (``ValueError``/``TypeError`` naming the setting), not at the first step.

Per-group settings (everything except the optimizer-wide ``seed``, ``fused``, ``grouped``,
``refresh_check_every`` and ``compile``) may also be overridden in a parameter group
dict; such overrides go through the same checks (:func:`check_group_settings`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

__all__ = [
    "AdaRankGradConfig",
    "DEFAULT_ENERGY",
    "GROUP_SETTINGS",
    "check_group_settings",
    "ScaleMode",
    "SubspaceSource",
]

#: the adaptive rank's energy when ``energy`` is left at ``None`` (the paper's 0.9)
DEFAULT_ENERGY = 0.9
#: how ``scale`` turns the low-rank Adam direction into an update (see ``AdaRankGradConfig.scale_mode``)
ScaleMode = Literal["rms", "galore"]
#: what a refresh takes its subspace and rank from (see ``AdaRankGradConfig.subspace_source``)
SubspaceSource = Literal["moment", "gradient"]


@dataclass(frozen=True)
class AdaRankGradConfig:
    """Settings of :class:`~lightning_adarank.AdaRankGrad` (arXiv 2410.17881).

    Args:
        lr: learning rate, as :class:`torch.optim.AdamW`: a float, or a 0-d float tensor (put it on the
            parameters' device). A tensor lr is read on the device by the grouped step, with no host read, so a
            CUDA graph that captures the step replays it with whatever value the tensor holds; LR schedulers
            write into it in place. The per-matrix paths read it on the host.
        betas: Adam's moment decay rates ``(β1, β2)``, each in ``[0, 1)``.
        eps: Adam's ``ε`` (added to ``√v̂``).
        weight_decay: decoupled weight decay; applied to the full weight of projected matrices too.
        max_rank: largest rank of a projection; matrices with ``min(shape) <= max_rank`` are not projected
            (they get plain AdamW).
        min_rank: smallest rank of a projection (``>= 1``).
        energy: the fraction η of the energy a subspace must keep (adaptive rank; the paper's Algorithm 2),
            in ``(0, 1]``: of the smoothed gradient's sketch with ``subspace_source="moment"`` (above its noise
            floor with ``noise_floor=True``), of ``‖G‖²_F`` with ``"gradient"``. ``None`` (default) means
            :data:`DEFAULT_ENERGY` (0.9) here; the task modules read it as 1.0 (every projected matrix at
            ``max_rank``) when they train from random initialisation, where a fixed rank was measured to train
            better (:mod:`~lightning_adarank.optim.rank_rule`). Set a value to have it obeyed everywhere.
        scale: α, a user multiplier on the projected update, ``> 0``. With ``scale_mode="rms"`` (default)
            ``scale=1`` means "the update RMS of AdamW at this ``lr``"; with ``"galore"`` it is GaLore's
            ``scale`` (GaLore's GLUE recipes use 4, its pre-training recipes 0.25). Fine-tuning a pretrained
            checkpoint at AdamW's ``lr``, ``scale=2`` fitted better on two of three GLUE tasks (3 seeds; it was
            4.6 % worse in perplexity pre-training from scratch), so the default stays 1: see the quality page.
        scale_mode: ``"rms"`` (default): the back-projected update is ``lr·α·√(s/r)·P N`` with
            ``N = m̂/(√v̂+ε)`` the ``r × l`` low-rank Adam direction and ``s = min(m, n)`` the projected side.
            Since ``P`` has orthonormal columns, ``‖P N‖_F = ‖N‖_F``, so the update's RMS over the ``m × n``
            matrix is ``lr·α·‖N‖_F/√(r·l) = lr·α·rms(N)``: the RMS of the Adam direction itself, as in full
            AdamW (whose update RMS is ``lr·rms(m̂/(√v̂+ε))``), **whatever the rank and the width**. Why:
            Adam makes every entry of ``N`` O(1), so the raw back-projection ``P N`` has RMS ≈ √(r/s) — a
            learning-rate cut tied to the rank (≈ 0.14 at r = 8, s = 384) that moves with every rank change
            and differs between layers of different width; no fixed ``scale`` fits them all. Its spectral norm
            does grow as the rank falls (``lr·α·√(s/r)·‖N‖₂``); a rule that bounds it, ``√(s/max_rank)`` (one
            direction's step independent of the rank), fitted less and scored lower on CoLA with either rule for
            new directions (``benchmarks/results/quality_second_pass.md``), so ``"rms"`` stays.
            ``"galore"``: GaLore's raw semantics ``lr·α·P N`` (for comparisons and a GaLore preset).
        subspace_source: ``"moment"`` (default): a refresh takes its subspace *and* its rank from a sketch of the
            smoothed gradient — the full first moment ``M = EMA_β1(G)`` that full AdamW would hold, kept only
            as ``Y = M Ω`` (``s × k``, ``k = max_rank + oversample``, ``Ω`` a fixed Gaussian test matrix),
            updated every step by one skinny product ``Y ← β1·Y + (1−β1)·G Ω`` (by linearity ``Y = M Ω``).
            The new basis is the top-``r`` left singular vectors of ``Y`` and ``r`` the smallest rank whose
            singular values keep ``energy`` of ``‖Y‖²_F``. Why: one mini-batch gradient is signal plus
            high-rank noise; its energy is spread over all ``s`` directions, so "keep 90 % of ``‖G‖²``"
            asks for the maximum rank whatever the structure and the rank never falls. Averaging over about
            ``1/(1−β1)`` steps cuts the noise energy about ``(1−β1)/(1+β1)`` times (≈ 19× at β1 = 0.9) while
            the persistent low-rank signal stays, so the rank follows the gradient's structure. The first
            refresh (no history yet) sees one gradient. ``power_iters`` is not used in this mode (power
            iterations need the matrix itself, which is never stored).
            ``"gradient"``: the paper's Algorithm 1–2 on the current gradient (range finder with
            ``power_iters`` power iterations, energy of ``‖G‖²_F``).
        noise_floor: with ``subspace_source="moment"``, choose the rank on the sketch's energy above its
            mini-batch noise floor (default ``False``: on its whole energy). At a refresh the noise left in the
            average is measured from that step's deviation, ``ν = (1−β1)/2·‖GΩ − Y‖²``
            (:func:`~lightning_adarank.optim.linalg.sketch_noise`), and the Marchenko–Pastur edge of that much
            noise is taken off every squared singular value of ``Y``
            (:func:`~lightning_adarank.optim.linalg.signal_spectrum`); nothing above the floor gives ``min_rank``.
            Why: averaging leaves about ``(1−β1)/(1+β1)`` of the noise, spread over every direction; as the signal
            shrinks against it the rank chosen on the whole energy rises towards ``max_rank``. Above the floor
            the rank follows the signal and falls during training, as the paper's Lemma 2 predicts. Why it is
            not the default: on GLUE at 189 steps the ranks fall (≈ 2.6 → 1.7, against 5.4 → 6.1) but the
            scores drop (SST-2 −1.4, CoLA −1.5, STS-B −14.7 points; docs, research notes, "GLUE quality"); keeping more
            of the signal (``energy=0.99``: ranks ≈ 3.6–4.4 → 2) still costs SST-2 −0.8 and STS-B −8.9 over six
            seeds; and on a noiseless full-batch problem the drift between steps counts as noise (end loss
            1.4–1.5× the default's). With new directions' second moment filled at a refresh it still collapses
            CoLA (375 steps) to the majority class on two seeds. Use it for a rank that reflects the structure,
            or where optimizer memory matters more than those points.
        min_gap: a matrix's subspace is refreshed no more often than every ``min_gap`` steps; the first
            ``min_gap − 1`` steps after a refresh (never the refresh step itself) calibrate the refresh test.
        max_gap: ... and at least every ``max_gap`` steps (never staler than GaLore's fixed schedule).
        tol: refresh threshold in ``(0, 1)``: from ``min_gap`` steps after a refresh a subspace is refreshed
            when the moving average (β = 0.9 per step) of its projected-gradient norm ``‖PᵀG‖``, or of the
            share ``‖PᵀG‖²/‖G‖²`` it captures, falls to ``tol`` × its reference (with ``subspace_source="moment"``
            both are read on the moment sketch ``Y``: ``‖PᵀY‖`` and ``‖PᵀY‖²/‖Y‖²``, noise averaged out). The reference is the mean
            over the calibration steps, i.e. over mini-batches the subspace was *not* chosen from. Why: the
            gradient a subspace is chosen from projects onto it more than any other mini-batch will (the
            subspace was fitted to that batch's noise too), so a reference taken there makes every later
            batch look "converged" and the test fire by selection bias alone (every 15–25 steps); a reference
            from fresh batches is what the same subspace captures on a typical batch, and only a real fall
            (convergence, or the gradient moving out of the subspace) triggers a refresh.
        oversample: extra sketch columns of the randomized range finder (``k = max_rank + oversample``).
        power_iters: power iterations of the range finder.
        transform_moments: carry Adam's moments into a new subspace (``M ← R M``, ``V ← (R∘R) V`` with
            ``R = P_newᵀ P_old``); ``False`` keeps them as they are, as GaLore does.
        state_bits: storage of the projected matrices' Adam moments: ``32`` fp32 (exact), ``16`` bf16 with
            (deterministic, hashed) stochastic rounding, ``8`` a plain uint8 buffer with row-wise blocks, √v for
            the second moment and Adam's ratio bound as a guard (moments under 256 elements stay fp32). The
            projection basis and moment sketch follow: bf16 at 16, 8-bit (linear code map for the basis) at 8. Math stays fp32: each
            moment is dequantized for its step and its refresh transform and re-quantized after (see
            :mod:`lightning_adarank.optim.quant`).
        dense_state_bits: the same choice for the parameters that get plain AdamW (biases, norms, unprojected
            matrices); ``32`` keeps them exact (torch's AdamW, bit for bit).
        stochastic_rounding: how updates are written into **bf16/fp16 weights** (a model trained with
            ``Trainer(precision="bf16-true")`` or cast with ``.bfloat16()``; fp32 weights are not affected):
            ``True`` (default) computes ``decay·W + update`` in fp32 and rounds it up or down with probability given
            by the dropped bits, so the stored weight is right on average; ``False`` rounds to nearest, which
            silently drops every update under half a 16-bit ulp (``|ΔW| < 2⁻⁹|W|`` in bf16: at ``lr = 1e-5``
            most of them). Deterministic (hashed from the step and the element, no random generator): a resumed
            run rounds as the uninterrupted one (:mod:`lightning_adarank.optim.rounding`).
        seed: the random test matrices depend only on ``(seed, parameter index, refresh count)``, so
            data-parallel ranks agree without communication and a resumed run is bit-identical.
        fused: torch's fused Adam kernel (``None``: where the device supports it), else foreach.
        grouped: step the projected matrices of a parameter group together: same-shape matrices share one
            stacked gradient, one batched matmul for the projection and one for the back-projection,
            one fused Adam call for all, the refresh test as device vectors (no host synchronisation on a
            normal step) and a batched refresh, so the operators per step do not grow with the number of
            matrices. ``False``: the per-matrix loop. ``None`` (default): grouped on accelerators, the loop on
            CPU, where the stacked copies cost more memory traffic than the saved operator launches
            (measured: ``benchmarks/README.md``, "Grouped step"). The two agree to fp32 rounding. FSDP2 (DTensor)
            parameters always take the per-matrix loop (:mod:`lightning_adarank.distributed`), and so do groups
            with ``state_bits``/``dense_state_bits`` below 32 (``grouped=True`` refuses them: the grouped
            step's moments are fp32 buffers stepped in place). The grouped step's transient memory is one
            chunk of stacked gradients (64 MiB by default, or one matrix when a matrix is larger).
        refresh_check_every: how often (in calls of the step) the device-side refresh flags and skip counts
            are read on the host; the refresh of a flagged matrix happens at the step after the read, so a
            refresh may come up to ``refresh_check_every − 1`` steps after its test fired (``max_gap`` is
            enforced on the host and is never late). ``None``: 1 on CPU (a read costs nothing there) and 8 on
            accelerators, where each read is a synchronisation that stalls the launch queue.
        compile: run the grouped step's per-chunk math (projection, sketch, refresh-test inputs, the non-finite
            restore, the padded direction: :mod:`~lightning_adarank.optim.stack_stages`) through
            :func:`torch.compile`; torch's Adam kernel and the writes into the weights stay eager. Implies the
            grouped step on every device (``grouped=False`` with it is refused; FSDP2 parameters and a group of one
            parameter still take the per-matrix loop, uncompiled). The first steps pay the
            compilation (about 20 s per function on a 2-core CPU, once per process; a new chunk shape or rank is
            a recompilation, after which dynamo treats the sizes as symbolic). Measured with and without in
            ``benchmarks/optimizer_cost.py --depth-only`` (docs: Benchmarks, Optimizer cost).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_rank: int = 8
    min_rank: int = 1
    energy: float | None = None
    scale: float = 1.0
    scale_mode: ScaleMode = "rms"
    subspace_source: SubspaceSource = "moment"
    noise_floor: bool = False
    min_gap: int = 10
    max_gap: int = 200
    tol: float = 0.7
    oversample: int = 4
    power_iters: int = 1
    transform_moments: bool = True
    state_bits: int = 32
    dense_state_bits: int = 32
    stochastic_rounding: bool = True
    seed: int = 0
    fused: bool | None = field(default=None)
    grouped: bool | None = None
    refresh_check_every: int | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        betas = self.betas
        if isinstance(betas, list):  # YAML/JSON give lists
            object.__setattr__(self, "betas", tuple(betas))
        check_group_settings(self.group_defaults())
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"AdaRankGrad: seed must be an int, got {self.seed!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"AdaRankGrad: fused must be True, False or None, got {self.fused!r}")
        if self.grouped is not None and not isinstance(self.grouped, bool):
            raise TypeError(f"AdaRankGrad: grouped must be True, False or None, got {self.grouped!r}")
        k = self.refresh_check_every
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"AdaRankGrad: refresh_check_every={k!r} must be None or an int >= 1")
        if not isinstance(self.compile, bool):
            raise TypeError(f"AdaRankGrad: compile must be True or False, got {self.compile!r}")
        if self.compile and self.grouped is False:
            raise ValueError(
                "AdaRankGrad: compile=True compiles the grouped step's math, but grouped=False asks for the per-matrix "
                "loop; leave grouped at None (compile=True then groups on every device) or set grouped=True"
            )

    def group_defaults(self) -> dict[str, Any]:
        """The per-group settings as a dict (the optimizer's ``defaults``; ``energy=None`` as
        :data:`DEFAULT_ENERGY`)."""
        out = {name: getattr(self, name) for name in GROUP_SETTINGS}
        if out["energy"] is None:
            out["energy"] = DEFAULT_ENERGY
        return out

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
#: settings that are optimizer-wide (a parameter group may not override them)
GLOBAL_SETTINGS = ("seed", "fused", "grouped", "refresh_check_every", "compile")
#: settings a parameter group may override
GROUP_SETTINGS = tuple(f.name for f in dataclasses.fields(AdaRankGradConfig) if f.name not in GLOBAL_SETTINGS)


def _check_range(name: str, value: float, low: float, high: float, *, low_open=False, high_open=False) -> None:
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok) or math.isnan(value):
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"AdaRankGrad: {name}={value!r} must be in {lb}{low}, {high}{rb}")


def check_group_settings(group: dict[str, Any]) -> None:
    """Check the per-group settings in ``group``; raises ``TypeError``/``ValueError`` naming the bad one."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):  # a 0-d float tensor: the grouped step reads it on the device (capture-ready)
        if lr.ndim != 0 or not lr.is_floating_point():
            raise TypeError(f"AdaRankGrad: a tensor lr must be a 0-d float tensor, got shape {tuple(lr.shape)}")
        lr = float(lr)  # checked once, when the group is built
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"AdaRankGrad: lr must be a number or a 0-d tensor, got {type(lr).__name__}")
    for key in ("eps", "weight_decay", "scale", "tol", "energy"):
        if not isinstance(group[key], (int, float)) or isinstance(group[key], bool):
            raise TypeError(f"AdaRankGrad: {key} must be a number, got {type(group[key]).__name__}")
    _check_range("lr", lr, 0.0, math.inf)
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
    for key, allowed in (("scale_mode", get_args(ScaleMode)), ("subspace_source", get_args(SubspaceSource))):
        if group[key] not in allowed:
            raise ValueError(f"AdaRankGrad: {key}={group[key]!r} must be one of {', '.join(map(repr, allowed))}")
    if not isinstance(group.get("stochastic_rounding", True), bool):
        raise TypeError(f"AdaRankGrad: stochastic_rounding must be a bool, got {group['stochastic_rounding']!r}")
    if not isinstance(group.get("noise_floor", False), bool):
        raise TypeError(f"AdaRankGrad: noise_floor must be a bool, got {group['noise_floor']!r}")
    if not isinstance(group["transform_moments"], bool):
        raise TypeError(f"AdaRankGrad: transform_moments must be a bool, got {group['transform_moments']!r}")
