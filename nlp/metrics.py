"""The GLUE metrics (torchmetrics) for one validation split."""

from __future__ import annotations

from collections.abc import Sequence

import torchmetrics
from torchmetrics import classification as tmc
from torchmetrics import regression as tmr

__all__ = ["METRIC_NAMES", "make_metrics", "default_metric_names"]

METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")


def default_metric_names(num_labels: int) -> tuple[str, ...]:
    """Metrics for data that is not a GLUE task: Pearson/Spearman for regression, else accuracy and F1."""
    return ("pearson", "spearman") if num_labels == 1 else ("accuracy", "f1")


def make_metrics(names: Sequence[str], num_labels: int) -> torchmetrics.MetricCollection:
    """A :class:`~torchmetrics.MetricCollection` keyed by metric name.

    Classification metrics take class-id predictions; F1 is binary F1 of class 1 for two classes
    (as GLUE reports for MRPC and QQP) and macro F1 otherwise. Pearson/Spearman take the
    regression output.
    """
    binary = num_labels == 2
    kind = "binary" if binary else "multiclass"
    extra = {} if binary else {"num_classes": num_labels}
    factories = {
        "accuracy": lambda: tmc.Accuracy(task=kind, **extra),
        "f1": lambda: tmc.F1Score(task=kind, **extra, **({} if binary else {"average": "macro"})),
        "matthews": lambda: tmc.MatthewsCorrCoef(task=kind, **extra),
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
