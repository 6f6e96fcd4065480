"""A tiny transformer-ish model and token data shared by the FSDP2 tests, their launch scripts and the benchmark.

Its matrices cover both projection sides and uneven row splits over 2 ranks (max_rank 4, sketch width 8):

====================  =========  ======  ======================
parameter             shape      side    rows per rank (2)
====================  =========  ======  ======================
``emb.weight``        41 × 12    right   21 / 20 (uneven)
``up.weight``         48 × 12    right   24 / 24
``down.weight``       13 × 48    left    7 / 6 (uneven)
``mix.weight``        12 × 13    left    6 / 6
``head.weight``       41 × 12    right   21 / 20 (uneven)
biases, ``norm``      vectors    dense   AdamW
====================  =========  ======  ======================
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM, SEQ = 41, 12, 6
SETTINGS = dict(lr=1e-2, weight_decay=0.01, max_rank=4, min_gap=2, max_gap=4, tol=0.9, energy=0.8, oversample=4)
#: the raw FSDP2 run (tests/test_fsdp.py) also chooses ranks above the sketch's noise floor: the all-reduced
#: deviation norms and the rank on them must agree with one process (the Lightning runs keep the defaults)
RAW_SETTINGS = {**SETTINGS, "noise_floor": True}


class TinyLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, 13)
        self.mix = nn.Linear(13, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = h + self.mix(nn.functional.gelu(self.down(nn.functional.gelu(self.up(h)))))
        return self.head(self.norm(h))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def batches(steps: int, global_batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """``steps`` global batches of token sequences (a noisy repeating pattern, so there is something to learn)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(SEQ + 1) * 3 % VOCAB
    out = []
    for _ in range(steps):
        shift = torch.randint(0, VOCAB, (global_batch, 1), generator=g)
        noise = torch.randint(0, VOCAB, (global_batch, SEQ + 1), generator=g)
        keep = torch.rand(global_batch, SEQ + 1, generator=g) < 0.8
        out.append(torch.where(keep, (base + shift) % VOCAB, noise))
    return out


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2: ``fully_shard`` every layer with weights, then the root."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    for mod in (model.emb, model.up, model.down, model.mix, model.norm, model.head):
        fully_shard(mod, mesh=mesh)
    return fully_shard(model, mesh=mesh)
