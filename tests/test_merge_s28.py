"""`hf_mudsc.merge` after the session-28 bug hunt: task names kept distinct for any number of parents, non-finite
calibration inputs refused on every method's pass, float64 parents' recipes re-run, object parents' labels checked
as folders' are."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from factories import make_batches, make_model, with_new_head

import hf_mudsc
from hf_mudsc.errors import CalibrationError, LoadError

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_three_parents_whose_names_collide_after_lettering_keep_one_task_each(tmp_path):
    """Folders `p/vit_b`, `q/vit`, `r/vit`: the two `vit` parents became `vit_b` and `vit_c`, and the first
    parent's `vit_b` range was written over — a 12-row head whose task ranges covered 9 rows."""
    body = make_model("vit_cls", 1)
    paths = []
    for index, (where, count) in enumerate([("p/vit_b", 3), ("q/vit", 4), ("r/vit", 5)]):
        model = with_new_head(body, count, seed=10 + index)
        model.config.id2label = {j: f"c{index}_{j}" for j in range(count)}
        model.config.label2id = {label: j for j, label in model.config.id2label.items()}
        model.save_pretrained(tmp_path / where)
        paths.append(str(tmp_path / where))
    merged = hf_mudsc.merge(paths, method="linear", progress=False)
    ranges = merged.config.task_label_ranges
    assert ranges == {"vit_b": [0, 3], "vit_b_2": [3, 7], "vit_c": [7, 12]}, ranges
    logits = merged(**make_batches("vit_cls", 1, 4)[0]).logits
    assert hf_mudsc.joint_probabilities(logits, merged.config).shape == (4, 12)
    assert merged.config.id2label[3] == "vit_b_2: c1_0"


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_non_finite_calibration_inputs_are_refused_on_every_methods_pass(method):
    """NaN in one calibration image got the one-line refusal only on the unit-matching statistics: regmean ended in
    torch's `lstsq` INTERNAL ASSERT traceback, fisher blamed the options (`overflowed float32`)."""
    parent = make_model("vit_cls", 1)
    other = copy.deepcopy(parent)
    with torch.no_grad():
        for tensor in other.parameters():
            tensor.add_(0.01 * torch.randn_like(tensor))
    batches = make_batches("vit_cls", 3, 8)
    batches[1]["pixel_values"][2, 0, 0, 0] = math.nan
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([parent, other], batches, method=method, refit="none", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "pixel_values hold NaN or inf in 1 of the 8 examples" in message, message


def test_a_merge_of_float64_parents_records_a_recipe_that_runs_again(tmp_path):
    """`out_dtype="auto"` keeps float64 parents' dtype and the recipe recorded `out_dtype: float64`, which a re-run
    refused (`unknown out_dtype 'float64'`)."""
    from hf_mudsc.publish.recipe import Recipe

    parents = [make_model("vit_cls", seed).double() for seed in (1, 2)]
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    assert merged.dtype == torch.float64
    hf_mudsc.save_merged(merged, tmp_path / "m")
    recipe = Recipe.load(tmp_path / "m" / "mudsc_recipe.yaml")
    assert recipe.out_dtype == "float64"
    again = hf_mudsc.merge(parents, method="linear", out_dtype="float64", progress=False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in merged.state_dict().items())


def test_a_model_object_whose_labels_skip_a_number_is_refused_as_its_folder_is():
    """`id2label = {0: cat, 1: fox, 5: dog}` on a 3-row head: refused from a folder's config.json, accepted from the
    object (its merge then said `dog` is row 5 of a 3-row head)."""
    model = make_model("vit_cls", 1)
    model.config.id2label = {0: "cat", 1: "fox", 5: "dog"}
    model.config.label2id = {"cat": 0, "fox": 1, "dog": 5}
    with pytest.raises(LoadError) as caught:
        hf_mudsc.merge([model, copy.deepcopy(model)], method="linear", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "id2label numbers its labels [0, 1, 5], not 0 to 2" in message, message


@pytest.mark.parametrize(("method", "option"), [("pcb", {"pcb_ratio": 1e-9}), ("localize_stitch", {"density": 1e-9})])
def test_a_share_that_keeps_no_entry_of_the_whole_model_is_refused_before_any_weights_load(tmp_path, monkeypatch,
                                                                                           method, option):
    """pcb's and localize_stitch's refusal came after the parents and the base were loaded (pcb: after its
    whole-model float64 task-vector stack was built); the per-tensor methods' came before any weights."""
    import transformers
    from factories import fine_tune

    from hf_mudsc.errors import MergeInputError

    base = make_model("vit_cls", 0)
    folders = []
    for name, model in (("base", base), ("a", fine_tune(base, 1, 0.05)), ("b", fine_tune(base, 2, 0.05))):
        model.save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(folders[1:], None, method=method, base=folders[0], progress=False, **option)
    message = str(caught.value)
    assert "\n" not in message and "keeps none of each task vector's" in message, message
