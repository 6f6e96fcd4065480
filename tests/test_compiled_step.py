"""``compile=True``: the grouped step's per-chunk math through ``torch.compile`` (inductor on CPU here). It must give
the eager step's result (to fp32 rounding: inductor fuses and reorders), keep the no-host-read promise, and issue
fewer operators per normal step, which is what it is for."""

import sys
from pathlib import Path

import pytest
import torch
from test_grouped_promises import SETTINGS, _host_reads, _params, _set_grads
from torch import nn

from lightning_adarank import AdaRankGrad, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from cost_setup import count_ops  # noqa: E402  (the benchmark's own operator count: top-level aten operators)


@pytest.mark.filterwarnings("ignore:AdaRankGrad.*non-finite")
def test_the_compiled_grouped_step_matches_the_eager_one_with_fewer_operators():
    eager, compiled = _params(), _params()
    settings = {**SETTINGS, "refresh_check_every": 1000}  # only the rebuilds read the flags: a normal step reads none
    opt_e = AdaRankGrad(eager, grouped=True, **settings)
    opt_c = AdaRankGrad(compiled, compile=True, **settings)  # compile=True groups on CPU too
    for t in range(14):  # refreshes (several ranks in a store), and a non-finite gradient at t = 5
        _set_grads(eager, t)
        _set_grads(compiled, t)
        opt_e.step()
        opt_c.step()
    assert opt_c._grouped.stores  # the grouped step ran
    assert opt_c.ranks() == opt_e.ranks() and len(set(opt_c.ranks().values())) > 1
    assert [s.refreshes for s in opt_c.subspaces().values()] == [s.refreshes for s in opt_e.subspaces().values()]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    # normal steps: no refresh pending, and none coming from max_gap
    for opt in (opt_e, opt_c):
        for st in opt.state.values():
            st["pending"] = False
        for group in opt.param_groups:
            group["max_gap"] = 1000
    _set_grads(eager, 20)
    _set_grads(compiled, 20)
    cpu = torch.device("cpu")
    ops_eager, ops_compiled = count_ops(opt_e.step, cpu), count_ops(opt_c.step, cpu)
    assert ops_compiled < 0.7 * ops_eager, (ops_compiled, ops_eager)
    assert _host_reads(opt_c, compiled, range(21, 24)) == 0


def test_compile_settings_that_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="grouped=False asks for the per-matrix loop"):
        AdaRankGrad([nn.Parameter(torch.randn(8, 8))], compile=True, grouped=False)
    with pytest.raises(TypeError, match="compile must be True or False"):
        AdaRankGrad([nn.Parameter(torch.randn(8, 8))], compile="yes")
    net = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 8))
    opt = AdaRankGrad(param_groups(net), max_rank=4, state_bits=16, compile=True)
    net(torch.randn(4, 32)).square().mean().backward()
    with pytest.raises(ValueError, match="compile=True .* cannot step low-bit state"):
        opt.step()
