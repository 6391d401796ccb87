"""N >= 2 parents: weighted `linear` merges, heads of different label sets concatenated in parent order, the
per-parent options checked before loading, the combined relation, the `auto` choice, the CLI and the recipe."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from factories import classifier_names, fine_tune, make_batches, make_model, with_new_head
from readme_examples import readme_example
from transformers import ViTForImageClassification, ViTImageProcessor

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import main
from hf_mudsc.errors import MergeInputError, UnmergeableModelError
from hf_mudsc.load.relation import parent_relation
from hf_mudsc.methods import METHODS
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe
from hf_mudsc.testing.lock import lock_model


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def weighted_mean(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """By hand, in mergekit's order: float32 accumulation of w_i * t_i, then the division by sum w_i."""
    total = torch.zeros_like(tensors[0])
    for weight, tensor in zip(weights, tensors):
        total += weight * tensor
    return total / sum(weights) if normalize else total


@pytest.fixture(scope="module")
def three():
    base = make_model("vit_cls", 0)
    return base, [fine_tune(base, seed, 0.05, relative=True) for seed in (1, 2, 3)]


@pytest.mark.parametrize(("weights", "normalize"), [(None, None), ([1.0, 2.0, 1.0], None), ([0.5, 0.25, 1.0], False)])
def test_linear_of_three_parents_is_the_weighted_mean(three, weights, normalize):
    _, parents = three
    merged = hf_mudsc.merge(parents, method="linear", weights=weights, normalize=normalize, progress=False)
    used = weights or [1.0, 1.0, 1.0]
    for name, tensor in merged.named_parameters():
        expected = weighted_mean([params(p)[name] for p in parents], used, normalize is not False)
        assert torch.equal(tensor.detach(), expected), name
    mudsc = merged.config.mudsc
    assert (mudsc["method"], mudsc["weights"], mudsc["normalize"]) == ("linear", used, normalize is not False)
    assert (mudsc["matcher"], mudsc["alpha"], mudsc["zip_decay"], mudsc["density"]) == (None, None, None, None)
    assert len(mudsc["parents"]) == len(mudsc["parent_revisions"]) == 3
    assert merged.merge_report.recipe["weights"] == weights and len(merged.merge_report.recipe["models"]) == 3


def test_three_label_sets_are_concatenated_in_parent_order(three):
    base, parents = three
    parents = [with_new_head(p, labels, seed) for p, labels, seed in zip(parents, (2, 3, 4), (4, 5, 6))]
    for index, parent in enumerate(parents):
        parent.config.id2label = {i: f"{'xyz'[index]}{i}" for i in range(parent.config.num_labels)}
        parent.config._name_or_path = f"org/task-{index}"
    merged = hf_mudsc.merge(parents, method="linear", weights=[1.0, 2.0, 1.0], progress=False)
    weight, bias = classifier_names(base)
    state = params(merged)
    for name in (weight, bias):
        assert torch.equal(state[name], torch.cat([params(p)[name] for p in parents]))
    body = [n for n in state if n not in (weight, bias)]
    assert body and all(torch.equal(state[n], weighted_mean([params(p)[n] for p in parents], [1.0, 2.0, 1.0]))
                        for n in body)
    assert merged.config.task_label_ranges == {"task-0": [0, 2], "task-1": [2, 5], "task-2": [5, 9]}
    assert merged.config.id2label[0] == "task-0: x0" and merged.config.id2label[8] == "task-2: z3"


def test_per_parent_options_are_checked_before_anything_is_loaded(tmp_path):
    missing = [str(tmp_path / f"no-parent-{i}") for i in range(3)]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, method="linear", weights=[1.0, 2.0])
    assert str(caught.value) == ("weights= (CLI: --weights) gives 2 values for 3 parents; give one per parent, in "
                                 "parent order")
    with pytest.raises(MergeInputError, match=r"^density= \(CLI: --density\) gives 4 values for 3 parents"):
        hf_mudsc.merge(missing, method="linear", density=[0.5, 0.5, 0.5, 0.5])
    with pytest.raises(MergeInputError, match=r"density must lie in \(0, 1\] \(CLI: --density\).*got 1.5"):
        hf_mudsc.merge(missing, method="linear", density=1.5)
    with pytest.raises(MergeInputError, match=r"weights must be a list of numbers \(CLI: --weights\), got 'ab'"):
        hf_mudsc.merge(missing, method="linear", weights="ab")


