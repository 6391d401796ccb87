"""The multi-start solve (docs/design.md §4.5): a MuDSC solve never ends below its weight and identity starts, and
keeps the paper's activation-start solution unless another start ends higher by more than the margin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from factories import fine_tune, make_batches, make_model

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import correlations_from
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.methods import get_method
from hf_mudsc.methods.registry import register_method, unregister_method
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe
from hf_mudsc.solve.loop import MULTISTART_MARGIN, SolveOptions, Solver, choose_start

STARTS = ["activation", "weight", "identity"]


@pytest.fixture(scope="module")
def same_init():
    """Two fine-tunes of one tiny ViT whose activation-only start misses the identity correspondence (the
    parents' weights are 0.2-scale, the deltas 0.15: far enough apart that activations alone pair other units)."""
    base = make_model("vit_cls", seed=0)
    a, b = fine_tune(base, 1, 0.15), fine_tune(base, 2, 0.15)
    batches = make_batches("vit_cls")
    average = hf_mudsc.merge([a, b], None, method="average", progress=False)
    return a, b, batches, average


@pytest.fixture(scope="module")
def different_init():
    """Two independently random tiny ViTs: the three starts end within 0.003 of each other, the weight start
    marginally highest (measured: zip 0.2913 / 0.2940 / 0.2926, align 0.1681 / 0.1696 / 0.1691)."""
    return make_model("vit_cls", 0), make_model("vit_cls", 1), make_batches("vit_cls")


@pytest.fixture(scope="module")
def single_start_method():
    """`mudsc` exactly as the paper solves it (the activation start only, every other option unchanged)."""
    method = register_method(dataclasses.replace(get_method("mudsc"), name="mudsc_single_start", extra_starts=()))
    yield method.name
    unregister_method(method.name)


def _identity_groups(report) -> list[bool]:
    out = []
    for found in report.matches:
        n = found.num_merged
        out.append(sorted(found.clusters()) == [(i, n + i) for i in range(n)])
    return out


# -- the selection rule -------------------------------------------------------------------------------------------


def test_choose_start_keeps_the_activation_start_within_the_margin():
    assert MULTISTART_MARGIN == 0.01
    assert choose_start({"activation": 0.50, "weight": 0.509, "identity": 0.505}) == "activation"
    assert choose_start({"activation": 0.50, "weight": 0.51, "identity": 0.40}) == "activation"  # not "more than"
    assert choose_start({"activation": 0.50, "weight": 0.40, "identity": 0.40}) == "activation"


def test_choose_start_switches_to_the_highest_start_beyond_the_margin():
    assert choose_start({"activation": 0.47, "weight": 0.74, "identity": 0.70}) == "weight"
    assert choose_start({"activation": 0.47, "weight": 0.60, "identity": 0.74}) == "identity"
    assert choose_start({"activation": 0.47, "weight": 0.74, "identity": 0.74}) == "weight"  # tie: earlier start
    assert choose_start({"activation": 0.50, "weight": 0.505}, margin=0.0) == "weight"


def test_choose_start_without_the_kept_start_takes_the_highest():
    assert choose_start({"weight": 0.3}) == "weight"
    assert choose_start({"weight": 0.3, "identity": 0.301}, keep="activation") == "identity"
    with pytest.raises(ValueError, match="at least one start"):
        choose_start({})


# -- same init: the merge is plain averaging ----------------------------------------------------------------------


@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_same_init_pair_merges_to_the_plain_average(same_init, single_start_method, matcher):
    a, b, batches, average = same_init
    # refit="none": the solve's result (the refit would then move the averaged layers toward the parents' outputs)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher=matcher, refit="none", progress=False)
    report = merged.merge_report
    assert _identity_groups(report) == [True] * len(report.matches)
    expected = average.state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert report.solve_start in ("weight", "identity")
    assert report.starts[report.solve_start] > report.starts["activation"] + MULTISTART_MARGIN
    # Control: the paper's single activation start (same options otherwise) does not find the identity here.
    paper = hf_mudsc.merge([a, b], batches, method=single_start_method, matcher=matcher, progress=False)
    assert not any(_identity_groups(paper.merge_report))
    assert paper.merge_report.starts.keys() == {"activation"}


# -- different init: the activation start is kept ------------------------------------------------------------------


@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_near_tie_keeps_the_activation_start_and_its_merge(different_init, single_start_method, matcher):
    a, b, batches = different_init
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher=matcher, progress=False)
    report = merged.merge_report
    # Independent initialisations: A_i <-> B_i is an arbitrary pairing, so no identity start is refined.
    assert merged.config.mudsc["parent_relation"]["relation"] == "independent"
    assert list(report.starts) == ["activation", "weight"]
    # Another start did end higher, but by less than the margin: with no margin it would have won.
    assert report.starts["weight"] > report.starts["activation"]
    assert choose_start(report.starts, margin=0.0) == "weight"
    assert report.solve_start == "activation"
    single = hf_mudsc.merge([a, b], batches, method=single_start_method, matcher=matcher, progress=False)
    assert single.merge_report.starts.keys() == {"activation"}
    assert report.objective_history == single.merge_report.objective_history
    assert report.sweeps == single.merge_report.sweeps
    expected = single.state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_the_identity_start_is_refined_only_for_parents_whose_tensors_line_up():
    from hf_mudsc.methods.matching import LINED_UP_RELATIONS
    from hf_mudsc.methods.registry import get_method

    method = get_method("mudsc")
    assert LINED_UP_RELATIONS == ("same model", "shared base")
    for relation in (None, "same model", "shared base"):
        assert method.starts_for(relation) == ("weight", "identity"), relation
    for relation in ("permuted copy", "independent"):
        assert method.starts_for(relation) == ("weight",), relation


