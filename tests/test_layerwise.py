"""Layer-wise mode: updates inside backward equal the normal step; low-rank gradient accumulation equals
projecting the full accumulated gradient while the subspace is fixed; 2-process DDP stays bit-identical."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad, param_groups
from lightning_adarank.optim.layerwise import LayerwiseUpdater

SETTINGS = dict(lr=5e-3, max_rank=4, min_gap=2, max_gap=4, weight_decay=0.01, seed=3)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.LayerNorm(40), nn.Linear(40, 24), nn.GELU(), nn.Linear(24, 5))


def _batch(t, n=16):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("noise_floor", [False, True])
def test_layerwise_equals_normal_step_and_frees_gradients(noise_floor):
    ref, lw = _model(), _model()
    ref_opt = AdaRankGrad(param_groups(ref), **SETTINGS, noise_floor=noise_floor)
    opt = AdaRankGrad(param_groups(lw), **SETTINGS, noise_floor=noise_floor)
    updater = LayerwiseUpdater(opt).attach(lw)
    for t in range(12):  # spans several refreshes (min_gap=2, max_gap=4)
        ref_opt.zero_grad()
        _loss(ref, _batch(t)).backward()
        ref_opt.step()
        assert updater.backward(_loss(lw, _batch(t)))
        assert all(p.grad is None for p in lw.parameters())
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert opt.ranks() == ref_opt.ranks()
    assert max(st.get("refreshes", 0) for st in opt.state.values()) >= 3


def test_low_rank_accumulation_matches_projected_full_accumulation():
    k = 3
    settings = dict(SETTINGS, min_gap=100, max_gap=100)  # no refresh after the first window
    lw = _model()
    opt = AdaRankGrad(param_groups(lw), **settings)
    updater = LayerwiseUpdater(opt, accumulate_grad_batches=k).attach(lw)
    for i in range(k):  # first window: chooses the subspaces (from its first micro-batch)
        stepped = updater.backward(_loss(lw, _batch(i)) / k)
        assert stepped == (i == k - 1)
        assert all(p.grad is None for p in lw.parameters())

    # reference: the same state, then a normal step on the full accumulated gradient
    ref = _model(seed=99)
    ref.load_state_dict(lw.state_dict())
    ref_opt = AdaRankGrad(param_groups(ref), **settings)
    ref_opt.load_state_dict(opt.state_dict())
    for w in range(1, 3):
        ref_opt.zero_grad()
        for i in range(k):
            (_loss(ref, _batch(w * k + i)) / k).backward()
        ref_opt.step()
        for i in range(k):
            updater.backward(_loss(lw, _batch(w * k + i)) / k)
    for a, b in zip(ref.parameters(), lw.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert updater.steps == 3


def test_accumulation_skips_a_parameter_with_non_finite_gradient():
    lw = _model()
    opt = AdaRankGrad(param_groups(lw), **SETTINGS)
    updater = LayerwiseUpdater(opt, accumulate_grad_batches=2).attach(lw)
    first = lw[0].weight
    handle = first.register_hook(lambda g: torch.full_like(g, float("nan")))  # only the first micro-batch
    updater.backward(_loss(lw, _batch(0)) / 2)
    handle.remove()
    before = {n: p.detach().clone() for n, p in lw.named_parameters()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        updater.backward(_loss(lw, _batch(1)) / 2)
    assert torch.equal(first, before["0.weight"])
    assert not torch.equal(lw[3].weight, before["3.weight"])


def test_updater_rejects_other_optimizers():
    with pytest.raises(TypeError, match="AdaRankGrad"):
        LayerwiseUpdater(torch.optim.AdamW(_model().parameters()))
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        LayerwiseUpdater(AdaRankGrad(_model().parameters()), accumulate_grad_batches=0)


@pytest.mark.slow
def test_ddp_layerwise_two_processes_bit_identical(tmp_path):
    script = Path(__file__).parent / "scripts" / "layerwise_ddp.py"
    with socket.socket() as sock:  # a free port, not a fixed one another run may still hold
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), LW_PORT=str(port))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert r0.keys() == r1.keys() == single.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # ranks agree bit for bit
        torch.testing.assert_close(r0[name], single[name], atol=1e-5, rtol=1e-4)  # = one process, global batch
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    assert any(not torch.equal(init[n], r0[n]) for n in r0)
