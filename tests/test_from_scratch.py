"""Issue 31: the embedding rule of the task modules (dense from scratch, projected from a pretrained checkpoint),
the matched-lr AdamW of the fair pre-training comparison, and ``benchmarks/from_scratch.py --smoke``."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TINY = {
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}


def _projected_names(opt) -> set[str]:
    """Names of the parameters in AdaRankGrad's projected groups (``low_rank=True``)."""
    return {n for g in opt.param_groups if g.get("low_rank") for n in g["param_names"]}


# ----------------------------------------------------------------------------- the rule itself
def test_rule_none_means_dense_from_scratch_and_projected_from_a_checkpoint(caplog):
    from lightning_adarank.optim.embedding_rule import resolve_include_embeddings

    with caplog.at_level(logging.INFO, logger="lightning_adarank.optim.embedding_rule"):
        assert resolve_include_embeddings(None, from_pretrained=False, owner="M") is False
        assert resolve_include_embeddings(None, from_pretrained=True, pretrained_default=True, owner="M") is True
        assert resolve_include_embeddings(None, from_pretrained=True) is False  # measured: dense fine-tunes better
    lines = [r.getMessage() for r in caplog.records]
    assert "M: include_embeddings=None -> False (training from scratch)" in lines[0]
    assert "Override with include_embeddings=True" in lines[0]
    assert "(fine-tuning a pretrained checkpoint)" in lines[1] and "Override with include_embeddings=False" in lines[1]
    # optimizers that project nothing never get True, whatever was asked
    for name in ("adamw", "lora"):
        assert resolve_include_embeddings(True, from_pretrained=True, optimizer=name) is False
        assert resolve_include_embeddings(None, from_pretrained=False, optimizer=name) is False
    assert resolve_include_embeddings(None, from_pretrained=True, pretrained_default=True, optimizer="galore") is True


def test_rule_obeys_explicit_choices_and_warns_only_for_projected_from_scratch():
    from lightning_adarank.optim.embedding_rule import (
        ProjectedEmbeddingsFromScratchWarning,
        resolve_include_embeddings,
    )

    with pytest.warns(ProjectedEmbeddingsFromScratchWarning, match="from scratch"):
        assert resolve_include_embeddings(True, from_pretrained=False) is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_include_embeddings(True, from_pretrained=True) is True
        assert resolve_include_embeddings(False, from_pretrained=False) is False
        assert resolve_include_embeddings(False, from_pretrained=True) is False
    with pytest.raises(TypeError, match="True, False or None"):
        resolve_include_embeddings("false", from_pretrained=False)  # a YAML string would read as true


def test_energy_rule_none_means_max_rank_from_scratch_and_adaptive_from_a_checkpoint(caplog):
    from lightning_adarank import AdaRankGrad, AdaRankGradConfig
    from lightning_adarank.optim.baselines import adarank_overrides
    from lightning_adarank.optim.config import DEFAULT_ENERGY
    from lightning_adarank.optim.rank_rule import FROM_SCRATCH_ENERGY, resolve_energy

    with caplog.at_level(logging.INFO, logger="lightning_adarank.optim.rank_rule"):
        assert resolve_energy(None, from_pretrained=False, owner="M") == FROM_SCRATCH_ENERGY == 1.0
        assert resolve_energy(None, from_pretrained=True) == DEFAULT_ENERGY == 0.9
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("M: AdaRankGrad energy=None -> 1.0 (training from scratch")
    assert "-> 0.9 (fine-tuning" in lines[1]
    for explicit in (0.9, 0.5, 1.0):  # an explicit value is obeyed, from scratch too
        assert resolve_energy(explicit, from_pretrained=False) == explicit
        assert resolve_energy(explicit, from_pretrained=True) == explicit
    # None is the config's default: the optimizer reads it as 0.9, and an explicit 0.9 stays an override
    assert AdaRankGradConfig().energy is None and AdaRankGradConfig().group_defaults()["energy"] == DEFAULT_ENERGY
    w = torch.nn.Parameter(torch.randn(8, 8))
    assert AdaRankGrad([w]).param_groups[0]["energy"] == DEFAULT_ENERGY
    assert adarank_overrides(AdaRankGradConfig(energy=0.9)) == {"energy": 0.9}
    assert adarank_overrides(AdaRankGradConfig()) == {}


