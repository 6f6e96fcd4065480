"""Training from scratch: AdamW vs AdaRankGrad (defaults and each embedding rule) vs GaLore, several seeds.

    OMP_NUM_THREADS=1 python benchmarks/from_scratch.py             # every part, seeds 0,1,2 (hours on 2 CPU cores)
    python benchmarks/from_scratch.py --part bio                     # the cell-type task from scratch (~15 min)
    python benchmarks/from_scratch.py --part bio_pretrained          # the same, fine-tuned from a pre-trained checkpoint
    python benchmarks/from_scratch.py --part llama --seeds 0         # the small-LLaMA learning-rate sweep, one seed
    python benchmarks/from_scratch.py --report-only                  # the tables from the stored runs
    python benchmarks/from_scratch.py --smoke                        # seconds (tests)

**bio**: scanpy's pbmc68k_reduced (700 real PBMCs, 10 cell types in ``bulk_labels``) tokenized with Geneformer's
gc30M dictionaries through the package's own API (``bio.data.load_cells``, ``CellClassificationDataModule``),
a ``GeneformerClassifier`` built from the gf-6L-30M config shrunk to 2 layers / hidden 128 (the full 25,426-gene
embedding table) and trained **from random initialisation** (no pre-training) with every method at the same
lr, schedule (10 warm-up steps, linear decay), batches and epochs; rank 16. The seed sets the split, the
initial weights and the batch order. Reported: test macro-F1 per seed, mean, and the gap to AdamW.

**llama**: ``benchmarks/llama_pretrain.py``'s set-up (``llama_tiny`` on SST-2's sentences, BPE vocab 4096), each
run a fresh process. The fair comparison: ``adamw_matched`` is full-rank AdamW with the low-rank recipe's
per-group learning rates (dense parameters at lr, attention/MLP matrices at 0.25 lr), swept on the same lr grid
as AdaRankGrad and GaLore; the best lr of each (mean over the seeds run) is reported side by side.

Every finished run is kept in ``--runs`` (JSON, keyed by part, set-up, method, lr and seed): a later call with
the same set-up reuses it and runs only what is missing, so the full grid can be run in pieces.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

#: bio methods: name -> (optimizer, include_embeddings, target_modules); ``None`` = the module's default rule
BIO_METHODS = {
    "adamw": ("adamw", None, "all-linear"),
    "adarankgrad": ("adarankgrad", None, "all-linear"),
    "adarankgrad_emb_projected": ("adarankgrad", True, "all-linear"),
    "adarankgrad_emb_dense": ("adarankgrad", False, "all-linear"),
    "adarankgrad_encoder_only": ("adarankgrad", None, "encoder"),  # pooler and classifier head dense too
    "galore": ("galore", None, "all-linear"),
}
#: llama methods (``llama_pretrain.py`` children): AdamW at the matched per-group lrs, AdaRankGrad with dense
#: embeddings (the recipe's default) and projected, GaLore
LLAMA_METHODS = ("adamw_matched", "adarankgrad32", "adarankgrad32_emb", "galore")
#: variants at another matrix learning rate: ``adamw_matrix<s>`` = ``adamw_matched`` with the matrices at ``s`` x lr
#: (not the recipe's 0.25); ``adarankgrad_matrix<s>`` = AdaRankGrad with the package's defaults (``scale_mode="rms"``,
#: the from-scratch energy rule) at the same per-group learning rates (``llama_pretrain``'s ``adarankgrad_matched``)
MATRIX_SCALE_CHILDREN = {"adamw_matrix": "adamw_matched", "adarankgrad_matrix": "adarankgrad_matched"}


def _matrix_child(method: str) -> tuple[str, str] | None:
    """``(child, scale)`` of a ``<prefix><s>`` method, ``None`` for a plain one."""
    for prefix, child in MATRIX_SCALE_CHILDREN.items():
        if method.startswith(prefix):
            return child, method[len(prefix) :]
    return None


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--part",
        choices=["bio", "bio_pretrained", "llama", "all"],
        default="all",
        help="bio_pretrained: the same classifier fine-tuned from a masked-gene pre-trained checkpoint",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--bio-methods",
        default="adamw,adarankgrad,adarankgrad_emb_projected,galore",
        help=f"of {list(BIO_METHODS)} (adarankgrad_emb_dense is what the default resolves to from scratch)",
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--pretrain-epochs", type=int, default=3, help="bio_pretrained: masked-gene epochs")
    p.add_argument("--max-length", type=int, default=128, help="genes per cell (top-ranked)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="bio: every method's learning rate (AdamW-sized)")
    p.add_argument("--rank", type=int, default=16, help="bio: AdaRankGrad's max rank, GaLore's rank")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--llama-methods", default=",".join(LLAMA_METHODS))
    p.add_argument("--llama-lrs", default="3e-3,1e-2,3e-2", help="the one lr grid every llama method is swept on")
    p.add_argument("--llama-steps", type=int, default=200)
    p.add_argument("--llama-rank", type=int, default=48)
    p.add_argument(
        "--adarank",
        type=json.loads,
        default={},
        help="further settings of every AdaRankGrad method, as JSON (runs are cached and tabled apart per value)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dictionary-dir", default=str(common.REPO.parent / "shared" / "data" / "geneformer" / "gc30M"))
    p.add_argument("--runs", type=Path, default=common.RESULTS / "from_scratch_runs.json")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--report-only", action="store_true", help="write the tables from --runs; train nothing")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.epochs, a.pretrain_epochs, a.max_length, a.llama_steps, a.llama_lrs = "0", 1, 1, 32, 4, "1e-2"
        a.bio_methods, a.llama_methods = "adamw,adarankgrad", "adamw_matched,adarankgrad32"
        if a.runs == common.RESULTS / "from_scratch_runs.json":
            a.runs = Path(tempfile.mkdtemp(prefix="from_scratch_")) / "runs.json"
    a.seed_list = [int(s) for s in a.seeds.split(",") if s != ""]
    return a


# ----------------------------------------------------------------------------- run cache
def load_runs(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_run(path: Path, run: dict) -> None:
    runs = [r for r in load_runs(path) if r["key"] != run["key"]] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1))


def find(runs: list[dict], key: str) -> dict | None:
    return next((r for r in runs if r["key"] == key), None)


# ----------------------------------------------------------------------------- bio
def _variant(a) -> str:
    """The set-up key's suffix for ``--adarank`` settings (empty for the package defaults)."""
    return f" adarank{json.dumps(a.adarank, sort_keys=True)}" if a.adarank else ""


