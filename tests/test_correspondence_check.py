"""`method="auto"` confirms a same-base choice on the activations (hf_mudsc.methods.auto, docs/design.md §4.8).

Parents whose weights are close ("shared base") may still have units that no longer correspond: then a position
merge (regmean, linear) fuses unrelated units, and `auto` must hand the merge to the unit matching instead.
"""

from __future__ import annotations

import logging

import pytest
import torch
from factories import ARCHITECTURES, fine_tune, make_batches, make_model, same_weights
from test_refit import same_base_fine_tunes
from transformers import ViTForImageClassification

import hf_mudsc
import hf_mudsc.methods.auto as auto
from hf_mudsc.diagnostics import relation_warning
from hf_mudsc.methods.auto import confirm_choice, correspondence_checker
from hf_mudsc.methods.registry import get_method
from hf_mudsc.solve.matchers import Match, share_in_place
from hf_mudsc.testing.toy import tiny_vit_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _match(cluster_of: list[int], num_models: int = 2) -> Match:
    clusters = torch.tensor(cluster_of)
    sizes = torch.bincount(clusters).double()
    return Match(cluster_of=clusters, merge_weight=1.0 / sizes[clusters], num_merged=int(sizes.numel()), value=0.0,
                 num_models=num_models)


def test_share_in_place_counts_the_units_every_parent_keeps_at_one_index():
    identity = _match([0, 1, 2, 0, 1, 2])
    swapped = _match([0, 1, 2, 0, 2, 1])  # B's units 1 and 2 swapped: unit 0 stays
    zipped = _match([0, 0, 1, 1, 2, 2])  # A0+A1, A2+B0, B1+B2: no index keeps A and B together
    assert identity.units_in_place() == 3 and swapped.units_in_place() == 1 and zipped.units_in_place() == 0
    three = _match([0, 1, 0, 1, 1, 0], num_models=3)  # unit 0: A0, B0 in cluster 0 but C0 in 1
    assert three.units_in_place() == 0
    assert _match([0, 1, 0, 1, 0, 1], num_models=3).units_in_place() == 2
    # pooled over the matched groups' units (3 + 3 units, 3 + 1 in place); unmatched groups left out
    assert share_in_place([identity, None, swapped]) == pytest.approx(4 / 6)
    assert share_in_place([None]) == 1.0 and share_in_place([]) == 1.0


def test_only_a_same_base_data_method_is_confirmed():
    regmean, linear = get_method("regmean"), get_method("linear")
    mudsc = get_method("mudsc")
    assert correspondence_checker("shared base", regmean, has_data=True, reference_compat=False) is mudsc
    assert correspondence_checker("shared base", regmean, has_data=False, reference_compat=False) is None
    assert correspondence_checker("shared base", regmean, has_data=True, reference_compat=True) is None
    assert correspondence_checker("same model", regmean, has_data=True, reference_compat=False) is None
    assert correspondence_checker("shared base", linear, has_data=True, reference_compat=False) is None
    assert correspondence_checker("independent", mudsc, has_data=True, reference_compat=False) is None


def test_the_choice_stands_when_most_units_stay_in_place():
    regmean, mudsc = get_method("regmean"), get_method("mudsc")
    reason = ("parents share a base, so the identity correspondence holds and calibration data is given (relative "
              "weight distance 0.4): regmean")
    method, kept = confirm_choice(regmean, reason, mudsc, 0.5, 0.4)
    assert method is regmean and kept == (
        "parents share a base, so the identity correspondence holds and calibration data is given (relative weight "
        "distance 0.4; mudsc's solve on the calibration data leaves 50.0% of units in place): regmean")
    method, moved = confirm_choice(regmean, reason, mudsc, 0.003, 0.598)
    assert method is mudsc and moved == (
        "parents share a base by their weights (relative weight distance 0.598), but their units do not correspond "
        "on the calibration data: mudsc's solve on the calibration data leaves 0.3% of units in place, and a "
        "same-base method needs at least 50%: mudsc")


def test_the_reorder_warning_is_left_out_when_the_matching_moved_most_units():
    mudsc = get_method("mudsc")
    assert "can only reorder them" in relation_warning("shared base", mudsc)
    assert relation_warning("shared base", mudsc, units_correspond=False) is None


