"""`refit="gate"` (docs/design.md §4.9): keep the refit only where it is measured, on held-out calibration
examples, to be at least as faithful to the parents as the merge without it.

The refit (`hf_mudsc.apply.refit`) is fitted on the calibration examples that are not held out (every
`fidelity.HOLDOUT_EVERY`-th example is held out, `fidelity.holdout_split`); the merged model before and after it is
scored on the held-out examples by the parents' log-probability agreement (`FidelityScorer.log_likelihood`: per
task and, for a concatenated head, over the whole head as a stock pipeline reads it; a regression head's outputs by
their relative squared error). The refitted model is kept when its score is >= the unrefitted one's and, for a
concatenated head, no task's own term is lower with it (the score pools the tasks, so a refit could buy one parent's
task with another's: three same-init parents, one fine-tuned far, lost a task 33 points to plain averaging that
way); else the unrefitted model is returned. The scores (each task's too) are recorded
(`config.mudsc["refit_gate"]`, the card's refit row). Why a gate: the refit adds up to +44 joint points across
initializations of the toy ViTs but measured below the unrefitted merge on real MiniLM pairs
(docs/benchmarks/refit_text.md); the held-out score sees which case a merge is in, from its own data, without
labels.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_mudsc.apply.fidelity import Agreement, FidelityScorer, holdout_split, tasks_below
from hf_mudsc.options import gate_scores, gate_tasks_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AverageCheck:
    """`method="auto"` on fine-tunes of one base: the merge the gate kept against plain averaging of the parents on
    the same held-out examples, task by task (`lowered`: the tasks whose own term the kept merge has below the
    average's; any such task and the average is returned instead, docs/design.md §4.9)."""

    score: float
    tasks: tuple[float, ...]
    lowered: tuple[int, ...]

    @property
    def kept(self) -> bool:
        """Whether plain averaging is the merge returned."""
        return bool(self.lowered)

    def as_config(self) -> dict[str, Any]:
        return {"kept": self.kept, "score": round(self.score, 6), "tasks": [round(t, 6) for t in self.tasks],
                "lowered_tasks": list(self.lowered)}


@dataclass
class GateDecision:
    """What the gate measured and chose (`as_config()` is `config.mudsc["refit_gate"]`); `tasks_none` /
    `tasks_refit`: each task's own term (head order) when the head is the parents' heads concatenated."""

    kept: bool
    score_none: float | None
    score_refit: float | None
    held_out_examples: int
    measure: str = "log-probability agreement"  # `FidelityScorer.measure`: what the scores are
    tasks_none: tuple[float, ...] | None = None
    tasks_refit: tuple[float, ...] | None = None
    # the task indices (a parent's, unless a merged parent holds several) the refit lowered (`fidelity.tasks_below`)
    lowered_tasks: tuple[int, ...] = ()
    average: AverageCheck | None = None  # the check against plain averaging, when one ran
    # the tasks' names when a merged parent holds several of them (task i is then not parent i's): None otherwise
    task_names: tuple[str, ...] | None = None

    def as_config(self) -> dict[str, Any]:
        config = {"kept": self.kept,
                  "score": (f"{self.measure}, mean over the parents (held out)" if "CKA" in self.measure
                            else f"parents' {self.measure}, per task and whole head (held out)"
                            if self.measure.startswith("log-probability") else f"parents' {self.measure}, per task "
                            "(held out)"),
                  "measure": self.measure,
                  "none": None if self.score_none is None else round(self.score_none, 6),
                  "refit": None if self.score_refit is None else round(self.score_refit, 6),
                  "held_out_examples": self.held_out_examples}
        if self.tasks_none is not None and self.tasks_refit is not None:
            config.update(tasks_none=[round(t, 6) for t in self.tasks_none],
                          tasks_refit=[round(t, 6) for t in self.tasks_refit],
                          lowered_tasks=list(self.lowered_tasks))
            if self.task_names is not None:
                config["task_names"] = list(self.task_names)
        if self.average is not None:
            config["average"] = self.average.as_config()
        return config


def decide(none: Agreement, refit: Agreement) -> bool:
    """Keep the refit when it is at least as faithful as the merge without it (ties keep it: the refit is what
    `refit="ridge"` measured best across initializations) and lowers no task's own term (`Agreement.tasks`)."""
    return refit.score >= none.score and not tasks_below(refit, none)


def gated_refit(merged: nn.Module, parents: Sequence[nn.Module],
                batches: Callable[[], Iterable[Mapping[str, Any]]],
                refit: Callable[[nn.Module, Callable[[], Iterable[Mapping[str, Any]]]], Any], *,
                task_sizes: Sequence[int] | None, mask_key: str | None = "attention_mask",
                scorer: FidelityScorer | None = None,
                average: Callable[[], nn.Module | None] | None = None,
                task_parents: Sequence[int] | None = None,
                task_names: Sequence[str] | None = None) -> tuple[nn.Module, Any, GateDecision]:
    """(the model to keep, the refit's report, the decision). `refit(model, batches)` refits `model` in place on
    `batches` (the pipeline's `refit_model` call); `merged` is refitted in place on the kept examples, and a copy
    taken before is returned when the gate drops the refit. Without held-out examples (fewer than
    `HOLDOUT_EVERY` calibration examples) nothing can be measured: the refit is fitted on all of them and kept.

    `scorer`: one already built on the held-out split of these same `batches` (`alpha="auto"`'s: the same
    examples, heads and mask), so the parents' held-out outputs are computed once per merge.

    `average`: builds plain averaging of the parents (or None when it cannot stand in for this merge), for
    `method="auto"` on fine-tunes of one base: when the merge the gate keeps has any task's own held-out term below
    the average's, the average is returned (`GateDecision.average`). Averaging is the baseline a default must not
    lose to; a data method plus refit can buy one parent's task with another's (three same-init parents, one
    fine-tuned far: a task 33 points under averaging) where no task of the average is worse on held-out data.

    `task_parents`: each task's parent when a merged parent holds several (`classifier.head_tasks`), and
    `task_names` the tasks' names, recorded to name a lowered task; None: task i is parent i's."""
    kept_rows, held_out = holdout_split(batches)
    if scorer is None:
        scorer = FidelityScorer(parents, held_out, task_sizes=task_sizes, mask_key=mask_key, task_parents=task_parents)
    if scorer.examples == 0:
        report = refit(merged, batches)
        logger.warning("refit gate: no held-out calibration example (fewer than 5 examples); the refit is kept")
        return merged, report, GateDecision(True, None, None, 0)
    before = copy.deepcopy(merged)
    none = scorer.agreement(before)
    report = refit(merged, lambda: kept_rows)
    refitted = scorer.agreement(merged)
    decision = GateDecision(decide(none, refitted), none.score, refitted.score, scorer.examples, scorer.measure,
                            none.tasks, refitted.tasks, tasks_below(refitted, none),
                            task_names=tuple(task_names) if task_names is not None else None)
    recorded = decision.as_config()  # the log says the scores and tasks as the card and inspect show them
    shown_none, shown_refit = gate_scores(none.score, refitted.score)
    logger.info("refit gate: held-out %s %s without the refit, %s with it%s: %s", scorer.measure, shown_none,
                shown_refit, f" (it lowered the own term of {gate_tasks_text(recorded, decision.lowered_tasks)})"
                if decision.lowered_tasks else "", "refit kept" if decision.kept else "refit dropped")
    chosen = refitted if decision.kept else none
    kept_model = merged if decision.kept else before
    if average is not None and chosen.tasks is not None:
        averaged = average()
        if averaged is not None:
            reference = scorer.agreement(averaged)
            decision.average = AverageCheck(reference.score, tuple(reference.tasks or ()),
                                            tasks_below(chosen, reference))
            logger.info("refit gate: plain averaging's held-out %s %s; %s", scorer.measure,
                        gate_scores(reference.score)[0],
                        f"the merge is below it on {gate_tasks_text(recorded, decision.average.lowered)}: "
                        "averaging kept" if decision.average.kept else
                        "the merge is at or above it on every task: merge kept")
            if decision.average.kept:
                return averaged, report, decision
    return kept_model, report, decision