def bio_setup(a, pretrained: bool = False) -> str:
    return (
        f"bio e{a.epochs} L{a.max_length} b{a.batch_size} lr{a.lr:g} r{a.rank} t{a.test_fraction:g}"
        + (f" pre{a.pretrain_epochs}" if pretrained else "")
        + _variant(a)
    )


def pretrain_bio(a, cells, seed: int) -> str:
    """Masked-gene pre-training with AdamW on every cell (no labels), as ``make demo`` does; the checkpoint folder."""
    import lightning as L

    from bio import GeneformerPretrainer, MaskedGeneDataModule
    from bio.demo import default_config_path, small_config_overrides

    out = Path(tempfile.mkdtemp(prefix="from_scratch_pretrained_"))
    L.seed_everything(seed, verbose=False)
    dm = MaskedGeneDataModule.from_dataset(
        cells,
        dictionary_dir=a.dictionary_dir,
        batch_size=a.batch_size,
        max_length=a.max_length,
        seed=seed,
        val_fraction=0.0,
    )
    pre = GeneformerPretrainer(
        model_config=str(default_config_path(Path(a.dictionary_dir))),
        optimizer="adamw",
        config_overrides=small_config_overrides(128, 2, a.max_length),
        lr=1e-3,
        warmup_steps=5,
        save_dir=str(out),
        rank_monitor=False,
        memory_monitor=False,
    )
    L.Trainer(
        max_epochs=a.pretrain_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    ).fit(pre, datamodule=dm)
    return str(out)


