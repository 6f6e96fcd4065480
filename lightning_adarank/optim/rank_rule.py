"""The adaptive rank's energy when training from scratch: what the task modules make of ``energy=None``.

Measured (``benchmarks/from_scratch.py``; results in ``benchmarks/results/from_scratch_cpu.md``), training from
random initialisation with the package's update rule (``scale_mode="rms"``), 3 seeds each:

* a Geneformer-architecture cell-type classifier (2 layers, hidden 128, rank 16, 8 epochs): macro-F1 34.5 at
  energy 0.9 (mean rank 3.6 of 16), 38.3 at 0.99 (rank 7.3), **39.9 at 1.0** (rank 16), against AdamW's 40.8;
  the last epoch's training loss 0.470 / 0.424 / 0.390 against AdamW's 0.351, the test loss 1.17 / 1.10 / 1.01
  against 1.005;
* a small LLaMA (200 steps, rank 48, at AdamW's per-group learning rates, lr 1e-2): validation perplexity 218.3 at
  energy 0.9 (mean rank 13.6 of 48) against 195.4 at 1.0, AdamW's 195.4; at the best lr of both (3e-2), 189.1
  against AdamW's 187.0.

Fine-tuning, the other way round: MiniLM on 2,000 CoLA sentences (3 epochs, 2 seeds,
``benchmarks/results/quality_second_pass.md``) reads Matthews 13.6 at energy 0.9 (ranks 5.3 → 6.5 of 8) and 3.0 at
1.0, its training loss 0.523 against 0.563.

From random initialisation the adaptive rank undertrains: the smoothed gradient of a network far from trained
concentrates 90 % of its sketch's energy in a few directions, so the rule picks ranks far below ``max_rank``
while the weights must still move in many. The paper's argument for a falling rank (its Lemma 2) is about the
gradient's rank shrinking as training converges, which is the fine-tuning regime. So:

* ``energy=None`` while training **from scratch**: 1.0, every projected matrix at ``max_rank`` (the memory the
  user budgeted with ``max_rank``/``rank``); refreshes, carried moments and the new-directions rule stay;
* ``energy=None`` when **fine-tuning** a checkpoint: :data:`~lightning_adarank.optim.config.DEFAULT_ENERGY`
  (0.9), the adaptive rank;
* an explicit value is always obeyed.

The plain optimizer and the callbacks cannot tell a random initialisation from a checkpoint, so they use 0.9;
pass ``energy=1.0`` there to train from scratch this way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .config import DEFAULT_ENERGY

__all__ = ["FROM_SCRATCH_ENERGY", "resolve_energy"]

log = logging.getLogger(__name__)

#: ``energy=None``'s value from random initialisation: keep every projected matrix at ``max_rank``
FROM_SCRATCH_ENERGY = 1.0


def resolve_energy(
    energy: float | None,
    *,
    from_pretrained: bool,
    owner: str = "",
    report: Callable[[str], None] | None = None,
) -> float:
    """The ``energy`` an AdaRankGrad run of a task module should use (see the module docstring for the rule).

    Args:
        energy: the user's setting; ``None`` applies the rule.
        from_pretrained: the weights come from a pretrained checkpoint (``False``: random initialisation).
        owner: a name for the log line (e.g. ``"GeneformerClassifier"``).
        report: where the line saying what ``None`` chose goes (default: this module's logger at INFO).

    Returns:
        The energy, in ``(0, 1]``; an explicit ``energy`` unchanged.
    """
    if energy is not None:
        return energy
    chosen = DEFAULT_ENERGY if from_pretrained else FROM_SCRATCH_ENERGY
    who = f"{owner}: " if owner else ""
    why = (
        "fine-tuning a pretrained checkpoint: the adaptive rank"
        if from_pretrained
        else "training from scratch: every projected matrix at max_rank"
    )
    (report or log.info)(f"{who}AdaRankGrad energy=None -> {chosen} ({why}). Set adarank.energy to override.")
    return chosen
