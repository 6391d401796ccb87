"""What a recipe (and the card written with it) says about a merge must be true (QA s21): a parent given as a model
object is named by its folder only when it still holds that folder's weights; `inspect RECIPE` refuses what
`merge --recipe` refuses; a recipe from a newer hf-mudsc says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from factories import vit_cli_case
from transformers import ViTForImageClassification

import hf_mudsc
from hf_mudsc.errors import RecipeError
from hf_mudsc.load.parents import load_parents_and_base
from hf_mudsc.load.references import pinned_reference
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Two tiny ViT folders (float32, safetensors) and a calibration folder."""
    root = tmp_path_factory.mktemp("truthful")
    parents, calibration = vit_cli_case(root)
    return root, parents, calibration


def test_an_object_holding_its_folders_weights_is_recorded_as_that_folder(case):
    _, (a, b), _ = case
    loaded, _, _ = load_parents_and_base([ViTForImageClassification.from_pretrained(a),
                                          ViTForImageClassification.from_pretrained(b)])
    assert [pinned_reference(p) for p in loaded] == [a, b]


def test_an_object_loaded_from_the_hub_unchanged_is_recorded_as_its_repo_pinned(case, local_hub, monkeypatch):
    """Bug hunt s29: transformers (>= 5.18) no longer sets `config._commit_hash`, so an object loaded with
    `from_pretrained("user/a")` and merged unchanged was recorded as `<ViTForImageClassification object>` (the card
    said "merged in memory", `base_model` lost it, `merge --recipe` refused it). Its cached snapshot holding exactly
    its weights names it, pinned to that snapshot's commit; a later commit of the repo, not the one loaded, does not."""
    _, (a, b), _ = case
    local_hub.upload_folder("user/a", a, "A")
    local_hub.upload_folder("user/b", b, "B")
    first, second_b = local_hub.head("user/a"), local_hub.head("user/b")
    loaded_a = ViTForImageClassification.from_pretrained("user/a")
    loaded_b = ViTForImageClassification.from_pretrained("user/b")
    # the repo moves on and its new snapshot is cached too: the object still holds the first commit's weights
    changed = ViTForImageClassification.from_pretrained(a)
    with torch.no_grad():
        changed.classifier.weight.mul_(0.5)
    changed.save_pretrained(Path(a).parent / "a-later")
    local_hub.upload_folder("user/a", Path(a).parent / "a-later", "later")
    ViTForImageClassification.from_pretrained("user/a")
    loaded, _, _ = load_parents_and_base([loaded_a, loaded_b])
    assert [pinned_reference(p) for p in loaded] == [f"user/a@{first}", f"user/b@{local_hub.head('user/b')}"]
    # review s29: a later commit changing only config.json (labels named) holds the same weights, but is another
    # model: the object is pinned to the commit whose config is its own, not to the newer one refs point at
    renamed = Path(b).parent / "b-renamed"
    shutil.copytree(b, renamed)
    config = json.loads((renamed / "config.json").read_text())
    config["id2label"] = {str(i): f"class {i}" for i in range(len(config["id2label"]))}
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
    (renamed / "config.json").write_text(json.dumps(config))
    local_hub.upload_folder("user/b", renamed, "name the labels")
    ViTForImageClassification.from_pretrained("user/b")  # cache the new head commit too
    loaded, _, _ = load_parents_and_base([loaded_a, loaded_b])
    assert pinned_reference(loaded[1]).endswith(f"@{second_b}")


def test_an_object_loaded_from_an_older_hub_commit_keeps_that_commits_processor(case, local_hub):
    """Left alone in s29, fixed s30: with no `config._commit_hash` (transformers >= 5.18) the processor of a Hub
    model object was read from the repo's default revision even when the object's weights were found in an older
    cached snapshot (the one the recipe pins): a later commit's preprocessing calibrated and was recorded."""
    from transformers import ViTImageProcessor

    _, (a, b), _ = case
    local_hub.upload_folder("user/old-a", a, "A")
    first = local_hub.head("user/old-a")
    loaded_a = ViTForImageClassification.from_pretrained("user/old-a")
    ViTImageProcessor.from_pretrained("user/old-a")  # cached, as a user loading both has it
    later = Path(a).parent / "a-later-processor"
    changed = ViTForImageClassification.from_pretrained(a)
    with torch.no_grad():
        changed.classifier.weight.mul_(0.5)
    changed.save_pretrained(later)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.25], image_std=[0.75]).save_pretrained(later)
    local_hub.upload_folder("user/old-a", later, "later weights and processor")
    ViTForImageClassification.from_pretrained("user/old-a")
    ViTImageProcessor.from_pretrained("user/old-a")  # the newer snapshot, with its processor, is cached too
    loaded, _, _ = load_parents_and_base([loaded_a, b])
    assert pinned_reference(loaded[0]) == f"user/old-a@{first}"
    assert list(loaded[0].processor.image_mean) == [0.5], loaded[0].processor.image_mean


