"""What :func:`~lightning_adarank.export.lora.export_lora` returns: :class:`LoraExportReport` (per-module ranks,
reconstruction errors, adapter size)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["ExportedModule", "LoraExportReport"]


@dataclass(frozen=True)
class ExportedModule:
    """How one changed module is carried in the adapter."""

    name: str
    kind: Literal["lora", "tokens", "full"]
    """``lora``: factored ``ΔW`` (and ``lora_bias``); ``tokens``: changed embedding rows; ``full``: whole copy."""
    shape: tuple[int, ...]
    rank: int
    """LoRA rank (0 for ``tokens``/``full``, and for a Linear where only the bias changed)."""
    energy_kept: float
    """Share of ``‖ΔW‖²_F`` the factors keep (1 for exact kinds)."""
    rel_error: float
    """``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F`` of the weight (0 for exact kinds)."""
    delta_norm: float
    """``‖ΔW‖_F`` of the weight (or of the module's whole change for ``full``)."""
    stored: int
    """Elements this module adds to the adapter."""


@dataclass(frozen=True)
class LoraExportReport:
    """What :func:`export_lora` wrote: per-module ranks and errors, adapter size."""

    out_dir: str
    energy: float | None
    rank: int | None
    modules: tuple[ExportedModule, ...]
    adapter_bytes: int
    """Size of the adapter weights file on disk."""
    model_bytes: int
    """Bytes of the fine-tuned model's parameters (what a full copy would take)."""

    @property
    def lora_modules(self) -> tuple[ExportedModule, ...]:
        return tuple(m for m in self.modules if m.kind == "lora")

    @property
    def total_rank(self) -> int:
        """Sum of the LoRA ranks."""
        return sum(m.rank for m in self.lora_modules)

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error of all factored matrices together: ``√(Σ‖ΔW − ΔŴ‖² / Σ‖ΔW‖²)``."""
        num = sum((m.rel_error * m.delta_norm) ** 2 for m in self.lora_modules)
        den = sum(m.delta_norm**2 for m in self.lora_modules)
        return math.sqrt(num / den) if den > 0 else 0.0

    @property
    def max_rel_error(self) -> float:
        """Largest per-matrix relative error."""
        return max((m.rel_error for m in self.lora_modules), default=0.0)

    @property
    def adapter_mib(self) -> float:
        return self.adapter_bytes / 2**20

    def summary(self) -> str:
        """A short text table: one line per kind, then the totals."""
        kinds = Counter(m.kind for m in self.modules)
        stored = Counter()
        for m in self.modules:
            stored[m.kind] += m.stored
        lines = [f"LoRA export -> {self.out_dir}"]
        for kind in ("lora", "tokens", "full"):
            if kinds[kind]:
                lines.append(f"  {kind:6s} {kinds[kind]:4d} modules  {stored[kind]:>12,d} elements")
        lines.append(
            f"  total rank {self.total_rank}, relative error {self.rel_error:.4f} (max {self.max_rel_error:.4f}), "
            f"adapter {self.adapter_mib:.2f} MiB vs model {self.model_bytes / 2**20:.2f} MiB"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python values (JSON-safe), with the derived totals."""
        out = asdict(self)
        out.update(
            total_rank=self.total_rank,
            rel_error=self.rel_error,
            max_rel_error=self.max_rel_error,
            adapter_mib=self.adapter_mib,
        )
        return out
