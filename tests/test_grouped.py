"""The grouped step (optim/grouped.py, optim/refresh.py) against the per-matrix loop, and its device-side rules:
non-finite skipping per matrix, the refresh flags read every ``refresh_check_every`` steps, no host reads on a
normal step, checkpoints of earlier versions."""

import io

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (24, 40), (24, 40), (40, 24), (40, 24), (30, 30), (7,), (3, 5)]
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _set_grads(params, t):
    g = torch.Generator().manual_seed(100 + t)  # drawn on the CPU, placed on each parameter's device
    for i, p in enumerate(params):
        # mixed spectra: some matrices low rank, some not, so the adaptive ranks differ inside a shape
        base = torch.randn(p.shape, generator=g)
        if p.dim() == 2 and i % 2 == 0:
            u = torch.randn(p.shape[0], 2, generator=g)
            base = u @ torch.randn(2, p.shape[1], generator=g) + 0.05 * base
        p.grad = (base * (0.9 ** (t % 7))).to(p.device, p.dtype)


@pytest.mark.parametrize(
    "source,weight_decay,scale_mode,noise_floor",
    [
        ("moment", 0.0, "rms", False),
        ("moment", 0.1, "galore", False),
        ("gradient", 0.1, "rms", False),
        ("moment", 0.0, "rms", True),
    ],
)
def test_grouped_step_matches_the_per_matrix_loop(source, weight_decay, scale_mode, noise_floor):
    settings = dict(
        lr=1e-2,
        max_rank=6,
        energy=0.9,
        min_gap=2,
        max_gap=6,
        tol=0.8,
        weight_decay=weight_decay,
        seed=3,
        subspace_source=source,
        scale_mode=scale_mode,
        noise_floor=noise_floor,
    )
    a, b = _params(), _params()
    opt_a = AdaRankGrad(a, grouped=True, **settings)
    opt_b = AdaRankGrad(b, grouped=False, **settings)
    for t in range(16):
        _set_grads(a, t)
        _set_grads(b, t)
        opt_a.step()
        opt_b.step()
    assert opt_a.ranks() == opt_b.ranks()
    assert len(set(opt_a.ranks().values())) > 1  # several ranks in one shape: several buckets
    assert [s.refreshes for s in opt_a.subspaces().values()] == [s.refreshes for s in opt_b.subspaces().values()]
    assert max(s.refreshes for s in opt_a.subspaces().values()) >= 3
    # same math, other summation order (bmm vs mm, CholeskyQR2 vs Householder in the range finder): fp32 rounding
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-5)
    assert (
        len(opt_a._grouped.stores) == 2 and not opt_b._grouped.stores
    )  # one store per oriented shape: (24, 40) and (30, 30)


@pytest.mark.parametrize("energy", [1.0, 0.6])
def test_non_finite_matrix_is_skipped_alone_inside_its_chunk(energy):
    params = _params()
    # energy 1: every rank is 4 (the stored bases are stepped as they are); 0.6: mixed ranks (a zero-padded stack)
    opt = AdaRankGrad(params, grouped=True, max_rank=4, energy=energy, min_gap=50, max_gap=50)
    _set_grads(params, 0)
    opt.step()
    store = next(s for s in opt._grouped.stores.values() if s.shape == (24, 40))
    assert store.chunks == [(0, 5)]  # the (24, 40) and the transposed (40, 24) are stepped as one stack
    assert (len(set(store.ranks)) > 1) == (energy < 1)
    before = [p.detach().clone() for p in params]
    state0 = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[params[1]].items()}
    _set_grads(params, 1)
    params[1].grad[2, 3] = float("inf")
    with pytest.warns(RuntimeWarning, match="skipped the step of 1 parameter"):
        opt.step()
    assert torch.equal(params[1], before[1])
    for k, v in state0.items():  # moments, basis, step counter, statistics, host counters: untouched
        assert torch.equal(opt.state[params[1]][k], v) if torch.is_tensor(v) else opt.state[params[1]][k] == v
    for i in (0, 2, 3, 6):  # its bucket neighbours, another shape and an unprojected parameter still stepped
        assert not torch.equal(params[i], before[i])
    # the skipped matrix resumes normally
    _set_grads(params, 2)
    opt.step()
    assert not torch.equal(params[1], before[1])
    assert int(opt.state[params[1]]["step"]) == int(opt.state[params[0]]["step"]) - 1