def test_an_object_changed_in_memory_is_recorded_as_an_object_and_its_recipe_refused(case, tmp_path):
    """QA s21: the recipe named `vit-a`'s folder for an object whose weights had been halved in memory, so
    `merge --recipe` silently merged other weights."""
    _, (a, b), _ = case
    edited = ViTForImageClassification.from_pretrained(a)
    with torch.no_grad():
        edited.classifier.weight.mul_(0.5)
    merged = hf_mudsc.merge([edited, b], method="linear", progress=False)
    models = merged.merge_report.recipe["models"]
    assert models[1] == b and a not in models[0] and "object" in models[0], models
    # config.json (pushed with the model) names it the same way, not by the folder it no longer equals
    assert merged.config.mudsc["parents"] == ["<ViTForImageClassification object>", Path(b).name]
    recipe = hf_mudsc.save_merged(merged, tmp_path / "m") / RECIPE_FILENAME
    with pytest.raises(RecipeError, match=r"models\[0\].*model object.*not recorded"):
        Recipe.load(recipe).validate()
    card = (tmp_path / "m" / "README.md").read_text()
    assert "merged in memory" in card and "(local folder)" in card  # A an object, B its folder


def test_an_object_loaded_in_another_dtype_is_an_object_and_the_reason_says_loaded_as(case):
    """Loaded with dtype=float16 from float32 folders: the folders hold other bytes (a re-run from them would merge
    the float32 values), and the card said "every parent is stored in float16"."""
    _, (a, b), _ = case
    half = [ViTForImageClassification.from_pretrained(p, dtype=torch.float16) for p in (a, b)]
    merged = hf_mudsc.merge(half, method="linear", progress=False)
    assert all("object" in m for m in merged.merge_report.recipe["models"])
    reason = merged.config.mudsc["out_dtype_reason"]
    assert "loaded as float16" in reason and "stored" not in reason, reason
    plan = hf_mudsc.merge(half, method="linear", dry_run=True, progress=False)  # the dry run says the same
    assert (plan.out_dtype, plan.out_dtype_reason) == ("float16", reason)


# ------------------------------------------------------------------------------------ inspect RECIPE (QA s21)
TOKEN = "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"


def inspect_recipe_text(tmp_path, capsys, text: str) -> tuple[int, str, str]:
    from hf_mudsc.cli.main import main

    path = tmp_path / "r.yaml"
    path.write_text(text)
    capsys.readouterr()
    code = main(["inspect", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("line", [f"models: [{TOKEN}, org/b]", f"models: [org/a, org/b]\nbase: org/{TOKEN}"])
def test_inspect_refuses_a_token_in_a_recipe_as_merge_does_without_showing_it(tmp_path, capsys, line):
    code, out, err = inspect_recipe_text(tmp_path, capsys, line + "\nmethod: linear\n")
    assert code == 2 and TOKEN not in out + err and "Run it with" not in out, out + err
    assert "access token" in err and len(err.strip().splitlines()) == 1, err


def test_inspect_exits_2_on_an_invalid_recipe_as_merge_does(tmp_path, capsys):
    code, out, err = inspect_recipe_text(tmp_path, capsys, "models: [org/a, org/b]\nmethod: no-such-method\n")
    assert code == 2 and "method" in err, err


def test_inspect_refuses_a_recipe_that_is_not_utf8_as_merge_does(tmp_path, capsys):
    """`inspect` read the file whole before the recipe's own checks: a codec error (exit 1) where `merge --recipe`
    says the file is not UTF-8 (exit 2)."""
    from hf_mudsc.cli.main import main

    path = tmp_path / "r.yaml"
    path.write_bytes(b"models: [org/a, org/b]\nmethod: mudsc # caf\xe9\n")
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "UTF-8" in err, err
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "m")]) == 2
    assert err.split("error: ", 1)[1] == capsys.readouterr().err.split("error: ", 1)[1]


def test_inspect_lists_local_inputs_a_run_would_not_find(case, tmp_path, capsys, monkeypatch):
    """Relative parent paths resolved from another working directory, a calibration folder that is gone, a
    pickle-only parent: `inspect` said "would merge ..." and printed a run command that failed."""
    _, (a, b), calibration = case
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"0")
    monkeypatch.chdir(tmp_path)
    code, out, err = inspect_recipe_text(
        tmp_path, capsys, f"models: [./vit-a, {b}, {pickled}]\ncalibration: {tmp_path / 'gone'}\nmethod: mudsc\n")
    assert code == 2 and "Run it with" not in out, out + err
    assert "./vit-a" in err and str(tmp_path / "gone") in err and "missing" in err, err
    assert "--allow-pickle" in err and str(b) not in err, err
    # Resolved from the folder they are relative to, and with the pickle parent left out, it runs.
    monkeypatch.chdir(Path(a).parent)
    code, out, err = inspect_recipe_text(tmp_path, capsys,
                                         f"models: [./vit-a, {b}]\ncalibration: {calibration}\nmethod: mudsc\n")
    assert code == 0 and "Run it with" in out, out + err



