"""Session 37's hunt in the refit, the size budget and N-parent merges (docs/design.md §4.9, §4.12, §4.13): what a
user hit there, each proven here before it was fixed."""

from __future__ import annotations

import logging

import pytest
import torch
from factories import fine_tune, make_batches, make_model, model_output, relative_error

import hf_mudsc
from hf_mudsc.errors import MergeInputError
from hf_mudsc.options import REFITTING

pytestmark = pytest.mark.usefixtures("one_thread")

MISSING = ["/nonexistent/parent-a", "/nonexistent/parent-b"]  # any load would fail: a refusal comes before it


@pytest.fixture(scope="module")
def same_base():
    """Two fine-tunes of one tiny ViT classifier, their base and a little calibration data."""
    base = make_model("vit_cls", seed=0)
    return base, fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05), make_batches("vit_cls", num_batches=2,
                                                                                   batch_size=8)


@pytest.mark.parametrize("refit", REFITTING)
@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.5, 0.25, -0.75]])
def test_a_refit_with_weights_summing_to_zero_is_refused_in_one_line_before_loading(refit, weights):
    """merge(..., method="task_arithmetic", refit="ridge", weights=[1, -1]) raised ZeroDivisionError from the
    refit's target weights (each parent's share w_i / Σw), after loading, calibrating and merging."""
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING + MISSING[:len(weights) - 2], [{"pixel_values": torch.zeros(1, 1, 16, 16)}],
                       method="task_arithmetic", base="/nonexistent/base", refit=refit, weights=weights)
    message = str(caught.value)
    assert "sum to 0" in message and "weights= (CLI: --weights)" in message and "--refit" in message
    assert "\n" not in message


def test_a_refit_whose_weights_scale_a_parent_far_beyond_a_mean_is_refused_before_loading():
    """weights=[1, -0.995] with a refit: the refit's target was 200·Y_A − 199·Y_B (each share w_i / Σw), no mean of
    the parents' outputs; refused like the base-filling mean of the same weights (`plan.check_filled_weights`)."""
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING, [{"pixel_values": torch.zeros(1, 1, 16, 16)}], method="task_arithmetic",
                       base="/nonexistent/base", refit="ridge", weights=[1.0, -0.995])
    assert "scale a parent by 200" in str(caught.value) and "\n" not in str(caught.value)


def test_zero_sum_weights_without_a_refit_still_merge(same_base):
    """The refusal is the refit's: task arithmetic itself takes weights summing to 0 (A's task vector minus B's)."""
    base, a, b, batches = same_base
    merged = hf_mudsc.merge([a, b], batches, method="task_arithmetic", base=base, refit="none", weights=[1, -1],
                            progress=False)
    assert all(torch.isfinite(p).all() for p in merged.parameters())


@pytest.mark.parametrize("method", ["average", "slerp"])
@pytest.mark.parametrize("refit", ["ridge", "repair"])
def test_weights_read_only_by_the_refit_are_recorded_and_not_called_unread(same_base, caplog, method, refit):
    """merge([A, B], data, method="average", refit="ridge", weights=[1, 3]) warned "method average does not read
    weights=: it has no effect" and recorded config.mudsc["weights"] None (the card hid its row), yet the refit's
    targets are the weighted mean of the parents' outputs: the merged weights differ from weights=None's."""
    _, a, b, batches = same_base
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        weighted = hf_mudsc.merge([a, b], batches, method=method, refit=refit, weights=[1, 3], progress=False)
    plain = hf_mudsc.merge([a, b], batches, method=method, refit=refit, progress=False)
    assert any(not torch.equal(p, q) for p, q in zip(weighted.state_dict().values(), plain.state_dict().values()))
    assert not [r.message for r in caplog.records if "weights=" in r.getMessage() and "no effect" in r.getMessage()]
    assert weighted.config.mudsc["weights"] == [1.0, 3.0]
    plan = hf_mudsc.merge([a, b], batches, method=method, refit=refit, weights=[1, 3], dry_run=True)
    assert not [text for text in plan.warnings if "weights=" in text and "no effect" in text]
    assert weighted.merge_report.recipe["weights"] == [1.0, 3.0]


@pytest.mark.parametrize("refit", ["ridge", "gate"])
@pytest.mark.parametrize(("kind", "copies"), [("bert_cls", 2), ("roberta_cls", 2), ("roberta_cls", 3)])
def test_a_refit_of_one_model_object_passed_more_than_once_gives_that_model_back(kind, copies, refit):
    """merge([model, model], data, method="mudsc", refit="ridge") on BERT returned a model 0.87 away from `model`
    (RoBERTa 0.9; refit="gate" raised "a calibration batch could not be run"): each parent's block replay hooked the
    one object."""
    model = make_model(kind, seed=0)
    batches = make_batches(kind, num_batches=2, batch_size=8)
    merged = hf_mudsc.merge([model] * copies, batches, method="mudsc", refit=refit, progress=False)
    for batch in batches:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5


