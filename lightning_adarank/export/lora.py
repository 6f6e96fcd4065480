"""``export_lora``: a full-parameter fine-tune as a PEFT LoRA adapter (arXiv 2410.17881, §3 after Algorithm 3).

For every ``nn.Linear`` whose weight changed, ``ΔW = W_tuned − W_base`` is factored by a randomized truncated
SVD (the randomized range finder of Algorithm 1, :func:`~lightning_adarank.optim.linalg.range_finder`) at a
fixed ``rank`` or at the smallest rank keeping ``energy`` of ``‖ΔW‖²_F`` (Algorithm 2's rule,
:func:`~lightning_adarank.optim.linalg.select_rank`). Everything else that changed is carried exactly, so that
the adapter reproduces the fine-tuned model and not just its matrices:

* a Linear's bias change: PEFT's ``lora_bias`` (a bias on ``lora_B``; merges and unmerges with the adapter);
* changed rows of an ``nn.Embedding``: PEFT's ``trainable_token_indices`` (only the changed rows are stored;
  the whole table via ``modules_to_save`` when more than half of its rows changed);
* the task head (``classifier``/``score`` by default), LayerNorms and any other changed module, and a Linear
  whose factors would not be smaller than the matrix: PEFT's ``modules_to_save`` (a full copy);

PEFT conventions: a LoRA layer adds ``lora_B(lora_A(x)) · scaling`` with ``scaling = alpha / r`` (``lora_B``'s
bias included), so ``lora_B`` is stored divided by ``scaling``. With the default ``alpha=None`` every module has
``alpha = r`` (``scaling = 1``). The singular values are split evenly, ``B = U√S``, ``A = √S Vᵀ``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..optim.linalg import projection_side, range_finder, select_rank
from .report import ExportedModule, LoraExportReport

__all__ = ["ExportedModule", "LoraExportReport", "export_lora", "factor_delta"]

HEAD_NAMES = ("classifier", "score")  # the names PEFT's sequence-classification models keep whole
_ADAPTER = "default"


# ---------------------------------------------------------------------------------------------- factorisation
@torch.no_grad()
def factor_delta(
    delta: Tensor,
    *,
    energy: float | None = 0.99,
    rank: int | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Truncated randomized SVD of a 2-D ``delta``: ``delta ≈ B @ A`` with ``B = U√S`` ``(m, r)`` and
    ``A = √S Vᵀ`` ``(r, n)``.

    ``rank`` fixes ``r`` (clipped to ``min(m, n)``); otherwise ``r`` is the smallest rank keeping ``energy`` of
    ``‖delta‖²_F`` (:func:`~lightning_adarank.optim.linalg.select_rank`). The sketch starts small and doubles
    until the chosen rank leaves ``oversample`` spare columns (a full SVD once it reaches half of ``min(m, n)``).
    The factors span an orthonormal basis, so the kept share is exact: ``‖delta − B A‖² = (1 − kept)·‖delta‖²``.

    Returns:
        ``(B, A, kept)``, ``kept`` the share of ``‖delta‖²_F`` that ``B @ A`` keeps.
    """
    if delta.dim() != 2:
        raise ValueError(f"factor_delta needs a 2-D tensor, got shape {tuple(delta.shape)}")
    if rank is None and energy is None:
        raise ValueError("give energy or rank")
    a = delta.float()
    side = projection_side(a.shape)
    s = min(a.shape)
    total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
    if total == 0.0:
        raise ValueError("delta is zero: nothing to factor")

    def exact():
        o = a if side == "left" else a.mT
        u, sv, vh = torch.linalg.svd(o, full_matrices=False)
        return u, sv, sv.unsqueeze(1) * vh

    if rank is not None:
        r = max(1, min(int(rank), s))
        k = r + oversample
        u, sv, w = exact() if 2 * k >= s else range_finder(a, side, k, power_iters, generator)
    else:
        k = min(s, 16 + oversample)
        while True:
            u, sv, w = exact() if 2 * k >= s else range_finder(a, side, k, power_iters, generator)
            r = select_rank(sv, total, energy, 1, sv.numel())
            if 2 * k >= s or r <= k - oversample:
                break
            k = min(s, 2 * k)
    kept = min(1.0, float(sv[:r].double().square().sum()) / total)
    root = sv[:r].clamp_min(torch.finfo(sv.dtype).tiny).sqrt()
    left = u[:, :r] * root  # (s, r)
    right = w[:r] / root.unsqueeze(1)  # (r, l): √S Vᵀ
    if side == "left":  # a = U W
        return left.contiguous(), right.contiguous(), kept
    return right.mT.contiguous(), left.mT.contiguous(), kept  # a = (U W)ᵀ = Wᵀ Uᵀ


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    name: str
    kind: str
    rank: int = 0
    b: Tensor | None = None
    a: Tensor | None = None
    kept: float = 1.0
    rel_error: float = 0.0
    delta_norm: float = 0.0
    bias_delta: Tensor | None = None
    rows: list[int] | None = None
    shape: tuple[int, ...] = ()


