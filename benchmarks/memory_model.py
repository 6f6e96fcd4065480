"""The memory model of ``memory_frontier.py``: the peak memory of one training step of a LLaMA with 16-bit weights,
one formula per component, for every method of the benchmark.

``peak = runtime + weights + gradients + state + activations + workspace``

* **runtime**: the process before the model exists (torch, transformers and the data loaded): measured once by a
  probe process, not modelled;
* **weights**: ``2·P`` bytes (bf16, no fp32 copy anywhere);
* **gradients**: all of them at once (``2·P``) when the optimizer steps after backward; in a layer-wise method
  (each gradient consumed inside backward) the largest one, ``2·max(numel)``;
* **state**: per method, from the shapes. AdaRankGrad's 8-bit bytes come from the optimizer's own accounting
  (``quant._nbytes``: codes, block scales, headers) at the rank the matrices hold: ``max_rank`` for a
  prediction (an upper bound: the adaptive rank may be lower), the run's mean rank to check a measurement. AdamW: two moments in the weights' dtype. torchao's ``AdamW8bit``: one byte per
  element and an fp32 scale per 256 (tensors under 4096 elements in the weights' dtype). GaLore 8-bit
  layer-wise: bitsandbytes' 8-bit moments of the projected ``r × l`` gradients and a bf16 ``s × r`` basis for
  the attention and MLP matrices, dense 8-bit moments for the embedding and ``lm_head``, fp32 ones for tensors
  under 4096 elements;
* **activations** (activation checkpointing on: each decoder layer keeps its input): ``L·B·T·h·2`` for the
  checkpoints, one layer's recomputed forward and backward (``B·T·(c_h·h + c_i·i)`` bytes and the attention
  scores ``B·heads·T²·c_att``), and the loss: logits in bf16, their fp32 copy for the cross-entropy, its
  log-softmax and its gradient (``c_v·B·T·V`` bytes);
* **workspace**: the transient of the optimizer step on its largest tensor: the fp32 copy of a gradient that
  AdaRankGrad projects (``4·numel``), AdamW's ``√v`` temporaries (``4·numel``: two bf16 temporaries), torchao's
  dequantized moments and fp32 weight (``16·numel``), GaLore's fp32 SVD at its first refresh (``12·s·l + 4·s²``)
  and its clone of the weight, or bitsandbytes' dense 8-bit step on the embedding (``30·numel``, calibrated on
  llama_60m's run, whichever is larger); a dense 8-bit AdaRankGrad step on an embedding (``70·numel``: fp32 copies of the
  weight, gradient, both decoded moments and the direction, 20 bytes, and the 8-bit encoder's int64 codes and
  comparison temporaries; calibrated on llama_60m's run). Every other coefficient is read off the code.

The coefficients are read off the code paths named above (and the HF LLaMA forward); ``memory_frontier.py``
prints the model next to every measurement so that its error is visible at every size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

VOCAB = 32000
LOW_RANK_METHODS = ("adarankgrad32", "adarankgrad8", "adarankgrad8_layerwise", "adarankgrad8_layerwise_dense_emb")
METHODS = ("adamw", "adamw8bit", "galore8bit_layerwise", *LOW_RANK_METHODS)
LAYERWISE = ("galore8bit_layerwise", "adarankgrad8_layerwise", "adarankgrad8_layerwise_dense_emb")


@dataclass(frozen=True)
class Shapes:
    """A LLaMA's weight shapes (untied ``lm_head``, no grouped-query attention)."""

    hidden: int
    inter: int
    layers: int
    heads: int
    vocab: int = VOCAB

    def matrices(self) -> list[tuple[str, tuple[int, int]]]:
        """``(kind, shape)`` of every 2-D weight; kinds ``emb`` (embedding, ``lm_head``), ``attn``, ``mlp``."""
        h, i = self.hidden, self.inter
        per_layer = [("attn", (h, h))] * 4 + [("mlp", (i, h)), ("mlp", (i, h)), ("mlp", (h, i))]
        return [("emb", (self.vocab, h)), ("emb", (self.vocab, h))] + per_layer * self.layers

    def vectors(self) -> list[int]:
        """Sizes of the 1-D weights (RMSNorm scales: two per layer and the final one)."""
        return [self.hidden] * (2 * self.layers + 1)

    @property
    def params(self) -> int:
        return sum(m * n for _, (m, n) in self.matrices()) + sum(self.vectors())

    @property
    def max_numel(self) -> int:
        return max(m * n for _, (m, n) in self.matrices())


