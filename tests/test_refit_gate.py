"""`refit="gate"` (docs/design.md §4.9, `hf_mudsc.apply.refit_gate`): the refit is fitted on the calibration examples
that are not held out and kept only if the merged model is at least as faithful to the parents on the held-out ones
(the parents' log-probability agreement, `FidelityScorer.log_likelihood`).

Proven here: the score's known values on hand-made logits; the gate drops a refit that makes the model less
faithful (returning the unrefitted model bit for bit) and keeps one that makes it more faithful; the refit sees only
the examples not held out; the decision and both scores reach config, recipe and card; bad input is refused
before loading."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from factories import make_batches, make_model
from torch import nn

import hf_mudsc
from hf_mudsc.apply import refit_gate
from hf_mudsc.apply.fidelity import Agreement, FidelityScorer
from hf_mudsc.apply.refit_gate import GateDecision, decide, gated_refit
from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import MergeInputError, RecipeError
from hf_mudsc.options import resolve_refit
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe

MISSING = ["/nonexistent/parent-a", "/nonexistent/parent-b"]

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedLogits(nn.Module):
    """Returns the same logits row for every example (`x`'s row count)."""

    def __init__(self, row: list[float]) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.tensor(row, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.row.expand(len(x), -1))


def _batches(rows: int = 10) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.zeros(rows, 1)}]


# ----------------------------------------------------------------------------------------- the score's values


def test_log_likelihood_of_uniform_merged_logits_is_the_mean_of_the_task_and_whole_head_terms():
    parents = [FixedLogits([2.0, 0.0]), FixedLogits([0.0, 1.0])]
    scorer = FidelityScorer(parents, _batches(), task_sizes=[2, 2])
    # each task: -log 2; the whole head against the raw ensemble (one softmax over [2, 0, 0, 1]): -log 4
    assert scorer.log_likelihood(FixedLogits([0.0, 0.0, 0.0, 0.0])) == pytest.approx(-1.5 * math.log(2))


def test_log_likelihood_of_the_parents_own_log_probabilities_is_minus_their_entropies_and_half_log_two():
    p_a, p_b = torch.tensor([0.8, 0.2], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)
    parents = [FixedLogits(p_a.log().tolist()), FixedLogits(p_b.log().tolist())]
    scorer = FidelityScorer(parents, _batches(), task_sizes=[2, 2])
    entropy = [float(-(p * p.log()).sum()) for p in (p_a, p_b)]
    merged = FixedLogits(torch.cat([p_a, p_b]).log().tolist())
    # per task: -(H_a + H_b) / 2; whole head: the raw ensemble is [p_a, p_b] / 2 and so is the merged softmax,
    # whose entropy is (H_a + H_b) / 2 + log 2
    tasks, whole = -(entropy[0] + entropy[1]) / 2, -(entropy[0] + entropy[1]) / 2 - math.log(2)
    assert scorer.log_likelihood(merged) == pytest.approx((tasks + whole) / 2)


def test_log_likelihood_sees_a_per_task_shift_that_the_per_task_agreement_does_not():
    """Shifting one task's logits against the other's leaves every task's softmax, and so the per-task joint
    decision and `scorer()`'s agreement, unchanged — but not the raw argmax a stock pipeline takes over the whole
    head. The log-likelihood's whole-head term (one softmax over the merged head against one over the parents'
    concatenated raw logits) scores that cross-head calibration, so the shifted head scores lower."""
    p_a, p_b = torch.tensor([0.6, 0.4], dtype=torch.float64), torch.tensor([0.1, 0.9], dtype=torch.float64)
    parents = [FixedLogits(p_a.log().tolist()), FixedLogits(p_b.log().tolist())]
    scorer = FidelityScorer(parents, _batches(), task_sizes=[2, 2])
    logits = torch.cat([p_a, p_b]).log()
    shifted = FixedLogits((logits + torch.tensor([9.0, 9.0, 0.0, 0.0], dtype=torch.float64)).tolist())
    same = FixedLogits(logits.tolist())
    ensemble = torch.cat([p_a, p_b]) / 2
    whole_shifted = float((ensemble * torch.log_softmax(shifted.row.detach(), 0)).sum())
    tasks = float(sum((p * p.log()).sum() for p in (p_a, p_b)) / 2)
    assert scorer.log_likelihood(shifted) == pytest.approx((tasks + whole_shifted) / 2)
    assert scorer.log_likelihood(shifted) < scorer.log_likelihood(same) - 1.0
    # The ensemble picks B's class 1 (0.9); the shifted head's raw argmax would pick A's class 0.
    assert scorer(shifted) == scorer(same) == 1.0


