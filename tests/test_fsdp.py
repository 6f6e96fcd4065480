"""AdaRankGrad on FSDP2 (``fully_shard``, CPU gloo, 2 processes): raw torch.

One launch of ``tests/scripts/fsdp_train.py`` (see its docstring) trains a tiny LM whose matrices cover both
projection sides and uneven row splits; the checks here compare it with one process training the unsharded
model on the same global batches.

Tolerance: fp32, ``rtol=1e-4, atol=2e-5`` on parameters of size O(0.1–1) after 8 steps. The sharded run sums the
same products in another order (reduce-scatter of the gradient, all-reduce of ``Σ_i G_iᵀΩ_i`` against one
``GᵀΩ``, CholeskyQR2 + small SVD against one SVD for the left-side bases, whose columns may also differ in sign:
the update ``P N`` does not), so the two agree to fp32 rounding amplified by a few Adam steps (``1/√v̂`` divides
by small numbers at step 1), not bit for bit. Ranks (integers chosen on the all-reduced sketch, above its noise
floor: ``noise_floor=True`` here, with all-reduced deviation norms) must be equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.fsdp_model import RAW_SETTINGS as SETTINGS
from scripts.fsdp_model import TinyLM, batches

from lightning_adarank import AdaRankGrad, param_groups

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_train.py"
STEPS, RESUME = 8, 5
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def launch(script: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run ``script`` in 2 gloo processes (torchrun, a free port) from the repository root."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch(SCRIPT, str(out), "--steps", str(STEPS), "--resume-at", str(RESUME))
    return {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)}


@pytest.fixture(scope="module")
def single():
    """One process, the unsharded model, the same global batches."""
    model = TinyLM()
    opt = AdaRankGrad(param_groups(model, include_embeddings=True), **SETTINGS)
    ranks = []
    for tokens in batches(STEPS):
        model.loss(tokens).backward()
        opt.step()
        opt.zero_grad()
        ranks.append(opt.ranks())
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "ranks": ranks,
        "opt": opt,
        "model": model,
    }


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-4, atol=2e-5, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


@pytest.mark.slow
def test_sharded_run_matches_single_process(runs, single):
    train = runs[0]["train"]
    _close(train["params"], single["params"], "FSDP2 vs one process")
    assert train["ranks"] == single["ranks"]  # every step, every matrix
    assert max(train["refreshes"].values()) > 1  # the comparison covers refreshes (moment transforms)
    initial = dict(TinyLM().named_parameters())
    assert not torch.allclose(train["params"]["down.weight"], initial["down.weight"])  # it trained
    # both sides were projected: the state says which pieces are sharded (DTensors)
    keys = train["sharded_keys"]
    assert keys["up.weight"] == ["exp_avg", "exp_avg_sq"]  # right side: moments sharded, basis replicated
    assert keys["down.weight"] == ["basis", "sketch"]  # left side: basis and sketch rows sharded
    assert keys["norm.weight"] == ["exp_avg", "exp_avg_sq"]  # AdamW moments, like the parameter


@pytest.mark.slow
def test_ranks_and_bases_identical_across_ranks(runs):
    a, b = runs[0]["train"], runs[1]["train"]
    assert a["ranks"] == b["ranks"]
    assert (
        a["bases"].keys()
        == b["bases"].keys()
        == {"emb.weight", "up.weight", "down.weight", "mix.weight", "head.weight"}
    )
    for name in a["bases"]:
        assert torch.equal(a["bases"][name], b["bases"][name]), name
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.mark.slow
def test_bases_match_single_process_subspaces(runs, single):
    """The same subspaces (projectors ``P Pᵀ``: column signs may differ on the left side)."""
    opt, model = single["opt"], single["model"]
    for name, p in model.named_parameters():
        if "basis" not in opt.state[p]:
            continue
        ref, got = opt.state[p]["basis"], runs[0]["train"]["bases"][name]
        torch.testing.assert_close(got @ got.mT, ref @ ref.mT, rtol=0, atol=5e-4, msg=name)


@pytest.mark.slow
def test_per_rank_state_is_about_half(runs, single):
    """Sharded state splits over the ranks; the replicated part (right-side bases and sketches, left-side moments,
    step counters) is the same on both and small."""
    s0, s1 = runs[0]["train"]["state"], runs[1]["train"]["state"]
    assert s0["replicated"] == s1["replicated"]
    assert s0["total"] == s0["sharded"] + s0["replicated"]
    total_sharded = s0["sharded"] + s1["sharded"]
    assert abs(s0["sharded"] - total_sharded / 2) <= 0.1 * total_sharded  # uneven splits: 21/20, 7/6 rows
    one = single["opt"].state_bytes()
    # a rank holds its half of the sharded state plus the replicated part; together they hold one process's state
    # (sharded once, replicated twice) up to the left side's sketch, which one process holds as min(m, n) × k too
    assert s0["total"] < 0.75 * one
    assert abs(total_sharded + s0["replicated"] - one) <= 0.02 * one


@pytest.mark.slow
def test_distributed_checkpoint_resume_equals_uninterrupted(runs):
    for r in (0, 1):
        ref = runs[r]["train"]["params"]
        for kind in ("dcp", "full"):
            for name, t in runs[r][kind].items():
                assert torch.equal(t, ref[name]), f"{kind} resume, rank {r}: {name}"
    assert runs[0]["dcp_ranks_after_load"] == runs[0]["train"]["ranks"][RESUME - 1]


@pytest.mark.slow
def test_distributed_basis_against_svd(runs):
    for r in (0, 1):
        lin = runs[r]["linalg"]
        for case, want_gather in (("well", False), ("deficient", True)):
            y, u, sv, gathered = lin[case]["y"], lin[case]["u"], lin[case]["sv"], lin[case]["gathered"]
            assert gathered is want_gather, case  # CholeskyQR2, or the gather fallback on a rank-3 Gram
            ref_u, ref_s, _ = torch.linalg.svd(y.double(), full_matrices=False)
            rank = 8 if case == "well" else 3
            torch.testing.assert_close(sv[:rank], ref_s[:rank], rtol=1e-5, atol=1e-6)
            uu, ru = u[:, :rank], ref_u[:, :rank]
            torch.testing.assert_close(uu.mT @ uu, torch.eye(rank, dtype=uu.dtype), rtol=0, atol=1e-5)
            torch.testing.assert_close(uu @ uu.mT, ru @ ru.mT, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_unsupported_settings_are_refused_by_name(runs):
    errors = runs[0]["errors"]
    assert "subspace_source='gradient'" in errors["gradient"]
    assert "state_bits" in errors["bits8"]
    assert "layer-wise mode is not supported with FSDP2" in errors["layerwise"]


def test_fsdp1_and_deepspeed_are_refused_with_the_way_out():
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy  # noqa: PLC0415

    from lightning_adarank.integrations.swap import check_strategy  # noqa: PLC0415

    with pytest.raises(ValueError, match="FSDPStrategy flattens.*ModelParallelStrategy with FSDP2"):
        check_strategy(FSDPStrategy(), "AdaRankGradCallback")
    check_strategy(ModelParallelStrategy(), "AdaRankGradCallback")  # FSDP2: allowed


@pytest.mark.slow
def test_nonfinite_shard_skips_the_parameter_on_every_rank(runs):
    """``inf`` in one rank's rows only: the skip is decided on all-reduced sums, so both ranks skip the same
    parameters (a per-shard decision would update half a matrix and desynchronise replicated state)."""
    for r in (0, 1):
        nf = runs[r]["nonfinite"]
        assert nf["skipped"] == 3, r  # warned about (one warning per parameter group)
        for name, before in nf["before"].items():
            same = torch.equal(nf["after"][name], before)
            assert same == (name in ("up.weight", "down.weight", "norm.weight")), (r, name)
    for name, t in runs[0]["nonfinite"]["after"].items():
        assert torch.equal(t, runs[1]["nonfinite"]["after"][name]), name
