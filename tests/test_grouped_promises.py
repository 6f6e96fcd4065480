"""The grouped step's promises, each measured: bit-identical resume at every ``refresh_check_every``, no host
synchronisation on a normal step (counted in a profiler trace, C++-side reads included), bounded transient
memory (peak RSS of the step in a fresh process), rebuilds limited to the shapes that changed."""

import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad, param_groups


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 40), (24, 40), (24, 40), (40, 24), (40, 24), (30, 30), (7,), (3, 5)]
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _set_grads(params, t):
    g = torch.Generator().manual_seed(100 + t)
    for i, p in enumerate(params):
        base = torch.randn(p.shape, generator=g)
        if p.dim() == 2 and i % 2 == 0:
            u = torch.randn(p.shape[0], 2, generator=g)
            base = u @ torch.randn(2, p.shape[1], generator=g) + 0.05 * base
        if t % 11 == 5 and i == 1:  # now and then a non-finite gradient (a skipped step) inside a bucket
            base[0, 0] = float("inf")
        p.grad = (base * (0.9 ** (t % 7))).to(p.device)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


SETTINGS = dict(lr=1e-2, max_rank=6, energy=0.9, min_gap=3, max_gap=12, tol=0.8, weight_decay=0.1, seed=1)


@pytest.mark.parametrize(
    "grouped,check_every,compile",
    [(True, 8, False), (True, 3, False), (True, 1, False), (False, 1, False), (True, 8, True)],
)
@pytest.mark.filterwarnings("ignore:AdaRankGrad.*non-finite")
def test_resume_is_bit_identical_at_any_step(grouped, check_every, compile):
    total = 40
    ref = _params()
    settings = {**SETTINGS, "compile": compile}
    opt = AdaRankGrad(ref, grouped=grouped, refresh_check_every=check_every, **settings)
    for t in range(total):
        _set_grads(ref, t)
        opt.step()
    assert max(s.refreshes for s in opt.subspaces().values()) >= 3
    for cut in (5, 13, 21):
        a = _params()
        opt_a = AdaRankGrad(a, grouped=grouped, refresh_check_every=check_every, **settings)
        for t in range(cut):
            _set_grads(a, t)
            opt_a.step()
        saved = _roundtrip(opt_a.state_dict())
        b = [nn.Parameter(p.detach().clone()) for p in a]
        opt_b = AdaRankGrad(b, grouped=grouped, refresh_check_every=check_every, **settings)
        opt_b.load_state_dict(saved)
        for t in range(cut, total):
            _set_grads(b, t)
            opt_b.step()
            _set_grads(a, t)  # the saving run goes on too: saving must not change its course
            opt_a.step()
        for pr, pa, pb in zip(ref, a, b):
            assert torch.equal(pr, pb), f"resumed run differs after a save at step {cut}"
            assert torch.equal(pr, pa), f"saving at step {cut} changed the run"


def _host_reads(opt, params, steps):
    """``aten::_local_scalar_dense`` calls (every device-to-host read, Python or C++) over ``steps`` steps, less
    those inside torch's own fused Adam kernel (its CPU implementation reads its step counters)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in steps:
            _set_grads(params, t)
            opt.step()

    def inside_torch_adam(event):
        while event is not None:
            if event.name.startswith("aten::_fused_adam"):
                return True
            event = event.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not inside_torch_adam(e))


@pytest.mark.parametrize("source", ["moment", "gradient"])
@pytest.mark.filterwarnings("ignore:AdaRankGrad.*non-finite")
def test_a_normal_grouped_step_reads_nothing_on_the_host(source, monkeypatch):
    params = _params()
    settings = {**SETTINGS, "min_gap": 50, "max_gap": 50}
    opt = AdaRankGrad(params, grouped=True, refresh_check_every=1000, subspace_source=source, **settings)
    _set_grads(params, 0)
    opt.step()  # a refresh step: reads the new ranks
    assert _host_reads(opt, params, range(1, 17)) == 0
    # the documented flag read every ``refresh_check_every`` steps is one ``tolist`` (which the profiler does not
    # see as a scalar read on CPU), and nothing else
    opt2 = AdaRankGrad(_params(), grouped=True, refresh_check_every=4, subspace_source=source, **settings)
    p2 = opt2.param_groups[0]["params"]
    _set_grads(p2, 0)
    opt2.step()
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    assert _host_reads(opt2, p2, range(1, 17)) == 0
    monkeypatch.undo()
    assert len(reads) == 4, reads


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from torch import nn
    from lightning_adarank import AdaRankGrad
    torch.manual_seed(0)
    n, grouped = 12, sys.argv[1] == "grouped"
    params = [nn.Parameter(torch.randn(1536, 1536) * 0.01) for _ in range(n)]
    grads = [torch.randn(1536, 1536) for _ in range(n)]
    opt = AdaRankGrad(params, grouped=grouped, max_rank=4, fused=False)
    for p, g in zip(params, grads):
        p.grad = g
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(8):  # the first step refreshes every matrix; then normal steps
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state_kib = opt.state_bytes() // 1024
    print(json.dumps({"growth_kib": peak - base, "grad_kib": n * 1536 * 1536 * 4 // 1024, "state_kib": state_kib}))
""")


