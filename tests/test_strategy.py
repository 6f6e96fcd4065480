"""AdaRankGradStrategy with a real Trainer: optimizer swap, settings, schedulers, registration, BERT."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from scripts.tiny import ADARANK, TinyModule, loader, make_data, trainer_kwargs

from lightning_adarank import AdaRankGrad, AdaRankGradDDPStrategy, AdaRankGradStrategy
from lightning_adarank.integrations.strategy import AdaRankGradStrategyMixin


def _fit(module, strategy, steps=6, callbacks=(), **kw):
    trainer = L.Trainer(strategy=strategy, max_steps=steps, callbacks=list(callbacks), **trainer_kwargs(**kw))
    trainer.fit(module, loader(make_data(), 16))
    return trainer


def test_strategy_swaps_in_adarank_with_module_settings():
    module = TinyModule()
    trainer = _fit(module, AdaRankGradStrategy(max_rank=6, min_gap=2), steps=4)
    opt = trainer.optimizers[0]
    assert type(opt) is AdaRankGrad
    # the module's decay / no-decay split and its Adam settings survive, group by group
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["net.0.weight"]["weight_decay"] == 0.1 and by_name["net.0.bias"]["weight_decay"] == 0.0
    assert by_name["net.0.weight"]["low_rank"] and not by_name["net.0.bias"]["low_rank"]
    assert all(g["betas"] == (0.85, 0.98) and g["eps"] == 1e-7 and g["lr"] == 1e-2 for g in opt.param_groups)
    assert all(g["max_rank"] == 6 for g in opt.param_groups)
    # every trainable parameter exactly once; the two 24-wide matrices are projected (the 4x24 head is not)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters()) and len(set(ids)) == len(ids)
    assert set(opt.ranks()) == {"net.0.weight", "net.2.weight"}
    assert all(1 <= r <= 6 for r in opt.ranks().values())


def test_strategy_settings_override_module_settings():
    trainer = _fit(TinyModule(), AdaRankGradStrategy(lr=3e-3, weight_decay=0.0, betas=(0.9, 0.99), max_rank=4), steps=2)
    opt = trainer.optimizers[0]
    assert {g["lr"] for g in opt.param_groups} == {3e-3}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}
    assert {g["betas"] for g in opt.param_groups} == {(0.9, 0.99)}
    assert max(opt.ranks().values()) <= 4


def test_target_modules_regex_and_errors():
    trainer = _fit(TinyModule(), AdaRankGradStrategy(target_modules=r"net\.2", max_rank=4), steps=2)
    assert set(trainer.optimizers[0].ranks()) == {"net.2.weight"}
    with pytest.raises(ValueError, match="selects no weight"):
        _fit(TinyModule(), AdaRankGradStrategy(target_modules=["nothing_here"]), steps=1)
    with pytest.raises(TypeError, match="unknown setting"):
        AdaRankGradStrategy(rank=4)
    with pytest.raises(ValueError, match="max_rank=0 must be >= min_rank"):  # checked when built, not at fit
        AdaRankGradStrategy(max_rank=0)


class _LrRecorder(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        self.lrs.append((lr_of[id(pl_module.net[0].weight)], lr_of[id(pl_module.net[0].bias)]))


@pytest.mark.parametrize("scheduler", ["hf_linear_warmup", "cosine", "sequential"])
def test_lr_scheduler_keeps_working(scheduler):
    """The learning rates under AdaRankGradStrategy follow the module's schedule exactly as with its own AdamW."""
    runs = {}
    for name, strategy in (("adamw", "auto"), ("adarank", AdaRankGradStrategy(**ADARANK))):
        rec = _LrRecorder()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _fit(TinyModule(scheduler=scheduler), strategy, steps=10, callbacks=[rec])
        assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], name
        runs[name] = rec.lrs
        sched = trainer.lr_scheduler_configs[0].scheduler
        assert sched.optimizer is trainer.optimizers[0]
    assert type(trainer.optimizers[0]) is AdaRankGrad
    assert len(set(runs["adamw"])) > 3  # the schedule does move
    assert [x for pair in runs["adarank"] for x in pair] == pytest.approx(
        [x for pair in runs["adamw"] for x in pair], rel=1e-12
    )


