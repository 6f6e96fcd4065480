"""``export_lora``: a short AdaRankGrad fine-tune of MiniLM on SST-2, exported as a PEFT LoRA adapter and
loaded with ``peft`` on a fresh base (whose head is a different random initialisation)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from sst2_minilm import accuracy, encode, finetune, load_classifier, logits, minilm_path, needs_sst2, read_sst2

from lightning_adarank.export.lora import factor_delta

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def run():
    """base (pre-trained MiniLM + random head), tuned (30 AdaRankGrad steps), dev batch, tuned dev logits."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train = encode(tok, read_sst2("train", 480), max_length=32)
    dev = encode(tok, read_sst2("dev", 872), max_length=32)  # the whole SST-2 dev set
    base = load_classifier(path)
    tuned = copy.deepcopy(base)
    finetune(tuned, train, steps=30, batch_size=16, lr=1e-4, max_rank=8, head_lr=3e-2)
    return {"path": path, "base": base, "tuned": tuned, "dev": dev, "tuned_logits": logits(tuned, dev)}


def _load(run, out):
    """The adapter on a fresh base (a new random head: only the adapter's copy of the head can be right)."""
    torch.manual_seed(123)
    return peft.PeftModel.from_pretrained(load_classifier(run["path"]), str(out))


def _without_lora_factors(model):
    """The adapter with every ``lora_B`` weight zeroed: all changes except the factored ``ΔW``."""
    for m in model.modules():
        if hasattr(m, "lora_B") and "default" in m.lora_B:
            m.lora_B["default"].weight.data.zero_()
    return model


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """Exports at several energies: ``{energy: (report, folder, adapter logits)}``, and ``"no_factors"``: the
    logits with every change but the factored ``ΔW`` (the same for every energy)."""
    out = {}
    for energy in (0.5, 0.9, 0.99):
        folder = tmp_path_factory.mktemp(f"lora{energy}")
        report = _export(run, folder, energy)
        out[energy] = (report, folder, logits(_load(run, folder), run["dev"]))
    out["no_factors"] = logits(_without_lora_factors(_load(run, out[0.99][1])), run["dev"])
    return out


def _export(run, folder, energy, **kw):
    from lightning_adarank import export_lora

    return export_lora(run["base"], run["tuned"], folder, energy=energy, base_model_name_or_path=run["path"], **kw)


@needs_sst2
@pytest.mark.slow  # shares the MiniLM fine-tune fixture
def test_adapter_logits_match_within_the_energy_tolerance(run, exported):
    lt = run["tuned_logits"]
    errors = {}
    l0 = exported["no_factors"]
    for energy in (0.5, 0.9, 0.99):
        report, _, la = exported[energy]
        # the factored matrices' share of the change in the logits, and what the adapter misses of it
        errors[energy] = float((la - lt).norm() / (lt - l0).norm())
        # each factored matrix misses at most √(1 − energy) of its ‖ΔW‖_F; the logits miss no more than that
        assert report.rel_error <= math.sqrt(1 - energy) + 1e-4
        assert errors[energy] <= math.sqrt(1 - energy)
    assert errors[0.5] > errors[0.9] > errors[0.99]
    # the factored part matters: without it the logits are far off
    assert float((l0 - lt).norm()) > 5 * float((exported[0.99][2] - lt).norm())


@needs_sst2
@pytest.mark.slow  # shares the MiniLM fine-tune fixture
def test_dev_accuracy_within_half_a_point_at_energy_099(run, exported):
    labels = run["dev"]["labels"]
    acc_tuned = accuracy(run["tuned_logits"], labels)
    acc_adapter = accuracy(exported[0.99][2], labels)
    assert acc_tuned > 60.0  # the fine-tune learned something (chance is ~51 %)
    flips = int((exported[0.99][2].argmax(-1) != run["tuned_logits"].argmax(-1)).sum())
    assert abs(acc_adapter - acc_tuned) <= 0.5, f"tuned {acc_tuned:.2f} %, adapter {acc_adapter:.2f} %, {flips} flips"


