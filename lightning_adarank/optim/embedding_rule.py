"""Whether embedding tables are projected: the default rule of the task modules.

Measured (``benchmarks/from_scratch.py``, results in ``benchmarks/results/from_scratch_cpu.md``) on a
Geneformer-architecture cell-type classifier (2 layers, hidden 128, the full 25,426 x 128 gene-embedding table,
rank 16, pbmc68k_reduced, 3 seeds): from random initialisation, at the fixed rank the task modules use there
(:mod:`~lightning_adarank.optim.rank_rule`), projecting the embedding table reads 36.5 macro-F1 against 39.9 with
it dense and AdamW's 40.8 (28.9 against 34.5 at the adaptive rank); fine-tuning a briefly masked-gene
pre-trained checkpoint, 28.5 against 39.6 dense and AdamW's 40.9. A likely reason: each step's
update of a projected table lies in a rank-r subspace of the hidden dimension, while the rows of a table
far from trained (random, or only briefly pre-trained) must move apart in every direction. Dense embeddings
keep Adam's two full-size moments of the table (here most of the optimizer state; for the 12-layer,
hidden-512 Geneformer about a third).

Rule (``include_embeddings=None``, the task modules' default):

* training **from scratch** (no pretrained checkpoint): embeddings get dense Adam (not projected);
* fine-tuning **from a pretrained checkpoint**: the module's ``pretrained_default`` (dense in ``bio``, as
  measured above; a well pre-trained checkpoint such as a published Geneformer was not measured).

An explicit ``True``/``False`` is always obeyed; ``True`` from scratch is obeyed with a warning. The choice
``None`` made is reported in one line naming the override.
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
    pretrained_default: bool = False,
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
            "to cost macro-F1 from random initialisation (benchmarks/results/from_scratch_cpu.md); "
            "include_embeddings=None or False gives them dense Adam.",
            ProjectedEmbeddingsFromScratchWarning,
            stacklevel=3,
        )
    return include_embeddings
