"""Going back to AdamW from an AdaRankGrad run (issue 30): the AdamW-shaped moments against their definition
(M = P·M_low, V = (P∘P)·V_low, element by element in float64), loading into torch's AdamW, and
ContinueWithAdamW resuming a real Lightning checkpoint with the module's AdamW (moments and LR schedule)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from scripts.tiny import ADARANK, TinyModule, loader, make_data, trainer_kwargs
from torch import nn

from lightning_adarank import AdaRankGrad, AdaRankGradCallback, ContinueWithAdamW, adamw_state_dict, param_groups
from lightning_adarank.export.adamw import convert_state_dict
from lightning_adarank.optim import quant


def _trained(state_bits=32, steps=7):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12))  # weights 40x24 (right side), 12x40 (left)
    opt = AdaRankGrad(param_groups(net), lr=1e-2, max_rank=6, min_gap=2, max_gap=3, energy=0.9, state_bits=state_bits)
    x, y = torch.randn(64, 24), torch.randn(64, 12)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net, opt


def _reference(st, p):
    """M[i,j] = Σ_k P[i,k] M_low[k,j], V[i,j] = Σ_k P[i,k]² V_low[k,j] on the projected side, in float64."""
    m, n = p.shape
    r = int(st["rank"])
    basis = quant.load(st["basis"], (min(m, n), r)).double()
    low_shape = (r, n) if m <= n else (m, r)
    mlow = quant.load(st["exp_avg"], low_shape).double()
    vlow = quant.load(st["exp_avg_sq"], low_shape).double()
    M, V = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    for k in range(r):
        if m <= n:  # left: P is m x r, moments r x n
            M += torch.outer(basis[:, k], mlow[k])
            V += torch.outer(basis[:, k] ** 2, vlow[k])
        else:  # right: P is n x r, moments m x r
            M += torch.outer(mlow[:, k], basis[:, k])
            V += torch.outer(vlow[:, k], basis[:, k] ** 2)
    return M, V


@pytest.mark.parametrize("state_bits", [32, 8])
def test_moments_match_their_definition(state_bits):
    net, opt = _trained(state_bits)
    converted = adamw_state_dict(opt)
    flat = [p for g in opt.param_groups for p in g["params"]]
    projected = 0
    for i, p in enumerate(flat):
        st, got = opt.state[p], converted["state"][i]
        assert got["exp_avg"].shape == p.shape and got["exp_avg_sq"].shape == p.shape
        assert float(got["step"]) == float(st["step"])
        if "basis" in st:
            projected += 1
            M, V = _reference(st, p)
            torch.testing.assert_close(got["exp_avg"].double(), M, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(got["exp_avg_sq"].double(), V, rtol=1e-5, atol=1e-12)
        else:
            torch.testing.assert_close(got["exp_avg"], quant.load(st["exp_avg"], p.shape).float())
    assert projected == 2


def test_plain_adamw_refuses_the_raw_state_and_loads_the_converted_one():
    net, opt = _trained()
    adamw = torch.optim.AdamW(net.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        adamw.load_state_dict(opt.state_dict())
    adamw.load_state_dict(adamw_state_dict(opt, like=adamw))
    assert adamw.param_groups[0]["lr"] == 1e-2  # the run's learning rate, as a resume would keep it
    nn.functional.mse_loss(net(torch.randn(8, 24)), torch.randn(8, 12)).backward()
    adamw.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert float(adamw.state[net[0].weight]["step"]) == float(opt.state[net[0].weight]["step"]) + 1


def test_conversion_refuses_other_optimizers_and_unnamed_states():
    net, opt = _trained()
    with pytest.raises(TypeError, match="AdamW or Adam, not SGD"):
        adamw_state_dict(opt, like=torch.optim.SGD(net.parameters(), lr=0.1))
    unnamed = AdaRankGrad(net.parameters(), lr=1e-2, max_rank=6)
    with pytest.raises(ValueError, match="has no param_names"):
        convert_state_dict(unnamed.state_dict(), dict(net.named_parameters()))


class _Seen(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.type = type(opt)
        self.state = {
            n: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for n, p in pl_module.named_parameters()
            if p in opt.state
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _first_run(tmp_path):
    trainer = L.Trainer(max_steps=6, callbacks=[AdaRankGradCallback(**ADARANK)], **trainer_kwargs())
    module = TinyModule(scheduler="cosine")
    trainer.fit(module, loader(make_data(), 16))
    trainer.save_checkpoint(tmp_path / "ada.ckpt")
    return trainer, module


def test_continue_with_adamw_resumes_a_lightning_checkpoint(tmp_path):
    ada_trainer, ada_module = _first_run(tmp_path)
    expected = adamw_state_dict(
        ada_trainer.optimizers[0],
        like=torch.optim.AdamW(
            [
                {"params": [p for n, p in ada_module.named_parameters() if n.endswith("weight")]},
                {"params": [p for n, p in ada_module.named_parameters() if not n.endswith("weight")]},
            ]
        ),
    )
    # what a user hit before: the group counts match (weights, biases), so torch loads it and the step fails
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        L.Trainer(max_steps=8, **trainer_kwargs()).fit(
            TinyModule(scheduler="cosine"), loader(make_data(), 16), ckpt_path=tmp_path / "ada.ckpt"
        )
    seen, stay = _Seen(), _Seen()
    L.Trainer(max_steps=8, callbacks=[ContinueWithAdamW(), seen], **trainer_kwargs()).fit(
        TinyModule(scheduler="cosine"), loader(make_data(), 16), ckpt_path=tmp_path / "ada.ckpt"
    )
    L.Trainer(max_steps=8, callbacks=[AdaRankGradCallback(**ADARANK), stay], **trainer_kwargs()).fit(
        TinyModule(scheduler="cosine"), loader(make_data(), 16), ckpt_path=tmp_path / "ada.ckpt"
    )
    assert seen.type is torch.optim.AdamW
    weights = [n for n, _ in ada_module.named_parameters() if n.endswith("weight")]
    for i, name in enumerate(weights):  # the weights group comes first: indices 0..len(weights)-1
        torch.testing.assert_close(seen.state[name]["exp_avg"], expected["state"][i]["exp_avg"])
        assert float(seen.state[name]["step"]) == 6.0
    assert len(seen.lrs) == 2 and seen.lrs == pytest.approx(stay.lrs, rel=1e-12)  # the cosine schedule goes on


def test_continue_with_adamw_can_drop_the_moments(tmp_path):
    _first_run(tmp_path)
    seen = _Seen()
    trainer = L.Trainer(max_steps=8, callbacks=[ContinueWithAdamW(moments="drop"), seen], **trainer_kwargs())
    trainer.fit(TinyModule(scheduler="cosine"), loader(make_data(), 16), ckpt_path=tmp_path / "ada.ckpt")
    assert seen.type is torch.optim.AdamW and seen.state == {} and trainer.global_step == 8
    with pytest.raises(ValueError, match="moments='keep' must be 'convert' or 'drop'"):
        ContinueWithAdamW(moments="keep")


class TwoLr(TinyModule):
    """AdamW with a body and a head group at different learning rates, each holding weights and biases, so the
    swap splits them into four AdaRankGrad groups; a LambdaLR (its lr is base_lr × factor: per-group lists)."""

    def configure_optimizers(self):
        body = [p for n, p in self.named_parameters() if not n.startswith("net.4")]
        head = [p for n, p in self.named_parameters() if n.startswith("net.4")]
        opt = torch.optim.AdamW([{"params": body, "lr": 1e-2}, {"params": head, "lr": 1e-3}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _GroupLrs(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_continue_with_adamw_maps_the_schedule_back_onto_the_modules_groups(tmp_path):
    trainer = L.Trainer(max_steps=5, callbacks=[AdaRankGradCallback(**ADARANK)], **trainer_kwargs())
    trainer.fit(TwoLr(), loader(make_data(), 16))
    assert len(trainer.optimizers[0].param_groups) == 4
    trainer.save_checkpoint(tmp_path / "ada.ckpt")
    back, plain = _GroupLrs(), _GroupLrs()
    L.Trainer(max_steps=8, callbacks=[ContinueWithAdamW(), back], **trainer_kwargs()).fit(
        TwoLr(), loader(make_data(), 16), ckpt_path=tmp_path / "ada.ckpt"
    )
    L.Trainer(max_steps=8, callbacks=[plain], **trainer_kwargs()).fit(TwoLr(), loader(make_data(), 16))
    flat = [lr for row in back.lrs for lr in row]
    assert len(back.lrs) == 3 and flat == pytest.approx([lr for row in plain.lrs[5:] for lr in row], rel=1e-12)
    assert back.lrs[0][0] != pytest.approx(back.lrs[0][1])


@pytest.mark.slow
def test_continue_adamw_benchmark_smoke():
    """benchmarks/continue_adamw.py --smoke: a row per continuation with numbers and ratios against staying."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    if not (repo.parent / "shared" / "data" / "glue" / "SST-2").is_dir():
        pytest.skip("../shared/data/glue/SST-2 is not here")
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "continue_adamw.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        line.split("|")[1:-1]
        for line in proc.stdout.splitlines()
        if line.startswith("| stay") or line.startswith("| convert") or line.startswith("| drop")
    ]
    assert [r[0].strip() for r in rows] == ["stay", "convert", "drop"]
    assert all(float(c) > 0 for r in rows for c in r[1:4])
    assert rows[0][-1].strip() == "1.00×"