def _adarank_state(
    shapes: Shapes, bits: int, rank: int, oversample: int, project_emb: bool, max_rank: int | None = None
) -> int:
    """AdaRankGrad's state bytes at ``bits`` with every projected matrix at ``rank`` (moments, basis) and a moment
    sketch of ``max_rank + oversample`` columns (``max_rank``: default ``rank``)."""
    max_rank = rank if max_rank is None else max_rank
    from lightning_adarank.optim import quant

    def moment(shape: tuple[int, ...], signed: bool) -> int:
        numel = math.prod(shape)
        if bits == 32 or numel < quant.MIN_QUANT_NUMEL:
            return 4 * numel
        return quant._nbytes(shape, quant.SIGNED if signed else quant.SQRT)[1]

    total = 0
    for kind, (m, n) in shapes.matrices():
        s, low = min(m, n), max(m, n)
        if (kind == "emb" and not project_emb) or s <= max_rank:
            total += 2 * moment((m, n), True) + 4  # moments and the fp32 step counter
            continue
        mshape = (rank, n) if m <= n else (m, rank)
        k = min(max_rank + oversample, low)
        basis = 4 * s * rank if bits == 32 else quant._nbytes((s * rank,), quant.LINEAR)[1]
        total += moment(mshape, True) + moment(mshape, False) + basis + moment((s, k), True)
        total += 4 * 7  # the step counter and six fp32 refresh-test statistics
    return total + sum(2 * moment((v,), True) + 4 for v in shapes.vectors())


def _state(shapes: Shapes, method: str, rank: int, oversample: int, state_rank: int | None = None) -> int:
    if method == "adamw":
        return 2 * 2 * shapes.params
    if method == "adamw8bit":
        sizes = [m * n for _, (m, n) in shapes.matrices()] + shapes.vectors()
        return sum(2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 2 * 2 * n for n in sizes)
    if method == "galore8bit_layerwise":
        total = 0
        for kind, (m, n) in shapes.matrices():
            if kind == "emb":
                total += 2 * (m * n + 4 * math.ceil(m * n / 2048))
            else:
                s, low = min(m, n), max(m, n)
                total += 2 * (rank * low + 4 * math.ceil(rank * low / 2048)) + 2 * s * rank
        return total + sum(2 * 4 * v for v in shapes.vectors())
    bits = 32 if method == "adarankgrad32" else 8
    project_emb = method != "adarankgrad8_layerwise_dense_emb"
    return _adarank_state(shapes, bits, state_rank or rank, oversample, project_emb, max_rank=rank)


def _workspace(shapes: Shapes, method: str) -> int:
    big = shapes.max_numel
    proj = max(m * n for kind, (m, n) in shapes.matrices() if kind != "emb")
    if method == "adamw":
        return 4 * big
    if method == "adamw8bit":
        return 16 * big
    if method == "galore8bit_layerwise":
        s = min(shapes.hidden, shapes.inter)
        return max(12 * proj + 4 * s * s + 2 * proj, 30 * big)  # SVD of a matrix, or bnb's 8-bit embedding step
    if method == "adarankgrad8_layerwise_dense_emb":
        return 70 * big  # the dense 8-bit step on the embedding (see the module docstring)
    return 4 * big


def _activations(shapes: Shapes, batch: int, seq: int, checkpointing: bool) -> int:
    h, i, L, V = shapes.hidden, shapes.inter, shapes.layers, shapes.vocab
    tokens = batch * seq
    scores = batch * shapes.heads * seq * seq * 6  # attention probabilities (fp32 softmax, bf16 copy)
    one_layer = tokens * (24 * h + 10 * i) + scores
    logits = 18 * tokens * V
    if checkpointing:
        return L * tokens * h * 2 + one_layer + logits
    return L * one_layer + logits


def predict(
    model: dict[str, int],
    method: str,
    *,
    batch: int,
    seq: int,
    max_rank: int,
    runtime_bytes: int,
    oversample: int = 4,
    checkpointing: bool = True,
    rank: int | None = None,
) -> dict[str, int]:
    """The components of the peak (bytes) and their sum ``total`` for ``method`` on a LLaMA of preset sizes
    ``model`` (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``).

    ``rank``: the rank AdaRankGrad's matrices hold (adaptive: known after a run); default ``max_rank``, the upper
    bound used for predictions."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    shapes = Shapes(
        model["hidden_size"], model["intermediate_size"], model["num_hidden_layers"], model["num_attention_heads"]
    )
    parts = {
        "runtime": int(runtime_bytes),
        "weights": 2 * shapes.params,
        "gradients": 2 * (shapes.max_numel if method in LAYERWISE else shapes.params),
        "state": _state(shapes, method, max_rank, oversample, rank),
        "activations": _activations(shapes, batch, seq, checkpointing),
        "workspace": _workspace(shapes, method),
    }
    parts["total"] = sum(parts.values())
    parts["params"] = shapes.params
    return parts