def _moved_mlp_pair() -> tuple[ViTForImageClassification, ViTForImageClassification]:
    """Parent B: parent A with every MLP's units permuted (the same function) and 1% noise. The MLP units are most
    of the units (2 x 128 of 416) while the MLP matrices are a small part of the weights' norm (the embeddings are
    scaled up), so the weights say "shared base" although most units moved."""
    torch.manual_seed(1)
    model_a = ViTForImageClassification(tiny_vit_config(3, hidden_size=32, intermediate_size=128)).eval()
    with torch.no_grad():
        model_a.vit.embeddings.position_embeddings.normal_(0.0, 5.0)
        model_a.vit.embeddings.patch_embeddings.projection.weight.mul_(5.0)
    model_b = ViTForImageClassification(model_a.config).eval()
    model_b.load_state_dict(model_a.state_dict())
    _move_mlp_units(model_b, torch.Generator().manual_seed(7))
    return model_a, fine_tune(model_b, 7, 0.01, relative=True)


def _move_mlp_units(model: ViTForImageClassification, generator: torch.Generator) -> None:
    """Permute every MLP's hidden units in place (fc1's rows and fc2's columns): the same function, units moved."""
    with torch.no_grad():
        for layer in model.vit.layers:
            order = torch.randperm(layer.mlp.fc1.out_features, generator=generator)
            layer.mlp.fc1.weight.copy_(layer.mlp.fc1.weight[order])
            layer.mlp.fc1.bias.copy_(layer.mlp.fc1.bias[order])
            layer.mlp.fc2.weight.copy_(layer.mlp.fc2.weight[:, order])


def _fc1_error(merged: torch.nn.Module, model_a: torch.nn.Module) -> float:
    """How far the merged first MLP's input weights are from parent A's (B is A with its units moved)."""
    got, want = merged.vit.layers[0].mlp.fc1.weight.detach(), model_a.vit.layers[0].mlp.fc1.weight.detach()
    return float((got - want).norm() / want.norm())


def test_auto_hands_a_shared_base_pair_whose_units_moved_to_the_unit_matching(caplog):
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=4)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
    mudsc = merged.config.mudsc
    assert mudsc["parent_relation"]["relation"] == "shared base"
    assert mudsc["method"] == "mudsc" and mudsc["correspondence_check"]["holds"] is False
    assert mudsc["correspondence_check"]["units_in_place"] < auto.IN_PLACE_MAJORITY
    assert mudsc["method_choice_reason"].startswith("parents share a base by their weights (relative weight distance ")
    assert mudsc["method_choice_reason"].endswith("a same-base method needs at least 50%: mudsc")
    assert merged.merge_report.recipe["method"] == "mudsc"  # the recipe re-runs the same merge
    # how to skip the check, from Python and the command line alike
    assert ("method auto: mudsc's unit matching runs first, to confirm that the units correspond: its activation-only "
            "zip start, then its solve unless that start leaves most units in place (method='regmean', CLI: --method "
            "regmean, skips it)") in caplog.text
    assert not any("can only reorder" in text for text in mudsc["warnings"])
    asked = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", refit="none", progress=False)
    assert same_weights(merged, asked)
    # the matching pairs each A unit with its moved copy; the position merge averages unrelated units
    regmean = hf_mudsc.merge([model_a, model_b], batches, method="regmean", refit="none", progress=False)
    assert _fc1_error(merged, model_a) < 0.05 < 0.5 < _fc1_error(regmean, model_a)


def test_auto_keeps_the_same_base_method_when_the_solve_keeps_the_units_in_place(monkeypatch):
    """The same pair with the cut lowered below its share: regmean merges, exactly as asked for by name."""
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=4)
    monkeypatch.setattr(auto, "IN_PLACE_MAJORITY", 0.2)
    merged = hf_mudsc.merge([model_a, model_b], batches, progress=False)
    mudsc = merged.config.mudsc
    assert mudsc["method"] == "regmean" and mudsc["refit"] == "gate"
    assert mudsc["correspondence_check"]["holds"] is True and mudsc["num_calibration_samples"] == 64
    report = merged.merge_report  # the solve's matches and starts dropped with it
    assert all(match is None for match in report.matches) and report.starts == {} and report.solve_start is None
    asked = hf_mudsc.merge([model_a, model_b], batches, method="regmean", progress=False)
    assert same_weights(merged, asked)