def test_the_relation_of_three_parents_is_the_loosest_pair_and_a_protected_third_is_named(three, caplog):
    base, parents = three
    independent = make_model("vit_cls", 9)
    merged = hf_mudsc.merge([*parents[:2], independent], method="linear", progress=False)
    relation = merged.config.mudsc["parent_relation"]
    expected = parent_relation(params(parents[0]), params(independent), spec_for(base))[0]
    assert relation["relation"] == "independent" and relation["weight_distance"] == round(expected.weight_distance, 6)
    assert len(relation["head_factor_imbalance"]) == 3
    locked = lock_model(parents[2], spec_for(base), seed=1)
    with pytest.raises(UnmergeableModelError, match=r"^parent C \(.*\) is protected against merging"):
        hf_mudsc.merge([parents[0], parents[1], locked], method="linear", progress=False)


def test_auto_merges_fine_tunes_of_one_base_linearly_and_says_why(three, caplog):
    base, parents = three
    distance = parent_relation(params(parents[0]), params(parents[1]), spec_for(base))[0].weight_distance
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents[:2], progress=False)
    reason = ("parents share a base, so the identity correspondence holds "
              f"(relative weight distance {distance:.3g}): linear")
    assert merged.config.mudsc["method"] == "linear" and merged.config.mudsc["method_choice_reason"] == reason
    assert f"method auto: {reason}" in caplog.text
    assert merged.merge_report.recipe["method"] == "linear"  # the recipe re-runs the method that was chosen
    for name, tensor in merged.named_parameters():
        assert torch.equal(tensor.detach(), weighted_mean([params(p)[name] for p in parents[:2]], [1.0, 1.0]))


def test_auto_merges_fine_tunes_of_one_base_by_regmean_when_calibration_data_is_given(three):
    base, parents = three
    distance = parent_relation(params(parents[0]), params(parents[1]), spec_for(base))[0].weight_distance
    batches = make_batches("vit_cls", 2)
    merged = hf_mudsc.merge(parents[:2], batches, progress=False)
    assert merged.config.mudsc["method"] == "regmean"
    assert merged.config.mudsc["method_choice_reason"] == (
        "parents share a base, so the identity correspondence holds and calibration data is given "
        f"(relative weight distance {distance:.3g}; mudsc's activation-only zip start on the calibration data leaves "
        "100.0% of units in place): regmean")
    assert merged.config.mudsc["correspondence_check"] == {"method": "mudsc", "parents": ["A", "B"],
                                                           "units_in_place": 1.0, "holds": True,
                                                           "solved": "first start"}
    direct = hf_mudsc.merge(parents[:2], batches, method="regmean", progress=False)
    for (name, tensor), (_, expected) in zip(merged.named_parameters(), direct.named_parameters()):
        assert torch.equal(tensor, expected), name


def test_options_the_method_does_not_read_are_named_in_a_warning(three, caplog):
    _, parents = three
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        hf_mudsc.merge(parents[:2], method="linear", alpha=0.3, density=0.5, weights=[1, 1], progress=False)
    assert ("method linear does not read alpha= (CLI: --alpha), density= (CLI: --density): they have no effect"
            in caplog.text)


def test_auto_matches_units_of_independent_parents_and_needs_data_for_it():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    merged = hf_mudsc.merge([a, b], make_batches("vit_cls", 1), progress=False)
    mudsc = merged.config.mudsc
    assert mudsc["method"] == "mudsc" and mudsc["matcher"] == "zip" and mudsc["alpha"] == 0.5
    assert mudsc["method_choice_reason"].startswith("parents come from different initializations, so their units "
                                                    "must be matched (relative weight distance ")
    assert mudsc["method_choice_reason"].endswith("): mudsc")
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], progress=False)
    assert str(caught.value).startswith("method 'auto' chose 'mudsc' (parents come from different initializations")
    assert "needs calibration data" in str(caught.value) and "\n" not in str(caught.value)


def test_auto_with_a_base_prefers_ties(three):
    base, parents = three
    merged = hf_mudsc.merge(parents, base=base, progress=False)
    chosen = next(name for name in ("ties", "linear") if name in METHODS)
    assert merged.config.mudsc["method"] == chosen
    assert merged.config.mudsc["method_choice_reason"].startswith("parents share a base, so the identity "
                                                                  "correspondence holds and the base is given")