def test_inspect_of_a_recipe_does_not_call_the_weights_a_refit_reads_without_effect(tmp_path, capsys):
    """`hf-mudsc inspect recipe.yaml` (method average, refit ridge, weights [1, 3]) printed "weights = [1.0, 3.0] (no
    effect)", though the refit's targets are the weighted mean of the parents' outputs."""
    import yaml
    from factories import vit_cli_case

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": parents, "calibration": calibration, "method": "average",
                                      "refit": "ridge", "weights": [1.0, 3.0]}))
    assert main(["inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "weights = [1.0, 3.0]" in out and "weights = [1.0, 3.0] (no effect)" not in out


def _shared_backbone(kind: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """A, B = A with another head on A's own backbone object (`B.bert = A.bert`), and B's unshared twin."""
    import copy

    a, other = make_model(kind, seed=0), make_model(kind, seed=3)
    b = copy.deepcopy(a)
    b.classifier = copy.deepcopy(other.classifier)
    b.bert = a.bert
    return a, b, copy.deepcopy(b)


@pytest.mark.parametrize("refit", ["ridge", "gate", None])
def test_parents_sharing_their_backbone_object_merge_as_their_unshared_twins(caplog, refit):
    """B = deepcopy(A) with another head and `B.bert = A.bert`: merge([A, B], data, method="mudsc", refit="ridge")
    was 0.87 away from the merge of B's unshared twin, refit="gate" and the default merge raised "a calibration batch
    could not be run": each parent's block replay hooked the modules the other parent holds too."""
    a, b, twin = _shared_backbone("bert_cls")
    batches = make_batches("bert_cls", num_batches=2, batch_size=8)
    keywords = {"method": "mudsc", "refit": refit} if refit is not None else {}
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        shared = hf_mudsc.merge([a, b], batches, progress=False, **keywords)
    said = [r.getMessage() for r in caplog.records if "share" in r.getMessage() and "copy" in r.getMessage()]
    assert said and "bert" in said[0]
    assert said[0] in shared.config.mudsc["warnings"]  # the card and config carry it, once (session 37's review)
    assert sum("shares module" in text for text in shared.config.mudsc["warnings"]) == 1
    unshared = hf_mudsc.merge([a, twin], batches, progress=False, **keywords)
    for (name, p), q in zip(shared.state_dict().items(), unshared.state_dict().values()):
        assert torch.equal(p, q), name
    assert b.bert is a.bert and b.classifier is not a.classifier  # the parents are left as given


@pytest.mark.parametrize("refit", ["ridge", "gate", None])
def test_a_shallow_copy_of_a_parent_merges_as_that_model(refit):
    """B = copy.copy(A) (another object holding every module of A): merge([A, B], data, method="mudsc",
    refit="ridge") returned a model 0.87 away from A (gate raised): the two replays hooked the same modules."""
    import copy

    a = make_model("bert_cls", seed=0)
    batches = make_batches("bert_cls", num_batches=2, batch_size=8)
    keywords = {"method": "mudsc", "refit": refit} if refit is not None else {}
    merged = hf_mudsc.merge([a, copy.copy(a)], batches, progress=False, **keywords)
    for batch in batches:
        assert relative_error(model_output(merged, batch), model_output(a, batch)) < 1e-5


@pytest.mark.parametrize("refit", REFITTING)
def test_more_weights_than_parents_with_a_refit_gets_the_count_message(refit):
    """merge([A, B], ..., refit="ridge", weights=[1, -1, 0]) said "... sum to 0" (the refit's check ran on all three)
    instead of "weights= gives 3 values for 2 parents"."""
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING, [{"pixel_values": torch.zeros(1, 1, 16, 16)}], method="task_arithmetic",
                       base="/nonexistent/base", refit=refit, weights=[1.0, -1.0, 0.0])
    assert "3 values for 2 parents" in str(caught.value) and "sum to 0" not in str(caught.value)


def test_a_recipe_with_more_weights_than_parents_and_a_refit_gets_the_count_message(tmp_path):
    """A recipe (2 models, refit ridge, weights [1, -1, 0]) was refused "... sum to 0", not for its count."""
    import yaml

    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"models": ["org/a", "org/b"], "calibration": "org/data:train",
                                      "method": "task_arithmetic", "base": "org/base", "refit": "ridge",
                                      "weights": [1.0, -1.0, 0.0]}))
    with pytest.raises(RecipeError) as caught:
        Recipe.load(recipe).validate()
    assert "sum to 0" not in str(caught.value) and "weights gives 3 values for 2 parents" in str(caught.value)


def test_weights_read_only_by_a_refit_the_gate_dropped_are_not_recorded(same_base, caplog):
    """merge([A, B], data, method="average", refit="gate", weights=[1, 3]) with the gate dropping the refit recorded
    config.mudsc["weights"] [1, 3] on an unweighted average and said nothing of the weights."""
    _, a, b, batches = same_base
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge([a, b], batches, method="average", refit="gate", weights=[1, 3], progress=False)
    assert merged.config.mudsc["refit_gate"]["kept"] is False  # (the case: these parents' gate drops the refit)
    assert merged.config.mudsc["weights"] is None
    said = [r.getMessage() for r in caplog.records if "weights=" in r.getMessage() and "gate" in r.getMessage()]
    assert len(said) == 1 and "no effect" in said[0] and said[0] in merged.config.mudsc["warnings"]
    plain = hf_mudsc.merge([a, b], batches, method="average", refit="none", progress=False)
    for p, q in zip(merged.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(p, q)