def _inside(name: str, parents: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _resolve_heads(model: nn.Module, modules_to_save: Sequence[str] | None) -> set[str]:
    names = [n for n, _ in model.named_modules() if n]
    if modules_to_save is None:
        return {
            n
            for n, m in model.named_modules()
            if n and n.split(".")[-1] in HEAD_NAMES and any(True for _ in m.parameters())
        }
    out = set()
    for key in modules_to_save:
        hits = [n for n in names if n == key or n.endswith("." + key)]
        if not hits:
            raise ValueError(f"export_lora: modules_to_save entry {key!r} matches no module of {type(model).__name__}")
        out.update(hits)
    return out


def _check_same_architecture(base: nn.Module, tuned: nn.Module) -> None:
    bp = {n: p.shape for n, p in base.named_parameters()}
    tp = {n: p.shape for n, p in tuned.named_parameters()}
    if bp.keys() != tp.keys():
        only_t = sorted(tp.keys() - bp.keys())[:3]
        only_b = sorted(bp.keys() - tp.keys())[:3]
        hint = (
            " (tuned looks like a PEFT model: export from its full-parameter fine-tune)"
            if any("lora_" in n for n in only_t)
            else ""
        )
        raise ValueError(
            f"export_lora: base and tuned have different parameters: only in tuned {only_t}, "
            f"only in base {only_b}{hint}"
        )
    for n, shape in tp.items():
        if bp[n] != shape:
            raise ValueError(f"export_lora: {n} has shape {tuple(bp[n])} in base but {tuple(shape)} in tuned")


def _changed(base_t: Tensor, tuned_t: Tensor) -> bool:
    return not torch.equal(base_t.detach().to(tuned_t.device), tuned_t.detach())


@torch.no_grad()
def _plan(base, tuned, heads, energy, rank, oversample, power_iters, seed) -> list[_Plan]:
    base_mods = dict(base.named_modules())
    full: set[str] = set(heads)
    plans: dict[str, _Plan] = {}
    seen: set[int] = set()
    for index, (name, mod) in enumerate(tuned.named_modules()):
        if not name or _inside(name, heads):
            continue
        bmod = base_mods[name]
        own = [(k, p) for k, p in mod.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        bufs = list(mod.named_buffers(recurse=False))
        changed = [k for k, p in own if _changed(getattr(bmod, k), p)]
        changed_bufs = [k for k, b in bufs if b is not None and _changed(getattr(bmod, k), b)]
        if not changed and not changed_bufs:
            continue
        if isinstance(mod, nn.Linear) and not changed_bufs and set(changed) <= {"weight", "bias"}:
            m, n = mod.weight.shape
            p = _Plan(name, "lora", shape=(m, n))
            if "bias" in changed:
                p.bias_delta = mod.bias.float() - bmod.bias.float().to(mod.bias.device)
            if "weight" in changed:
                delta = mod.weight.float() - bmod.weight.float().to(mod.weight.device)
                gen = torch.Generator(device=delta.device).manual_seed(seed + index)
                b, a, kept = factor_delta(
                    delta, energy=energy, rank=rank, oversample=oversample, power_iters=power_iters, generator=gen
                )
                p.rank, p.b, p.a, p.kept = b.shape[1], b, a, kept
                p.delta_norm = float(torch.linalg.vector_norm(delta))
                p.rel_error = float(torch.linalg.vector_norm(delta - b @ a)) / p.delta_norm
            if p.rank * (m + n) >= m * n:  # the factors would not be smaller than the matrix
                full.add(name)
            else:
                plans[name] = p
        elif isinstance(mod, nn.Embedding) and changed == ["weight"] and not changed_bufs:
            delta = mod.weight.float() - bmod.weight.float().to(mod.weight.device)
            rows = (delta != 0).any(dim=1).nonzero().flatten().tolist()
            if 2 * len(rows) > mod.num_embeddings:
                full.add(name)
            else:
                plans[name] = _Plan(
                    name,
                    "tokens",
                    rows=rows,
                    shape=tuple(mod.weight.shape),
                    delta_norm=float(torch.linalg.vector_norm(delta)),
                )
        else:
            full.add(name)
    # PEFT matches modules_to_save by suffix (``key.endswith(name)``): a module whose name ends with one of the
    # fully kept names is wrapped too, so it must be kept whole as well (e.g. "pre_classifier" vs "classifier").
    names = [n for n, _ in tuned.named_modules() if n]
    while True:
        extra = {n for n in names if n not in full and not _inside(n, full) and any(n.endswith(t) for t in full)}
        if not extra:
            break
        full |= extra
    out = [p for n, p in plans.items() if not _inside(n, full)]
    lora_bias = any(p.bias_delta is not None for p in out if p.kind == "lora")
    if lora_bias:  # PEFT's lora_bias is one switch for all LoRA layers; a layer without a bias could not merge
        no_bias = {p.name for p in out if p.kind == "lora" and tuned.get_submodule(p.name).bias is None}
        if no_bias:
            moved = {p.name for p in out if p.kind == "lora" and p.bias_delta is not None}
            full |= moved
            out = [p for p in out if p.name not in moved]
    for p in out:
        if p.kind == "lora" and p.rank == 0:  # only the bias changed: rank-1 zero factors carry lora_bias
            p.rank = 1
            m, n = p.shape
            dev = tuned.get_submodule(p.name).weight.device
            p.b, p.a = torch.zeros(m, 1, device=dev), torch.zeros(1, n, device=dev)
            p.kept, p.rel_error = 1.0, 0.0
    full = {n for n in full if not any(n.startswith(p + ".") for p in full)}  # a kept module holds its children
    full_plans = []
    for n in sorted(full):
        mod = tuned.get_submodule(n)
        bmod = base.get_submodule(n)
        sq = sum(
            float(torch.linalg.vector_norm(t.float() - bmod.get_parameter(k).float().to(t.device))) ** 2
            for k, t in mod.named_parameters()
        )
        shape = tuple(mod.weight.shape) if isinstance(getattr(mod, "weight", None), Tensor) else ()
        full_plans.append(_Plan(n, "full", shape=shape, delta_norm=math.sqrt(sq)))
    return out + full_plans


# ---------------------------------------------------------------------------------------------- export
def export_lora(
    base: nn.Module,
    tuned: nn.Module,
    out_dir: str | Path,
    *,
    energy: float = 0.99,
    rank: int | None = None,
    alpha: float | None = None,
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> LoraExportReport:
    """Write the change from ``base`` to ``tuned`` as a PEFT LoRA adapter that
    ``peft.PeftModel.from_pretrained(base, out_dir)`` loads.

    Args:
        base: the model before fine-tuning (not modified; a copy is wrapped).
        tuned: the fine-tuned model, same architecture and parameter names as ``base``.
        out_dir: adapter folder (``adapter_config.json``, ``adapter_model.safetensors``, ``export_report.json``).
        energy: per matrix, the smallest rank keeping this share of ``‖ΔW‖²_F``, in ``(0, 1]``.
        rank: a fixed rank for every matrix instead (``energy`` is then ignored).
        alpha: LoRA alpha of every module (``scaling = alpha / r``); ``None``: ``alpha = r`` (scaling 1).
        modules_to_save: modules carried whole (the task head), by name or name suffix; ``None``: every module
            named ``classifier`` or ``score``. A module whose head is freshly initialised when the base is loaded
            must be listed here, or the adapter would be relative to one random initialisation.
        base_model_name_or_path: recorded in ``adapter_config.json`` (lets ``AutoPeftModel`` find the base);
            default ``base.name_or_path`` of a transformers model.
        oversample, power_iters: of the randomized SVD (:func:`factor_delta`).
        seed: seeds the random sketches (the export is deterministic).

    Returns:
        a :class:`LoraExportReport` (also written to ``out_dir/export_report.json``).

    Raises:
        ValueError: different architectures, a bad ``energy``/``rank``, or nothing changed.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover
        raise ImportError("export_lora needs peft >= 0.15: pip install 'peft>=0.15'") from err
    if rank is None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ValueError(f"export_lora: energy={energy!r} must be in (0, 1]")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"export_lora: rank={rank!r} must be an int >= 1 (or None for the energy rule)")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"export_lora: alpha={alpha!r} must be > 0")
    _check_same_architecture(base, tuned)
    heads = _resolve_heads(tuned, modules_to_save)
    plans = _plan(base, tuned, heads, energy, rank, oversample, power_iters, seed)
    lora = [p for p in plans if p.kind == "lora"]
    tokens = [p for p in plans if p.kind == "tokens"]
    full = [p for p in plans if p.kind == "full"]
    if not lora and not tokens and not any(p.delta_norm > 0 for p in full):
        raise ValueError("export_lora: tuned does not differ from base; there is nothing to export")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(base, "name_or_path", None) or None

    r_max = max((p.rank for p in lora), default=1)
    config = LoraConfig(
        r=r_max,
        lora_alpha=alpha if alpha is not None else r_max,
        target_modules=[p.name for p in lora],
        rank_pattern={re.escape(p.name): p.rank for p in lora},
        alpha_pattern={re.escape(p.name): (alpha if alpha is not None else p.rank) for p in lora},
        lora_dropout=0.0,
        bias="none",
        lora_bias=any(p.bias_delta is not None for p in lora),
        init_lora_weights=False,
        modules_to_save=[p.name for p in full] or None,
        trainable_token_indices={p.name: p.rows for p in tokens} or None,
        base_model_name_or_path=base_model_name_or_path,
    )
    if not lora:  # PEFT wants at least one target: an exact rank-1 zero LoRA is not worth it, so refuse clearly
        raise ValueError(
            "export_lora: no nn.Linear weight changed; a LoRA adapter has nothing to factor "
            "(save the changed modules instead)"
        )
    wrapped = get_peft_model(copy.deepcopy(base), config)
    inner = wrapped.base_model.model
    with torch.no_grad():
        for p in lora:
            layer = inner.get_submodule(p.name)
            if layer.r.get(_ADAPTER) != p.rank:
                raise RuntimeError(f"export_lora: PEFT gave {p.name} rank {layer.r.get(_ADAPTER)}, expected {p.rank}")
            scaling = layer.scaling[_ADAPTER]
            lora_a, lora_b = layer.lora_A[_ADAPTER], layer.lora_B[_ADAPTER]
            lora_a.weight.copy_(p.a.to(lora_a.weight))
            lora_b.weight.copy_((p.b / scaling).to(lora_b.weight))
            if lora_b.bias is not None:
                lora_b.bias.copy_((p.bias_delta / scaling).to(lora_b.bias) if p.bias_delta is not None else 0.0)
        for p in tokens:
            adapter = inner.get_submodule(p.name).token_adapter
            rows = torch.tensor(p.rows, dtype=torch.long, device=tuned.get_submodule(p.name).weight.device)
            adapter.trainable_tokens_delta[_ADAPTER].copy_(tuned.get_submodule(p.name).weight[rows])
        for p in full:
            inner.get_submodule(p.name).modules_to_save[_ADAPTER].load_state_dict(
                tuned.get_submodule(p.name).state_dict()
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # peft 0.21 mistakes lora_B's 1-D bias for an unsharded ZeRO-3 tensor
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        wrapped.save_pretrained(str(out), save_embedding_layers=False)
    files = [out / "adapter_model.safetensors", out / "adapter_model.bin"]
    adapter_bytes = next((f.stat().st_size for f in files if f.exists()), 0)

    def stored(p: _Plan) -> int:
        if p.kind == "lora":
            return p.rank * sum(p.shape) + (p.shape[0] if config.lora_bias else 0)
        if p.kind == "tokens":
            return len(p.rows) * p.shape[1]
        return sum(t.numel() for t in tuned.get_submodule(p.name).state_dict().values())

    report = LoraExportReport(
        out_dir=str(out),
        energy=None if rank is not None else float(energy),
        rank=rank,
        modules=tuple(
            ExportedModule(p.name, p.kind, p.shape, p.rank, p.kept, p.rel_error, p.delta_norm, stored(p)) for p in plans
        ),
        adapter_bytes=adapter_bytes,
        model_bytes=sum(t.numel() * t.element_size() for t in tuned.parameters()),
    )
    (out / "export_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report
