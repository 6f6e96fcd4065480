"""Pre-train a small LLaMA with AdamW, 8-bit AdamW, GaLore, 8-bit GaLore and AdaRankGrad at 32 and 8 bits.

    python benchmarks/llama_pretrain.py            # CPU: llama_tiny (3.3M) on SST-2's sentences
    python benchmarks/llama_pretrain.py --smoke    # seconds (tests)

Every method trains the same model (same initial weights, same batches) in its own fresh process (so that the
peak RSS is its own), ``--jobs`` at a time, and reports validation perplexity every ``--eval-every`` steps
(a plot), the optimizer state bytes (every tensor in ``optimizer.state``, torchao/bitsandbytes codes and
scales counted as stored) and the peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, and
its growth over the RSS before the first step).

Methods and settings: ``adamw`` (torch, lr ``--lr-adam``), ``adamw8bit`` (torchao ``AdamW8bit``), ``galore`` /
``galore8bit`` (galore-torch ``GaLoreAdamW`` / ``GaLoreAdamW8bit``, rank ``--rank``, scale 0.25, refresh every
``--gap`` steps, lr ``--lr-lowrank``: GaLore's pre-training recipe), ``adarankgrad32`` / ``adarankgrad8``
(``max_rank=--rank``, scale 0.25, lr ``--lr-lowrank``, ``state_bits`` 32 / 8). Projected matrices: the
attention and MLP linears (GaLore's choice); embeddings, ``lm_head`` and norms get the method's dense Adam.
``adarankgrad32emb`` / ``adarankgrad8emb``: the same with the token embedding and ``lm_head`` projected too
(``include_embeddings=True``, ``target_modules=r"attn|mlp|lm_head"``). ``adamw8bit`` runs torchao's step eagerly
on CPU (``TORCHDYNAMO_DISABLE``; it compiles for minutes there; the arithmetic is the same).
On request (``--methods``): ``adamw_matched``, full-rank AdamW with the low-rank recipe's per-group learning
rates (dense parameters at ``--lr-lowrank``, the attention/MLP matrices at ``--matched-scale`` (0.25) times it), the
fair peer of the low-rank methods; ``adarankgrad32_emb``, AdaRankGrad with the embedding table projected too;
``adarankgrad_matched``, AdaRankGrad with the package's defaults (``scale_mode="rms"``, the from-scratch energy
rule of :mod:`lightning_adarank.optim.rank_rule`) and ``scale=--matched-scale``: exactly ``adamw_matched``'s
per-group learning rates (the projected update's RMS is AdamW's at ``scale`` times the lr).
``--seed`` sets the initial weights and the batch order.
Schedule: linear warm-up (10 %) then cosine to 10 % (GaLore's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
import torch  # noqa: E402

SST2 = common.REPO.parent / "shared" / "data" / "glue" / "SST-2"
METHODS = (
    "adamw",
    "adamw8bit",
    "galore",
    "galore8bit",
    "adarankgrad32",
    "adarankgrad8",
    "adarankgrad32emb",
    "adarankgrad8emb",
)
EXTRA_METHODS = ("adamw_matched", "adarankgrad32_emb", "adarankgrad_matched")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default="llama_tiny", help="preset of nlp.pretrain.LLAMA_PRESETS")
    p.add_argument("--train-files", nargs="*", default=[str(SST2 / "train.tsv")])
    p.add_argument("--val-files", nargs="*", default=[str(SST2 / "dev.tsv")])
    p.add_argument("--text-column", default="sentence")
    p.add_argument("--tokenizer", default=None, help="AutoTokenizer path; default: BPE trained on the train files")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val-blocks", type=int, default=128)
    p.add_argument("--rank", type=int, default=48)
    p.add_argument("--gap", type=int, default=200, help="GaLore's update_proj_gap (its pre-training value)")
    p.add_argument("--lr-adam", type=float, default=3e-3)
    p.add_argument("--lr-lowrank", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0, help="weight initialisation and batch order")
    p.add_argument(
        "--matched-scale",
        type=float,
        default=0.25,
        help="adamw_matched: the matrices' lr is this times --lr-lowrank (0.25: the low-rank recipe's scale)",
    )
    p.add_argument(
        "--adarank",
        type=json.loads,
        default={},
        help="further AdaRankGrad settings for the adarankgrad methods, as JSON (e.g. '{\"energy\": 0.99}')",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--jobs", type=int, default=2, help="methods trained at a time")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.steps, a.eval_every, a.batch, a.block, a.val_blocks, a.vocab, a.rank = 6, 3, 4, 32, 8, 512, 8
    return a


def prepare_data(a: argparse.Namespace, path: Path) -> int:
    from nlp.lm_data import PackedTextDataModule

    dm = PackedTextDataModule(
        train_files=a.train_files,
        val_files=a.val_files,
        text_column=a.text_column,
        tokenizer=a.tokenizer,
        vocab_size=a.vocab,
        block_size=a.block,
        batch_size=a.batch,
        max_val_blocks=a.val_blocks,
    )
    dm.setup()
    torch.save({"train": dm._train.blocks, "val": dm._val.blocks, "vocab": dm.vocab_size}, path)
    return dm.vocab_size


def child(a: argparse.Namespace) -> None:
    """Train one method and emit its curve, state bytes and peak memory."""
    from lightning_adarank.optim.baselines import optimizer_state_bytes
    from nlp.pretrain import CausalLMPretrainer, build_pretrain_optimizer, cosine_with_warmup

    torch.set_num_threads(a.threads)
    device = common.pick_device(a.device)
    if a.child == "adamw8bit" and device.type == "cpu":  # torchao compiles its step for minutes on CPU: run eagerly
        os.environ["TORCHDYNAMO_DISABLE"] = "1"  # (torch.compile then returns the function itself)
    data = torch.load(a.data, weights_only=True)
    train, val = data["train"], data["val"]
    module = CausalLMPretrainer(vocab_size=data["vocab"], model=a.model, optimizer="adamw", seed=a.seed)
    model = module.model.to(device)
    name = a.child
    if name == "adamw_matched":
        opt = matched_adamw(model, a.lr_lowrank, a.matched_scale)
    elif name == "adarankgrad_matched":  # the package's defaults at adamw_matched's per-group learning rates
        from lightning_adarank.optim.rank_rule import resolve_energy

        settings = {"scale": a.matched_scale, **a.adarank}  # scale_mode "rms": the matrices' update RMS = AdamW's
        settings["energy"] = resolve_energy(settings.get("energy"), from_pretrained=False)
        opt = build_pretrain_optimizer(model, "adarankgrad", lr=a.lr_lowrank, rank=a.rank, **settings)
    elif name.startswith("adarankgrad"):
        if name == "adarankgrad32_emb":  # the embedding table projected too (include_embeddings=True's rule)
            bits, where = 32, dict(include_embeddings=True)
        else:  # "emb" suffix: the embedding and lm_head projected too; 8-bit: projected AND dense moments
            bits = int(name[len("adarankgrad") :].removesuffix("emb"))
            where = dict(include_embeddings=True, target_modules=r"attn|mlp|lm_head") if name.endswith("emb") else {}
        opt = build_pretrain_optimizer(
            model,
            "adarankgrad",
            lr=a.lr_lowrank,
            rank=a.rank,
            state_bits=bits,
            dense_state_bits=bits,
            **where,
            **{"scale": 0.25, "scale_mode": "galore", **a.adarank},  # --adarank may override the recipe's scale
        )
    elif name.startswith("galore"):
        opt = build_pretrain_optimizer(model, name, lr=a.lr_lowrank, rank=a.rank, scale=0.25, update_proj_gap=a.gap)
    else:
        opt = build_pretrain_optimizer(model, name, lr=a.lr_adam)
    warm = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warm, a.steps, 0.1))
    gen = torch.Generator().manual_seed(a.seed)
    order = torch.cat([torch.randperm(len(train), generator=gen) for _ in range(1 + a.steps * a.batch // len(train))])

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = 0.0
        for i in range(0, len(val), 32):
            x = val[i : i + 32].to(device)
            total += model(input_ids=x, labels=x).loss.item() * len(x)
        model.train()
        return math.exp(total / len(val))

    common.reset_peak(device)
    base = common.current_bytes(device)
    curve = [(0, evaluate())]
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        x = train[order[(step - 1) * a.batch : step * a.batch]].to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            curve.append((step, evaluate()))
    seconds = time.perf_counter() - t0
    ranks = opt.ranks() if hasattr(opt, "ranks") else {}
    common.emit_result(
        {
            "method": name,
            "curve": curve,
            "state_bytes": optimizer_state_bytes(opt),
            "lowrank_bytes": lowrank_bytes(opt),
            "peak": common.peak_bytes(device),
            "base": base,
            "seconds": seconds,
            "params": sum(p.numel() for p in model.parameters()),
            "avg_rank": (sum(ranks.values()) / len(ranks)) if ranks else None,
        }
    )


def matched_adamw(model, lr: float, scale: float) -> torch.optim.Optimizer:
    """Full-rank AdamW with the low-rank recipe's per-group learning rates (issue 31's fair comparison): the
    matrices the low-rank methods project (``param_groups``' projected group) at ``lr * scale``, the rest
    (embeddings, ``lm_head``, norms: the dense Adam of the low-rank methods) at ``lr``."""
    import inspect

    from lightning_adarank import param_groups
    from nlp.pretrain import build_pretrain_optimizer

    targets = inspect.signature(build_pretrain_optimizer).parameters["target_modules"].default  # the projected set
    groups = param_groups(model, targets, include_embeddings=False)
    for g in groups:
        g.pop("param_names")
        g["lr"] = lr * scale if g.pop("low_rank") else lr
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def lowrank_bytes(opt) -> int | None:
    """State bytes of the projected matrices only (AdaRankGrad: those with a basis; GaLore: groups with a rank)."""
    from lightning_adarank.optim.baselines import _tensor_bytes

    seen: set[int] = set()
    if hasattr(opt, "subspaces"):
        return sum(_tensor_bytes(st, seen) for st in opt.state.values() if "basis" in st)
    groups = [g for g in opt.param_groups if "rank" in g]
    if not groups:
        return None
    return sum(_tensor_bytes(opt.state[p], seen) for g in groups for p in g["params"] if p in opt.state)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps, ppl = zip(*r["curve"][1:])
        ax.plot(
            steps,
            ppl,
            marker=".",
            label=r["method"],
            linestyle="--" if r["method"].endswith("8") or "8bit" in r["method"] else "-",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    a = parse(argv)
    if a.child:
        return child(a)
    device = common.pick_device(a.device)
    methods = [m for m in a.methods.split(",") if m]
    bad = set(methods) - set(METHODS) - set(EXTRA_METHODS)
    if bad:
        raise SystemExit(f"unknown methods {sorted(bad)}; choose from {METHODS + EXTRA_METHODS}")
    if any(not Path(f).is_file() for f in a.train_files + a.val_files):
        raise SystemExit(f"text files not found: {a.train_files + a.val_files}")
    tmp = Path(tempfile.mkdtemp(prefix="llama_pretrain_"))
    data = tmp / "blocks.pt"
    vocab = prepare_data(a, data)
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--smoke"]
    smoke = (
        ["--steps", str(a.steps), "--eval-every", str(a.eval_every), "--batch", str(a.batch), "--rank", str(a.rank)]
        if a.smoke
        else []
    )
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        results = list(
            pool.map(
                lambda m: common.run_child(
                    [os.path.relpath(__file__, common.REPO), *passthrough, *smoke, "--child", m, "--data", str(data)],
                    timeout=7200,
                ),
                methods,
            )
        )
    wall = time.time() - t0
    by = {r["method"]: r for r in results}
    ref = by.get("adamw")
    rows = []
    for r in results:
        final = r["curve"][-1][1]
        rows.append(
            [
                r["method"],
                f"{final:.1f}",
                common.ratio(final, ref["curve"][-1][1]) if ref else "—",
                f"{r['state_bytes'] / 2**10:,.0f}",
                common.ratio(r["state_bytes"], ref["state_bytes"]) if ref else "—",
                "—" if r["lowrank_bytes"] is None else f"{r['lowrank_bytes'] / 2**10:,.0f}",
                common.mib(r["peak"]),
                common.mib(r["peak"] - r["base"]),
                "—" if r["avg_rank"] is None else f"{r['avg_rank']:.1f}",
                f"{r['seconds']:.0f}",
            ]
        )
    steps = [s for s, _ in results[0]["curve"]]
    curve_rows = [[s, *[f"{dict(r['curve'])[s]:.1f}" for r in results]] for s in steps]
    p = results[0]["params"]
    notes = [
        f"model `{a.model}` ({p / 1e6:.2f}M parameters), vocab {vocab} ({'BPE trained on the train files' if a.tokenizer is None else a.tokenizer}), "
        f"blocks of {a.block} tokens, batch {a.batch}, {a.steps} steps, eval every {a.eval_every} steps on "
        f"{a.val_blocks} validation blocks; rank {a.rank} (AdaRankGrad: max rank), GaLore gap {a.gap}",
        f"lr: AdamW/8-bit AdamW {a.lr_adam}; GaLore/AdaRankGrad {a.lr_lowrank} with scale 0.25"
        f"{f'; adamw_matched {a.lr_lowrank} (dense) / {a.matched_scale * a.lr_lowrank:g} (matrices)' if 'adamw_matched' in methods else ''}"
        f"; warm-up 10 %, cosine to 10 %; seed {a.seed}",
        f"data: {', '.join(Path(f).name for f in a.train_files)} → {', '.join(Path(f).name for f in a.val_files)}; "
        f"{a.jobs} method(s) at a time, {a.threads} thread(s) each; total wall time {wall / 60:.1f} min",
    ]
    text = common.header("Small-LLaMA pre-training: perplexity, optimizer state, peak memory", device, a.threads, notes)
    text += "\n" + common.markdown_table(
        [
            "method",
            "final val ppl",
            "ppl / AdamW",
            "state KiB",
            "state / AdamW",
            "projected-matrix state KiB",
            "peak MiB",
            "peak − start MiB",
            "avg rank",
            "train s",
        ],
        rows,
    )
    text += "\nValidation perplexity by step:\n\n" + common.markdown_table(
        ["step", *[r["method"] for r in results]], curve_rows
    )
    text += "\n"
    for suffix, what in (("", ""), ("emb", ", embedding and lm_head projected")):
        if f"adarankgrad8{suffix}" in by and f"adarankgrad32{suffix}" in by:
            a8, a32 = by[f"adarankgrad8{suffix}"]["curve"][-1][1], by[f"adarankgrad32{suffix}"]["curve"][-1][1]
            text += f"- 8-bit / 32-bit AdaRankGrad{what} final perplexity: {a8 / a32:.4f} (target ≤ 1.02)\n"
    if ref and "adarankgrad32" in by:
        text += f"- AdaRankGrad (32-bit) / AdamW final perplexity: {by['adarankgrad32']['curve'][-1][1] / ref['curve'][-1][1]:.4f} (target ≤ 1.05)\n"
    for key in ("adarankgrad8", "adarankgrad8emb"):
        if "galore8bit" in by and key in by:
            a8, g8 = by[key], by["galore8bit"]
            text += (
                f"- {key} / 8-bit GaLore optimizer state: {a8['state_bytes'] / g8['state_bytes']:.3f} "
                f"(target ≤ 0.5); projected matrices only: {a8['lowrank_bytes'] / g8['lowrank_bytes']:.3f}\n"
            )
    tag = "llama_pretrain" + ("_smoke" if a.smoke else "")
    out = common.save(tag, device, text, a.out_dir)
    plot(results, out.with_suffix(".png"))
    print(text)
    print(f"saved {out} and {out.with_suffix('.png')}")
    (tmp / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