def test_log_likelihood_with_three_parents_of_unequal_heads_uses_one_softmax_over_all_their_logits():
    """The third parent has one output: a regression head (transformers' `num_labels=1`), scored by its relative
    squared error; the whole-head softmax covers the two classification tasks' logits."""
    rows = [[1.0, -1.0], [0.5, 2.0, -0.5], [3.0]]
    parents = [FixedLogits(row) for row in rows]
    scorer = FidelityScorer(parents, _batches(), task_sizes=[2, 3, 1])
    merged_row = [0.0, 1.0, 2.0, 0.0, 1.0, -2.0]
    tasks = []
    for row, (lo, hi) in zip(rows[:2], [(0, 2), (2, 5)]):
        p = torch.tensor(row, dtype=torch.float64).softmax(0)
        tasks.append(float((p * torch.tensor(merged_row[lo:hi], dtype=torch.float64).log_softmax(0)).sum()))
    tasks.append(-((-2.0 - 3.0) ** 2) / 3.0 ** 2)
    ensemble = torch.tensor(rows[0] + rows[1], dtype=torch.float64).softmax(0)
    whole = float((ensemble * torch.tensor(merged_row[:5], dtype=torch.float64).log_softmax(0)).sum())
    assert scorer.log_likelihood(FixedLogits(merged_row)) == pytest.approx((sum(tasks) / 3 + whole) / 2)


def test_a_multi_label_head_is_scored_per_label_by_its_sigmoids_not_by_a_softmax():
    """A multi-label head (problem_type "multi_label_classification") predicts each label by its own sigmoid: a shift
    of its logits flips labels while a softmax over them, which the gate and alpha="auto" scored it by, stays the
    same. Its term is now the parents' per-label Bernoulli log-likelihood `Σ_l p log q + (1 - p) log(1 - q)` (p, q:
    the parent's and the merged sigmoids), its agreement the share of labels decided alike (logit > 0), and it takes
    part in no softmax decision (no joint agreement, no whole-head term)."""
    multi = FixedLogits([2.0, -1.0])
    multi.config = SimpleNamespace(problem_type="multi_label_classification")
    single = FixedLogits([0.0, 1.0])
    scorer = FidelityScorer([multi, single], _batches(), task_sizes=[2, 2])
    same = FixedLogits([2.0, -1.0, 0.0, 1.0])
    shifted = FixedLogits([7.0, 4.0, 0.0, 1.0])  # the multi-label slice + 5: label 1 now on
    p, q = torch.tensor([2.0, -1.0]).double().sigmoid(), torch.tensor([7.0, 4.0]).double().sigmoid()
    bernoulli = float((p * q.log() + (1 - p) * (1 - q).log()).sum())
    softmax = torch.tensor([0.0, 1.0], dtype=torch.float64)
    own = float((softmax.softmax(0) * softmax.log_softmax(0)).sum())
    assert scorer.log_likelihood(shifted) == pytest.approx((bernoulli + own) / 2)
    assert scorer.log_likelihood(shifted) < scorer.log_likelihood(same) - 1.0
    assert scorer(shifted) == pytest.approx((0.5 + 1.0) / 2)  # one of the two labels flipped; task B agrees
    assert scorer(same) == 1.0
    assert "Bernoulli" in scorer.measure