def test_alpha_auto_searches_once_the_unit_matching_is_chosen():
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=5)
    merged = hf_mudsc.merge([model_a, model_b], batches, alpha="auto", refit="none", progress=False)
    asked = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", alpha="auto", refit="none", progress=False)
    assert merged.config.mudsc["method"] == "mudsc" and merged.config.mudsc["alpha_auto"] is not None
    assert merged.config.mudsc["alpha_auto"] == asked.config.mudsc["alpha_auto"]
    assert same_weights(merged, asked)


def test_reference_compat_keeps_the_unconfirmed_choice():
    """The paper's single start does not find the identity even where it holds: no check runs."""
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=4)
    merged = hf_mudsc.merge([model_a, model_b], batches, reference_compat=True, progress=False)
    assert merged.config.mudsc["method"] == "regmean" and merged.config.mudsc["correspondence_check"] is None


def test_a_check_whose_statistics_do_not_fit_in_memory_leaves_the_choice_unconfirmed(monkeypatch, caplog):
    """The same-base method needs no statistics: the merge it would have run without the check runs, and says so."""
    import hf_mudsc.pipeline as pipeline
    from hf_mudsc.errors import MergeInputError

    def check_memory(model, parents, method, **kwargs):
        if method is not None and method.name == "mudsc":
            raise MergeInputError("mudsc needs 9 GB of activation statistics, 1 GB is available")

    monkeypatch.setattr(pipeline, "check_memory", check_memory)
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=4)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
    assert merged.config.mudsc["method"] == "regmean" and merged.config.mudsc["correspondence_check"] is None
    assert ("method auto: regmean is not confirmed on the calibration data (whether the units correspond, by mudsc's "
            "solve): mudsc needs 9 GB of activation statistics, 1 GB is available") in caplog.text


def test_three_parents_are_checked_on_parent_a_and_the_parent_farthest_from_it(caplog):
    """Three parents: one pair is solved, parent A and the farthest by weight distance (the moved copy, C here);
    its units moved, so the three are solved; that solve, which merges, keeps the verdict (its units moved too), so
    the three are merged by the unit matching, as asked for by name."""
    model_a, moved = _moved_mlp_pair()
    parents = [model_a, fine_tune(model_a, 3, 0.01, relative=True), moved]
    batches = make_batches("vit_cls", num_batches=4)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, batches, refit="none", progress=False)
    check = merged.config.mudsc["correspondence_check"]
    assert merged.config.mudsc["method"] == "mudsc" and check["parents"] == ["A", "B", "C"] and check["holds"] is False
    assert "of units of parents A and C in place" in caplog.text  # the pair's verdict, said when it came
    assert "of units of all 3 parents in place" in merged.config.mudsc["method_choice_reason"]
    asked = hf_mudsc.merge(parents, batches, method="mudsc", refit="none", progress=False)
    assert same_weights(merged, asked)


def test_three_parents_whose_farthest_pair_keeps_its_units_merge_by_the_same_base_method():
    model_a = _moved_mlp_pair()[0]
    parents = [model_a, fine_tune(model_a, 3, 0.01, relative=True), fine_tune(model_a, 4, 0.01, relative=True)]
    batches = make_batches("vit_cls", num_batches=4)
    merged = hf_mudsc.merge(parents, batches, progress=False)
    check = merged.config.mudsc["correspondence_check"]
    assert merged.config.mudsc["method"] == "regmean" and check["holds"] is True and check["units_in_place"] >= 0.5
    assert check["parents"][0] == "A" and check["parents"][1] in ("B", "C")
    asked = hf_mudsc.merge(parents, batches, method="regmean", progress=False)
    assert same_weights(merged, asked)