def run_bio(a, cells, method: str, seed: int, pretrained: str | None = None) -> dict:
    """Train one classifier (from scratch, or fine-tune ``pretrained``); its test macro-F1 and what the embedding
    rule chose."""
    import lightning as L

    from bio import CellClassificationDataModule, GeneformerClassifier
    from bio.demo import default_config_path, small_config_overrides
    from lightning_adarank import optimizer_state_bytes

    optimizer, include_embeddings, target_modules = BIO_METHODS[method]
    L.seed_everything(seed, verbose=False)
    dm = CellClassificationDataModule.from_dataset(
        cells,
        label_column="bulk_labels",
        group_column=None,
        batch_size=a.batch_size,
        max_length=a.max_length,
        seed=seed,
        test_fraction=a.test_fraction,
    )
    arch = (
        dict(pretrained=pretrained)
        if pretrained
        else dict(
            model_config=str(default_config_path(Path(a.dictionary_dir))),
            config_overrides=small_config_overrides(128, 2, a.max_length),
        )
    )
    model = GeneformerClassifier(
        dm.label_names,
        **arch,
        optimizer=optimizer,
        rank=a.rank,
        lr=a.lr,
        warmup_steps=10,
        include_embeddings=include_embeddings,
        target_modules=target_modules,
        adarank=a.adarank or None,  # used by the AdaRankGrad methods only
        rank_monitor=False,
        memory_monitor=False,
    )
    trainer = L.Trainer(
        max_epochs=a.epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    train_loss = trainer.callback_metrics.get("train/loss_epoch")
    ranks = list(trainer.optimizers[0].ranks().values()) if hasattr(trainer.optimizers[0], "ranks") else []
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    opt = trainer.optimizers[0]
    emb = model.model.bert.embeddings.word_embeddings.weight
    projected = any(g.get("low_rank") and any(p is emb for p in g["params"]) for g in opt.param_groups) or (
        optimizer == "galore" and any("rank" in g and any(p is emb for p in g["params"]) for g in opt.param_groups)
    )
    return {
        "f1": float(test["test/f1_macro"]),
        "acc": float(test["test/accuracy"]),
        "train_loss": None if train_loss is None else float(train_loss),  # the last epoch's mean
        "test_loss": float(test["test/loss"]) if "test/loss" in test else None,
        "mean_rank": sum(ranks) / len(ranks) if ranks else None,  # AdaRankGrad's, at the end
        "seconds": seconds,
        "state_bytes": optimizer_state_bytes(opt),
        "emb_projected": bool(projected),
        "test_cells": len(dm.splits["test"]),
        "majority_f1": dm.majority_baseline("test")["macro_f1"],
    }


def bio_part(a, pretrained: bool = False) -> str:
    import torch

    from bio.data import BUILTIN_PBMC, load_cells

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not Path(a.dictionary_dir).is_dir():
        raise SystemExit(f"Geneformer dictionaries not found at {a.dictionary_dir} (--dictionary-dir)")
    methods = [m for m in a.bio_methods.split(",") if m]
    bad = set(methods) - set(BIO_METHODS)
    if bad:
        raise SystemExit(f"unknown bio methods {sorted(bad)}; choose from {list(BIO_METHODS)}")
    setup = bio_setup(a, pretrained)
    cells = None
    for seed in a.seed_list:
        checkpoint = None
        for method in methods:
            key = f"{setup}|{method}|{seed}"
            if a.report_only or find(load_runs(a.runs), key):
                continue
            if cells is None:
                cells = load_cells(
                    h5ad=BUILTIN_PBMC, dictionary_dir=a.dictionary_dir, obs_columns=["bulk_labels"], progress=False
                )
            if pretrained and checkpoint is None:
                checkpoint = pretrain_bio(a, cells, seed)
            r = run_bio(a, cells, method, seed, checkpoint)
            save_run(a.runs, {"key": key, "part": "bio", "setup": setup, "method": method, "seed": seed, **r})
            print(
                f"bio {method} seed {seed}: macro-F1 {r['f1']:.3f} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True
            )
    return bio_report(a, setup, methods, pretrained)


def _union(first: list, more) -> list:
    """``first`` in order, then the other values of ``more`` (sorted) not in it."""
    return list(first) + sorted(set(more) - set(first))


def bio_report(a, setup: str, methods: list[str], pretrained: bool = False) -> str:
    """The table over every cached run of this set-up (the methods and seeds of this call first)."""
    runs = [r for r in load_runs(a.runs) if r.get("part") == "bio" and r["setup"] == setup]
    if not runs:
        return f"### bio ({setup}): no runs yet\n"
    present = {r["method"] for r in runs}
    methods = _union([m for m in methods if m in present], present)
    seeds = _union([s for s in a.seed_list if any(r["seed"] == s for r in runs)], (r["seed"] for r in runs))
    by = {(r["method"], r["seed"]): r for r in runs}
    means = {m: statistics.mean(100 * by[m, s]["f1"] for s in seeds if (m, s) in by) for m in methods}
    ref = means.get("adamw")
    rows = []
    for m in methods:
        got = [by[m, s] for s in seeds if (m, s) in by]
        rows.append(
            [
                m,
                BIO_METHODS[m][0]
                + ("" if BIO_METHODS[m][2] == "all-linear" else f", target_modules={BIO_METHODS[m][2]!r}"),
                {None: "default (None)", True: "True", False: "False"}[BIO_METHODS[m][1]],
                "projected" if got[0]["emb_projected"] else "dense",
                *[f"{100 * by[m, s]['f1']:.1f}" if (m, s) in by else "—" for s in seeds],
                f"**{means[m]:.1f}** ({len(got)})",
                "—" if ref is None or m == "adamw" else f"{means[m] - ref:+.1f}",
                f"{got[0]['state_bytes'] / 2**20:.2f}",
                f"{statistics.mean(g['seconds'] for g in got):.0f}",
            ]
        )
    g0 = runs[0]
    start = (
        f"fine-tuned from a checkpoint pre-trained by masked-gene modeling on every cell ({a.pretrain_epochs} "
        f"epochs, AdamW lr 0.001, no labels; one per seed)"
        if pretrained
        else "random init"
    )
    text = (
        f"### Cell-type classifier {'fine-tuned' if pretrained else 'from scratch'} (pbmc68k_reduced, bulk_labels)\n\n"
        f"- set-up: gf-6L-30M config shrunk to 2 layers / hidden 128 (25,426-gene embedding table), {start}, "
        f"top {a.max_length} genes, {a.epochs} epochs, batch {a.batch_size}, lr {a.lr:g} for every method "
        f"(10 warm-up steps, linear decay), rank {a.rank}; stratified split with test fraction {a.test_fraction:g} "
        f"({g0['test_cells']} test cells; majority-class macro-F1 {100 * g0['majority_f1']:.1f} on seed "
        f"{g0['seed']}); the seed sets split, init and batch order\n\n"
    )
    text += common.markdown_table(
        [
            "method",
            "optimizer",
            "include_embeddings",
            "embedding table",
            *[f"seed {s}" for s in seeds],
            "mean macro-F1 (seeds)",
            "vs AdamW (points)",
            "state MiB",
            "fit s",
        ],
        rows,
    )
    return text


# ----------------------------------------------------------------------------- llama
def llama_part(a) -> str:
    import llama_pretrain

    methods = [m for m in a.llama_methods.split(",") if m]
    bad = (
        {m for m in methods if _matrix_child(m) is None}
        - set(llama_pretrain.METHODS)
        - set(llama_pretrain.EXTRA_METHODS)
    )
    if bad:
        raise SystemExit(f"unknown llama methods {sorted(bad)}")
    lrs = [float(x) for x in a.llama_lrs.split(",") if x]
    base = ["--steps", str(a.llama_steps), "--rank", str(a.llama_rank), "--threads", str(a.threads)]
    if a.smoke:
        base = ["--smoke", *base]
    la = llama_pretrain.parse(base)
    setup = f"llama {la.model} v{la.vocab} b{la.block}x{la.batch} s{la.steps} r{la.rank}" + _variant(a)
    data = None
    for seed in a.seed_list:
        for lr in lrs:
            for method in methods:
                key = f"{setup}|{method}|{lr:g}|{seed}"
                if a.report_only or find(load_runs(a.runs), key):
                    continue
                if data is None:
                    data = Path(tempfile.mkdtemp(prefix="from_scratch_llama_")) / "blocks.pt"
                    llama_pretrain.prepare_data(la, data)
                child = [
                    "benchmarks/llama_pretrain.py",
                    "--steps",
                    str(la.steps),
                    "--eval-every",
                    str(la.steps),
                    "--batch",
                    str(la.batch),
                    "--block",
                    str(la.block),
                    "--rank",
                    str(la.rank),
                    "--threads",
                    str(a.threads),
                    "--seed",
                    str(seed),
                    "--lr-lowrank",
                    f"{lr:g}",
                    "--lr-adam",
                    f"{lr:g}",
                    "--data",
                    str(data),
                    *(["--adarank", json.dumps(a.adarank)] if a.adarank else []),
                ]
                if (matrix := _matrix_child(method)) is not None:
                    child += ["--child", matrix[0], "--matched-scale", matrix[1]]
                else:
                    child += ["--child", method]
                r = common.run_child(child, timeout=7200)
                ppl = r["curve"][-1][1]
                save_run(
                    a.runs,
                    {
                        "key": key,
                        "part": "llama",
                        "setup": setup,
                        "method": method,
                        "lr": lr,
                        "seed": seed,
                        "ppl": ppl,
                        "seconds": r["seconds"],
                        "state_bytes": r["state_bytes"],
                        "mean_rank": r.get("avg_rank"),
                    },
                )
                print(
                    f"llama {method} lr {lr:g} seed {seed}: ppl {ppl:.1f} ({r['seconds']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    return llama_report(a, la, setup, methods, lrs)


def llama_report(a, la, setup: str, methods: list[str], lrs: list[float]) -> str:
    """The lr grid (mean over the seeds run, their number in brackets) and the best lr of each method, over every
    cached run of this set-up."""
    runs = [r for r in load_runs(a.runs) if r.get("part") == "llama" and r["setup"] == setup]
    if not runs:
        return f"### llama ({setup}): no runs yet\n"
    present = {r["method"] for r in runs}
    methods = _union([m for m in methods if m in present], present)
    lrs = sorted({r["lr"] for r in runs})
    seeds = _union([s for s in a.seed_list if any(r["seed"] == s for r in runs)], (r["seed"] for r in runs))
    by = {(r["method"], r["lr"], r["seed"]): r["ppl"] for r in runs}
    grid_rows, best = [], {}
    for m in methods:
        cells = []
        for lr in lrs:
            got = [by[m, lr, s] for s in seeds if (m, lr, s) in by]
            if not got:
                cells.append("—")
                continue
            mean = statistics.mean(got)
            cells.append(f"{mean:.1f} ({len(got)})")
            if m not in best or mean < best[m][1]:
                best[m] = (lr, mean)
        grid_rows.append([m, *cells])
    ref = best.get("adamw_matched")
    full = [best[m][1] for m in best if m.startswith("adamw")]  # every full-rank AdamW variant
    best_rows = [
        [
            m,
            f"{lr:g}",
            *[f"{by[m, lr, s]:.1f}" if (m, lr, s) in by else "—" for s in seeds],
            f"**{mean:.1f}**",
            "—" if ref is None else f"{mean / ref[1]:.3f}",
            "—" if not full else f"{mean / min(full):.3f}",
        ]
        for m, (lr, mean) in best.items()
    ]
    text = (
        f"### Small LLaMA from scratch, fair comparison\n\n"
        f"- set-up: `{la.model}` on SST-2 sentences (BPE vocab {la.vocab}), blocks of {la.block}, batch {la.batch}, "
        f"{la.steps} steps, warm-up 10 %, cosine to 10 %; rank {la.rank}; scale 0.25 for the projected matrices "
        f"(AdaRankGrad `scale_mode='galore'`, GaLore, gap {la.gap}); `adamw_matched` = full AdamW with dense "
        f"parameters at lr and attention/MLP matrices at 0.25 lr; every method on the same lr grid\n\n"
        f"Final validation perplexity by peak lr, mean over the seeds run (how many in brackets):\n\n"
    )
    text += common.markdown_table(["method", *[f"lr {x:g}" for x in lrs]], grid_rows)
    text += "\nBest lr of each (lowest mean), per seed:\n\n" + common.markdown_table(
        [
            "method",
            "best lr",
            *[f"seed {s}" for s in seeds],
            "mean ppl",
            "ppl / AdamW (matched)",
            "ppl / best AdamW variant",
        ],
        best_rows,
    )
    text += (
        "\n`adamw_matrix<s>`: `adamw_matched` with the attention/MLP matrices at s x lr instead of the recipe's "
        "0.25 x lr (AdaRankGrad's projected update in `scale_mode='galore'` is smaller than its nominal "
        "0.25 lr: the back-projected Adam step of a rank-r subspace has about sqrt(r/m) of full Adam's RMS). "
        "`adarankgrad_matrix<s>`: AdaRankGrad with the package's defaults (`scale_mode='rms'`, whose update RMS is "
        "AdamW's, and the from-scratch energy rule: every projected matrix at max_rank) at exactly "
        "`adamw_matrix<s>`'s per-group learning rates.\n"
    )
    return text


def main(argv=None) -> str:
    a = parse(argv)
    import torch

    device = torch.device("cpu")
    t0 = time.time()
    parts = []
    if a.part in ("bio", "all"):
        parts.append(bio_part(a))
    if a.part in ("bio_pretrained", "all"):
        parts.append(bio_part(a, pretrained=True))
    if a.part in ("llama", "all"):
        parts.append(llama_part(a))
    cmd = "python benchmarks/from_scratch.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"## Training from scratch\n\n- command: `{cmd.strip()}`\n- machine: {common.machine(device)}; "
        f"{a.threads} torch thread(s); this call {(time.time() - t0) / 60:.1f} min (runs reused from "
        f"`{a.runs.name}` are not re-timed)\n\n" + "\n".join(parts)
    )
    tag = "from_scratch" + ("_smoke" if a.smoke else "") + ("" if a.part == "all" else f"_{a.part}")
    out = common.save(tag, device, text, a.out_dir if a.out_dir else (a.runs.parent if a.smoke else None))
    print(text)
    print(f"saved {out}")
    return text


if __name__ == "__main__":
    main()
