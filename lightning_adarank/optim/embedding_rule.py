"""Whether embedding tables are projected: the default rule of the task modules (issue 31).

Measured on a Geneformer-architecture cell-type classifier trained from scratch (2 layers, hidden 128, the
full 25,426 x 128 gene-embedding table, rank 16), projecting the embedding table costs many points of
macro-F1 against AdamW, and leaving it to dense Adam closes most of the gap (numbers in
``benchmarks/results/from_scratch_cpu.md``). A randomly initialised table needs full-rank updates: every
token's row starts unrelated to the others, and a rank-16 projection of its gradient lets only a 16-dimensional
family of rows move at a time. Fine-tuning a pretrained table is different: its update is small and
low-rank, and projecting the table saves most of the optimizer state on models whose vocabulary is large.

Rule (``include_embeddings=None``, the task modules' default):

* training **from scratch** (no pretrained checkpoint): embeddings get dense Adam (not projected);
* fine-tuning **from a pretrained checkpoint**: the module's ``pretrained_default`` (projected in ``bio``).

An explicit ``True``/``False`` is always obeyed; ``True`` from scratch is obeyed with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

__all__ = ["resolve_include_embeddings", "ProjectedEmbeddingsFromScratchWarning"]

log = logging.getLogger(__name__)


class ProjectedEmbeddingsFromScratchWarning(UserWarning):
    """Embedding tables are projected while training from scratch (measured to cost quality)."""


def resolve_include_embeddings(
    include_embeddings: bool | None,
    *,
    from_pretrained: bool,
    pretrained_default: bool = True,
    optimizer: str = "adarankgrad",
    owner: str = "",
    report: Callable[[str], None] | None = None,
) -> bool:
    """The ``include_embeddings`` a low-rank optimizer should use (see the module docstring for the rule).

    Args:
        include_embeddings: the user's choice; ``None`` applies the rule.
        from_pretrained: the weights come from a pretrained checkpoint (``False``: random initialisation).
        pretrained_default: what ``None`` means when fine-tuning from a checkpoint.
        optimizer: the optimizer's name; only ``adarankgrad`` and ``galore`` project anything, so the others
            always get ``False`` (and no log line).
        owner: a name for the log line (e.g. ``"GeneformerClassifier"``).
        report: where the line saying what ``None`` chose goes (default: this module's ``logging`` logger at
            INFO; Lightning modules pass ``rank_zero_info`` so it shows next to Lightning's own lines).

    Returns:
        Whether ``nn.Embedding`` tables are projected.

    Raises:
        TypeError: ``include_embeddings`` is neither ``None`` nor a bool (e.g. the string ``"false"``, which
            would otherwise read as true).
    """
    if include_embeddings is not None and not isinstance(include_embeddings, bool):
        raise TypeError(f"include_embeddings must be True, False or None (auto), got {include_embeddings!r}")
    if optimizer not in ("adarankgrad", "galore"):
        return False
    who = f"{owner}: " if owner else ""
    if include_embeddings is None:
        chosen = bool(pretrained_default) if from_pretrained else False
        why = "fine-tuning a pretrained checkpoint" if from_pretrained else "training from scratch"
        (report or log.info)(
            f"{who}include_embeddings=None -> {chosen} ({why}): embedding tables "
            f"{'are projected' if chosen else 'get dense Adam, not projected'}. "
            f"Override with include_embeddings={not chosen}."
        )
        return chosen
    if include_embeddings and not from_pretrained:
        warnings.warn(
            f"{who}include_embeddings=True while training from scratch: projected embedding tables were measured "
            "to cost quality from random initialisation (benchmarks/results/from_scratch_cpu.md); "
            "include_embeddings=None or False gives them dense Adam.",
            ProjectedEmbeddingsFromScratchWarning,
            stacklevel=3,
        )
    return include_embeddings