# -- what the report records ----------------------------------------------------------------------------------------


def test_report_and_config_record_every_start_objective_and_the_winner(same_init):
    a, b, batches, _ = same_init
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="zip", progress=False)
    report = merged.merge_report
    assert list(report.starts) == STARTS
    assert all(isinstance(v, float) and -1.0 <= v <= 1.0 for v in report.starts.values())
    # The kept start's objective is the objective of the matches the merge used.
    assert report.starts[report.solve_start] == pytest.approx(float(np.mean(report.group_values)), abs=1e-12)
    assert report.starts[report.solve_start] >= max(report.objective_history)
    info = merged.config.mudsc
    assert info["solve_start"] == report.solve_start
    assert info["start_objectives"] == {k: round(v, 6) for k, v in report.starts.items()}


def test_kept_activation_start_objective_is_its_best_sweep(different_init):
    a, b, batches = different_init
    report = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", progress=False).merge_report
    assert report.starts["activation"] == max(report.objective_history)
    assert report.starts["activation"] == pytest.approx(float(np.mean(report.group_values)), abs=1e-12)


@pytest.mark.parametrize("method,options,expected", [
    ("mudsc", {"reference_compat": True}, ["activation"]),
    ("mudsc", {"alpha": 0.0}, ["activation"]),  # activation-only: nothing to sweep
    ("zipit", {}, ["activation"]),
    ("activation_align", {}, ["activation"]),
    ("weight_matching", {}, ["weight"]),
    ("average", {}, []),
])
def test_single_start_methods_record_their_one_start(different_init, method, options, expected):
    a, b, batches = different_init
    merged = hf_mudsc.merge([a, b], batches, method=method, progress=False, **options)
    report = merged.merge_report
    assert list(report.starts) == expected
    assert report.solve_start == (expected[0] if expected else None)
    assert merged.config.mudsc["solve_start"] == report.solve_start
    assert list(merged.config.mudsc["start_objectives"]) == expected


def test_card_names_the_kept_start_and_every_start_objective(same_init):
    a, b, batches, _ = same_init
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="zip", progress=False)
    card = str(render_card(merged, Recipe(models=["org/a", "org/b"], calibration="org/ds:train")))
    report = merged.merge_report
    recorded = merged.config.mudsc["start_objectives"]  # what the card reads (6 decimals)
    objectives = ", ".join(f"{name} {value:.4f}" for name, value in recorded.items())
    assert (f"| Solver sweeps | {report.sweeps} from the {report.solve_start} start "
            f"(final objective per start: {objectives}) |") in card.splitlines()


# -- the solver's starts ---------------------------------------------------------------------------------------------


def _solver(a, b, batches, **options):
    spec = spec_for(a)
    correlations = correlations_from(collect_statistics(a, b, spec, batches, progress=False))
    return Solver(spec, dict(a.named_parameters()), dict(b.named_parameters()), correlations, SolveOptions(**options))


def test_weight_start_is_the_weight_matching_solve(different_init):
    a, b, batches = different_init
    solver = _solver(a, b, batches, matcher="zip", extra_starts=("weight", "identity"))
    start = solver._weight_state()
    expected = hf_mudsc.merge([a, b], None, method="weight_matching", progress=False).merge_report.matches
    for got, want in zip(start.matches, expected, strict=True):
        assert torch.equal(got.cluster_of, want.cluster_of) and got.head_pairing == want.head_pairing


def test_unknown_or_activation_free_extra_starts_are_refused(different_init):
    a, b, batches = different_init
    with pytest.raises(ValueError, match=r"unknown solve starts \['random'\]; choose from activation, weight"):
        _solver(a, b, batches, extra_starts=("random",))
    with pytest.raises(ValueError, match="extra solve starts need activation correlations"):
        Solver(spec_for(a), dict(a.named_parameters()), dict(b.named_parameters()), None,
               SolveOptions(use_activations=False, alpha=1.0, extra_starts=("identity",)))


def test_the_start_choice_note_says_why_a_higher_start_was_not_kept():
    from hf_mudsc.solve.loop import start_choice_note

    objectives = {"activation": 0.6231, "weight": 0.6245, "identity": 0.6240}
    assert start_choice_note(objectives, choose_start(objectives)) == (
        "start objectives activation 0.623100, weight 0.624500, identity 0.624000; kept the activation start (the "
        "weight start ends 0.0014 higher, within the 0.01 margin a start must clear to replace it)")
    clear = {"activation": 0.60, "weight": 0.70}
    assert start_choice_note(clear, choose_start(clear)) == (
        "start objectives activation 0.600000, weight 0.700000; kept the weight start")