def test_non_finite_unprojected_gradient_skips_the_unprojected_call():
    params = _params()
    opt = AdaRankGrad(params, grouped=True, max_rank=4)
    _set_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    _set_grads(params, 1)
    params[6].grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(params[6], before[6]) and torch.equal(params[7], before[7])  # the fused call's skip flag
    assert not torch.equal(params[0], before[0])  # projected matrices are not held back


def test_refresh_flags_are_read_every_k_steps():
    w = nn.Parameter(torch.randn(30, 50))
    w2 = nn.Parameter(torch.randn(30, 50))
    g0 = torch.randn(30, 50)

    def refresh_steps(k):
        opt = AdaRankGrad(
            [w, w2], grouped=True, lr=1e-3, max_rank=4, min_gap=3, max_gap=1000, tol=0.5, refresh_check_every=k
        )
        steps, last = [], 0
        for t in range(60):  # a converging gradient: the test fires once the smoothed norm halves
            w.grad, w2.grad = g0 * 0.7**t, g0 * 0.7**t
            opt.step()
            if opt.state[w]["refreshes"] > last:
                steps.append(t)
                last = opt.state[w]["refreshes"]
        return steps

    every = refresh_steps(1)
    late = refresh_steps(5)
    assert len(every) >= 3 and every[0] == 0, every
    # with k = 5 a refresh happens only on the step after a read (calls 5, 10, ...: steps 5, 10, ...)
    assert all(t % 5 == 0 for t in late) and len(late) >= 2, late
    assert late[1] >= every[1]


def test_a_normal_step_reads_nothing_on_the_host(monkeypatch):
    params = _params()
    opt = AdaRankGrad(params, grouped=True, max_rank=4, min_gap=50, max_gap=50, refresh_check_every=10)
    _set_grads(params, 0)
    opt.step()  # the first step is a refresh (it reads the ranks)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for t in range(1, 5):
        _set_grads(params, t)
        opt.step()
    monkeypatch.undo()
    assert reads == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (synchronisation debug mode)")
@pytest.mark.parametrize("compile", [False, True])
def test_a_normal_cuda_step_does_not_synchronise(compile):
    params = [nn.Parameter(p.detach().cuda()) for p in _params()]
    opt = AdaRankGrad(params, grouped=True, max_rank=4, min_gap=50, max_gap=50, refresh_check_every=10, compile=compile)
    for t in range(3):  # a refresh step, then normal steps that compile (with compile=True)
        _set_grads(params, t)
        opt.step()
    for t in range(3, 7):
        _set_grads(params, t)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_checkpoint_with_float_statistics_of_earlier_versions_loads():
    params = _params()
    opt = AdaRankGrad(params, grouped=True, max_rank=4)
    for t in range(3):
        _set_grads(params, t)
        opt.step()
    sd = opt.state_dict()
    for st in sd["state"].values():  # earlier versions kept the refresh statistics as Python floats
        for k in ("ref_norm", "ema_norm", "ref_share", "ema_share"):
            if k in st:
                st[k] = float(st[k])
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    twin = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = AdaRankGrad(twin, grouped=True, max_rank=4)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.ranks() == opt.ranks()
    _set_grads(params, 3)
    _set_grads(twin, 3)
    opt.step()
    opt2.step()
    for a, b in zip(params, twin):
        assert torch.equal(a, b)
    # a saved state holds no views into the grouped storage: each tensor owns exactly its data
    assert all(v._base is None for st in opt.state_dict()["state"].values() for v in st.values() if torch.is_tensor(v))


def test_bf16_parameters_in_the_grouped_step():
    a = _params(dtype=torch.bfloat16)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt_a = AdaRankGrad(a, max_rank=4, grouped=True, weight_decay=0.1)
    opt_b = AdaRankGrad(b, max_rank=4, grouped=False, weight_decay=0.1)
    for t in range(4):
        _set_grads(a, t)
        _set_grads(b, t)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert pa.dtype == torch.bfloat16
        torch.testing.assert_close(pa.float(), pb.float(), atol=2e-2, rtol=1e-2)  # bf16 rounding of the update
    assert all(st["exp_avg"].dtype == torch.float32 for st in opt_a.state.values())
