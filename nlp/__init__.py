"""GLUE and text-classification fine-tuning with AdaRankGrad (and its peers) on PyTorch Lightning.

Public API: :class:`GLUEDataModule`, :class:`TextClassificationDataModule`,
:class:`GLUETransformer`, the task table (:data:`GLUE_TASKS`, :func:`get_task`) and the command
``python -m nlp fit --config ...`` (:func:`nlp.cli.main`).
"""

from nlp.data import DEFAULT_MODEL, GLUEDataModule, TextClassificationDataModule
from nlp.hub import ModelLoadError
from nlp.model import GLUETransformer
from nlp.readers import DataError
from nlp.tasks import GLUE_TASKS, GLUETask, get_task

__all__ = [
    "DEFAULT_MODEL",
    "DataError",
    "GLUEDataModule",
    "GLUETask",
    "GLUETransformer",
    "GLUE_TASKS",
    "ModelLoadError",
    "TextClassificationDataModule",
    "get_task",
]