@pytest.mark.parametrize(("lines", "needle"), [
    ("method: ties", "needs the parents' common base model and none was given"),
    ("method: linear\ndevice: cuda", "CUDA is not available on this machine"),
])
def test_inspect_refuses_what_the_merges_dry_run_refuses(case, tmp_path, capsys, monkeypatch, lines, needle):
    """QA s24: `inspect RECIPE` said "Run it with ..." (exit 0) for recipes `merge --recipe` refuses at once (ties
    without a base, device cuda without CUDA): it runs the same dry run, so it refuses them in its words."""
    _, (a, b), _ = case
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = inspect_recipe_text(tmp_path, capsys, f"models: [{a}, {b}]\n{lines}\n")
    assert code == 1 and "Run it with" not in out, out + err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_inspect_marks_options_the_method_does_not_read(case, tmp_path, capsys):
    """QA s24: options weight_matching ignores were listed as if they applied, and zipit with matcher align was shown
    as "zipit (matcher zip)" only: each is marked "no effect", as the merge's warning says."""
    _, (a, b), calibration = case
    code, out, err = inspect_recipe_text(
        tmp_path, capsys, f"models: [{a}, {b}]\nmethod: weight_matching\ndensity: 0.3\nlayer_swap: '1:1'\n")
    assert code == 0 and "Run it with" in out, out + err
    assert "density = 0.3 (no effect)" in out and "layer_swap = '1:1' (no effect)" in out, out
    assert "does not read" in out  # the dry run's warning, with its reason
    code, out, err = inspect_recipe_text(
        tmp_path, capsys, f"models: [{a}, {b}]\ncalibration: {calibration}\nmethod: zipit\nmatcher: align\n")
    assert code == 0 and "method:      zipit (matcher zip)" in out, out + err
    assert "matcher = 'align' (no effect)" in out, out


