"""AdaRankGradCallback with real Trainers: the swap (groups, settings, schedules), checkpoint resume into the
swapped optimizer, layer-wise mode, refusals (sharding strategies, bad settings) and the nothing-projected
warning."""

from __future__ import annotations

import pickle
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from scripts.tiny import ADARANK, TinyModule, loader, make_data, trainer_kwargs

from lightning_adarank import (
    AdaRankGrad,
    AdaRankGradCallback,
    AdaRankGradConfig,
    AdaRankGradStrategy,
    EffectiveRankMonitor,
)


def _fit(module, callbacks, steps=6, data=None, ckpt_path=None, **kw):
    trainer = L.Trainer(max_steps=steps, callbacks=list(callbacks), **trainer_kwargs(**kw))
    trainer.fit(module, data or loader(make_data(), 16), ckpt_path=ckpt_path)
    return trainer


class _Lrs(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


@pytest.mark.parametrize("scheduler", ["cosine", "hf_linear_warmup"])
def test_callback_swaps_adamw_and_the_schedule_follows(scheduler):
    """The callback and the strategy give the same optimizer and run (one swap implementation); the learning
    rates follow the module's schedule exactly as under its own AdamW."""
    runs = {}
    for name, kw in (
        ("adamw", {}),
        ("callback", {"callbacks": [AdaRankGradCallback(**ADARANK)]}),
        ("strategy", {"strategy": AdaRankGradStrategy(**ADARANK)}),
    ):
        lrs = _Lrs()
        module = TinyModule(scheduler=scheduler)
        trainer = _fit(module, [*kw.get("callbacks", []), lrs], steps=8, strategy=kw.get("strategy", "auto"))
        runs[name] = (module, trainer, lrs.lrs)
    _, trainer, lrs = runs["callback"]
    opt = trainer.optimizers[0]
    assert type(opt) is AdaRankGrad and trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["net.0.weight"]["weight_decay"] == 0.1 and by_name["net.0.bias"]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.85, 0.98) and g["eps"] == 1e-7 for g in opt.param_groups)
    assert all(g["max_rank"] == ADARANK["max_rank"] and g["energy"] == ADARANK["energy"] for g in opt.param_groups)
    adamw_lrs = [row[0] for row in runs["adamw"][2]]
    assert len(set(adamw_lrs)) > 3 and [row[0] for row in lrs] == pytest.approx(adamw_lrs, rel=1e-12)
    cb_module, st_module = runs["callback"][0], runs["strategy"][0]
    for (n, a), b in zip(cb_module.named_parameters(), st_module.parameters()):
        assert torch.equal(a, b), n
    assert opt.ranks() == runs["strategy"][1].optimizers[0].ranks()


def test_callback_lr_override_keeps_the_schedule_factor():
    lrs = _Lrs()
    _fit(TinyModule(scheduler="cosine"), [AdaRankGradCallback(lr=2e-3, weight_decay=0.0), lrs], steps=4)
    cosine = [2e-3 * (1 + torch.cos(torch.tensor(torch.pi * k / 8)).item()) / 2 for k in range(4)]
    assert [row[0] for row in lrs.lrs] == pytest.approx(cosine, rel=1e-6)


