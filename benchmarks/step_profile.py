"""Where a normal AdaRankGrad step spends its time, against fused AdamW, on BERT-base's shapes.

    python benchmarks/step_profile.py [--threads 2] [--profile]

Random gradients on every parameter (no forward/backward), refreshes switched off so every timed step is a
normal one; the minimum over ``--repeats`` steps (load on a shared machine only adds time). Prints the step
times of fused AdamW and of AdaRankGrad with ``subspace_source="moment"`` (default: one extra product ``GΩ`` per
matrix for the moment sketch) and ``"gradient"`` (no sketch), the ratios, and with ``--profile`` the top
operators of the default step (torch.profiler).

Two floors put the numbers in context of the host: one streaming read of every projected gradient
(``G.sum()``, memory bandwidth), and the projections and back-projections alone (``PᵀG`` or ``G P``, and
``W += P N``, at rank ``--rank``: one thin matrix product each per matrix, what any GaLore-style optimizer does
every step). Where the host's
BLAS runs thin products far below its bandwidth, the projection alone can cost more than fused AdamW.
"""

from __future__ import annotations

import argparse
import time

import torch


def _min_ms(opt: torch.optim.Optimizer, repeats: int) -> float:
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _floors(model: torch.nn.Module, rank: int, repeats: int) -> list[tuple[str, float]]:
    """Times of one read of every projected gradient, and of the rank-``rank`` projections alone."""
    from lightning_adarank import param_groups
    from lightning_adarank.optim.linalg import apply_update_, project, projection_side

    group = next(g for g in param_groups(model) if g["low_rank"])
    mats = [q for q in group["params"] if q.dim() == 2]
    bases = [torch.linalg.qr(torch.randn(min(q.shape), rank))[0] for q in mats]
    read = _timed(lambda: [q.grad.sum() for q in mats], repeats)
    proj = _timed(lambda: [project(q.grad, b, projection_side(q.shape)) for q, b in zip(mats, bases)], repeats)
    lows = [project(q.grad, b, projection_side(q.shape)) * 1e-12 for q, b in zip(mats, bases)]
    back = _timed(
        lambda: [
            apply_update_(q.data, b, n, projection_side(q.shape), decay=1.0, alpha=1.0)
            for q, b, n in zip(mats, bases, lows)
        ],
        repeats,
    )
    return [
        (f"floor: one read of the {len(mats)} projected gradients", read),
        (f"floor: their rank-{rank} projections alone", proj),
        (f"floor: their rank-{rank} back-projections alone (W += P N)", back),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    import transformers

    from lightning_adarank import AdaRankGrad, param_groups

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig())
    for q in model.parameters():
        q.grad = torch.randn_like(q) * 1e-3
    no_refresh = dict(min_gap=10**6, max_gap=10**6)
    rows = [("AdamW (fused)", _min_ms(torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True), a.repeats))]
    rows += _floors(model, a.rank, a.repeats)
    for src in ("moment", "gradient"):
        opt = AdaRankGrad(param_groups(model), lr=1e-5, max_rank=a.rank, subspace_source=src, **no_refresh)
        rows.append((f'AdaRankGrad r≤{a.rank}, subspace_source="{src}"', _min_ms(opt, a.repeats)))
    print(f"BERT-base shapes, {a.threads} CPU thread(s), torch {torch.__version__}, min of {a.repeats} steps\n")
    print("| optimizer | normal step ms | × fused AdamW |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / rows[0][1]:.2f}× |")
    if a.profile:
        opt = AdaRankGrad(param_groups(model), lr=1e-5, max_rank=a.rank, **no_refresh)
        for _ in range(3):
            opt.step()
        with torch.profiler.profile() as prof:
            for _ in range(5):
                opt.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
