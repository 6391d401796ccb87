"""`refit="gate"` (docs/design.md §4.9): keep the refit only where it is measured, on held-out calibration
examples, to be at least as faithful to the parents as the merge without it.

The refit (`hf_mudsc.apply.refit`) is fitted on the calibration examples that are not held out (every
`fidelity.HOLDOUT_EVERY`-th example is held out, `fidelity.holdout_split`); the merged model before and after it is
scored on the held-out examples by the parents' log-probability agreement (`FidelityScorer.log_likelihood`: per
task and, for a concatenated head, over the whole head as a stock pipeline reads it; a regression head's outputs by
their relative squared error). The
refitted model is kept when its score is >= the unrefitted one's, else the unrefitted model is returned. Both
scores are recorded (`config.mudsc["refit_gate"]`, the card's refit row). Why a gate: the refit adds up to +44
joint points across initializations of the toy ViTs but measured below the unrefitted merge on real MiniLM pairs
(docs/benchmarks/refit_text.md); the held-out score sees which case a merge is in, from its own data, without labels.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_mudsc.apply.fidelity import FidelityScorer, holdout_split

logger = logging.getLogger(__name__)


@dataclass
class GateDecision:
    """What the gate measured and chose (`as_config()` is `config.mudsc["refit_gate"]`)."""

    kept: bool
    score_none: float | None
    score_refit: float | None
    held_out_examples: int
    measure: str = "log-probability agreement"  # `FidelityScorer.measure`: what the scores are

    def as_config(self) -> dict[str, Any]:
        return {"kept": self.kept,
                "score": (f"{self.measure}, mean over the parents (held out)" if "CKA" in self.measure
                          else f"parents' {self.measure}, per task and whole head (held out)"
                          if self.measure.startswith("log-probability") else f"parents' {self.measure}, per task "
                          "(held out)"),
                "measure": self.measure,
                "none": None if self.score_none is None else round(self.score_none, 6),
                "refit": None if self.score_refit is None else round(self.score_refit, 6),
                "held_out_examples": self.held_out_examples}


def decide(score_none: float, score_refit: float) -> bool:
    """Keep the refit when it is at least as faithful as the merge without it (ties keep it: the refit is what
    `refit="ridge"` measured best across initializations)."""
    return score_refit >= score_none


def gated_refit(merged: nn.Module, parents: Sequence[nn.Module],
                batches: Callable[[], Iterable[Mapping[str, Any]]],
                refit: Callable[[nn.Module, Callable[[], Iterable[Mapping[str, Any]]]], Any], *,
                task_sizes: Sequence[int] | None, mask_key: str | None = "attention_mask",
                scorer: FidelityScorer | None = None) -> tuple[nn.Module, Any, GateDecision]:
    """(the model to keep, the refit's report, the decision). `refit(model, batches)` refits `model` in place on
    `batches` (the pipeline's `refit_model` call); `merged` is refitted in place on the kept examples, and a copy
    taken before is returned when the gate drops the refit. Without held-out examples (fewer than
    `HOLDOUT_EVERY` calibration examples) nothing can be measured: the refit is fitted on all of them and kept.

    `scorer`: one already built on the held-out split of these same `batches` (`alpha="auto"`'s: the same
    examples, heads and mask), so the parents' held-out outputs are computed once per merge."""
    kept_rows, held_out = holdout_split(batches)
    if scorer is None:
        scorer = FidelityScorer(parents, held_out, task_sizes=task_sizes, mask_key=mask_key)
    if scorer.examples == 0:
        report = refit(merged, batches)
        logger.warning("refit gate: no held-out calibration example (fewer than 5 examples); the refit is kept")
        return merged, report, GateDecision(True, None, None, 0)
    before = copy.deepcopy(merged)
    score_none = scorer.log_likelihood(before)
    report = refit(merged, lambda: kept_rows)
    score_refit = scorer.log_likelihood(merged)
    decision = GateDecision(decide(score_none, score_refit), score_none, score_refit, scorer.examples,
                            scorer.measure)
    logger.info("refit gate: held-out %s %.4f without the refit, %.4f with it: %s", scorer.measure,
                score_none, score_refit, "refit kept" if decision.kept else "refit dropped")
    return (merged if decision.kept else before), report, decision
