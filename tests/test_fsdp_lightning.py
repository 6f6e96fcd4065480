"""FSDP2 through Lightning's and Fabric's ``ModelParallelStrategy`` (CPU gloo, 2 processes, torchrun).

``tests/scripts/fsdp_lightning.py`` runs each door ``N`` steps, and ``K`` steps + a checkpoint + a resume to ``N``
for both checkpoint kinds (``save_distributed_checkpoint=True``: a DCP directory; ``False``: one full file). The
uninterrupted run must match one process on the same global batches (fp32 tolerance as in ``test_fsdp.py``: the
sharded sums are taken in another order), be identical on both ranks, and each resume must end on exactly the
parameters of the uninterrupted run (the checkpoint holds the whole state, so nothing may differ).
Lightning's ``ModelParallelStrategy`` accepts ``accelerator="cpu"`` (gloo, a CPU device mesh) in Lightning 2.6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scripts.fsdp_model import SETTINGS, TinyLM, batches
from test_fsdp import launch

from lightning_adarank import AdaRankGrad, param_groups

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_lightning.py"
STEPS, RESUME = 6, 3


@pytest.fixture(scope="module")
def single():
    model = TinyLM()
    opt = AdaRankGrad(param_groups(model, include_embeddings=True), **SETTINGS)
    for tokens in batches(STEPS):
        model.loss(tokens).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.ranks()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["callback", "strategy", "fabric"])
def test_model_parallel_door_matches_single_process_and_resumes(mode, single, tmp_path):
    launch(SCRIPT, mode, str(tmp_path), "--steps", str(STEPS), "--resume-at", str(RESUME))
    runs = {r: torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)}
    prefix = "_forward_module." if mode == "fabric" else "net."
    ref_params, ref_ranks = single
    a, b = runs[0], runs[1]
    assert a["ranks"] == b["ranks"] == {prefix + n: r for n, r in ref_ranks.items()}
    for name, t in a["params"].items():
        assert torch.equal(t, b["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(t, ref_params[name.removeprefix(prefix)], rtol=1e-4, atol=2e-5, msg=name)
    assert (a["kind_True"], a["kind_False"]) == ("dir", "file")
    for kind in ("dcp", "full"):
        for name, t in a[kind].items():
            assert torch.equal(t, a["params"][name]), f"{kind} resume: {name}"


def test_model_parallel_strategy_takes_both_argument_sets():
    """The strategy route: ModelParallelStrategy's arguments and every AdaRankGrad setting, typed (LightningCLI
    reads the signature), checked when built."""
    import inspect  # noqa: PLC0415

    from lightning_adarank import AdaRankGradModelParallelStrategy  # noqa: PLC0415

    names = inspect.signature(AdaRankGradModelParallelStrategy.__init__).parameters
    assert {"data_parallel_size", "save_distributed_checkpoint", "target_modules", "max_rank", "energy"} <= set(names)
    strategy = AdaRankGradModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, max_rank=3)
    assert strategy.adarank_settings == {"max_rank": 3} and strategy._data_parallel_size == 2
    with pytest.raises(ValueError, match="min_gap"):
        AdaRankGradModelParallelStrategy(min_gap=0)
