"""What ``optimizer_cost.py`` measures: the models (built from configs, no downloads), their gradients, the
optimizer variants side by side, and how a variant is armed for a normal or a refresh step; plus the operator
count of one step (torch.profiler)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common as C  # noqa: E402
import torch  # noqa: E402

GENEFORMER_CONFIG = C.REPO.parent / "shared" / "data" / "geneformer" / "configs" / "gf-12L-30M-i2048_config.json"
ALL_MODELS = ("bert-base", "roberta-base", "geneformer-12L-30M", "llama-60m", "llama-130m")
#: the GPU run of issue 13 (``--gpu-run``): the models of its table
GPU_MODELS = ("bert-base", "roberta-base", "geneformer-12L-30M", "llama-130m", "llama-350m")
LLAMA = {"llama-60m": (512, 1376, 8, 8), "llama-130m": (768, 2048, 12, 12), "llama-350m": (1024, 2736, 24, 16)}
LLAMA_EXTRA_RANK = 128


# ----------------------------------------------------------------------------- models from configs
def build_model(name: str):
    """``(model, kind, vocab_size, head)``: kind ``"cls"`` (sequence classification) or ``"lm"`` (causal LM);
    ``head`` is the module LoRA keeps fully trainable (``modules_to_save``), or None."""
    from transformers import (  # noqa: PLC0415
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        RobertaConfig,
        RobertaForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "bert-base":
        cfg = BertConfig(num_labels=2)
        return BertForSequenceClassification(cfg), "cls", cfg.vocab_size, "classifier"
    if name == "roberta-base":
        cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)
        return RobertaForSequenceClassification(cfg), "cls", cfg.vocab_size, "classifier"
    if name == "geneformer-12L-30M":
        cfg = BertConfig.from_json_file(str(GENEFORMER_CONFIG))
        cfg.num_labels = 2
        return BertForSequenceClassification(cfg), "cls", cfg.vocab_size, "classifier"
    if name in LLAMA:  # GaLore's configs/llama_60m.json, llama_130m.json, llama_350m.json
        h, i, n, heads = LLAMA[name]
        cfg = LlamaConfig(
            hidden_size=h,
            intermediate_size=i,
            num_hidden_layers=n,
            num_attention_heads=heads,
            vocab_size=32000,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
        )
        return LlamaForCausalLM(cfg), "lm", cfg.vocab_size, None
    if name.startswith("bert-w"):  # "bert-w256-L6": the depth-scaling model of one width (operator counts)
        width, layers = (int(x) for x in name[len("bert-w") :].split("-L"))
        cfg = BertConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=max(1, width // 64),
            intermediate_size=4 * width,
            num_labels=2,
        )
        return BertForSequenceClassification(cfg), "cls", cfg.vocab_size, "classifier"
    if name == "tiny-bert":  # smoke tests only
        cfg = BertConfig(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=2,
        )
        return BertForSequenceClassification(cfg), "cls", cfg.vocab_size, "classifier"
    raise ValueError(f"unknown model {name!r}")


def make_batch(kind: str, vocab: int, batch: int, seq: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = ids.clone() if kind == "lm" else torch.randint(0, 2, (batch,), generator=g)
    return {k: v.to(device) for k, v in out.items()}


def forward_backward(model, batch: dict) -> None:
    model(**batch).loss.backward()


# ----------------------------------------------------------------------------- optimizers
@dataclass
class Variant:
    key: str  # "adamw" | "lora" | "galore" | "adarank" | "adarank_emb" | "adarank_emb_loop" | "adarank_emb_grouped"
    # | "adarank_emb_compiled"
    rank: int | None = None

    @property
    def label(self) -> str:
        return {
            "adamw": "AdamW (fused)",
            "lora": f"LoRA r={self.rank} (fused AdamW)",
            "galore": f"GaLore r={self.rank}",
            "adarank": f"AdaRankGrad r≤{self.rank}",
            "adarank_emb": f"AdaRankGrad r≤{self.rank} +emb",
            "adarank_emb_loop": f"AdaRankGrad r≤{self.rank} +emb, per-matrix loop",
            "adarank_emb_grouped": f"AdaRankGrad r≤{self.rank} +emb, grouped",
            "adarank_emb_compiled": f"AdaRankGrad r≤{self.rank} +emb, grouped, compile=True",
            "none": "fwd+bwd only (no optimizer)",
        }[self.key]


def variants(ranks: list[int], loop: bool = False) -> list[Variant]:
    """Every optimizer of a model's table; ``loop`` adds AdaRankGrad +emb grouped and per-matrix, explicitly."""
    out = [Variant("adamw")]
    for r in ranks:
        out += [Variant("lora", r), Variant("galore", r), Variant("adarank", r), Variant("adarank_emb", r)]
        if loop:
            out += [Variant("adarank_emb_grouped", r), Variant("adarank_emb_loop", r)]
    return out


def make_optimizer(model, v: Variant):
    """The optimizer for ``v`` (``model`` is already LoRA-wrapped for ``"lora"``)."""
    from lightning_adarank import build_optimizer  # noqa: PLC0415

    lr = 1e-4
    if v.key in ("adamw", "lora"):  # fused for both: the fastest stock AdamW, on CPU and CUDA
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    if v.key == "galore":  # GaLore's recipe: embeddings stay with (its own) AdamW, gap 200
        return build_optimizer(model, "galore", lr=lr, rank=v.rank, galore_update_proj_gap=200)
    extra = {
        "adarank_emb_loop": {"grouped": False},
        "adarank_emb_grouped": {"grouped": True},
        "adarank_emb_compiled": {"grouped": True, "compile": True},
    }.get(v.key, {})
    return build_optimizer(model, "adarankgrad", lr=lr, rank=v.rank, include_embeddings=v.key != "adarank", **extra)


def lora_model(model, rank: int, head: str | None):
    from lightning_adarank import apply_lora  # noqa: PLC0415

    return apply_lora(copy.deepcopy(model), rank, modules_to_save=[head] if head else None)


def arm(opt, v: Variant, refresh: bool) -> None:
    """Make the next step a refresh step (or surely not one)."""
    for st in opt.state.values():
        if v.key.startswith("adarank") and "basis" in st:
            st["pending"] = refresh
        elif v.key == "galore" and "projector" in st:
            gap = st["projector"].update_proj_gap
            st["step"] = gap if refresh else 1  # GaLoreProjector.project refreshes when step % gap == 0


def rank_summary(opt) -> str:
    ranks = list(opt.ranks().values())
    if not ranks:
        return ""
    return f"{sum(ranks) / len(ranks):.1f} ({min(ranks)}–{max(ranks)})"


# ----------------------------------------------------------------------------- measurements
def count_ops(fn, device) -> int:
    """Operators one call of ``fn`` issues, from torch.profiler.

    CPU: top-level aten operators (an aten op not called from inside another aten op: what the Python side
    dispatches, each paying the dispatcher and, on a GPU, at least one launch). CUDA: device kernels and
    memory operations (memcpy/memset) recorded on the GPU.
    """
    from torch.autograd import DeviceType  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    C.sync(device)
    with profile(activities=activities) as prof:
        fn()
        C.sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)

    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if e.name.startswith("aten::") and not nested(e))
