"""``CausalLMPretrainer``: pre-train ``LlamaForCausalLM`` from a config (no weights), as GaLore's Table 2.

The model is built from a preset (:data:`LLAMA_PRESETS`: GaLore's ``configs/llama_*.json``), a config JSON file,
or explicit sizes. Optimizers (:func:`build_pretrain_optimizer`): ``adarankgrad`` (``adarank={"state_bits": 8}``
for 8-bit moments), ``galore`` / ``galore8bit`` (galore-torch's ``GaLoreAdamW`` / ``GaLoreAdamW8bit``),
``adamw`` (torch) and ``adamw8bit`` (torchao's ``AdamW8bit``). Learning rate: linear warm-up, then cosine decay
to ``min_lr_ratio`` of the peak (GaLore's ``torchrun_main.py`` schedule). Validation logs the token-weighted
mean loss ``val/loss`` and the perplexity ``val/ppl = exp(val/loss)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

__all__ = ["CausalLMPretrainer", "LLAMA_PRESETS", "PRETRAIN_OPTIMIZERS", "build_pretrain_optimizer", "llama_config"]

# Architectures of jiaweizzhao/GaLore configs/llama_{60m,130m,350m,1b}.json (commit 8460814); the tiny one is
# ours (CPU tests and benchmark). GaLore uses vocab 32000 (T5's tokenizer) and max_sequence_length 1024.
LLAMA_PRESETS: dict[str, dict[str, int]] = {
    "llama_60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
    "llama_130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    "llama_350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24, num_attention_heads=16),
    "llama_1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24, num_attention_heads=32),
    "llama_tiny": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    # GaLore's configs/llama_{3b,7b}.json (7B: LLaMA-7B's shapes) and LLaMA-13B's (Touvron et al. 2023, Table 2)
    "llama_3b": dict(hidden_size=2560, intermediate_size=6848, num_hidden_layers=32, num_attention_heads=32),
    "llama_7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama_13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
PRETRAIN_OPTIMIZERS = ("adarankgrad", "galore", "galore8bit", "adamw", "adamw8bit")


def llama_config(vocab_size: int, model: str | None = None, max_position_embeddings: int = 1024, **sizes: int | None):
    """A ``transformers.LlamaConfig``: ``model`` is a preset name or a config JSON path; ``sizes`` override it."""
    from transformers import LlamaConfig

    base: dict[str, Any] = {}
    if model is not None:
        if model in LLAMA_PRESETS:
            base = dict(LLAMA_PRESETS[model])
        elif Path(model).expanduser().is_file():
            raw = json.loads(Path(model).expanduser().read_text())
            keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps")
            base = {k: raw[k] for k in keys if k in raw}
        else:
            raise ValueError(f"model={model!r} is neither a preset ({', '.join(LLAMA_PRESETS)}) nor a config file")
    base.update({k: v for k, v in sizes.items() if v is not None})
    missing = [
        k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in base
    ]
    if missing:
        raise ValueError(f"give model=<preset or config.json> or the sizes {missing}")
    base.setdefault("rms_norm_eps", 1e-6)
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        tie_word_embeddings=False,
        use_cache=False,
        **base,
    )


class _CPUSafeGaLoreAdamW8bit:
    """galore-torch's ``GaLoreAdamW8bit`` calls ``torch.cuda.synchronize()`` in every step, which raises on a
    CPU-only torch; this makes that call a no-op while its step runs on CPU (bitsandbytes ≥ 0.50 has the CPU
    8-bit kernels). Built lazily so that galore-torch is imported only when asked for."""

    @staticmethod
    def build(groups, **kwargs):
        from galore_torch import GaLoreAdamW8bit

        class CPUSafe(GaLoreAdamW8bit):
            @torch.no_grad()
            def step(self, closure=None):
                if torch.cuda.is_available():
                    return super().step(closure)
                real = torch.cuda.synchronize
                torch.cuda.synchronize = lambda *a, **k: None
                try:
                    return super().step(closure)
                finally:
                    torch.cuda.synchronize = real

        return CPUSafe(groups, **kwargs)


def build_pretrain_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    rank: int = 128,
    scale: float | None = None,
    update_proj_gap: int = 200,
    target_modules: str | list[str] = r"attn|mlp",
    include_embeddings: bool = False,
    **adarank: Any,
) -> torch.optim.Optimizer:
    """One of :data:`PRETRAIN_OPTIMIZERS` for ``model``; projected methods get the matrices ``target_modules``
    selects (GaLore's pre-training: the ``attn`` and ``mlp`` linears; embeddings and ``lm_head`` dense)."""
    from lightning_adarank import build_optimizer, param_groups

    if name not in PRETRAIN_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(PRETRAIN_OPTIMIZERS)}")
    if adarank and name != "adarankgrad":
        raise ValueError(f"adarank settings {sorted(adarank)} are for optimizer='adarankgrad', not {name!r}")
    if name in ("adarankgrad", "galore", "adamw"):
        extra = dict(adarank) if name == "adarankgrad" else {}
        if name == "galore":
            extra["galore_update_proj_gap"] = update_proj_gap
        return build_optimizer(
            model,
            name,
            lr=lr,
            weight_decay=weight_decay,
            betas=tuple(betas),
            rank=rank,
            scale=scale,
            target_modules=target_modules,
            include_embeddings=include_embeddings,
            **extra,
        )
    if name == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(
            [p for p in model.parameters() if p.requires_grad], lr=lr, betas=tuple(betas), weight_decay=weight_decay
        )
    groups = param_groups(model, target_modules, include_embeddings)
    for g in groups:
        g.pop("param_names")
        if g.pop("low_rank"):
            g.update(
                rank=rank, update_proj_gap=update_proj_gap, scale=0.25 if scale is None else scale, proj_type="std"
            )
    return _CPUSafeGaLoreAdamW8bit.build(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine from 1 down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CausalLMPretrainer(L.LightningModule):
    """Pre-train a ``LlamaForCausalLM`` from scratch.

    Args:
        vocab_size: tokenizer size (linked from the data module by ``python -m nlp pretrain``).
        model: a preset of :data:`LLAMA_PRESETS` (``llama_60m`` … ``llama_1b``, GaLore's) or a config JSON path.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: override the preset.
        max_position_embeddings: longest sequence.
        optimizer: one of :data:`PRETRAIN_OPTIMIZERS`.
        learning_rate, weight_decay, betas: optimizer settings.
        rank: AdaRankGrad's ``max_rank``, GaLore's rank.
        scale: projected-update scale α (``None``: AdaRankGrad 1.0, GaLore 0.25).
        update_proj_gap: GaLore's refresh period.
        target_modules: regex/list of the projected linears (default GaLore's ``attn|mlp``).
        include_embeddings: also project the embedding table. ``None`` (default) applies the package's embedding
            rule for training from scratch: dense Adam, not projected (logged; ``True`` is obeyed with a warning:
            see :mod:`lightning_adarank.optim.embedding_rule`).
        warmup_steps: linear warm-up steps; min_lr_ratio: floor of the cosine decay.
        adarank: further AdaRankGrad settings, e.g. ``{"state_bits": 8}``. ``energy`` left unset is 1.0 here
            (every projected matrix at ``rank``; logged): the rule for training from scratch, see
            :mod:`lightning_adarank.optim.rank_rule`. ``{"energy": 0.9}`` gives the adaptive rank.
        seed: weight initialisation.
    """

    def __init__(
        self,
        vocab_size: int = 32000,
        model: str | None = "llama_60m",
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_attention_heads: int | None = None,
        max_position_embeddings: int = 1024,
        optimizer: str = "adarankgrad",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        rank: int = 128,
        scale: float | None = None,
        update_proj_gap: int = 200,
        target_modules: str | list[str] = r"attn|mlp",
        include_embeddings: bool | None = None,
        warmup_steps: int = 1000,
        min_lr_ratio: float = 0.1,
        adarank: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in PRETRAIN_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(PRETRAIN_OPTIMIZERS)}")
        if adarank and optimizer != "adarankgrad":
            raise ValueError(f"adarank settings {sorted(adarank)} are for optimizer='adarankgrad', not {optimizer!r}")
        if not 0.0 <= min_lr_ratio <= 1.0 or warmup_steps < 0:
            raise ValueError("need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1")
        self.save_hyperparameters()
        from transformers import LlamaForCausalLM

        config = llama_config(
            vocab_size,
            model,
            max_position_embeddings,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = LlamaForCausalLM(config)
        self._val_sums: list[torch.Tensor] = []  # per batch: [sum of token losses, tokens]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.model(input_ids=input_ids, labels=labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()  # predicted positions (the model shifts labels by one)
        self._val_sums.append(torch.stack([loss.detach().float() * tokens, tokens.float()]))

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        total = torch.stack(self._val_sums).sum(0)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")  # token-weighted over every process
        self._val_sums.clear()
        mean = total[0] / total[1]
        self.log_dict({"val/loss": mean, "val/ppl": torch.exp(mean)}, prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        from lightning.pytorch.utilities import rank_zero_info

        from lightning_adarank.optim.embedding_rule import resolve_include_embeddings
        from lightning_adarank.optim.rank_rule import resolve_energy

        hp = self.hparams
        projects = "galore" if hp.optimizer.startswith("galore") else hp.optimizer  # galore8bit projects too
        include_embeddings = resolve_include_embeddings(
            hp.include_embeddings,
            from_pretrained=False,
            optimizer=projects,
            owner=type(self).__name__,
            report=rank_zero_info,
        )
        adarank = dict(hp.adarank or {})
        if hp.optimizer == "adarankgrad":  # from scratch: every projected matrix at max_rank unless energy is set
            adarank["energy"] = resolve_energy(
                adarank.get("energy"), from_pretrained=False, owner=type(self).__name__, report=rank_zero_info
            )
        opt = build_pretrain_optimizer(
            self.model,
            hp.optimizer,
            lr=hp.learning_rate,
            weight_decay=hp.weight_decay,
            betas=tuple(hp.betas),
            rank=hp.rank,
            scale=hp.scale,
            update_proj_gap=hp.update_proj_gap,
            target_modules=hp.target_modules,
            include_embeddings=include_embeddings,
            **adarank,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_with_warmup(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