# ----------------------------------------------------------------------------- bio modules
def test_bio_classifier_energy_follows_the_rank_rule(tmp_path):
    """From scratch the projected group gets energy 1.0; fine-tuning a checkpoint 0.9; an explicit 0.9 from
    scratch is obeyed; the other optimizers get no energy at all."""
    from bio import GeneformerClassifier

    kw = dict(
        model_config=dict(TINY),
        rank=4,
        lr_schedule="constant",
        warmup_steps=0,
        rank_monitor=False,
        memory_monitor=False,
    )

    def energies(module) -> set:
        opt = module.configure_optimizers()
        return {g["energy"] for g in opt.param_groups if g.get("low_rank")}

    scratch = GeneformerClassifier(["a", "b"], **kw)
    assert energies(scratch) == {1.0}
    scratch.save_pretrained(tmp_path / "ckpt")
    assert energies(GeneformerClassifier(["a", "b"], pretrained=str(tmp_path / "ckpt"), **kw)) == {0.9}
    assert energies(GeneformerClassifier(["a", "b"], adarank={"energy": 0.9}, **kw)) == {0.9}
    galore = GeneformerClassifier(["a", "b"], optimizer="galore", **kw).configure_optimizers()
    assert not any("energy" in g for g in galore.param_groups)


def test_bio_classifier_default_follows_the_rule(tmp_path, caplog):
    from bio import GeneformerClassifier

    kw = dict(
        model_config=dict(TINY),
        optimizer="adarankgrad",
        rank=4,
        lr_schedule="constant",
        warmup_steps=0,
        rank_monitor=False,
        memory_monitor=False,
    )
    scratch = GeneformerClassifier(["a", "b"], **kw)
    assert scratch.hparams.include_embeddings is None
    with caplog.at_level(logging.INFO):
        opt = scratch.configure_optimizers()
    emb = "bert.embeddings.word_embeddings.weight"
    linears = {n for n, m in scratch.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert emb not in _projected_names(opt)
    assert {f"{n}.weight" for n in linears} == _projected_names(opt)  # every linear, no embedding table
    assert any(
        "GeneformerClassifier: include_embeddings=None -> False (training from scratch)" in r.getMessage()
        for r in caplog.records
    )

    scratch.save_pretrained(tmp_path / "ckpt")
    tuned = GeneformerClassifier(["a", "b"], pretrained=str(tmp_path / "ckpt"), **kw)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        projected = _projected_names(tuned.configure_optimizers())
    embeddings = {f"{n}.weight" for n, m in tuned.model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert len(embeddings) == 3 and not embeddings & projected  # word, position, token type: dense by default
    assert any(
        "include_embeddings=None -> False (fine-tuning a pretrained checkpoint)" in r.getMessage()
        for r in caplog.records
    )
    asked = GeneformerClassifier(["a", "b"], pretrained=str(tmp_path / "ckpt"), include_embeddings=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning fine-tuning a checkpoint
        assert embeddings <= _projected_names(asked.configure_optimizers())
    forced = GeneformerClassifier(["a", "b"], include_embeddings=True, **kw)
    from lightning_adarank.optim.embedding_rule import ProjectedEmbeddingsFromScratchWarning

    with pytest.warns(ProjectedEmbeddingsFromScratchWarning):
        assert emb in _projected_names(forced.configure_optimizers())


def test_bio_pretrainer_from_scratch_keeps_embeddings_dense():
    from bio import GeneformerPretrainer

    pre = GeneformerPretrainer(
        model_config=dict(TINY),
        optimizer="galore",
        rank=4,
        lr_schedule="constant",
        warmup_steps=0,
        rank_monitor=False,
        memory_monitor=False,
    )
    opt = pre.configure_optimizers()
    emb = pre.model.bert.embeddings.word_embeddings.weight
    with_rank = [g for g in opt.param_groups if "rank" in g]  # GaLore's projected group
    assert with_rank and not any(p is emb for g in with_rank for p in g["params"])
    assert any(p is emb for g in opt.param_groups if "rank" not in g for p in g["params"])


# ----------------------------------------------------------------------------- fair pre-training comparison
def test_matched_adamw_gives_matrices_the_scaled_lr_and_the_rest_the_full_lr():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import llama_pretrain

    from nlp.pretrain import CausalLMPretrainer

    model = CausalLMPretrainer(
        vocab_size=50,
        model=None,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        optimizer="adamw",
    ).model
    opt = llama_pretrain.matched_adamw(model, 0.02, 0.25)
    assert isinstance(opt, torch.optim.AdamW)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter, once
    for name, module in model.named_modules():  # reference: GaLore's selection, the attn/mlp nn.Linear weights
        for pname, p in module.named_parameters(recurse=False):
            matrix = isinstance(module, torch.nn.Linear) and re.search(r"attn|mlp", name) and pname == "weight"
            assert lr_of[id(p)] == pytest.approx(0.005 if matrix else 0.02), (name, pname)
    assert lr_of[id(model.lm_head.weight)] == 0.02 and lr_of[id(model.model.embed_tokens.weight)] == 0.02


# ----------------------------------------------------------------------------- the benchmark
@pytest.mark.skipif(
    not (SHARED / "geneformer" / "gc30M").is_dir() or not (SHARED / "glue" / "SST-2").is_dir(),
    reason=f"shared data not found under {SHARED}",
)
def test_from_scratch_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/from_scratch.py", "--smoke", "--runs", str(tmp_path / "runs.json")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = {}  # section title -> first table of the section: {method: cells}
    for section in proc.stdout.split("### ")[1:]:
        rows: dict[str, list[str]] = {}
        for line in section.splitlines():
            if line.startswith("| "):
                cells = [c.strip() for c in line.split("|")[1:-1]]
                rows.setdefault(cells[0], cells)
        tables[section.split("\n")[0]] = rows
    scratch, tuned, llama = (
        next(v for k, v in tables.items() if k.startswith(t))
        for t in ("Cell-type classifier from scratch", "Cell-type classifier fine-tuned", "Small LLaMA")
    )
    assert scratch["adamw"][3] == "dense" and scratch["adarankgrad"][2:4] == ["default (None)", "dense"]
    assert tuned["adarankgrad"][2:4] == ["default (None)", "dense"]  # dense when fine-tuning too (measured)
    for name in ("adamw", "adarankgrad"):
        assert 0.0 <= float(scratch[name][4]) <= 100.0 and 0.0 <= float(tuned[name][4]) <= 100.0
    for name in ("adamw_matched", "adarankgrad32"):  # llama grid: a finite perplexity from one seed
        assert float(llama[name][1].split()[0]) > 1.0 and llama[name][1].endswith("(1)")
    assert (tmp_path / "from_scratch_smoke_cpu.md").is_file()


def _fit_tiny_llama(width: int, rank: int, steps: int, **kw):
    """A ``CausalLMPretrainer`` (one layer, hidden ``width``, AdaRankGrad at ``rank``) fitted ``steps`` real
    Lightning steps on random tokens; returns its optimizer."""
    import lightning as L

    from nlp.pretrain import CausalLMPretrainer

    ids = torch.randint(0, 50, (4 * steps, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=4)
    module = CausalLMPretrainer(
        vocab_size=50,
        model=None,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        optimizer="adarankgrad",
        rank=rank,
        warmup_steps=1,
        **kw,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer.optimizers[0]


def test_llama_pretrainer_default_keeps_embeddings_dense(caplog):
    """``CausalLMPretrainer`` always trains from scratch: by default ``embed_tokens`` gets dense Adam (logged);
    ``include_embeddings=True`` projects it, with the warning. Two real Lightning steps each."""
    from lightning_adarank.optim.embedding_rule import ProjectedEmbeddingsFromScratchWarning

    with caplog.at_level(logging.INFO):
        projected = _projected_names(_fit_tiny_llama(16, 4, 2))
    assert "model.embed_tokens.weight" not in projected and "model.layers.0.mlp.up_proj.weight" in projected
    assert any(
        "CausalLMPretrainer: include_embeddings=None -> False (training from scratch)" in r.getMessage()
        for r in caplog.records
    )
    with pytest.warns(ProjectedEmbeddingsFromScratchWarning):
        assert "model.embed_tokens.weight" in _projected_names(_fit_tiny_llama(16, 4, 2, include_embeddings=True))


def test_llama_pretrainer_trains_at_max_rank_unless_energy_is_set(caplog):
    """``CausalLMPretrainer`` trains from scratch, so ``energy`` left unset is 1.0 (logged) and every projected
    matrix keeps rank ``rank`` through four real Lightning steps; ``adarank={"energy": 0.5}`` is obeyed, and
    there the rule picks lower ranks on the same run."""

    def fit(**kw):
        opt = _fit_tiny_llama(32, 8, 4, **kw)
        return {g["energy"] for g in opt.param_groups if g.get("low_rank")}, opt.ranks()

    with caplog.at_level(logging.INFO):
        energy, ranks = fit()
    assert energy == {1.0} and ranks and set(ranks.values()) == {8}
    assert any("CausalLMPretrainer: AdaRankGrad energy=None -> 1.0" in r.getMessage() for r in caplog.records)
    energy, ranks = fit(adarank={"energy": 0.5})
    assert energy == {0.5} and min(ranks.values()) < 8
