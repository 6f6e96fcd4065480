"""``python -m nlp export-lora --ckpt run.ckpt --energy 0.99 --out adapter/``: a GLUE fine-tune as a PEFT LoRA
adapter (see :func:`lightning_adarank.export_lora`).

The base is the checkpoint's ``model_name_or_path`` (or ``--base``) with a fresh head; the head is carried
whole in the adapter, so ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base,
num_labels=...), out)`` reproduces the fine-tuned classifier. The tokenizer is saved next to the adapter.
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
    """Export a ``GLUETransformer`` checkpoint as a LoRA adapter.

    Args:
        ckpt: Lightning checkpoint of ``python -m nlp fit`` (full-parameter fine-tune: adarankgrad, galore, adamw).
        out: adapter folder to write.
        energy: per matrix, the smallest rank keeping this share of ``‖ΔW‖²_F``.
        rank: a fixed rank for every matrix instead of ``energy``.
        base: the pre-trained model the fine-tune started from (default: the checkpoint's ``model_name_or_path``).
        alpha: LoRA alpha of every module (default ``alpha = r``, scaling 1).
    """
    from lightning_adarank import export_lora
    from nlp.hub import load_classifier, load_tokenizer
    from nlp.model import GLUETransformer

    module = GLUETransformer.load_from_checkpoint(ckpt, map_location="cpu")
    hp = module.hparams
    if hp.optimizer == "lora":
        raise SystemExit(
            f"{ckpt} is a LoRA fine-tune already: its adapter is module.model.save_pretrained(...); "
            "export-lora turns a full-parameter fine-tune into one"
        )
    base_path = base or hp.model_name_or_path
    id2label = getattr(module.model.config, "id2label", None)
    base_model = load_classifier(base_path, hp.num_labels, id2label=id2label)
    report = export_lora(
        base_model, module.model, out, energy=energy, rank=rank, alpha=alpha, base_model_name_or_path=str(base_path)
    )
    try:
        load_tokenizer(base_path).save_pretrained(out)
    except Exception as err:  # noqa: BLE001  (the adapter is written; the tokenizer is a convenience)
        print(f"note: tokenizer not saved ({err})", file=sys.stderr)
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
    """``python -m nlp export-lora ...``."""
    from jsonargparse import CLI

    CLI(export_checkpoint, args=list(sys.argv[2:] if argv is None else argv), as_positional=False)