def test_a_one_shot_iterator_is_refused_before_the_check_reads_it(monkeypatch):
    """The same-base method reads the data again after the check's statistics: a one-shot iterator is refused as
    before, in one line and before any statistics are collected — not after the check consumed it."""
    import hf_mudsc.calibrate.distributed as distributed
    from hf_mudsc.errors import MergeInputError

    def collect(*args, **kwargs):
        raise AssertionError("statistics were collected before the refusal")

    monkeypatch.setattr(distributed, "collect_statistics_distributed", collect)
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=4)
    with pytest.raises(MergeInputError) as refused:
        hf_mudsc.merge([model_a, model_b], iter(batches), progress=False)
    text = str(refused.value)
    assert text.startswith("method 'auto' chose 'regmean' (parents share a base, so the identity correspondence "
                           "holds"), text  # the choice and why: the user did not name regmean
    assert text.endswith("), which reads the calibration data more than once, so it cannot be a one-shot iterator; "
                         "pass re-readable data (a list of batches or a datasets.Dataset), or merge without data: "
                         "method='ties' (with base) / 'linear' (CLI: --method)"), text
    assert "\n" not in text


def test_a_one_shot_iterator_for_a_named_data_method_is_refused_naming_it():
    """A method the caller named is refused as that method, with the data it takes."""
    from hf_mudsc.errors import MergeInputError

    batches = make_batches("vit_cls", num_batches=2)
    with pytest.raises(MergeInputError, match=r"^method 'regmean' reads the calibration data more than once, so it "
                                              r"cannot be a one-shot iterator; pass re-readable data \(a list of "
                                              r"batches or a datasets.Dataset\)$"):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], iter(batches), method="regmean",
                       progress=False)


def test_a_check_the_unit_matching_cannot_run_is_said(caplog):
    """Options the unit matching refuses (a zero weight regmean takes) leave the choice unconfirmed, and the log says
    so, as when the check does not fit in memory."""
    model_a, model_b = _moved_mlp_pair()
    batches = make_batches("vit_cls", num_batches=4)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge([model_a, model_b], batches, weights=[1.0, 0.0], refit="none", progress=False)
    assert merged.config.mudsc["method"] == "regmean" and merged.config.mudsc["correspondence_check"] is None
    assert ("method auto: regmean is not confirmed on the calibration data (whether the units correspond, by mudsc's "
            "solve): weights= (CLI: --weights) of mudsc must all be > 0") in caplog.text


def test_the_discarded_solve_is_freed_before_the_same_base_method_merges(monkeypatch):
    """The check's merged weights (a whole model) are not held while regmean collects its Gram matrices: the memory
    checked for regmean does not count them. (The first start is made to decide nothing, so that the solve runs.)"""
    import gc
    import weakref

    import hf_mudsc.pipeline as pipeline
    from hf_mudsc.methods.data import RegMeanMethod
    from hf_mudsc.methods.matching import UnitMatchingMethod

    monkeypatch.setattr(pipeline, "_start_in_place", lambda checker, context: 0.0)

    solved, alive = [], []
    solve, regmean = UnitMatchingMethod.merge_parameters, RegMeanMethod.merge_parameters

    def solve_and_keep(self, context):
        result = solve(self, context)
        solved.append(weakref.ref(result))
        return result

    def regmean_after(self, context):
        gc.collect()
        alive.extend(ref() is not None for ref in solved)
        return regmean(self, context)

    monkeypatch.setattr(UnitMatchingMethod, "merge_parameters", solve_and_keep)
    monkeypatch.setattr(RegMeanMethod, "merge_parameters", regmean_after)
    merged = hf_mudsc.merge(same_base_fine_tunes(), make_batches("vit_cls", num_batches=2), refit="none",
                            progress=False)
    check = merged.config.mudsc["correspondence_check"]
    assert merged.config.mudsc["method"] == "regmean" and check["holds"] and "solved" not in check
    assert alive == [False]