class _StateAtStart(Callback):
    """The optimizer state right after Lightning restored the checkpoint (on_train_start)."""

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.type = type(opt)
        self.steps = sorted({int(st["step"]) for st in opt.state.values() if "step" in st})
        self.ranks = opt.ranks()
        self.last_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def test_callback_resume_restores_the_swapped_optimizer_and_schedule(tmp_path):
    data = loader(make_data(), 16)
    full_module = TinyModule(scheduler="cosine", by_step=True)
    full = _fit(full_module, [AdaRankGradCallback(**ADARANK)], steps=10, data=data)

    _fit(
        TinyModule(scheduler="cosine", by_step=True),
        [
            AdaRankGradCallback(**ADARANK),
            ModelCheckpoint(tmp_path, every_n_train_steps=5, save_top_k=-1),
        ],
        steps=5,
        data=data,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    ckpt = tmp_path / "epoch=0-step=5.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert any("basis" in st for st in saved["optimizer_states"][0]["state"].values())  # AdaRankGrad's state

    at_start = _StateAtStart()
    resumed_module = TinyModule(scheduler="cosine", by_step=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-resumable loader
        resumed = _fit(resumed_module, [AdaRankGradCallback(**ADARANK), at_start], steps=10, data=data, ckpt_path=ckpt)
    assert at_start.type is AdaRankGrad and at_start.steps == [5] and at_start.last_epoch == 5
    assert at_start.ranks and all(1 <= r <= ADARANK["max_rank"] for r in at_start.ranks.values())
    for (n, a), b in zip(full_module.named_parameters(), resumed_module.parameters()):
        assert torch.equal(a, b), n  # bit-identical to the uninterrupted run
    assert resumed.optimizers[0].subspaces() == full.optimizers[0].subspaces()
    sched = resumed.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 10 and sched.get_last_lr() == full.lr_scheduler_configs[0].scheduler.get_last_lr()


def test_callback_layerwise_equals_strategy_layerwise():
    ref = TinyModule(scheduler="hf_linear_warmup")
    _fit(ref, [], steps=6, strategy=AdaRankGradStrategy(layerwise=True), accumulate_grad_batches=2)
    module = TinyModule(scheduler="hf_linear_warmup")
    cb = AdaRankGradCallback(layerwise=True)
    _fit(module, [cb], steps=6, accumulate_grad_batches=2)
    assert cb._swap.updater is None  # detached at teardown
    for (n, a), b in zip(ref.named_parameters(), module.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="gradient_clip_val"):
        _fit(TinyModule(), [AdaRankGradCallback(layerwise=True)], steps=1, gradient_clip_val=1.0)


def test_callback_checks_settings_when_built_and_refuses_sharding():
    with pytest.raises(ValueError, match="min_gap"):
        AdaRankGradCallback(min_gap=0)
    with pytest.raises(TypeError, match="unknown AdaRankGrad setting"):
        AdaRankGradCallback(rank=4)
    cb = AdaRankGradCallback.from_config(AdaRankGradConfig(max_rank=3, lr=5e-4))
    assert cb.config.max_rank == 3 and cb._swap.overrides["lr"] == 5e-4
    cb2 = pickle.loads(pickle.dumps(cb))  # ddp_spawn pickles the Trainer's callbacks
    assert cb2.config == cb.config and cb2._swap.overrides == cb._swap.overrides
    # a Trainer cannot be built with FSDP1 on CPU: the check reads only trainer.strategy, a real FSDPStrategy;
    # ModelParallelStrategy (FSDP2) is supported (tests/test_fsdp_lightning.py)
    with pytest.raises(ValueError, match="FSDPStrategy flattens the parameters.*ModelParallelStrategy with FSDP2"):
        cb.setup(SimpleNamespace(strategy=FSDPStrategy()), TinyModule(), "fit")


def test_nothing_projected_warns_once_and_fit_ends_cleanly(tmp_path):
    """max_rank above every matrix's smaller side: a warning naming the matrices, then plain AdamW; the rank
    monitor writes no plot instead of crashing at on_fit_end."""
    monitor = EffectiveRankMonitor()
    with pytest.warns(
        UserWarning, match=r"projects no matrix.*net\.0\.weight \(24, 16\): min\(shape\)=16 <= max_rank=32"
    ) as rec:
        trainer = _fit(
            TinyModule(),
            [AdaRankGradCallback(max_rank=32), monitor],
            steps=4,
            log_every_n_steps=1,
            default_root_dir=tmp_path,
        )
    assert sum("projects no matrix" in str(w.message) for w in rec) == 1
    assert type(trainer.optimizers[0]) is AdaRankGrad and not trainer.optimizers[0].subspaces()
    assert monitor.plot_path is None and not monitor.history.layers


def test_monitor_without_adarank_says_how_to_enable_it():
    with pytest.warns(UserWarning, match="add lightning_adarank.AdaRankGradCallback"):
        _fit(TinyModule(), [EffectiveRankMonitor()], steps=2, log_every_n_steps=1)
