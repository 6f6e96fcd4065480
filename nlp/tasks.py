"""The GLUE task table: text columns, labels, metrics and file layouts of the eight tasks.

One :class:`GLUETask` per task, keyed by the name the Hugging Face hub uses (``nyu-mll/glue``
configs). Everything task-specific lives here so the data module and the LightningModule stay
generic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GLUETask", "GLUE_TASKS", "get_task"]


@dataclass(frozen=True)
class GLUETask:
    """Static description of one GLUE task.

    Attributes:
        name: hub config name (``"sst2"``).
        dir_name: folder name in the original GLUE layout (``"SST-2"``).
        text_columns: column names of the one or two text fields in the local ``.tsv`` files.
        label_column: column name of the label in the local files.
        hub_text_columns: the same text fields as named on the hub.
        label_names: class names in hub label-id order; ``None`` for regression (STS-B).
        file_label_values: how labels are spelled in the local files, in label-id order.
        eval_splits: validation split name (used as the metric prefix) -> (local file, hub split).
        metrics: metric names logged as ``<split>/<metric>``.
        monitor: the headline metric (paper's column for this task).
        header: whether the local ``.tsv`` files have a header row (CoLA's do not).
        columns: column names to use when there is no header.
        regression_range: allowed label range for regression tasks.
    """

    name: str
    dir_name: str
    text_columns: tuple[str, ...]
    label_column: str
    hub_text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    file_label_values: tuple[str, ...] | None
    eval_splits: dict[str, tuple[str, str]] = field(default_factory=lambda: {"val": ("dev.tsv", "validation")})
    metrics: tuple[str, ...] = ("accuracy",)
    monitor: str = "accuracy"
    header: bool = True
    columns: tuple[str, ...] | None = None
    regression_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        """True for STS-B (one output, MSE loss)."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Number of model outputs: classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True when each example is a sentence pair."""
        return len(self.text_columns) == 2

    @property
    def monitor_key(self) -> str:
        """Logged name of the headline metric, e.g. ``val/matthews`` or ``val_matched/accuracy``."""
        return f"{next(iter(self.eval_splits))}/{self.monitor}"


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GLUETask] = {
    t.name: t
    for t in (
        GLUETask(
            name="cola",
            dir_name="CoLA",
            text_columns=("sentence",),
            label_column="label",
            hub_text_columns=("sentence",),
            label_names=("unacceptable", "acceptable"),
            file_label_values=_BINARY,
            metrics=("matthews", "accuracy"),
            monitor="matthews",
            header=False,  # source, label, original mark, sentence
            columns=("source", "label", "original_mark", "sentence"),
        ),
        GLUETask(
            name="sst2",
            dir_name="SST-2",
            text_columns=("sentence",),
            label_column="label",
            hub_text_columns=("sentence",),
            label_names=("negative", "positive"),
            file_label_values=_BINARY,
        ),
        GLUETask(
            name="mrpc",
            dir_name="MRPC",
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            hub_text_columns=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            file_label_values=_BINARY,
            metrics=("f1", "accuracy"),
            monitor="accuracy",
        ),
        GLUETask(
            name="stsb",
            dir_name="STS-B",
            text_columns=("sentence1", "sentence2"),
            label_column="score",
            hub_text_columns=("sentence1", "sentence2"),
            label_names=None,
            file_label_values=None,
            metrics=("pearson", "spearman"),
            monitor="pearson",
            regression_range=(0.0, 5.0),
        ),
        GLUETask(
            name="qqp",
            dir_name="QQP",
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            hub_text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            file_label_values=_BINARY,
            metrics=("f1", "accuracy"),
            monitor="accuracy",
        ),
        GLUETask(
            name="mnli",
            dir_name="MNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            hub_text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            file_label_values=("entailment", "neutral", "contradiction"),
            eval_splits={
                "val_matched": ("dev_matched.tsv", "validation_matched"),
                "val_mismatched": ("dev_mismatched.tsv", "validation_mismatched"),
            },
        ),
        GLUETask(
            name="qnli",
            dir_name="QNLI",
            text_columns=("question", "sentence"),
            label_column="label",
            hub_text_columns=("question", "sentence"),
            label_names=_NLI2,
            file_label_values=_NLI2,
        ),
        GLUETask(
            name="rte",
            dir_name="RTE",
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            hub_text_columns=("sentence1", "sentence2"),
            label_names=_NLI2,
            file_label_values=_NLI2,
        ),
    )
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> GLUETask:
    """Look a task up by hub name (case-insensitive; ``SST-2`` and ``STS-B`` spellings accepted).

    Raises:
        ValueError: for an unknown task, listing the known ones.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(
            f"Unknown GLUE task {name!r}. Known tasks: {', '.join(GLUE_TASKS)} "
            "(for your own data use nlp.TextClassificationDataModule)."
        )
    return GLUE_TASKS[key]