def test_module_returning_adarank_is_kept():
    module = TinyModule(adarank=True)
    with pytest.warns(UserWarning, match="is an AdaRankGrad already"):
        trainer = _fit(module, AdaRankGradStrategy(max_rank=3), steps=2)
    opt = trainer.optimizers[0]
    assert type(opt) is AdaRankGrad and all(g["max_rank"] == ADARANK["max_rank"] for g in opt.param_groups)


def test_registered_names_and_classes():
    t = L.Trainer(strategy="adarank", **trainer_kwargs())
    assert isinstance(t.strategy, AdaRankGradStrategy) and isinstance(t.strategy, SingleDeviceStrategy)
    assert t.strategy.root_device == torch.device("cpu")
    # "auto" with several devices becomes DDP, as Lightning's own "auto" does (settings kept)
    t = L.Trainer(strategy=AdaRankGradStrategy(max_rank=5), **trainer_kwargs(devices=2))
    assert isinstance(t.strategy, AdaRankGradDDPStrategy) and isinstance(t.strategy, AdaRankGradStrategyMixin)
    assert t.num_devices == 2 and t.strategy.cluster_environment is not None and t.strategy.world_size == 2
    assert t.strategy.adarank_settings == {"max_rank": 5}
    t = L.Trainer(strategy="adarank_ddp_spawn", **trainer_kwargs(devices=2))
    assert isinstance(t.strategy, AdaRankGradDDPStrategy) and t.strategy._start_method == "spawn"
    t = L.Trainer(strategy="adarank_ddp_find_unused_parameters_true", **trainer_kwargs(devices=2))
    assert t.strategy._ddp_kwargs == {"find_unused_parameters": True}
    # DDPStrategy's own arguments; the strategy pickles (ddp_spawn sends it to the workers)
    s = AdaRankGradDDPStrategy(process_group_backend="gloo", max_rank=5, static_graph=True)
    assert s.process_group_backend == "gloo" and isinstance(s, DDPStrategy) and s._ddp_kwargs == {"static_graph": True}
    s2 = pickle.loads(pickle.dumps(s))
    assert type(s2) is type(s) and s2.adarank_settings == {"max_rank": 5} and s2.process_group_backend == "gloo"
    with pytest.raises(ValueError, match="energy=1.5 must be in"):
        AdaRankGradDDPStrategy(energy=1.5)


def test_import_is_lazy_and_registers_on_first_use():
    code = (
        "import sys, lightning_adarank as la\n"
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules\n"
        "la.AdaRankGradStrategy\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert {'adarank', 'adarank_ddp', 'adarank_ddp_spawn'} <= set(StrategyRegistry)\n"
        "assert not any(k.startswith('adarank_deepspeed') for k in StrategyRegistry)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tiny_bert_with_target_modules():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
        num_labels=3,
    )

    class Bert(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = transformers.BertForSequenceClassification(config)

        def training_step(self, batch, _):
            ids, labels = batch
            return self.model(input_ids=ids, labels=labels).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 64, (48, 12), generator=g), torch.randint(0, 3, (48,), generator=g)
    )
    module = Bert()
    before = module.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    trainer = L.Trainer(
        strategy=AdaRankGradStrategy(target_modules=["query", "value"], max_rank=4, min_gap=2),
        max_steps=4,
        **trainer_kwargs(),
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=12))
    ranks = trainer.optimizers[0].ranks()
    assert sorted(ranks) == sorted(
        f"model.bert.encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in ("query", "value")
    )
    assert not torch.equal(before, module.model.bert.encoder.layer[0].attention.self.query.weight)