@needs_sst2
@pytest.mark.slow  # shares the MiniLM fine-tune fixture
def test_report_ranks_errors_and_size(run, exported):
    from safetensors.torch import load_file

    report, folder, _ = exported[0.99]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    lora = report.lora_modules
    assert lora and all(m.kind == "lora" for m in lora)
    for m in lora:
        assert m.energy_kept >= 0.99 - 1e-9 and m.rel_error <= math.sqrt(1 - m.energy_kept) + 1e-4
    # per-module ranks are in the config and in the stored factors
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    ranks = {
        k.split(".lora_A")[0].removeprefix("base_model.model."): v.shape[0]
        for k, v in tensors.items()
        if ".lora_A." in k
    }
    assert ranks == {m.name: m.rank for m in lora}
    assert sorted(cfg["rank_pattern"].values()) == sorted(m.rank for m in lora)
    assert report.total_rank == sum(ranks.values())
    assert len(set(ranks.values())) > 1  # the energy rule gives different ranks to different matrices
    # the file holds exactly the stored elements (fp32), plus a small header
    numel = sum(v.numel() for v in tensors.values())
    assert numel == sum(m.stored for m in report.modules)
    assert 4 * numel <= report.adapter_bytes <= 4 * numel + 64 * 1024
    assert report.adapter_bytes < report.model_bytes / 10
    kinds = {m.name: m.kind for m in report.modules}
    assert kinds["classifier"] == "full"
    assert kinds["bert.embeddings.word_embeddings"] == "tokens"
    assert kinds["bert.encoder.layer.0.attention.output.LayerNorm"] == "full"
    # smaller energy, smaller adapter
    assert exported[0.5][0].total_rank < exported[0.9][0].total_rank < report.total_rank
    assert exported[0.5][0].adapter_bytes < report.adapter_bytes


@needs_sst2
@pytest.mark.slow  # shares the MiniLM fine-tune fixture
def test_merge_and_unload_gives_the_same_weights(run, exported):
    from safetensors.torch import load_file

    report, folder, la = exported[0.99]
    model = _load(run, folder)
    merged = model.merge_and_unload()
    sd = merged.state_dict()
    base, tuned = run["base"].state_dict(), run["tuned"].state_dict()
    assert sd.keys() == tuned.keys()
    # reference computed from the saved factors: W_base + B @ A · alpha / r, bias_base + b_B · alpha / r
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    lora_names = {m.name for m in report.lora_modules}
    for name in lora_names:
        key = f"base_model.model.{name}"
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        r = a.shape[0]
        scaling = cfg["alpha_pattern"][next(k for k in cfg["alpha_pattern"] if k.replace("\\", "") == name)] / r
        torch.testing.assert_close(sd[f"{name}.weight"], base[f"{name}.weight"] + scaling * b @ a, atol=2e-6, rtol=0)
        torch.testing.assert_close(
            sd[f"{name}.bias"], base[f"{name}.bias"] + scaling * tensors[f"{key}.lora_B.bias"], atol=2e-6, rtol=0
        )
        torch.testing.assert_close(sd[f"{name}.bias"], tuned[f"{name}.bias"], atol=2e-6, rtol=0)  # biases exact
    # everything not factored is the tuned model's, exactly (head, LayerNorms, embeddings)
    for key in tuned:
        if key.rsplit(".", 1)[0] not in lora_names:
            assert torch.equal(sd[key], tuned[key]), key
    # the merged model computes what the adapter does, and the same as the tuned one within the energy's error
    torch.testing.assert_close(
        logits(merged, {k: v[:256] for k, v in run["dev"].items()}), la[:256], atol=1e-4, rtol=1e-4
    )
    # and the merged weights are the fine-tuned ones up to the reported reconstruction error
    for m in report.lora_modules:
        w = f"{m.name}.weight"
        miss = float(torch.linalg.vector_norm(sd[w] - tuned[w]) / torch.linalg.vector_norm(tuned[w] - base[w]))
        assert miss == pytest.approx(m.rel_error, rel=1e-2, abs=1e-5), m.name


@needs_sst2
@pytest.mark.slow  # shares the MiniLM fine-tune fixture
def test_fixed_rank_and_alpha_follow_peft_conventions(run, tmp_path):
    dev = {k: v[:128] for k, v in run["dev"].items()}
    lt = run["tuned_logits"][:128]
    rep4 = _export(run, tmp_path / "r4", 0.99, rank=4, alpha=16.0)
    cfg = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert {m.rank for m in rep4.lora_modules} == {4} and set(cfg["alpha_pattern"].values()) == {16.0}
    la = logits(_load(run, tmp_path / "r4"), dev)
    # alpha only rescales lora_B: the same adapter as alpha = r
    rep4b = _export(run, tmp_path / "r4b", 0.99, rank=4)
    lb = logits(_load(run, tmp_path / "r4b"), dev)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    assert rep4.rel_error == pytest.approx(rep4b.rel_error, abs=1e-6)
    assert float((la - lt).norm() / lt.norm()) < 0.2


