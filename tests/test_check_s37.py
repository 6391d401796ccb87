"""`auto`'s correspondence check looks at the solve's first start before running the solve (hf_mudsc.methods.auto,
docs/design.md §4.8): fine-tunes whose activation matching already leaves most units in place are confirmed without
the multi-start solve, which was most of the check's cost (a MiniLM fine-tune pair: `scripts/correspondence_start.py`);
a first start that moved most units decides nothing, and the solve decides as before.
"""

from __future__ import annotations

import pytest
import torch
from factories import make_batches, same_weights
from test_correspondence_check import _moved_mlp_pair
from test_refit import same_base_fine_tunes

import hf_mudsc
import hf_mudsc.pipeline as pipeline
from hf_mudsc.methods.auto import check_record, confirm_choice
from hf_mudsc.methods.matching import UnitMatchingMethod
from hf_mudsc.methods.registry import MergeMethod, get_method
from hf_mudsc.solve.matchers import share_in_place

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_solves(monkeypatch) -> list[str]:
    """Record every unit-matching merge (the check's solve) by method name."""
    solves: list[str] = []
    real = UnitMatchingMethod.merge_parameters

    def counted(self, context):
        solves.append(self.name)
        return real(self, context)

    monkeypatch.setattr(UnitMatchingMethod, "merge_parameters", counted)
    return solves


def test_a_first_start_that_keeps_most_units_confirms_without_the_solve(monkeypatch):
    """`merge(same_base_fine_tunes(), batches)`: no mudsc solve runs, the record says the first start decided, and
    the merge is regmean's, bit for bit."""
    solves = _count_solves(monkeypatch)
    tuned, batches = same_base_fine_tunes(), make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(tuned, batches, refit="none", progress=False)
    record = merged.config.mudsc
    assert solves == []
    assert record["method"] == "regmean"
    assert record["correspondence_check"] == {"method": "mudsc", "parents": ["A", "B"], "units_in_place": 1.0,
                                              "holds": True, "solved": "first start"}
    assert ("; mudsc's activation-only zip start on the calibration data leaves 100.0% of units in "
            "place): regmean") in record["method_choice_reason"]
    assert same_weights(merged, hf_mudsc.merge(tuned, batches, method="regmean", refit="none", progress=False))


def test_a_first_start_that_moved_most_units_leaves_the_decision_to_the_solve(monkeypatch):
    """`merge(_moved_mlp_pair(), batches)`: the first start moved most units, so the solve runs and decides (its
    merge kept); the record has no "solved" key and the reason names the solve."""
    solves = _count_solves(monkeypatch)
    starts: list[float] = []
    real = pipeline._start_in_place
    monkeypatch.setattr(pipeline, "_start_in_place", lambda checker, context: starts.append(
        real(checker, context)) or starts[-1])
    merged = hf_mudsc.merge(list(_moved_mlp_pair()), make_batches("vit_cls", num_batches=4), refit="none",
                            progress=False)
    record = merged.config.mudsc
    assert len(starts) == 1 and starts[0] < 0.5
    assert solves == ["mudsc"] and record["method"] == "mudsc"
    assert "solved" not in record["correspondence_check"] and record["correspondence_check"]["holds"] is False
    assert "mudsc's solve on the calibration data leaves" in record["method_choice_reason"]


def test_the_solve_still_confirms_when_the_first_start_alone_does_not(monkeypatch):
    """A pair whose first start moves most units but whose solve keeps them (the same-init digit ViTs): the solve
    runs, regmean merges, and the record is the solve's (made here by a first start that decides nothing)."""
    solves = _count_solves(monkeypatch)
    monkeypatch.setattr(pipeline, "_start_in_place", lambda checker, context: 0.1)
    tuned, batches = same_base_fine_tunes(), make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(tuned, batches, refit="none", progress=False)
    assert solves == ["mudsc"]
    assert merged.config.mudsc["correspondence_check"] == {"method": "mudsc", "parents": ["A", "B"],
                                                           "units_in_place": 1.0, "holds": True}
    assert "mudsc's solve on the calibration data leaves 100.0%" in merged.config.mudsc["method_choice_reason"]
    assert same_weights(merged, hf_mudsc.merge(tuned, batches, method="regmean", refit="none", progress=False))