def _rss_growth(mode):
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_grouped_step_transient_memory_is_bounded():
    """Eight steps (a refresh of every matrix, then normal steps) raise the peak RSS by no more than the
    per-matrix loop does (which stacks nothing: state and first-use allocations) plus the documented stack budget
    (fresh processes; the gradients are 108 MiB, so a step that stacked them all would exceed the bound)."""
    from lightning_adarank.optim.grouped import STACK_BYTES

    grouped, loop = _rss_growth("grouped"), _rss_growth("loop")
    assert grouped["growth_kib"] * 1024 <= loop["growth_kib"] * 1024 + STACK_BYTES + 8 * 2**20, (grouped, loop)


@pytest.mark.filterwarnings("ignore:AdaRankGrad.*non-finite")
def test_a_refresh_rebuilds_only_its_shape():
    params = _params()
    opt = AdaRankGrad(params, grouped=True, refresh_check_every=1, **{**SETTINGS, "min_gap": 50, "max_gap": 50})
    _set_grads(params, 0)
    opt.step()
    _set_grads(params, 1)
    opt.step()
    stores = dict(opt._grouped.stores)
    assert len(stores) == 2  # one store per oriented shape: (24, 40) (with the (40, 24) as transposes), (30, 30)
    opt.state[params[3]]["pending"] = True  # a (40, 24) matrix is due for a refresh
    _set_grads(params, 2)
    opt.step()
    for key, store in opt._grouped.stores.items():
        if store.shape == (24, 40):
            assert store is not stores[key]
        else:
            assert store is stores[key]


def test_grouped_true_refuses_low_bit_state_and_the_default_steps_it_per_matrix():
    """Low-bit state on the grouped path: refused with its reason when asked for explicitly; the default
    (grouped=None) and grouped=False step it with the per-matrix loop and build no grouped store."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 48), torch.nn.Linear(48, 8))
    x = torch.randn(16, 32)
    for grouped in (True, None, False):
        opt = AdaRankGrad(param_groups(net), max_rank=4, state_bits=16, grouped=grouped)
        net(x).square().mean().backward()
        if grouped:
            with pytest.raises(ValueError, match="grouped=True cannot step low-bit state"):
                opt.step()
        else:
            before = [p.detach().clone() for p in net.parameters()]
            opt.step()
            assert not opt._grouped.stores  # the per-matrix loop took it
            assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
        net.zero_grad()


@pytest.mark.filterwarnings("ignore:AdaRankGrad.*non-finite")
def test_a_tensor_lr_is_read_on_the_device_and_followed_in_place():
    """Capture-readiness: with ``lr`` a 0-d tensor, a normal grouped step reads nothing on the host (a CUDA graph
    replays the same kernels), and a value written into that tensor in place, as a graph's user or an LR scheduler
    does, is what the next step uses: the run matches one given the same lrs as floats."""
    lrs = [0.02 / (1 + t) for t in range(12)]

    def run(as_tensor):
        params = _params()
        lr = torch.tensor(lrs[0]) if as_tensor else lrs[0]
        opt = AdaRankGrad(params, grouped=True, refresh_check_every=1000, **{**SETTINGS, "lr": lr})
        group = opt.param_groups[0]
        for t, value in enumerate(lrs):
            if as_tensor:
                group["lr"].fill_(value)  # in place: the group's entry stays the same tensor
            else:
                group["lr"] = value
            if t == 1 and as_tensor:
                assert _host_reads(opt, params, [t]) == 0
                continue
            _set_grads(params, t)
            opt.step()
        return params, group["lr"]

    floats, _ = run(False)
    tensors, lr = run(True)
    assert torch.is_tensor(lr) and lr.item() == pytest.approx(lrs[-1])
    for a, b in zip(floats, tensors):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # fp32 lr against a float64 one


def test_a_tensor_lr_must_be_a_0d_float_tensor():
    with pytest.raises(TypeError, match="0-d float tensor"):
        AdaRankGrad(_params(), lr=torch.tensor([1e-3]))
    with pytest.raises(ValueError, match="lr"):
        AdaRankGrad(_params(), lr=torch.tensor(-1.0))
