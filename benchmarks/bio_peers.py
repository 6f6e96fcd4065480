"""AdaRankGrad vs GaLore vs LoRA vs AdamW on the same Geneformer cell-type task (issue 5).

Task: scanpy's bundled pbmc68k_reduced (700 real PBMCs, 10 cell types in ``bulk_labels``), tokenized with
Geneformer's gc30M dictionaries (top ``--max-length`` genes per cell), stratified 80/10/10 split. Model: the
gf-6L-30M-i2048 config shrunk to 2 layers / hidden 128 (full 25,426-gene embedding table). A shared starting
point is pre-trained once by masked-gene modeling with AdamW, then each optimizer fine-tunes it with the same
seed, batches, epochs and schedule (linear warmup/decay). AdaRankGrad and GaLore project every linear layer
and the embedding table (max rank / rank 16); LoRA puts rank-16 adapters on every linear layer (classifier
fully trained); AdamW trains everything.

Reported: validation macro-F1 per epoch, test macro-F1 / accuracy, fit wall time, optimizer state bytes
(``lightning_adarank.optimizer_state_bytes`` after fit) and the ratio to AdamW, and the average effective rank
(AdaRankGrad: parameter-weighted mean of its adaptive ranks over the logged steps; GaLore / LoRA: their fixed
rank; AdamW: full rank).

    python benchmarks/bio_peers.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/bio_peers.py --epochs 10 --max-length 256

Needs ../shared/data/geneformer (dictionaries and configs; not part of the package).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_LR = {"adarankgrad": 1e-2, "galore": 1e-2, "lora": 5e-3, "adamw": 1e-3}


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 epochs, max length 64 (the README table)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--optimizers", default="adarankgrad,galore,lora,adamw")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR", help="override a learning rate")
    p.add_argument("--dictionary-dir", default=str(REPO.parent / "shared" / "data" / "geneformer" / "gc30M"))
    a = p.parse_args(argv)
    if a.quick:
        a.epochs, a.max_length, a.pretrain_epochs = 4, 64, 2
    lrs = dict(DEFAULT_LR)
    for item in a.lr:
        name, value = item.split("=")
        lrs[name] = float(value)

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from bio import CellClassificationDataModule, GeneformerClassifier, GeneformerPretrainer, MaskedGeneDataModule
    from bio.data import BUILTIN_PBMC, load_cells
    from bio.demo import average_logged, default_config_path, small_config_overrides
    from lightning_adarank import optimizer_state_bytes

    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dictionary_dir = Path(a.dictionary_dir)
    if not dictionary_dir.is_dir():
        raise SystemExit(f"Geneformer dictionaries not found at {dictionary_dir} (--dictionary-dir)")
    config = default_config_path(dictionary_dir)
    overrides = small_config_overrides(128, 2, a.max_length)
    cells = load_cells(
        h5ad=BUILTIN_PBMC, dictionary_dir=str(dictionary_dir), obs_columns=["bulk_labels"], progress=False
    )
    work = Path(tempfile.mkdtemp(prefix="bio_peers_"))
    kw = dict(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )

    L.seed_everything(a.seed, verbose=False)
    mlm = MaskedGeneDataModule.from_dataset(
        cells,
        dictionary_dir=str(dictionary_dir),
        batch_size=a.batch_size,
        max_length=a.max_length,
        seed=a.seed,
        val_fraction=0.0,
    )
    pre = GeneformerPretrainer(
        model_config=str(config),
        config_overrides=overrides,
        optimizer="adamw",
        lr=1e-3,
        warmup_steps=5,
        save_dir=str(work / "pretrained"),
        memory_monitor=False,
    )
    L.Trainer(max_epochs=a.pretrain_epochs, logger=False, limit_val_batches=0, **kw).fit(pre, datamodule=mlm)

    rows, baseline = [], None
    for name in a.optimizers.split(","):
        L.seed_everything(a.seed, verbose=False)
        dm = CellClassificationDataModule.from_dataset(
            cells,
            label_column="bulk_labels",
            group_column=None,
            batch_size=a.batch_size,
            max_length=a.max_length,
            seed=a.seed,
        )
        model = GeneformerClassifier(
            dm.label_names,
            pretrained=str(work / "pretrained"),
            optimizer=name,
            rank=a.rank,
            lr=lrs[name],
            warmup_steps=10,
            memory_monitor=False,
        )
        logger = CSVLogger(work, name=name)
        trainer = L.Trainer(max_epochs=a.epochs, logger=logger, **kw)
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        wall = time.perf_counter() - t0
        test = trainer.test(model, datamodule=dm, verbose=False)[0]
        baseline = dm.majority_baseline("test")
        trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
        if name == "adarankgrad":
            eff = average_logged(Path(logger.log_dir) / "metrics.csv", "adarank/avg_rank")
            eff_s = f"{eff:.2f} (adaptive, max {a.rank})" if eff is not None else "n/a"
        elif name in ("galore", "lora"):
            eff_s = f"{a.rank} (fixed)"
        else:
            eff_s = "full"
        rows.append(
            dict(
                name=name,
                lr=lrs[name],
                f1=[h["val/f1_macro"] for h in model.history],
                test_f1=test["test/f1_macro"],
                test_acc=test["test/accuracy"],
                wall=wall,
                state=optimizer_state_bytes(trainer.optimizers[0]),
                eff=eff_s,
                trainable=trainable,
            )
        )
        print(f"{name}: test macro-F1 {test['test/f1_macro']:.3f}, {wall:.1f} s", file=sys.stderr, flush=True)

    adamw_state = next((r["state"] for r in rows if r["name"] == "adamw"), None)
    cmd = (
        "python benchmarks/bio_peers.py"
        + (" --quick" if a.quick else "")
        + "".join(f" {x}" for x in (argv or sys.argv[1:]) if x != "--quick")
    )
    lines = [
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}  ",
        f"Task: pbmc68k_reduced bulk_labels (10 classes; train/val/test {len(dm.splits['train'])}/{len(dm.splits['val'])}/"
        f"{len(dm.splits['test'])} cells), top {a.max_length} genes, 2-layer hidden-128 Geneformer, AdamW MLM pre-training "
        f"{a.pretrain_epochs} epochs, fine-tuning {a.epochs} epochs, batch {a.batch_size}, seed {a.seed}  ",
        f"Majority-class baseline on test: macro-F1 {baseline['macro_f1']:.3f}, accuracy {baseline['accuracy']:.3f}",
        "",
        "| optimizer | lr | val macro-F1 per epoch | test macro-F1 | test acc | fit wall (s) | optimizer state | vs AdamW | avg effective rank | trainable params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['state'] / adamw_state:.2f}x" if adamw_state else "n/a"
        per_epoch = " / ".join(f"{v:.3f}" for v in r["f1"])
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {per_epoch} | {r['test_f1']:.3f} | {r['test_acc']:.3f} | "
            f"{r['wall']:.1f} | {r['state'] / 2**20:.2f} MiB | {ratio} | {r['eff']} | {r['trainable']:,} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
