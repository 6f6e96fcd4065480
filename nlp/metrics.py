"""The GLUE metrics (torchmetrics) for one validation split."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

__all__ = ["METRIC_NAMES", "make_metrics", "default_metric_names", "matthews_from_confmat"]

METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")


def matthews_from_confmat(confmat: torch.Tensor) -> torch.Tensor:
    """Matthews correlation from a confusion matrix, 0 when undefined (sklearn's and GLUE's convention).

    torchmetrics returns a small non-zero value for degenerate cases (e.g. a classifier that predicts one
    class only gets about 0.1 on CoLA's dev set); the GLUE score of such a classifier is 0.
    """
    cm = confmat.double()
    t, p = cm.sum(1), cm.sum(0)
    c, s = cm.trace(), cm.sum()
    num = c * s - (t * p).sum()
    den = torch.sqrt(s * s - (p * p).sum()) * torch.sqrt(s * s - (t * t).sum())
    return (num / den).float() if den > 0 else torch.zeros((), device=cm.device)


class _BinaryMatthews(tmc.BinaryMatthewsCorrCoef):
    def compute(self) -> torch.Tensor:
        return matthews_from_confmat(self.confmat)


class _MulticlassMatthews(tmc.MulticlassMatthewsCorrCoef):
    def compute(self) -> torch.Tensor:
        return matthews_from_confmat(self.confmat)


def default_metric_names(num_labels: int) -> tuple[str, ...]:
    """Metrics for data that is not a GLUE task: Pearson/Spearman for regression, else accuracy and F1."""
    return ("pearson", "spearman") if num_labels == 1 else ("accuracy", "f1")


def make_metrics(names: Sequence[str], num_labels: int) -> torchmetrics.MetricCollection:
    """A :class:`~torchmetrics.MetricCollection` keyed by metric name.

    Classification metrics take class-id predictions; F1 is binary F1 of class 1 for two classes
    (as GLUE reports for MRPC and QQP) and macro F1 otherwise. Matthews correlation is 0 when undefined
    (:func:`matthews_from_confmat`). Pearson/Spearman take the
    regression output.
    """
    binary = num_labels == 2
    kind = "binary" if binary else "multiclass"
    extra = {} if binary else {"num_classes": num_labels}
    factories = {
        "accuracy": lambda: tmc.Accuracy(task=kind, **extra),
        "f1": lambda: tmc.F1Score(task=kind, **extra, **({} if binary else {"average": "macro"})),
        "matthews": lambda: _BinaryMatthews() if binary else _MulticlassMatthews(num_labels),
        "pearson": tmr.PearsonCorrCoef,
        "spearman": tmr.SpearmanCorrCoef,
    }
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(factories)}.")
    if num_labels == 1 and any(n in ("accuracy", "f1", "matthews") for n in names):
        raise ValueError("Classification metrics need num_labels >= 2 (num_labels=1 is regression).")
    if num_labels > 1 and any(n in ("pearson", "spearman") for n in names):
        raise ValueError("Pearson/Spearman need a regression head (num_labels=1).")
    return torchmetrics.MetricCollection({n: factories[n]() for n in names})
