"""How far an 8-bit optimizer state moves the update from the 32-bit one, on an embedding's sparse rows.

Set-up (issue 25): a BERT with hidden 384 and BERT's vocabulary (30,522 rows, random init, ``--layers`` 2),
``--steps`` 3 steps on batches of 8 × 64 random tokens (most rows of the word embedding get no gradient),
loss = masked-LM cross-entropy of each token's neighbour (an untied decoder, so the embedding's gradient is
row-sparse), lr 1e-4, no weight decay. For every method the update of each
weight ``ΔW = W_after − W_before`` is compared with its 32-bit reference, run on the same batches:

* **projected**: AdaRankGrad with the embeddings projected (``include_embeddings=True``, ``max_rank`` in
  ``--ranks``), ``state_bits=dense_state_bits=8`` against the same at 32;
* **dense**: AdaRankGrad with the embeddings left to its AdamW path, ``dense_state_bits=state_bits=8`` against
  the same at 32 (which is torch's AdamW, bit for bit);
* **torchao AdamW8bit** against torch's ``AdamW`` (peer; needs torchao; run eagerly, ``TORCHDYNAMO_DISABLE``,
  because its step compiles for minutes on CPU: the arithmetic is the same).

Columns: the word embedding's update norm at 8 bits over that at 32 (1 = same size; issue: 300× projected,
6× dense before the row-wise √v format), the largest ratio over the rows the batches touched, the relative
difference ``‖Δ8 − Δ32‖/‖Δ32‖`` of the embedding and of the whole model.

    OMP_NUM_THREADS=1 python benchmarks/lowbit_update.py            # 2 layers, ranks 1 2 8 (~2 min on 1 core)
    python benchmarks/lowbit_update.py --layers 6 --ranks 8 --no-torchao
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common

from lightning_adarank import AdaRankGrad, param_groups

EMB = "bert.embeddings.word_embeddings.weight"


def build(layers: int, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        tie_word_embeddings=False,
    )  # untied: only the rows of the batch's tokens get a gradient
    return BertForMaskedLM(cfg)


def run(layers: int, steps: int, make_opt, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update ΔW of every weight after ``steps`` steps of ``make_opt(model)`` on ``batches``."""
    model = build(layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_opt(model)
    for ids in batches[:steps]:
        opt.zero_grad()
        model(input_ids=ids, labels=ids.roll(1, dims=1)).loss.backward()
        opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def compare(low: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    e8, e32 = low[EMB], ref[EMB]
    touched = e32.norm(dim=1) > 0
    rows8, rows32 = e8[touched].norm(dim=1), e32[touched].norm(dim=1)
    whole = sum(float((low[n] - ref[n]).square().sum()) for n in ref) ** 0.5
    whole_ref = sum(float(ref[n].square().sum()) for n in ref) ** 0.5
    return {
        "norm8": float(e8.norm()),
        "norm32": float(e32.norm()),
        "ratio": float(e8.norm() / e32.norm()),
        "row_max": float((rows8 / rows32).max()),
        "row_min": float((rows8 / rows32).min()),
        "untouched_zero": bool((e8[~touched] == 0).all()),
        "emb_diff": float((e8 - e32).norm() / e32.norm()),
        "model_diff": whole / whole_ref,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-torchao", action="store_true", help="leave torchao's AdamW8bit out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    threads = common.set_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 30522, (8, 64), generator=gen) for _ in range(args.steps)]
    rows = []

    def ada(bits: int, projected: bool, rank: int = 8):
        return lambda m: AdaRankGrad(
            param_groups(m, include_embeddings=projected),
            lr=args.lr,
            max_rank=rank,
            weight_decay=0.0,
            state_bits=bits,
            dense_state_bits=bits,
        )

    for rank in args.ranks:
        ref = run(args.layers, args.steps, ada(32, True, rank), batches)
        low = run(args.layers, args.steps, ada(8, True, rank), batches)
        rows.append((f"AdaRankGrad projected, max_rank={rank}", compare(low, ref)))
    ref = run(args.layers, args.steps, ada(32, False), batches)
    low = run(args.layers, args.steps, ada(8, False), batches)
    rows.append(("AdaRankGrad dense AdamW path", compare(low, ref)))
    if not args.no_torchao:
        adamw = run(
            args.layers, args.steps, lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0), batches
        )
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # torch.compile then returns the function itself
        from torchao.optim import AdamW8bit

        low = run(args.layers, args.steps, lambda m: AdamW8bit(m.parameters(), lr=args.lr, weight_decay=0.0), batches)
        rows.append(("torchao AdamW8bit vs torch AdamW", compare(low, adamw)))
    table = common.markdown_table(
        [
            "method (8-bit vs its 32-bit run)",
            "‖ΔE‖ 8-bit",
            "‖ΔE‖ 32-bit",
            "ratio",
            "row ratio max / min",
            "untouched rows 0",
            "‖ΔE8−ΔE32‖/‖ΔE32‖",
            "whole model ‖Δ8−Δ32‖/‖Δ32‖",
        ],
        [
            (
                name,
                f"{r['norm8']:.4g}",
                f"{r['norm32']:.4g}",
                f"{r['ratio']:.3f}x",
                f"{r['row_max']:.3f} / {r['row_min']:.3f}",
                r["untouched_zero"],
                f"{r['emb_diff']:.3f}",
                f"{r['model_diff']:.3f}",
            )
            for name, r in rows
        ],
    )
    text = (
        common.header(
            f"8-bit vs 32-bit update, BERT {args.layers} layers, vocabulary 30522, {args.steps} steps",
            torch.device("cpu"),
            threads,
        )
        + "\n"
        + table
    )
    print(text)
    common.save(f"lowbit_update_{args.layers}l", torch.device("cpu"), text, args.out_dir)


if __name__ == "__main__":
    main()