def save_family(root, parents, base=None) -> list[str]:
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    folders = []
    for index, model in enumerate([*parents, *([base] if base is not None else [])]):
        folder = root / (f"parent-{index}" if index < len(parents) else "base")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_cli_merges_three_parents_with_weights_and_the_recipe_reruns_it(three, tmp_path, capsys):
    base, parents = three
    *folders, base_folder = save_family(tmp_path, parents, base)
    out = tmp_path / "merged"
    assert main(["merge", *folders, "--method", "linear", "--weights", "1", "2", "1", "--base", base_folder,
                 "--output", str(out)]) == 0
    merged = ViTForImageClassification.from_pretrained(out)
    for name, tensor in merged.named_parameters():
        assert torch.equal(tensor.detach(), weighted_mean([params(p)[name] for p in parents], [1.0, 2.0, 1.0])), name
    recipe = yaml.safe_load((out / RECIPE_FILENAME).read_text())
    assert recipe["models"] == folders and recipe["weights"] == [1.0, 2.0, 1.0] and recipe["base"] == base_folder
    assert recipe["method"] == "linear"
    card = (out / "README.md").read_text()
    for row in ("| A | `parent-0` (local folder) |", "| B | `parent-1` (local folder) |",
                "| C | `parent-2` (local folder) |", "| base | `base` (local folder) |", "| Weights | 1.0 2.0 1.0 |",
                "| Base model | `base` |", "merge** of 3 fine-tuned"):
        assert row in card, row
    assert merged.config.mudsc["base"] == "base" and merged.config.mudsc["weights"] == [1.0, 2.0, 1.0]
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / RECIPE_FILENAME), "--output", str(again)]) == 0
    rerun = ViTForImageClassification.from_pretrained(again)
    assert all(torch.equal(x, y) for x, y in zip(merged.state_dict().values(), rerun.state_dict().values()))


def test_cli_refuses_weights_that_do_not_match_the_parents(tmp_path, capsys):
    code = main(["merge", "a", "b", "c", "--method", "linear", "--weights", "1", "2", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "weights gives 2 values for 3 parents (CLI: --weights)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("method", "flag"), [("breadcrumbs", "--gamma"), ("della", "--epsilon")])
def test_cli_refuses_a_per_parent_list_of_the_wrong_length_for_every_such_option(tmp_path, capsys, method, flag):
    """Bug hunt s29: --weights/--density lists of the wrong length were refused up front (exit 2), --gamma/--epsilon
    only after parent A was loaded whole (exit 1). Every per-parent option alike, before anything is opened."""
    code = main(["merge", "a", "b", "--base", "c", "--method", method, flag, "0.1", "0.1", "0.1",
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag.removeprefix('--')} gives 3 values for 2 parents (CLI: {flag})" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_recipe_round_trip_with_base_and_weights(tmp_path):
    recipe = Recipe(models=["org/a@" + "1" * 40, "org/b", "./c"], base="org/base@" + "2" * 40, weights=[1.0, 2.0, 0.5],
                    density=[0.5, 0.6, 0.7], normalize=False, scaling=0.8, rescale=False, method="linear")
    loaded = Recipe.load(recipe.save(tmp_path / RECIPE_FILENAME)).validate()
    assert loaded == recipe
    written = yaml.safe_load((tmp_path / RECIPE_FILENAME).read_text())
    assert written["base"] == "org/base@" + "2" * 40 and written["weights"] == [1.0, 2.0, 0.5]
    assert Recipe(models=["a", "b"]).override(density=[0.5]).density == 0.5  # `--density 0.5`


def test_the_readme_n_parents_example_runs(capsys):
    import re

    block = readme_example("n-parents")
    namespace: dict = {"__name__": "readme_n_parents"}
    exec(compile(block, "README.md (N parents example)", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "linear [1.0, 2.0, 1.0]"
    assert re.fullmatch(r"parents share a base, so the identity correspondence holds \(relative weight distance "
                        r"[0-9.e-]+\): linear", printed[1]), printed[1]
    parents, merged = namespace["parents"], namespace["merged"]
    for name, tensor in merged.named_parameters():
        expected = weighted_mean([params(p)[name] for p in parents], [1.0, 2.0, 1.0])
        assert torch.equal(tensor.detach(), expected), name
    assert merged.config.mudsc["base"] == "base"  # a model object without a name


def test_a_third_parent_of_another_architecture_is_named_c_not_b():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    expected = "different architectures: parent A is ViTForImageClassification, parent C is Bert"
    with pytest.raises(MergeInputError, match=expected):
        hf_mudsc.merge([a, b, make_model("bert_cls")], method="linear", progress=False)



def test_inspect_of_a_three_parent_merge_says_why_it_has_no_diagnostics(three, tmp_path, capsys):
    """QA s20: a merge of three parents writes no merge_diagnostics.json (they are two-parent only: docs/design.md
    §4.13), and `hf-mudsc inspect` said it was "merged before it existed" — false, and a user looks for a missing
    file."""
    _, parents = three
    merged = hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=2), method="mudsc", refit="none",
                            alpha=0.5, progress=False)
    out = hf_mudsc.save_merged(merged, tmp_path / "m3")
    assert not (out / "merge_diagnostics.json").exists()
    capsys.readouterr()
    assert main(["inspect", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "merged before it existed" not in printed, printed
    assert "merges of more than two parents have no merge_diagnostics.json" in printed, printed