def test_inspect_says_what_the_check_found(tmp_path, capsys):
    """`hf-mudsc inspect` of a "shared base" pair merged by mudsc says why: the share of units the check's solve left
    in place (the relation line alone reads as a contradiction)."""
    from hf_mudsc.cli.main import main

    model_a, model_b = _moved_mlp_pair()
    merged = hf_mudsc.merge([model_a, model_b], make_batches("vit_cls", num_batches=4), refit="none", progress=False)
    merged.save_pretrained(tmp_path / "merged")
    share = merged.config.mudsc["correspondence_check"]["units_in_place"]
    assert main(["inspect", str(tmp_path / "merged"), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "relation:  shared base" in text and "method:    mudsc" in text
    assert (f"  units:     {share:.1%} left in place by mudsc's solve on the calibration data: they do not "
            "correspond, so method auto kept that solve's merge") in text


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_every_architecture_confirms_the_same_base_choice_on_fine_tunes_whose_units_stay(kind):
    """1% noise on one model (every factory architecture: ViT, BERT, RoBERTa, CLIP and its towers, with and without
    heads): the check's first start already leaves every unit in place (so its solve is skipped), and regmean merges
    exactly as asked for by name."""
    tuned = [fine_tune(make_model(kind, seed=1), seed, 0.01, relative=True) for seed in (2, 3)]
    batches = make_batches(kind, num_batches=2)
    merged = hf_mudsc.merge(tuned, batches, refit="none", progress=False)
    assert merged.config.mudsc["method"] == "regmean"
    assert merged.config.mudsc["correspondence_check"] == {"method": "mudsc", "parents": ["A", "B"],
                                                           "units_in_place": 1.0, "holds": True,
                                                           "solved": "first start"}
    asked = hf_mudsc.merge(tuned, batches, method="regmean", refit="none", progress=False)
    assert same_weights(merged, asked)


def _sample_counts(caplog) -> list[str]:
    """The log lines that state how many calibration samples a pass read."""
    return [record.getMessage() for record in caplog.records
            if "calibrated on" in record.getMessage() or "calibration samples" in record.getMessage()]


@pytest.mark.parametrize("case,alpha", [("same base", 0.5), ("same base", "auto"), ("moved", 0.5),
                                        ("three", 0.5)])
def test_each_calibration_pass_is_said_once_with_what_it_was_for(caplog, case, alpha):
    """The check's statistics and the same-base method's own pass each say their count once, named: a user read
    "calibrated on 64 samples" then "calibrated on 80 samples" (alpha="auto" holds every 5th example out of the
    check's statistics) — two contradictory sizes for one merge. When the check's solve is kept, its pass is the
    only one."""
    batches = make_batches("vit_cls", num_batches=5)  # 80 examples
    parents = {"same base": same_base_fine_tunes, "moved": _moved_mlp_pair,
               "three": lambda: same_base_fine_tunes(seeds=(2, 3, 4))}[case]()
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge(list(parents), batches, alpha=alpha, refit="none", progress=False)
    check = merged.config.mudsc["correspondence_check"]
    if case == "same base":
        held = " (every 5th example held out for alpha='auto')" if alpha == "auto" else ""
        assert _sample_counts(caplog) == [
            f"calibrated on {64 if held else 80} samples: mudsc's statistics for the correspondence check{held}",
            "calibrated on 80 samples: regmean's own pass"]
    elif case == "moved":
        assert merged.config.mudsc["method"] == "mudsc"
        assert _sample_counts(caplog) == ["calibrated on 80 samples: mudsc's statistics for the correspondence check"]
    else:
        assert merged.config.mudsc["method"] == "regmean"
        assert _sample_counts(caplog) == [
            f"calibrated on 80 samples: mudsc's statistics for the correspondence check of parents A and "
            f"{check['parents'][1]}", "calibrated on 80 samples: regmean's own pass"]


@pytest.mark.parametrize("case", ["auto", "mudsc", "three moved"])
def test_data_shorter_than_num_samples_is_warned_once_with_its_size(caplog, case):
    """num_samples beyond the data: one warning naming the data's 80 examples — not one per pass (three parents whose
    units moved: the pair check's statistics, then the unit matching's over all three), and not the 64 the statistics
    keep under alpha="auto" (every 5th example is held out to score the α candidates)."""
    batches = make_batches("vit_cls", num_batches=5)  # 80 examples
    if case == "three moved":
        model_a, moved = _moved_mlp_pair()
        parents = [model_a, fine_tune(model_a, 3, 0.01, relative=True), moved]
    else:
        parents = same_base_fine_tunes()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, batches, method="mudsc" if case == "mudsc" else "auto", alpha="auto",
                                num_samples=1000, refit="none", progress=False)
    assert merged.config.mudsc["method"] == ("regmean" if case == "auto" else "mudsc")
    short = [record.getMessage() for record in caplog.records if "asked for 1000" in record.getMessage()]
    assert short == ["num_samples= (CLI: --num-samples) asked for 1000 calibration samples, but the data holds only "
                     "80; all 80 were used"]


def _auto_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("method auto: ")]


