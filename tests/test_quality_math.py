"""The three quality choices of AdaRankGrad, tested against their definitions (issue 12):

* update RMS vs rank at a fixed gradient (``scale_mode="rms"`` vs GaLore's raw ``"galore"``), against AdamW;
* the calibrated refresh test on synthetic gradient streams: stationary (no refresh) and rotating (a refresh
  follows, and the new subspace holds the new directions);
* rank selection on a noisy stream: the moment sketch follows the signal's rank, one mini-batch does not.
"""

import math

import pytest
import torch
from torch import nn

from lightning_adarank import AdaRankGrad
from lightning_adarank.optim.linalg import signal_spectrum, sketch_basis, sketch_noise


def _rms(x: torch.Tensor) -> float:
    return float(x.square().mean().sqrt())


@pytest.mark.parametrize("shape", [(64, 96), (96, 64)])
def test_update_rms_does_not_depend_on_rank_and_matches_adamw(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    lr = 1e-3
    w_ref = nn.Parameter(torch.zeros(shape))
    adamw = torch.optim.AdamW([w_ref], lr=lr, weight_decay=0.0)
    w_ref.grad = g.clone()
    adamw.step()
    ref = _rms(w_ref.detach())  # AdamW's first step: lr·sign(g), RMS = lr
    ours, galore = {}, {}
    for r in (1, 2, 4, 8, 16):
        for mode, out in (("rms", ours), ("galore", galore)):
            w = nn.Parameter(torch.zeros(shape))
            opt = AdaRankGrad([w], lr=lr, max_rank=r, min_rank=r, scale_mode=mode, min_gap=50, max_gap=50)
            for _ in range(3):  # a fixed gradient: Adam's direction stays ±1 in the subspace
                w.grad = g.clone()
                before = w.detach().clone()
                opt.step()
            assert opt.state[w]["rank"] == r
            out[r] = _rms(w.detach() - before)
    for r, v in ours.items():
        assert v == pytest.approx(ref, rel=1e-3), (r, v, ref)  # RMS = lr at every rank, as AdamW
    s = min(shape)
    for r, v in galore.items():  # GaLore's raw scale: RMS = lr·√(r/s), a rank-dependent step
        assert v == pytest.approx(ref * math.sqrt(r / s), rel=1e-3)


def _signal(s: int, l: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(s, rank, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(l, rank, generator=gen))
    return u @ torch.diag(torch.linspace(3.0, 1.5, rank)) @ v.T


def _stream(w: nn.Parameter, opt: AdaRankGrad, means: list[torch.Tensor], noise: float, gen) -> list[int]:
    """Feed ``means[t] + noise·ε_t`` as gradients; return the steps at which a refresh happened."""
    at, before = [], 0
    for t, mean in enumerate(means):
        w.grad = mean + noise * torch.randn(mean.shape, generator=gen) / math.sqrt(mean.numel())
        opt.step()
        if opt.state[w]["refreshes"] > before:
            at.append(t)
            before = opt.state[w]["refreshes"]
    return at


@pytest.mark.parametrize("source", ["moment", "gradient"])
def test_stationary_stream_is_not_refreshed(source):
    """Same signal and noise level every step: the calibrated reference is what a typical batch projects, so
    nothing falls and only the first step chooses a subspace (max_gap is out of reach)."""
    gen = torch.Generator().manual_seed(1)
    mean = _signal(48, 80, 3, gen)
    noise = float(mean.norm())  # noise energy = signal energy per batch
    w = nn.Parameter(torch.zeros(48, 80))
    opt = AdaRankGrad([w], lr=1e-6, max_rank=6, min_gap=10, max_gap=10_000, subspace_source=source)
    refreshes = _stream(w, opt, [mean] * 300, noise, gen)
    assert refreshes == [0]
    st = opt.state[w]
    assert st["ref_count"] == 9  # steps 1 … min_gap − 1 calibrated the test, not the refresh step


def test_reference_from_the_refresh_batch_would_be_biased():
    """Why the refresh step is left out: the batch a subspace was chosen from (``subspace_source="gradient"``,
    the paper's range finder on one batch) projects onto it more than the later batches of the same
    stationary stream do (selection bias)."""
    source = "gradient"
    gen = torch.Generator().manual_seed(2)
    mean = _signal(48, 80, 3, gen)
    w = nn.Parameter(torch.zeros(48, 80))
    opt = AdaRankGrad([w], lr=1e-6, max_rank=6, min_gap=10, max_gap=10_000, subspace_source=source)
    noisy = lambda: mean + 2 * float(mean.norm()) * torch.randn(48, 80, generator=gen) / math.sqrt(48 * 80)  # noqa: E731
    w.grad = noisy()
    opt.step()
    basis = opt.state[w]["basis"]
    at_refresh = float((basis.T @ w.grad).norm())
    later = []
    for _ in range(30):
        w.grad = noisy()
        opt.step()
        later.append(float((basis.T @ w.grad).norm()))
    assert at_refresh > 1.05 * sum(later) / len(later)
    assert opt.state[w]["refreshes"] == 1


@pytest.mark.parametrize("source", ["moment", "gradient"])
def test_rotating_stream_is_refreshed_and_new_subspace_follows(source):
    gen = torch.Generator().manual_seed(3)
    a, b = _signal(48, 80, 3, gen), _signal(48, 80, 3, gen)
    noise = 0.5 * float(a.norm())
    w = nn.Parameter(torch.zeros(48, 80))
    opt = AdaRankGrad([w], lr=1e-6, max_rank=6, min_gap=10, max_gap=10_000, subspace_source=source)
    refreshes = _stream(w, opt, [a] * 100, noise, gen)
    old = opt.state[w]["basis"]
    refreshes += [100 + t for t in _stream(w, opt, [b] * 60, noise, gen)]
    assert refreshes[0] == 0 and all(t >= 100 for t in refreshes[1:])  # nothing while the signal is still
    assert len(refreshes) >= 2 and refreshes[1] <= 115  # the rotation at step 100 is followed within 15 steps

    def captured(basis):  # share of the new signal's energy inside a subspace
        return float((basis.T @ b).square().sum() / b.square().sum())

    assert captured(old) < 0.3
    assert captured(opt.state[w]["basis"]) > 0.75  # at least tol (0.7) of the asked-for energy (0.9)


def test_rank_follows_signal_under_minibatch_noise():
    """A rank-2 signal under noise of twice its energy per batch: one batch's energy is spread over every
    direction, so keeping 90 % of it needs max_rank; the moment sketch averages the noise away."""
    gen = torch.Generator().manual_seed(4)
    mean = _signal(48, 80, 2, gen)
    noise = math.sqrt(2.0) * float(mean.norm())
    ranks = {}
    for source in ("moment", "gradient"):
        w = nn.Parameter(torch.zeros(48, 80))
        opt = AdaRankGrad([w], lr=1e-6, max_rank=8, energy=0.9, min_gap=10, max_gap=10, subspace_source=source)
        _stream(w, opt, [mean] * 81, noise, gen)  # refreshes every 10 steps; the last at step 80
        ranks[source] = opt.state[w]["rank"]
    assert ranks["gradient"] == 8
    assert ranks["moment"] <= 3


def test_sketch_basis_recovers_exact_low_rank_and_flat_spectra():
    gen = torch.Generator().manual_seed(5)
    m = _signal(40, 70, 3, gen)
    omega = torch.randn(70, 12, generator=gen)
    basis, kept = sketch_basis(m @ omega, energy=0.99, min_rank=1, max_rank=8)
    assert basis.shape == (40, 3) and kept > 0.99
    u = torch.linalg.svd(m, full_matrices=False)[0][:, :3]
    torch.testing.assert_close(basis @ basis.T, u @ u.T, atol=1e-4, rtol=0)  # same subspace
    flat = (
        torch.linalg.qr(torch.randn(40, 40, generator=gen))[0]
        @ torch.linalg.qr(torch.randn(40, 70, generator=gen).T)[0].T
    )
    basis, _ = sketch_basis(flat @ omega, energy=0.9, min_rank=1, max_rank=8)
    assert basis.shape[1] == 8  # no structure: the maximum rank


def test_sketch_noise_estimates_the_noise_left_in_the_average():
    """``ν = (1−β1)/2·‖GΩ − Y_prev‖²`` against the noise energy actually left in the average, ``‖Y − S‖²``,
    on a stream of fresh sketches ``S + E_t`` whose mean ``S`` is known."""
    gen = torch.Generator().manual_seed(6)
    beta = 0.9
    s, k, sigma2 = 64, 12, 4.0
    mean = torch.randn(s, k, generator=gen)
    y = mean.clone()
    estimates, truths = [], []
    for t in range(600):
        fresh = mean + torch.randn(s, k, generator=gen) * math.sqrt(sigma2 / (s * k))
        if t >= 100:  # the average has forgotten its start
            estimates.append(float(sketch_noise(torch.linalg.vector_norm(fresh - y).square(), beta)))
            truths.append(float((y - mean).square().sum()))
        y = beta * y + (1 - beta) * fresh
    expected = sigma2 * (1 - beta) / (1 + beta)  # the EMA's share of the per-step noise
    assert sum(truths) / len(truths) == pytest.approx(expected, rel=0.1)
    assert sum(estimates) / len(estimates) == pytest.approx(expected, rel=0.1)


def test_signal_spectrum_removes_the_floor_of_pure_noise():
    gen = torch.Generator().manual_seed(7)
    s, k = 400, 12
    noise = torch.randn(s, k, generator=gen)
    sv = torch.linalg.svdvals(noise)
    nu = float(noise.square().sum())
    # the k squared singular values average ν/k and spread up to the Marchenko–Pastur edge (1 + √(k/s))²·ν/k
    edge = (1 + math.sqrt(k / s)) ** 2 * nu / k
    assert float(sv.min().square()) < nu / k < float(sv.max().square()) < 1.05 * edge
    assert float(signal_spectrum(sv, nu, s).sum()) < 0.01 * nu
    strong = torch.linalg.qr(torch.randn(s, 2, generator=gen))[0] @ torch.randn(2, k, generator=gen) * 10.0
    sig = signal_spectrum(torch.linalg.svdvals(strong + noise), nu, s)
    assert (sig[2:] == 0).all()
    assert float(sig[:2].sum()) == pytest.approx(float(strong.square().sum()), rel=0.1)


def test_rank_chosen_above_the_noise_floor():
    """Noise of 6× the signal's energy per batch: even the averaged sketch keeps a noise share (≈ 6/19 of the
    signal) spread over every direction, so 90 % of its whole energy (the default) needs more than the signal's
    rank 2. With ``noise_floor=True`` the rank above the measured floor is the signal's; pure noise gets
    ``min_rank``."""
    gen = torch.Generator().manual_seed(8)
    mean = _signal(48, 80, 2, gen)
    noise = math.sqrt(6.0) * float(mean.norm())
    for signal, want, without_floor in ((mean, 2, 4), (torch.zeros_like(mean), 1, 8)):
        ranks = {}
        for floor in (True, False):
            w = nn.Parameter(torch.zeros(48, 80))
            opt = AdaRankGrad([w], lr=1e-6, max_rank=8, energy=0.9, min_gap=10, max_gap=10, noise_floor=floor)
            _stream(w, opt, [signal] * 81, noise, gen)  # refreshes every 10 steps; the last at step 80
            ranks[floor] = opt.state[w]["rank"]
        st = opt.state[w]
        assert ranks[True] == want
        assert ranks[False] >= without_floor  # the default: the rank of the whole averaged energy
        # the same (default) sketch through the functional core: the floor measured from a fresh batch
        whole, _ = sketch_basis(st["sketch"], energy=0.9, min_rank=1, max_rank=8)
        assert whole.shape[1] == ranks[False]
        fresh = (signal + noise * torch.randn(48, 80, generator=gen) / math.sqrt(48 * 80)) @ opt.context.test_matrix(
            80, 12, w.device
        )
        nu = sketch_noise(torch.linalg.vector_norm(fresh - st["sketch"]).square(), 0.9)
        above, _ = sketch_basis(st["sketch"], energy=0.9, min_rank=1, max_rank=8, noise=nu)
        assert above.shape[1] == want


def test_noise_floor_setting_checked():
    with pytest.raises(TypeError, match="noise_floor"):
        AdaRankGrad([nn.Parameter(torch.zeros(8, 8))], noise_floor=1)
