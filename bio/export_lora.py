"""``python -m bio export-lora --ckpt run.ckpt --energy 0.99 --out adapter/``: a Geneformer cell-classifier
fine-tune as a PEFT LoRA adapter (see :func:`lightning_adarank.export_lora`).

The base is the checkpoint's ``pretrained`` Geneformer folder (or ``--base``) loaded as the classifier was
built, with a fresh head; the head is carried whole in the adapter. A classifier trained from scratch
(``model_config``, no ``pretrained``) has no base to be relative to and is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["export_checkpoint", "main"]


def export_checkpoint(
    ckpt: str,
    out: str,
    energy: float = 0.99,
    rank: int | None = None,
    base: str | None = None,
    alpha: float | None = None,
):
    """Export a ``GeneformerClassifier`` checkpoint as a LoRA adapter.

    Args:
        ckpt: Lightning checkpoint of ``python -m bio fit`` (full-parameter fine-tune: adarankgrad, galore, adamw).
        out: adapter folder to write (``label_mapping.json`` is written next to it).
        energy: per matrix, the smallest rank keeping this share of ``‖ΔW‖²_F``.
        rank: a fixed rank for every matrix instead of ``energy``.
        base: the pre-trained Geneformer folder the fine-tune started from (default: the checkpoint's
            ``pretrained``).
        alpha: LoRA alpha of every module (default ``alpha = r``, scaling 1).
    """
    from lightning_adarank import export_lora

    from .model import GeneformerClassifier

    module = GeneformerClassifier.load_from_checkpoint(ckpt, map_location="cpu")
    hp = dict(module.hparams)
    if hp.get("optimizer") == "lora":
        raise SystemExit(
            f"{ckpt} is a LoRA fine-tune already: its adapter is module.model.save_pretrained(...); "
            "export-lora turns a full-parameter fine-tune into one"
        )
    base = base or hp.get("pretrained")
    if not base:
        raise SystemExit(
            f"{ckpt} was trained from scratch (no `pretrained` folder): a LoRA adapter needs the "
            "pre-trained base it is relative to; pass --base if there is one"
        )
    hp["pretrained"] = str(base)
    hp["model_config"] = None
    base_model = GeneformerClassifier(**hp).model  # built as for training: same overrides, a fresh head
    report = export_lora(
        base_model, module.model, out, energy=energy, rank=rank, alpha=alpha, base_model_name_or_path=str(base)
    )
    (Path(out) / "label_mapping.json").write_text(json.dumps({"label_names": list(module.label_names)}, indent=2))
    print(report.summary())
    print(
        json.dumps(
            {
                "out": str(Path(out)),
                "total_rank": report.total_rank,
                "adapter_mib": report.adapter_mib,
                "rel_error": report.rel_error,
            }
        )
    )
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m bio export-lora ...``."""
    from jsonargparse import CLI

    CLI(export_checkpoint, args=list(sys.argv[2:] if argv is None else argv), as_positional=False)