@needs_sst2
@pytest.mark.slow  # shares the MiniLM fine-tune fixture
def test_bad_inputs_are_refused(run, tmp_path):
    from lightning_adarank import export_lora

    with pytest.raises(ValueError, match="energy"):
        export_lora(run["base"], run["tuned"], tmp_path, energy=1.5)
    with pytest.raises(ValueError, match="rank"):
        export_lora(run["base"], run["tuned"], tmp_path, rank=0)
    with pytest.raises(ValueError, match="nothing to export"):
        export_lora(run["base"], copy.deepcopy(run["base"]), tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="different parameters"):
        export_lora(run["base"], other, tmp_path)
    with pytest.raises(ValueError, match="matches no module"):
        export_lora(run["base"], run["tuned"], tmp_path, modules_to_save=["no_such_head"])


# ---------------------------------------------------------------------------------------------- factor_delta
def _matrix(m, n, spectrum, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g))
    return (u * torch.tensor(spectrum)) @ v.mT


@pytest.mark.parametrize("shape", [(96, 300), (300, 96)])
def test_factor_delta_energy_rank_is_the_exact_svd_rank(shape):
    spectrum = [0.7**i for i in range(60)]
    delta = _matrix(*shape, spectrum)
    sv = torch.linalg.svdvals(delta.double())
    cum = torch.cumsum(sv**2, 0) / (sv**2).sum()
    for energy in (0.5, 0.9, 0.99, 0.999):
        expected = int((cum < energy).sum()) + 1  # smallest r with Σ_{i<=r} σ² >= energy ‖Δ‖²
        b, a, kept = factor_delta(delta, energy=energy, generator=torch.Generator().manual_seed(1))
        assert b.shape == (shape[0], expected) and a.shape == (expected, shape[1])
        assert kept >= energy
        err = float(torch.linalg.vector_norm(delta - b @ a) ** 2 / torch.linalg.vector_norm(delta) ** 2)
        assert err == pytest.approx(1 - kept, abs=1e-5)  # orthonormal basis: the error is what is not kept
        # balanced factors: B and Aᵀ have the same column norms (√σ each)
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_factor_delta_fixed_rank_matches_the_best_rank_r_approximation():
    delta = _matrix(200, 120, [1.0 / (1 + i) for i in range(120)], seed=3)
    b, a, kept = factor_delta(delta, rank=10, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(delta)
    best = float(sv[10:].square().sum().sqrt())  # Eckart–Young
    assert b.shape == (200, 10)
    assert float(torch.linalg.vector_norm(delta - b @ a)) <= best * 1.01
    with pytest.raises(ValueError, match="zero"):
        factor_delta(torch.zeros(5, 7), energy=0.9)


# ---------------------------------------------------------------------------------------------- a tiny custom model
class _Tiny(torch.nn.Module):
    """Not a transformers model: embedding, a LayerNorm, Linears (one without bias), and a head next to a
    module whose name ends with the head's ("pre_classifier", as in DistilBERT)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)
        self.frozen = torch.nn.Linear(32, 32)
        self.pre_classifier = torch.nn.Linear(32, 32)
        self.classifier = torch.nn.Linear(32, 3)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = h + self.down(torch.relu(self.up(h)))
        h = self.frozen(h)
        return self.classifier(torch.tanh(self.pre_classifier(h.mean(1))))


def test_tiny_custom_model_round_trip(tmp_path):
    from lightning_adarank import export_lora

    torch.manual_seed(0)
    base = _Tiny()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.emb.weight[[3, 7]] += 0.5  # two rows
        tuned.norm.weight += 0.1
        tuned.up.weight += 0.05 * torch.randn(64, 2) @ torch.randn(2, 32)  # rank 2
        tuned.down.bias += 0.1  # bias only
        tuned.pre_classifier.weight += 0.05 * torch.randn(32, 1) @ torch.randn(1, 32)
        tuned.classifier.weight += 0.3
    report = export_lora(base, tuned, tmp_path, energy=0.999)
    kinds = {m.name: (m.kind, m.rank) for m in report.modules}
    assert kinds == {
        "emb": ("tokens", 0),
        "norm": ("full", 0),
        "up": ("lora", 2),
        "down": ("lora", 1),
        "pre_classifier": ("full", 0),
        "classifier": ("full", 0),
    }  # "frozen" did not change
    torch.manual_seed(1)
    fresh = _Tiny()
    fresh.load_state_dict(base.state_dict())
    fresh.classifier.reset_parameters()  # the head of a fresh base is another random initialisation
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    ids = torch.randint(0, 50, (4, 6))
    ids[0, 0], ids[1, 1] = 3, 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), tuned(ids), atol=1e-5, rtol=1e-5)
        merged = loaded.merge_and_unload()
        for key, value in tuned.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-5, rtol=0, msg=key)
    with pytest.raises(ValueError, match="no nn.Linear weight changed"):
        only_norm = copy.deepcopy(base)
        with torch.no_grad():
            only_norm.norm.bias += 1.0
        export_lora(base, only_norm, tmp_path / "n")