@pytest.mark.parametrize("case", ["same base", "moved"])
def test_the_first_auto_line_says_the_choice_waits_for_the_check(caplog, case):
    """Before the check has run, the log does not say the identity correspondence holds: the first line says the
    same-base method is chosen if the units correspond, the check runs, and the last line says what it found."""
    parents = same_base_fine_tunes() if case == "same base" else _moved_mlp_pair()
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge(list(parents), make_batches("vit_cls", num_batches=4), refit="none", progress=False)
    distance = merged.config.mudsc["parent_relation"]["weight_distance"]
    lines = _auto_lines(caplog)
    assert lines == [
        f"method auto: parents share a base by their weights (relative weight distance {distance:.3g}) and "
        "calibration data is given: regmean if their units correspond, which mudsc's unit matching checks first",
        "method auto: mudsc's unit matching runs first, to confirm that the units correspond: its activation-only zip "
        "start, then its solve unless that start leaves most units in place (method='regmean', CLI: --method "
        "regmean, skips it)",
        f"method auto: {merged.config.mudsc['method_choice_reason']}"]
    assert ("identity correspondence holds" in lines[-1]) is (case == "same base")


def test_a_choice_no_check_confirms_is_said_once_as_final(caplog):
    """reference_compat=True runs no check: the one line is the choice and its reason, as before."""
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge(same_base_fine_tunes(), make_batches("vit_cls", num_batches=2), refit="none",
                                reference_compat=True, progress=False)
    assert merged.config.mudsc["correspondence_check"] is None
    assert _auto_lines(caplog) == [f"method auto: {merged.config.mudsc['method_choice_reason']}"]


def test_three_parents_whose_pair_check_fails_are_judged_again_by_the_solve_over_all(monkeypatch):
    """The pair's solve is a proxy: a pair near a tie between its starts judged "do not correspond" (1.8 % in place)
    while the three-parent mudsc solve that then merged left every unit in place — the recorded reason contradicted
    the merge. The solve over every parent decides by the same rule as two parents' solve (the solve itself, never
    its first start alone, as the reason says: session 37's review)."""
    from hf_mudsc.methods.matching import UnitMatchingMethod

    solves: list[int] = []
    solve = UnitMatchingMethod.merge_parameters
    monkeypatch.setattr(UnitMatchingMethod, "merge_parameters",
                        lambda self, context: solves.append(len(context.parents)) or solve(self, context))
    import hf_mudsc.pipeline as pipeline

    real = pipeline._pair_in_place
    monkeypatch.setattr(pipeline, "_pair_in_place", lambda *args, **kwargs: (0.0, real(*args, **kwargs)[1], False))
    model_a = _moved_mlp_pair()[0]
    parents = [model_a, fine_tune(model_a, 3, 0.01, relative=True), fine_tune(model_a, 4, 0.01, relative=True)]
    batches = make_batches("vit_cls", num_batches=4)
    merged = hf_mudsc.merge(parents, batches, progress=False)
    record = merged.config.mudsc
    check = record["correspondence_check"]
    assert record["method"] == "regmean", record["method_choice_reason"]
    assert check["parents"] == ["A", "B", "C"] and check["holds"] is True and check["units_in_place"] >= 0.5
    assert "solved" not in check and solves == [3]  # the solve over all three ran and decided
    assert "leaves 0.0% of their units in place, so it solves every parent" in record["method_choice_reason"]
    assert "mudsc's solve on the calibration data leaves" in record["method_choice_reason"]
    assert same_weights(merged, hf_mudsc.merge(parents, batches, method="regmean", progress=False))