def test_log_likelihood_with_one_shared_head_averages_the_parents_terms():
    parents = [FixedLogits([0.0, 0.0, 0.0]), FixedLogits([0.0, 0.0, 0.0])]
    scorer = FidelityScorer(parents, _batches(), task_sizes=None)
    assert scorer.log_likelihood(FixedLogits([0.0, 0.0, 0.0])) == pytest.approx(-math.log(3))


def test_decide_keeps_the_refit_when_it_scores_at_least_as_well():
    assert decide(Agreement(-1.0), Agreement(-0.5)) and decide(Agreement(-1.0), Agreement(-1.0))
    assert not decide(Agreement(-0.5), Agreement(-0.50001))


def test_decide_drops_a_refit_that_lowers_any_tasks_own_term_and_keeps_ties():
    assert decide(Agreement(-1.0, (-0.5, -0.5)), Agreement(-0.9, (-0.5, -0.4)))
    assert not decide(Agreement(-1.0, (-0.5, -0.5)), Agreement(-0.5, (-0.1, -0.5000001)))


# ----------------------------------------------------------------------------------------- the gate's choice


class CountingRefit:
    """A stand-in for the pipeline's refit: sets the model's logits row to `row` and counts the examples it read."""

    def __init__(self, row: list[float]) -> None:
        self.row, self.examples = row, 0

    def __call__(self, model: nn.Module, batches) -> str:
        self.examples = sum(len(batch["x"]) for batch in batches())
        with torch.no_grad():
            model.row.copy_(torch.tensor(self.row, dtype=torch.float64))
        return "report"


def test_gate_drops_a_refit_that_moves_the_merged_model_away_from_its_parents():
    parents = [FixedLogits([3.0, 0.0]), FixedLogits([0.0, 3.0])]
    merged = FixedLogits([3.0, 0.0, 0.0, 3.0])  # the parents' logits exactly
    before = merged.row.detach().clone()
    refit = CountingRefit([0.0, 3.0, 3.0, 0.0])  # every task's prediction reversed
    kept, report, decision = gated_refit(merged, parents, lambda: _batches(10), refit, task_sizes=[2, 2])
    assert report == "report" and refit.examples == 8  # the 2 held-out examples (every 5th) are not fitted
    assert decision.kept is False and decision.held_out_examples == 2
    assert decision.score_refit < decision.score_none
    assert torch.equal(kept.row, before)  # the unrefitted model, bit for bit


def test_gate_drops_a_refit_that_keeps_each_tasks_softmax_but_shifts_one_head_against_the_other():
    """The refit's head targets are centred per task; on text pairs that lost the cross-head calibration the raw
    joint decision needs (docs/benchmarks/gate_joint.md). A refit that changes nothing but one task's offset
    scores equal per task and lower on the whole head: dropped, the unrefitted model returned bit for bit."""
    parents = [FixedLogits([2.0, 0.0]), FixedLogits([0.5, 1.5])]
    merged = FixedLogits([2.0, 0.0, 0.5, 1.5])  # the parents' logits exactly
    before = merged.row.detach().clone()
    refit = CountingRefit([-1.0, -3.0, 0.5, 1.5])  # task A's logits 3 lower: each task's softmax unchanged
    kept, _, decision = gated_refit(merged, parents, lambda: _batches(10), refit, task_sizes=[2, 2])
    assert decision.kept is False and decision.score_refit < decision.score_none
    assert torch.equal(kept.row, before)