def test_three_parents_are_confirmed_by_the_pairs_first_start(monkeypatch):
    """`merge(three fine-tunes, batches)`: the pair (A and the parent farthest from it) is confirmed by its first
    start: no solve over the pair nor over every parent."""
    solves = _count_solves(monkeypatch)
    tuned, batches = same_base_fine_tunes(seeds=(2, 3, 4)), make_batches("vit_cls", num_batches=2)
    merged = hf_mudsc.merge(tuned, batches, refit="none", progress=False)
    check = merged.config.mudsc["correspondence_check"]
    assert solves == [] and merged.config.mudsc["method"] == "regmean"
    assert check["parents"] in (["A", "B"], ["A", "C"]) and check["holds"] is True
    assert check["solved"] == "first start"
    assert "mudsc's activation-only zip start on the calibration data leaves" in (
        merged.config.mudsc["method_choice_reason"])


@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_the_first_start_is_the_activation_zip_matching(monkeypatch, matcher):
    """Known answer: the first start the check reads is the matching ZipIt merges by (activations only, zip), on the
    same statistics, whatever the merge's matcher: align's start keeps too many units in place where they moved
    (`methods.auto.START_MATCHER`)."""
    seen: list[list] = []
    real = UnitMatchingMethod.first_start
    monkeypatch.setattr(UnitMatchingMethod, "first_start",
                        lambda self, context: seen.append(real(self, context)) or seen[-1])
    tuned, batches = same_base_fine_tunes(), make_batches("vit_cls", num_batches=2)
    hf_mudsc.merge(tuned, batches, refit="none", matcher=matcher, progress=False)
    expected = hf_mudsc.merge(tuned, batches, method="zipit", refit="none", progress=False).merge_report.matches
    assert len(seen) == 1 and len(seen[0]) == len(expected)
    for found, wanted in zip(seen[0], expected):
        assert torch.equal(found.cluster_of, wanted.cluster_of)
    assert share_in_place(seen[0]) == share_in_place(expected)


def test_only_a_method_with_an_activation_start_has_a_first_start():
    """A weight-only method's start is itself a sweep, and a method without unit matching has none: None."""
    assert get_method("weight_matching").first_start(None) is None  # type: ignore[arg-type]
    assert MergeMethod.first_start(get_method("regmean"), None) is None  # type: ignore[arg-type]


def test_the_record_and_reason_say_when_the_first_start_decided():
    mudsc, regmean = get_method("mudsc"), get_method("regmean")
    assert check_record(mudsc, ["A", "B"], 0.8, first_start=True) == {
        "method": "mudsc", "parents": ["A", "B"], "units_in_place": 0.8, "holds": True, "solved": "first start"}
    assert "solved" not in check_record(mudsc, ["A", "B"], 0.8)
    _, reason = confirm_choice(regmean, "parents share a base ... (relative weight distance 0.1): regmean", mudsc,
                               0.8, 0.1, pair="parents A and C", first_start=True)
    assert reason == ("parents share a base ... (relative weight distance 0.1; mudsc's activation-only zip start on "
                      "the calibration data leaves 80.0% of units of parents A and C in place): regmean")


def test_inspect_names_the_first_start_when_it_decided(tmp_path, capsys):
    """`hf-mudsc inspect` of a merge the first start confirmed says so (not "mudsc's solve", which never ran)."""
    from hf_mudsc.cli.main import main

    merged = hf_mudsc.merge(same_base_fine_tunes(), make_batches("vit_cls", num_batches=2), refit="none",
                            progress=False)
    merged.save_pretrained(tmp_path / "merged")
    assert main(["inspect", str(tmp_path / "merged"), "--no-plots"]) == 0
    assert ("  units:     100.0% left in place by mudsc's activation-only zip start on the calibration data: they "
            "correspond, so method auto kept the same-base method") in capsys.readouterr().out