def test_merge_recipe_lists_local_inputs_it_would_not_find_before_loading_anything(case, tmp_path, capsys,
                                                                                    monkeypatch):
    """`inspect RECIPE` listed them (exit 2); `merge --recipe` of the same file failed at the first parent's load with
    exit 1, one problem at a time, after the calibration and output checks."""
    from hf_mudsc.cli.main import main

    _, (_, b), _ = case
    path = tmp_path / "r.yaml"
    path.write_text(f"models: [./vit-a, {b}]\ncalibration: {tmp_path / 'gone'}\nmethod: mudsc\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["merge", "--recipe", str(path), "--output", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "./vit-a" in err and str(tmp_path / "gone") in err and "missing" in err, err
    assert not (tmp_path / "m").exists()

# ------------------------------------------------------------------------------------ the recipe's version (QA s21)
def test_a_recipe_from_a_newer_release_says_so(tmp_path, caplog):
    """`hf_mudsc_version: 9.9.9` was accepted silently, and a key a newer release added failed as a typo would."""
    from hf_mudsc._version import __version__

    path = tmp_path / "r.yaml"
    path.write_text("hf_mudsc_version: 9.9.9\nmodels: [org/a, org/b]\nnew_future_option: 3\n")
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    message = str(caught.value)
    assert "9.9.9" in message and __version__ in message and "upgrade" in message, message
    assert "new_future_option" in message, message
    path.write_text("hf_mudsc_version: 9.9.9\nmodels: [org/a, org/b]\n")
    with caplog.at_level("WARNING"):
        Recipe.load(path)
    assert "9.9.9" in caplog.text and "newer" in caplog.text, caplog.text
    path.write_text(f"hf_mudsc_version: {__version__}\nmodels: [org/a, org/b]\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        Recipe.load(path)
    assert "newer" not in caplog.text


@pytest.mark.parametrize("value", [
    "{units_in_place: !!binary aGk=}",                        # bytes: no JSON value
    "{extra: !!set {a}}",                                      # a set
    "{when: 2026-12-02}",                                      # a date
    "{1: x}",                                                  # a key that is no string
    "&a {k: *a}",                                              # a mapping holding itself
    "{score: .nan}",                                           # NaN: no strict JSON
    "&a {k: [x, x, x, x, x, x, x, x, x, x]}",
])
def test_a_recipes_auto_chosen_holding_anything_but_plain_json_is_refused_on_load(tmp_path, value):
    """`auto_chosen.method.correspondence_check` is copied into the re-run's config.json: a YAML set passed the
    check, then the whole merge ran and writing the config failed with a traceback (`set is not JSON
    serializable`); aliases nesting a list ten times per level grow exponentially when written."""
    if value.startswith("&a {"):  # ten levels of ten aliases: 10^10 strings once expanded
        lines = ["  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
            f"  l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1},"
            f" *l{i - 1}, *l{i - 1}]" for i in range(1, 10)]
        value = "\n" + "\n".join("      " + line for line in lines)
    path = tmp_path / "r.yaml"
    path.write_text("models: [org/a, org/b]\nmethod: mudsc\nauto_chosen:\n  method:\n    value: mudsc\n"
                    f"    reason: r\n    correspondence_check: {value}\n")
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    message = str(caught.value)
    assert "\n" not in message and "auto_chosen" in message and "delete the key" in message, message


def test_a_recipes_plain_auto_chosen_still_loads(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("models: [org/a, org/b]\nmethod: mudsc\nauto_chosen:\n  method:\n    value: mudsc\n"
                    "    reason: r\n    correspondence_check: null\n    parent_relation: {relation: independent, "
                    "weight_distance: 1.41, head_factor_imbalance: [1.06, 1.07], nested: {ok: true, none: null}}\n")
    chosen = Recipe.load(path).auto_chosen
    assert chosen["method"]["parent_relation"]["head_factor_imbalance"] == [1.06, 1.07]


# ------------------------------------------------------------------------------------ a re-run's card (QA s21)
def test_a_recipe_rerun_says_what_the_original_said_and_gives_the_same_weights(case, tmp_path):
    """The re-run's card said `float32 (asked for with out_dtype= ...)` and lost the method's reason and the
    correspondence check: the recipe pins what `auto` chose, which the user never asked for."""
    import json

    from hf_mudsc.cli.main import main

    _, (a, b), calibration = case
    first, again = tmp_path / "m1", tmp_path / "m2"
    assert main(["merge", a, b, "--calibration", calibration, "--refit", "none", "--num-samples", "16",
                 "--output", str(first)]) == 0
    assert main(["merge", "--recipe", str(first / RECIPE_FILENAME), "--output", str(again)]) == 0
    configs = [json.loads((folder / "config.json").read_text())["mudsc"] for folder in (first, again)]
    assert configs[0]["method_choice_reason"] and configs[0]["out_dtype_reason"].startswith("auto:"), configs[0]
    for key in ("method", "method_choice_reason", "correspondence_check", "out_dtype", "out_dtype_reason"):
        assert configs[1][key] == configs[0][key], key
    recipes = [Recipe.load(folder / RECIPE_FILENAME) for folder in (first, again)]
    assert recipes[1] == recipes[0] and recipes[0].auto_chosen, recipes
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    # Asked for on the re-run's command line: the reason says so.
    assert main(["merge", "--recipe", str(first / RECIPE_FILENAME), "--out-dtype", "float16",
                 "--output", str(tmp_path / "m3")]) == 0
    assert "asked for" in json.loads((tmp_path / "m3" / "config.json").read_text())["mudsc"]["out_dtype_reason"]


def test_a_processor_given_to_merge_that_preprocessed_the_data_is_named_in_the_recipe(case, tmp_path, caplog,
                                                                                        capsys):
    """Bug hunt s29: `merge(..., processor=P)` preprocessed the raw calibration images with P instead of parent A's
    processor (other weights), but the recipe said nothing, and `merge --recipe` silently built other weights. The
    recipe says so in a comment line and its re-run warns; a processor equal to parent A's changes nothing and adds
    no line."""
    import logging

    from transformers import ViTImageProcessor

    from hf_mudsc.cli.main import main

    _, (a, b), calibration = case
    other = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.1], image_std=[0.2])
    merged = hf_mudsc.merge([a, b], calibration, method="zipit", refit="none", num_samples=16, processor=other,
                            progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "given")
    text = (folder / RECIPE_FILENAME).read_text()
    assert "# processor: the calibration data was preprocessed by a processor given to hf_mudsc.merge" in text
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        assert main(["merge", "--recipe", str(folder / RECIPE_FILENAME), "--output", str(tmp_path / "again")]) == 0
    assert "preprocessed by a processor given to hf_mudsc.merge" in caplog.text and "its weights may differ" in \
        caplog.text
    caplog.clear()
    assert main(["inspect", str(folder / RECIPE_FILENAME)]) == 0  # inspect says it too (review s29)
    assert ("warning:     its merge's calibration data was preprocessed by a processor given to hf_mudsc.merge"
            in capsys.readouterr().out)
    own = ViTImageProcessor.from_pretrained(a)
    same = hf_mudsc.merge([a, b], calibration, method="zipit", refit="none", num_samples=16, processor=own,
                          progress=False)
    assert "# processor:" not in (hf_mudsc.save_merged(same, tmp_path / "own") / RECIPE_FILENAME).read_text()