def test_gate_drops_a_refit_that_buys_one_task_with_another_even_when_the_pooled_score_rises():
    """The gate's score pools the tasks; a refit that brings one task much closer to its parent while taking another
    away (three same-init parents, one fine-tuned far: a task lost 33 points to plain averaging with the refit the
    pooled score kept, the s31 quality hunt) is dropped: no task's own term may fall (docs/design.md §4.9)."""
    parents = [FixedLogits([2.0, 0.0]), FixedLogits([0.0, 2.0]), FixedLogits([4.0, 0.0])]
    merged = FixedLogits([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # every task right, under-confident
    before = merged.row.detach().clone()
    refit = CountingRefit([1.0, 0.0, 0.0, 0.8, 4.0, 0.0])  # task C its parent's exactly, task B a little less sure
    kept, _, decision = gated_refit(merged, parents, lambda: _batches(10), refit, task_sizes=[2, 2, 2])
    assert decision.score_refit > decision.score_none  # the pooled score prefers the refit ...
    assert decision.tasks_refit[1] < decision.tasks_none[1]  # ... which lowers task B's own agreement
    assert decision.tasks_refit[2] > decision.tasks_none[2] and decision.tasks_refit[0] == decision.tasks_none[0]
    assert decision.kept is False and decision.lowered_tasks == (1,)
    assert torch.equal(kept.row, before)  # the unrefitted model, bit for bit
    config = decision.as_config()
    assert config["kept"] is False and config["lowered_tasks"] == [1]
    assert config["tasks_none"] == [round(t, 6) for t in decision.tasks_none]
    assert config["tasks_refit"] == [round(t, 6) for t in decision.tasks_refit]


def test_gate_keeps_a_refit_that_raises_every_task_and_records_each_tasks_terms():
    parents = [FixedLogits([2.0, 0.0]), FixedLogits([0.0, 2.0]), FixedLogits([4.0, 0.0])]
    merged = FixedLogits([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    refit = CountingRefit([2.0, 0.0, 0.0, 2.0, 4.0, 0.0])  # every task its parent's exactly
    kept, _, decision = gated_refit(merged, parents, lambda: _batches(10), refit, task_sizes=[2, 2, 2])
    assert decision.kept is True and kept is merged and decision.lowered_tasks == ()
    assert all(r > n for r, n in zip(decision.tasks_refit, decision.tasks_none))


class Built:
    """A stand-in for the pipeline's plain-average builder: returns `model` (or None) and counts its calls."""

    def __init__(self, model: nn.Module | None) -> None:
        self.model, self.calls = model, 0

    def __call__(self) -> nn.Module | None:
        self.calls += 1
        return self.model


THREE = [FixedLogits([2.0, 0.0]), FixedLogits([0.0, 2.0]), FixedLogits([4.0, 0.0])]


def test_plain_averaging_is_returned_when_the_kept_merge_is_below_it_on_any_task():
    """method="auto" on fine-tunes of one base: the refit raises every task over the data method's merge (kept), yet
    leaves parent B's task below plain averaging's on the held-out examples: the average is the merge returned."""
    merged = FixedLogits([1.0, 0.0, 0.0, 0.2, 0.0, 0.0])  # the data method's merge: task B nearly undecided
    refit = CountingRefit([1.5, 0.0, 0.0, 0.5, 4.0, 0.0])  # every task closer to its parent
    average = Built(FixedLogits([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]))  # task B surer than the refit's, A and C less
    kept, _, decision = gated_refit(merged, THREE, lambda: _batches(10), refit, task_sizes=[2, 2, 2],
                                    average=average)
    assert decision.kept is True and decision.lowered_tasks == ()  # the refit itself passed the gate
    assert average.calls == 1 and kept is average.model
    assert decision.average.kept is True and decision.average.lowered == (1,)
    assert decision.average.tasks[1] > decision.tasks_refit[1]
    assert decision.as_config()["average"] == {"kept": True, "score": round(decision.average.score, 6),
                                               "tasks": [round(t, 6) for t in decision.average.tasks],
                                               "lowered_tasks": [1]}


def test_the_kept_merge_stays_when_it_is_at_or_above_plain_averaging_on_every_task():
    merged = FixedLogits([1.0, 0.0, 0.0, 0.2, 0.0, 0.0])
    refit = CountingRefit([2.0, 0.0, 0.0, 2.0, 4.0, 0.0])  # every task its parent's exactly
    average = Built(FixedLogits([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]))
    kept, _, decision = gated_refit(merged, THREE, lambda: _batches(10), refit, task_sizes=[2, 2, 2],
                                    average=average)
    assert kept is merged and decision.average.kept is False and decision.average.lowered == ()
    assert decision.as_config()["average"]["kept"] is False


def test_no_average_check_without_tasks_or_without_an_average_that_can_stand_in():
    refit = CountingRefit([2.0, 0.0, 0.0, 2.0, 4.0, 0.0])
    unbuildable = Built(None)  # e.g. a size budget widened the merge: the average has other shapes
    kept, _, decision = gated_refit(FixedLogits([1.0, 0.0, 0.0, 0.2, 0.0, 0.0]), THREE, lambda: _batches(10),
                                    refit, task_sizes=[2, 2, 2], average=unbuildable)
    assert unbuildable.calls == 1 and decision.average is None and "average" not in decision.as_config()
    shared = Built(FixedLogits([2.0, 0.0]))
    _, _, decision = gated_refit(FixedLogits([-1.0, 0.0]), THREE[:2], lambda: _batches(10), CountingRefit([0.5, 0.0]),
                                 task_sizes=None, average=shared)
    assert shared.calls == 0 and decision.average is None  # one shared head: no tasks to hold against it


def test_the_per_task_guard_needs_tasks_one_shared_head_is_decided_by_its_pooled_score():
    """Parents sharing one label set have one output the merge must compromise on: no per-task terms, no guard."""
    parents = [FixedLogits([2.0, 0.0]), FixedLogits([0.0, 2.0])]
    merged = FixedLogits([-1.0, 0.0])
    refit = CountingRefit([0.5, 0.0])  # closer to A, a little farther from B
    kept, _, decision = gated_refit(merged, parents, lambda: _batches(10), refit, task_sizes=None)
    assert decision.tasks_none is None and decision.tasks_refit is None and decision.lowered_tasks == ()
    assert decision.score_refit > decision.score_none and decision.kept is True
    assert "tasks_none" not in decision.as_config()


def test_a_card_and_inspect_say_which_parents_task_a_dropped_refit_would_have_lowered(tmp_path):
    """A refit dropped although its pooled score is the higher one: the card's refit row and `inspect` say why."""
    from hf_mudsc.cli.inspect import summary

    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    merged = hf_mudsc.merge([model_a, model_b], make_batches("vit_cls", num_batches=2), refit="none", progress=False)
    gate = GateDecision(False, -1.2, -1.0, 40, tasks_none=(-0.5, -0.6, -0.9), tasks_refit=(-0.5, -0.7, -0.3),
                        lowered_tasks=(1,))
    merged.config.mudsc.update(refit="gate", refit_gate=gate.as_config())
    card = " ".join(str(render_card(merged, Recipe(models=["a", "b"], calibration="c", refit="gate"))).split())
    assert ("| Refit / ridge λ (relative) / examples | gate: refit dropped (held-out log-probability agreement -1.0000 "
            "with, -1.2000 without; 40 examples; it lowered parent B's task: -0.7000 with, -0.6000 without) /") in card
    text = summary(tmp_path, merged.config.mudsc, merged.merge_report.diagnostics, None, False)
    assert ("refit:     the gate dropped the refit (held-out log-probability agreement -1.0000 with it, -1.2000 "
            "without; 40 examples; it lowered parent B's task: -0.7000 with, -0.6000 without)") in text


def test_gate_keeps_a_refit_that_brings_the_merged_model_closer_to_its_parents():
    parents = [FixedLogits([3.0, 0.0]), FixedLogits([0.0, 3.0])]
    merged = FixedLogits([0.0, 0.0, 0.0, 0.0])
    refit = CountingRefit([3.0, 0.0, 0.0, 3.0])
    kept, _, decision = gated_refit(merged, parents, lambda: _batches(10), refit, task_sizes=[2, 2])
    assert decision.kept is True and kept is merged
    assert kept.row.tolist() == [3.0, 0.0, 0.0, 3.0]
    assert decision.as_config() == {
        "kept": True, "score": "parents' log-probability agreement, per task and whole head (held out)",
        "measure": "log-probability agreement", "none": round(decision.score_none, 6),
        "refit": round(decision.score_refit, 6), "held_out_examples": 2,
        "tasks_none": [round(-math.log(2), 6)] * 2, "tasks_refit": [round(t, 6) for t in decision.tasks_refit],
        "lowered_tasks": []}


def test_gate_without_a_held_out_example_fits_on_everything_and_keeps_the_refit(caplog):
    parents = [FixedLogits([3.0, 0.0]), FixedLogits([0.0, 3.0])]
    refit = CountingRefit([0.0, 3.0, 3.0, 0.0])
    kept, _, decision = gated_refit(FixedLogits([3.0, 0.0, 0.0, 3.0]), parents, lambda: _batches(4), refit,
                                    task_sizes=[2, 2])
    assert decision == GateDecision(True, None, None, 0) and refit.examples == 4
    assert kept.row.tolist() == [0.0, 3.0, 3.0, 0.0]
    assert "no held-out calibration example" in caplog.text


# ------------------------------------------------------------------------------------------- through merge()


@pytest.mark.parametrize("keep", [False, True])
def test_merge_with_the_gate_records_its_decision_in_config_recipe_and_card(monkeypatch, keep):
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)  # 32 examples: 6 held out
    monkeypatch.setattr(refit_gate, "decide", lambda none, refit: keep)
    gated = hf_mudsc.merge([model_a, model_b], batches, refit="gate", progress=False)
    plain = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
    gate = gated.config.mudsc["refit_gate"]
    assert gated.config.mudsc["refit"] == gated.merge_report.recipe["refit"] == "gate"
    assert gate["kept"] is keep and gate["held_out_examples"] == 6
    assert gated.merge_report.refit_gate.as_config() == gate  # the merge report holds the same decision
    assert isinstance(gate["none"], float) and isinstance(gate["refit"], float)
    assert gated.merge_report.refit.examples == 26  # the refit read the 26 examples not held out
    same = all(torch.equal(p, q) for p, q in zip(gated.state_dict().values(), plain.state_dict().values()))
    assert same is not keep  # dropped: the unrefitted merge exactly; kept: the refitted one
    assert plain.config.mudsc["refit_gate"] is None
    card = str(render_card(gated, Recipe(models=["a", "b"], calibration="c", refit="gate")))
    verdict = "kept" if keep else "dropped"
    assert (f"| Refit / ridge λ (relative) / examples | gate: refit {verdict} (held-out log-probability agreement "
            f"{gate['refit']:.4f} with, {gate['none']:.4f} without; 6 examples) / 0.001 / auto: 26 examples |") in card


def test_with_auto_alpha_the_gate_reuses_the_alpha_searchs_held_out_parent_outputs(monkeypatch):
    """alpha="auto" holds out the same examples as the gate: the parents' held-out outputs are computed once, and
    the merge is the one a gate with its own scorer gives, tensor for tensor."""
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    built = []
    original_init = FidelityScorer.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(FidelityScorer, "__init__", counting_init)
    shared = hf_mudsc.merge([model_a, model_b], batches, alpha="auto", refit="gate", progress=False)
    assert len(built) == 1  # the α search's scorer, reused by the gate
    original_gate = refit_gate.gated_refit
    monkeypatch.setattr(refit_gate, "gated_refit", lambda *a, **k: original_gate(*a, **{**k, "scorer": None}))
    built.clear()
    fresh = hf_mudsc.merge([model_a, model_b], batches, alpha="auto", refit="gate", progress=False)
    assert len(built) == 2  # the α search's and the gate's own
    assert shared.config.mudsc["refit_gate"] == fresh.config.mudsc["refit_gate"]
    assert shared.config.mudsc["refit_gate"]["held_out_examples"] == shared.config.mudsc["alpha_auto"][
        "held_out_examples"] == 6
    assert all(torch.equal(p, q) for p, q in zip(shared.state_dict().values(), fresh.state_dict().values()))


def test_the_gate_is_a_cli_flag_and_a_recipe_value():
    args = build_parser().parse_args(["merge", "a", "b", "--calibration", "c", "-o", "o", "--refit", "gate"])
    assert build_recipe(args).refit == "gate"
    assert resolve_refit("gate", matches_units=False, has_data=True, num_parents=2, reference_compat=False) == "gate"


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("options", "message"), [
    ({"refit": "gate", "reference_compat": True},
     "refit='gate' changes the merged weights, which reference_compat=True must keep equal to the reference's; "
     "drop one of --refit / --reference-compat"),
    ({"refit": "gate", "method": "average"}, "refit='gate' needs calibration data"),
    ({"refit": "gates"}, "unknown refit 'gates'; choose one of: auto, none, ridge, gate, repair (CLI: --refit)"),
])
def test_bad_gate_options_are_refused_before_loading(options, message):
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING, None, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_gate_refuses_a_one_shot_iterator_before_loading():
    with pytest.raises(MergeInputError, match=r"reads the calibration data once per layer step"):
        hf_mudsc.merge(MISSING, iter(make_batches("vit_cls", num_batches=1)), refit="gate")


def test_a_recipe_with_the_gate_and_no_calibration_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("models: [a, b]\nrefit: gate\n")
    with pytest.raises(RecipeError, match=r"refit 'gate' needs calibration data"):
        Recipe.load(path).validate()


def test_a_deep_copy_is_what_the_gate_returns_when_it_drops_the_refit():
    parents = [FixedLogits([3.0, 0.0]), FixedLogits([0.0, 3.0])]
    merged = FixedLogits([3.0, 0.0, 0.0, 3.0])
    kept, _, _ = gated_refit(merged, parents, lambda: _batches(10), CountingRefit([0.0, 3.0, 3.0, 0.0]),
                             task_sizes=[2, 2])
    assert kept is not merged and copy.deepcopy(kept).row.tolist() == [3.0, 0.0, 0.0, 3.0]


# --------------------------------------------------------------------------- a regression head (one output)


def test_a_one_output_regression_head_is_scored_by_its_relative_squared_error_not_a_constant():
    """`num_labels=1` is transformers' regression head: a softmax over one logit is 1 whatever the output, so a
    log-probability score would be 0 for every model and the gate's decision vacuous. Its outputs are compared
    instead: minus the squared error relative to the parent's outputs' mean square."""
    scorer = FidelityScorer([FixedLogits([2.0]), FixedLogits([4.0])], _batches(), task_sizes=None)
    assert scorer.log_likelihood(FixedLogits([3.0])) == pytest.approx(-(1 / 4 + 1 / 16) / 2)
    assert scorer.log_likelihood(FixedLogits([2.0])) > scorer.log_likelihood(FixedLogits([9.0]))
    assert scorer(FixedLogits([2.5])) > scorer(FixedLogits([9.0]))  # alpha="auto"'s score sees it too
    assert "squared error" in scorer.measure


def test_merging_regression_parents_records_a_gate_that_measured_something(tmp_path):
    model_a, model_b = make_model("vit_cls", seed=1, num_labels=1), make_model("vit_cls", seed=2, num_labels=1)
    merged = hf_mudsc.merge([model_a, model_b], make_batches("vit_cls", num_batches=2), progress=False)
    gate = merged.config.mudsc["refit_gate"]
    assert gate["none"] != gate["refit"] and "squared error" in gate["measure"]
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "relative squared error" in card and "log-probability" not in card


def test_a_bare_encoders_gate_says_it_scored_feature_cka_not_log_probabilities(tmp_path):
    """Without logits (a bare encoder; CLIP's towers) the gate's score is the mean linear CKA of the held-out
    features: the card must not call it a log-probability agreement."""
    parents = [make_model("vit", seed) for seed in (1, 2)]
    merged = hf_mudsc.merge(parents, make_batches("vit", num_batches=2), method="mudsc", progress=False)
    gate = merged.config.mudsc["refit_gate"]
    assert 0 < gate["refit"] <= 1 and "CKA" in gate["measure"] and "log-probability" not in gate["score"]
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    assert "held-out linear CKA of the features" in (tmp_path / "merged" / "README.md").read_text()
