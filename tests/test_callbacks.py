"""EffectiveRankMonitor / MemoryMonitor with a real Trainer and CSV logger; RankHistory; checkpoint resume."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from scripts.tiny import ADARANK, TinyModule, loader, make_data, make_net, trainer_kwargs

from lightning_adarank import (
    AdaRankGrad,
    AdaRankGradStrategy,
    EffectiveRankMonitor,
    MemoryMonitor,
    RankHistory,
    plot_rank_history,
    rank_metrics,
)
from lightning_adarank.optim.baselines import optimizer_state_bytes


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _series(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def test_trainer_logs_rank_and_memory_series_and_saves_plot(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    ranks = EffectiveRankMonitor(per_layer=True)
    trainer = L.Trainer(
        strategy=AdaRankGradStrategy(**ADARANK),
        max_steps=12,
        log_every_n_steps=2,
        callbacks=[ranks, MemoryMonitor()],
        **trainer_kwargs(logger=logger),
    )
    trainer.fit(TinyModule(), loader(make_data(), 16))
    rows = _rows(f"{logger.log_dir}/metrics.csv")
    opt = trainer.optimizers[0]
    avg = _series(rows, "adarank/avg_rank")
    assert sorted(avg) == [2, 4, 6, 8, 10, 12]
    # recompute the final figures independently from the optimizer's state tensors
    sizes = {"net.0.weight": (24, 16), "net.2.weight": (24, 24)}
    st = {n: opt.state[p] for n, p in trainer.lightning_module.named_parameters() if n in sizes}
    rank = {n: s["basis"].shape[1] for n, s in st.items()}
    numel = {n: a * b for n, (a, b) in sizes.items()}
    assert avg[12] == pytest.approx(sum(rank[n] * numel[n] for n in sizes) / sum(numel.values()))
    # the state counts the moment sketch too (GaLore has none)
    state = sum(
        s["basis"].numel() + s["exp_avg"].numel() + s["exp_avg_sq"].numel() + s["sketch"].numel() for s in st.values()
    )
    galore = sum(ADARANK["max_rank"] * (min(s) + 2 * max(s)) for s in sizes.values())
    assert _series(rows, "adarank/state_reduction_vs_galore")[12] == pytest.approx(1 - state / galore)
    for n in sizes:
        assert _series(rows, f"adarank/rank/{n}")[12] == rank[n]
    assert _series(rows, "optimizer/state_bytes")[12] == optimizer_state_bytes(opt)
    assert _series(rows, "memory/peak_bytes")[12] > 10 * 2**20  # a Python process with torch: tens of MB at least
    assert _series(rows, "adarank/refreshes")[12] > len(sizes)  # min_gap=2: subspaces were refreshed
    # the plot
    png = tmp_path / "run" / "version_0" / "adarank_ranks.png"
    assert ranks.plot_path == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ranks.history.steps == [2, 4, 6, 8, 10, 12] and ranks.history.layers == ["net.0.weight", "net.2.weight"]


def test_memory_monitor_with_plain_adamw_and_rank_monitor_warns(tmp_path):
    logger = CSVLogger(tmp_path, name="adamw")
    rank_mon = EffectiveRankMonitor(log_every_n_steps=1)
    with pytest.warns(UserWarning, match="no AdaRankGrad"):
        trainer = L.Trainer(
            max_steps=3, callbacks=[rank_mon, MemoryMonitor(log_every_n_steps=1)], **trainer_kwargs(logger=logger)
        )
        trainer.fit(TinyModule(), loader(make_data(), 16))
    rows = _rows(f"{logger.log_dir}/metrics.csv")
    assert "adarank/avg_rank" not in rows[0]
    # AdamW: two moments of every parameter in fp32 plus a 4-byte step counter per parameter
    params = list(trainer.lightning_module.parameters())
    assert _series(rows, "optimizer/state_bytes")[3] == sum(2 * 4 * p.numel() + 4 for p in params)
    assert len(rank_mon.history) == 0 and rank_mon.plot_path is None


def test_rank_metrics_and_history_roundtrip(tmp_path):
    net = make_net()
    opt = AdaRankGrad(net.named_parameters(), lr=1e-2, max_rank=6, energy=0.5)
    assert rank_metrics(opt) == {}
    x = torch.randn(32, 16)
    hist = RankHistory()
    for step in range(1, 4):
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        hist.record(step, opt)
    m = rank_metrics(opt, per_layer=True)
    r = opt.ranks()
    assert m["adarank/rank/0.weight"] == r["0.weight"]
    sketch = opt.state[net[2].weight]["sketch"].numel()  # the moment sketch counts; GaLore (rank 6) has none
    assert m["adarank/state_reduction_vs_galore/2.weight"] == pytest.approx(
        1 - (r["2.weight"] * (24 + 2 * 24) + sketch) / (6 * (24 + 2 * 24))
    )
    hist.record(2, opt)  # re-recording an earlier step (a resumed run) truncates the later rows
    assert hist.steps == [1, 2]
    state = hist.state_dict()
    torch.save(state, tmp_path / "h.pt")
    again = RankHistory()
    again.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    assert again.state_dict() == state and again.average() == hist.average()
    assert plot_rank_history(state, tmp_path / "sub" / "p.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no recorded step"):
        plot_rank_history(RankHistory(), tmp_path / "empty.png")


def _resume_trainer(tmp_path, steps, name, callbacks=(), **kw):
    return L.Trainer(
        strategy=AdaRankGradStrategy(**ADARANK),
        max_steps=steps,
        log_every_n_steps=2,
        callbacks=[EffectiveRankMonitor(), *callbacks],
        **trainer_kwargs(logger=CSVLogger(tmp_path, name=name), **kw),
    )


def test_interrupted_and_resumed_training_matches_uninterrupted(tmp_path):
    """Stop at step 10 (mid-epoch, a refresh pending), resume from the checkpoint to 24: same parameters,
    subspaces, ranks and rank history as one uninterrupted run. The batch of step k is a function of k
    (``by_step``) so the comparison does not depend on how Lightning repositions a non-stateful loader."""
    data = loader(make_data(), 16)  # 12 batches per epoch
    full = _resume_trainer(tmp_path, 24, "full")
    full_module = TinyModule(scheduler="cosine", by_step=True)
    full.fit(full_module, data)

    first = _resume_trainer(
        tmp_path,
        10,
        "part",
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)],
    )
    first.fit(TinyModule(scheduler="cosine", by_step=True), data)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=10.ckpt"
    # the whole Lightning checkpoint, our optimizer and callback state included, loads without pickle
    raw = torch.load(ckpt, weights_only=True)
    assert raw["optimizer_states"][0]["state"] and raw["global_step"] == 10
    (cb_state,) = [v for k, v in raw["callbacks"].items() if k.startswith("EffectiveRankMonitor")]
    assert cb_state["history"]["steps"] == [2, 4, 6, 8, 10]

    second = _resume_trainer(tmp_path, 24, "part")
    resumed_module = TinyModule(scheduler="cosine", by_step=True)
    second.fit(resumed_module, data, ckpt_path=ckpt)

    for (n, a), (_, b) in zip(full_module.named_parameters(), resumed_module.named_parameters()):
        assert torch.equal(a, b), n
    subspaces = full.optimizers[0].subspaces()
    assert second.optimizers[0].subspaces() == subspaces and all(s.refreshes > 2 for s in subspaces.values())
    h_full = next(c for c in full.callbacks if isinstance(c, EffectiveRankMonitor)).history
    h_res = next(c for c in second.callbacks if isinstance(c, EffectiveRankMonitor)).history
    assert h_res.steps == list(range(2, 25, 2)) and h_res.state_dict() == h_full.state_dict()
    assert second.lr_scheduler_configs[0].scheduler.last_epoch == 24
