"""Exporting a fine-tune: :func:`~lightning_adarank.export.lora.export_lora` (a PEFT LoRA adapter from ``W_final − W_0``)."""
