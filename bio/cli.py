"""Command line: ``python -m bio tokenize|pretrain|fit|validate|test|demo`` (LightningCLI / jsonargparse).

* ``python -m bio tokenize --h5ad cells.h5ad --dictionary_dir gc30M --output_dir cells.dataset`` — tokenize.
* ``python -m bio pretrain --config ...`` — masked-gene pre-training (``GeneformerPretrainer`` +
  ``MaskedGeneDataModule``; a ``fit`` run).
* ``python -m bio fit --config bio/configs/cardiomyopathy.yaml`` — fine-tune ``GeneformerClassifier`` on
  ``CellClassificationDataModule``; after fitting, the test split is evaluated and the model is exported
  (Hugging Face format with ``id2label``) into the run folder.
* ``python -m bio demo`` — the offline end-to-end demo (``bio.demo``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from .data import CellClassificationDataModule
from .model import GeneformerClassifier
from .pretrain import GeneformerPretrainer
from .pretrain_data import MaskedGeneDataModule

__all__ = ["ClassifierCLI", "main"]

USAGE = """usage: python -m bio {tokenize,pretrain,fit,validate,test,export-lora,demo} [options]

  tokenize   rank-value encode an .h5ad into a Geneformer .dataset folder  (python -m bio tokenize --help)
  pretrain   masked-gene pre-training (LightningCLI fit)                     (python -m bio pretrain --help)
  fit        fine-tune a cell classifier, then test and export               (python -m bio fit --help)
  validate, test   evaluate a classifier checkpoint (--ckpt_path)
  export-lora  a fine-tuned checkpoint as a PEFT LoRA adapter              (python -m bio export-lora --help)
  demo       offline end-to-end demo on scanpy's pbmc68k_reduced            (python -m bio demo --help)
"""


class ClassifierCLI(LightningCLI):
    """LightningCLI for cell classification: the data module's label names are linked into the model
    (and so saved with it); ``fit`` is followed by a test run and an export of the model."""

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.label_names", "model.label_names", apply_on="instantiate")
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="where fit exports the Hugging Face model (default: <log_dir>/hf_model)",
        )

    def after_fit(self):
        trainer, model, dm = self.trainer, self.model, self.datamodule
        if len(dm.splits["test"]):
            trainer.test(model, datamodule=dm, verbose=True)
        if trainer.is_global_zero:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            cfg = self.config.get(self.subcommand, self.config)
            export = Path(cfg.get("export_dir") or (log_dir / "hf_model"))
            model.save_pretrained(export)
            summary = {
                "test": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")},
                "majority_baseline": dm.majority_baseline("test") if len(dm.splits["test"]) else None,
                "label_names": dm.label_names,
                "split_groups": dm.split_groups,
                "history": model.history,
                "export_dir": str(export),
            }
            (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(f"summary: {log_dir / 'summary.json'}; model: {export}")


def _pretrain_cli(args: list[str]) -> None:
    LightningCLI(
        GeneformerPretrainer,
        MaskedGeneDataModule,
        args=["fit", *args] if not (args and args[0] in ("fit", "validate")) else args,
        save_config_kwargs={"overwrite": True},
    )


def _tokenize_cli(args: list[str]) -> None:
    from jsonargparse import CLI

    from .tokenizer import tokenize_h5ad

    report = CLI(tokenize_h5ad, args=args, as_positional=False)
    print(report.summary())


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bio``."""
    import warnings

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass the sub-command on
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in ("pretrain", "fit", "validate", "test", "predict"):  # bio/configs/... after pip install too
        from lightning_adarank.integrations.packaged_configs import resolve_packaged_configs

        rest = resolve_packaged_configs(rest, "bio")
    if command == "tokenize":
        _tokenize_cli(rest)
    elif command == "pretrain":
        _pretrain_cli(rest)
    elif command in ("fit", "validate", "test", "predict"):
        ClassifierCLI(
            GeneformerClassifier,
            CellClassificationDataModule,
            args=[command, *rest],
            save_config_kwargs={"overwrite": True},
        )
    elif command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
    else:
        raise SystemExit(f"unknown command {command!r}\n{USAGE}")
