"""``python -m nlp fit --config ...``: LightningCLI for GLUE / text classification.

The data module is chosen with ``--data`` (``nlp.GLUEDataModule`` for GLUE,
``nlp.TextClassificationDataModule`` for your own files); the model's ``task``, ``num_labels`` and
validation split names are linked from it, and the data's tokenizer from ``--model.model_name_or_path``.
With ``--model.optimizer adarankgrad`` the effective-rank and memory callbacks are added unless the
config already has them.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import LightningCLI

from nlp.data import TextClassificationDataModule
from nlp.model import GLUETransformer

__all__ = ["GLUECLI", "main", "default_adarank_callbacks"]

log = logging.getLogger(__name__)


def default_adarank_callbacks() -> list[Callback]:
    """``[EffectiveRankMonitor(), MemoryMonitor()]`` from lightning_adarank (those that exist)."""
    import lightning_adarank

    out = []
    for name in ("EffectiveRankMonitor", "MemoryMonitor"):
        try:
            out.append(getattr(lightning_adarank, name)())
        except (AttributeError, ImportError):  # not in this version of lightning_adarank
            log.warning("lightning_adarank.%s is not available; running without it.", name)
    return out


class GLUECLI(LightningCLI):
    """LightningCLI with the data -> model links and AdaRankGrad's default callbacks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.init_args.model_name_or_path")
        parser.link_arguments("data.task_name", "model.task", apply_on="instantiate")
        parser.link_arguments("data.num_labels", "model.num_labels", apply_on="instantiate")
        parser.link_arguments("data.eval_split_names", "model.eval_splits", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if getattr(self.model, "hparams", {}).get("optimizer") == "adarankgrad":
            have = {type(cb).__name__ for cb in trainer.callbacks}
            for cb in default_adarank_callbacks():
                if type(cb).__name__ not in have:
                    trainer.callbacks.append(cb)
        return trainer


def main(args: list[str] | None = None, run: bool = True) -> GLUECLI:
    """Entry point of ``python -m nlp``; ``args`` replaces ``sys.argv[1:]`` (handy in tests).

    ``--config nlp/configs/...`` (or ``glue/sst2_r8.yaml``, ...) finds the configs installed with the package
    when the path does not exist (see :mod:`lightning_adarank.integrations.packaged_configs`).
    ``python -m nlp pretrain ...`` goes to the causal-LM pre-training CLI (:mod:`nlp.pretrain_cli`).
    """
    import sys
    import warnings

    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["pretrain"]:  # causal-LM pre-training
        from nlp.pretrain_cli import main as pretrain_main

        if args is None:  # from the command line: LightningCLI reads sys.argv, less the sub-command
            sys.argv = [sys.argv[0], *argv[1:]]
            return pretrain_main(None, run=run)
        return pretrain_main(argv[1:], run=run)

    from lightning_adarank.integrations.packaged_configs import resolve_packaged_configs

    given = sys.argv[1:] if args is None else list(args)
    resolved = resolve_packaged_configs(given, "nlp")
    if args is None and resolved != given:  # we pass the command line on, with the configs' installed paths
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        args = resolved
    elif args is not None:
        args = resolved
    return GLUECLI(
        GLUETransformer,
        TextClassificationDataModule,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
