"""Low-bit state (``state_bits`` 8 and 16) resumes bit-identically through real Lightning Trainer checkpoints
(``Trainer.fit(ckpt_path=...)``: the callback route, the strategy route, ``VerifiedCheckpointIO``) and through
Fabric; the checkpoints load with ``weights_only=True``.

Issue 25: with the earlier torchao tensor subclass, Lightning's loader (a callable ``map_location``) failed with
"Callable map_location not supported with _rebuild_wrapper_subclass"; and 16-bit stochastic rounding drew from
the global RNG, which a resume does not restore."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scripts.tiny import trainer_kwargs
from torch import nn

from lightning_adarank import (
    AdaRankGrad,
    AdaRankGradCallback,
    AdaRankGradStrategy,
    VerifiedCheckpointIO,
    param_groups,
)

# large enough that every moment, basis and sketch is stored in the low-bit format (≥ 256 elements)
SETTINGS = dict(max_rank=4, min_gap=2, max_gap=3, tol=0.9, energy=0.8)


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 512, (16, 6), generator=g), torch.randn(16, 16, generator=g)) for _ in range(n)]


class SparseModule(L.LightningModule):
    """An embedding (sparse rows: 96 of 512 tokens per batch), a 64→300→16 MLP; the batch is a function of the
    global step, so a resumed run sees the same data whatever Lightning does with the loader's position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(512, 64)
        self.net = nn.Sequential(nn.Linear(64, 300), nn.Tanh(), nn.Linear(300, 16))
        self.data = _batches()

    def training_step(self, batch, batch_idx):
        ids, y = self.data[self.global_step % len(self.data)]
        return nn.functional.mse_loss(self.net(self.emb(ids).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(list(range(64)), batch_size=1)


def _fit(route: str, bits: int, steps: int, module: SparseModule, ckpt_dir=None, ckpt_path=None) -> L.Trainer:
    settings = dict(SETTINGS, state_bits=bits, dense_state_bits=bits, include_embeddings=True)
    kw: dict = {}
    callbacks: list = []
    if route == "strategy":
        kw["strategy"] = AdaRankGradStrategy(**settings)
    else:
        callbacks.append(AdaRankGradCallback(**settings))
        if route == "verified_io":
            kw["plugins"] = [VerifiedCheckpointIO()]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(ckpt_dir, every_n_train_steps=steps, save_top_k=-1))
        kw.update(enable_checkpointing=True, default_root_dir=ckpt_dir)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the non-resumable loader
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(("route", "bits"), [("callback", 8), ("strategy", 8), ("verified_io", 8), ("strategy", 16)])
def test_lightning_resume_is_bit_identical(tmp_path, route, bits):
    full = SparseModule()
    opt_full = _fit(route, bits, 10, full).optimizers[0]
    _fit(route, bits, 5, SparseModule(), ckpt_dir=tmp_path)
    ckpt = tmp_path / "epoch=0-step=5.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain tensors only
    states = saved["optimizer_states"][0]["state"].values()
    want = torch.uint8 if bits == 8 else torch.bfloat16
    assert sum(st["exp_avg"].dtype == want for st in states) >= 4  # emb, two weights, the 300-bias: low-bit
    assert any(st.get("basis") is not None and st["basis"].dtype == want for st in states)

    resumed = SparseModule()
    opt = _fit(route, bits, 10, resumed, ckpt_path=ckpt).optimizers[0]
    assert type(opt) is AdaRankGrad
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n  # bit-identical to the uninterrupted run
    assert opt.subspaces() == opt_full.subspaces()
    assert opt.state_bytes() == opt_full.state_bytes()


def test_fabric_resume_is_bit_identical(tmp_path):
    from lightning.fabric import Fabric

    data = _batches()

    def make():
        fabric = Fabric(accelerator="cpu", devices=1, plugins=[VerifiedCheckpointIO()])
        module = SparseModule()
        opt = AdaRankGrad(
            param_groups(module, include_embeddings=True), lr=1e-2, state_bits=8, dense_state_bits=8, **SETTINGS
        )
        model, opt = fabric.setup(module, opt)
        return fabric, model, opt

    def train(model, opt, fabric, lo, hi):
        for k in range(lo, hi):
            ids, y = data[k % len(data)]
            opt.zero_grad()
            fabric.backward(nn.functional.mse_loss(model.net(model.emb(ids).mean(1)), y))
            opt.step()

    fabric, model, opt = make()
    train(model, opt, fabric, 0, 5)
    path = tmp_path / "f.ckpt"
    fabric.save(path, {"model": model, "optimizer": opt})
    train(model, opt, fabric, 5, 10)
    assert any(
        st["exp_avg"].dtype == torch.uint8 for st in torch.load(path, weights_only=True)["optimizer"]["state"].values()
    )

    fabric2, model2, opt2 = make()
    fabric2.load(path, {"model": model2, "optimizer": opt2})
    train(model2, opt2, fabric2, 5, 10)
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