def test_the_start_is_read_with_the_zip_matcher_whatever_the_merges(monkeypatch):
    """`merge(fine-tunes, batches, matcher="align")`: the check's first start is still the zip matching — align's start
    kept up to 44 % of units in place on pairs whose units moved (zip's 0-4 %), 6 points under the cut."""
    matchers: list[str] = []
    real = UnitMatchingMethod.first_start
    monkeypatch.setattr(UnitMatchingMethod, "first_start",
                        lambda self, context: matchers.append(context.options.matcher) or real(self, context))
    merged = hf_mudsc.merge(same_base_fine_tunes(), make_batches("vit_cls", num_batches=2), refit="none",
                            matcher="align", progress=False)
    assert matchers == ["zip"] and merged.config.mudsc["correspondence_check"]["solved"] == "first start"


def test_joint_predictions_tell_confident_heads_apart_where_the_probabilities_argmax_ties():
    """`hf_mudsc.joint_predictions(logits, {"a": [0, 2], "b": [2, 4]})` on a row a=[20, 0], b=[0, 30]: task b's label
    (its log-probability is higher), where `joint_probabilities(...).argmax(-1)` — the card's snippet before — gave
    task a's (both maxima are 1.0 in float32)."""
    ranges = {"a": [0, 2], "b": [2, 4]}
    logits = torch.tensor([[20.0, 0.0, 0.0, 30.0], [0.0, 30.0, 20.0, 0.0], [1.0, 0.0, 0.0, 3.0]])
    assert hf_mudsc.joint_probabilities(logits, ranges).argmax(-1).tolist() == [0, 1, 3]  # the first row ties
    assert hf_mudsc.joint_predictions(logits, ranges).tolist() == [3, 1, 3]
    far = torch.tensor([[200.0, 0.0, 0.0, 300.0]])  # past float32's exp range (~87-103): decided in float64
    assert hf_mudsc.joint_predictions(far, ranges).tolist() == [3]
    plain = torch.tensor([[0.5, 2.0, 1.0]])  # no task ranges: the plain argmax
    assert hf_mudsc.joint_predictions(plain, {}).tolist() == [1]


def test_joint_predictions_refuse_heads_without_a_softmax_naming_themselves():
    """`joint_predictions(logits, config)` of a regression or multi-label head: one line naming joint_predictions."""
    from transformers import BertConfig

    from hf_mudsc.errors import EvaluationError

    for config in (BertConfig(num_labels=1, problem_type="regression"),
                   BertConfig(num_labels=2, problem_type="multi_label_classification")):
        with pytest.raises(EvaluationError, match=r"^joint_predictions has no rule for a "):
            hf_mudsc.joint_predictions(torch.zeros(1, config.num_labels), config)


def test_the_held_out_joint_agreement_tells_confident_heads_apart():
    """FidelityScorer([A, B], rows, task_sizes=[2, 2]) of a merge deciding task b on a row where A's logits are
    [40, 0] and B's [0, 60] (the scorer's float64 softmax maxima both 1.0, past a margin of ~37): the ensemble's joint
    choice tied and went to task a, so the merge that agrees with it by the rule scored 2/3 instead of 1 (alpha auto,
    the refit gate and the average check read this score)."""
    from test_eval_s34 import controlled, rows

    from hf_mudsc.apply.fidelity import FidelityScorer

    parent_a = controlled(["x", "y"], [[40.0, 0.0]])
    parent_b = controlled(["p", "q"], [[0.0, 60.0]])
    merged = controlled(["a: x", "a: y", "b: p", "b: q"], [[5.0, 0.0, 0.0, 60.0]])
    scorer = FidelityScorer([parent_a, parent_b], [rows([0, 0])], task_sizes=[2, 2], mask_key="attention_mask")
    assert scorer(merged) == 1.0
