"""Peak memory of a whole training step on a BERT-base-sized model: AdamW, GaLore, AdaRankGrad, and
AdaRankGrad layer-wise (updates fused into backward, gradients freed at once).

Each method runs in a fresh process (peak RSS only grows). Reported: the process's peak memory during
training minus its memory right after the model was built (the *training overhead*: gradients, optimizer
state, activations, temporaries), and the optimizer state bytes. On CUDA: ``max_memory_allocated``.

    python benchmarks/layerwise_memory.py --quick      # 2 steps, batch 4 x 64 tokens
    python benchmarks/layerwise_memory.py              # 3 steps, batch 8 x 128 tokens
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402

METHODS = ("adamw", "galore", "adarankgrad", "adarankgrad_layerwise")


def child(args: argparse.Namespace) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from lightning_adarank import build_optimizer, optimizer_state_bytes
    from lightning_adarank.optim.layerwise import LayerwiseUpdater

    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
    )
    model = BertForSequenceClassification(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=g).to(device)
    name = args.child
    layerwise = name == "adarankgrad_layerwise"
    opt_name = "adarankgrad" if layerwise else name
    extra = dict(include_embeddings=True) if opt_name == "adarankgrad" else {}
    opt = build_optimizer(model, opt_name, lr=1e-5, rank=args.rank, **extra)
    updater = LayerwiseUpdater(opt).attach(model) if layerwise else None
    gc.collect()
    common.sync(device)
    base = common.current_bytes(device)
    common.reset_peak(device)
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=labels).loss
        if updater is not None:
            updater.backward(loss)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        del loss
    peak = common.peak_bytes(device)
    common.emit_result(dict(peak=peak, base=base, state=optimizer_state_bytes(opt)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny model, for the test suite")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument(
        "--out-dir", type=Path, default=None, help="where to write the Markdown (default benchmarks/results)"
    )
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=768, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=12, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.batch, args.seq, args.steps = 4, 64, 2
    if args.smoke:
        args.hidden, args.layers, args.batch, args.seq, args.steps = 64, 2, 2, 16, 2
    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    shape = f"BERT hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens"
    rows, res = [], {}
    for name in METHODS:
        argv = [
            __file__,
            "--child",
            name,
            "--device",
            str(device),
            "--threads",
            str(threads),
            "--rank",
            str(args.rank),
            "--hidden",
            str(args.hidden),
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
        ]
        res[name] = r = common.run_child(argv)
        r["overhead"] = r["peak"] - r["base"]
    for name in METHODS:
        r = res[name]
        rows.append(
            [
                name,
                common.mib(r["peak"]),
                common.mib(r["overhead"]),
                common.mib(r["state"]),
                common.ratio(r["overhead"], res["adamw"]["overhead"]),
                common.ratio(r["overhead"], res["galore"]["overhead"]),
            ]
        )
    what = "CUDA max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    notes = [
        shape + f"; {args.steps} training steps (forward, backward, step); rank {args.rank}",
        f"peak = {what}; overhead = peak minus memory right after building the model and optimizer",
        "AdaRankGrad projects every linear layer and the embeddings; GaLore projects the linear layers "
        "(embeddings on full AdamW, as in its recipes); each method in its own fresh process",
    ]
    text = common.header("Peak training-step memory: layer-wise vs the peers", device, threads, notes)
    text += common.markdown_table(
        [
            "method",
            "peak MiB",
            "training overhead MiB",
            "optimizer state MiB",
            "overhead vs AdamW",
            "overhead vs GaLore",
        ],
        rows,
    )
    print(text)
    if not args.smoke:
        common.save("layerwise_memory", device, text, args.out_dir)


if __name__ == "__main__":
    main()
