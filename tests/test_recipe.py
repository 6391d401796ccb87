"""The recipe: every CLI flag is a key, YAML round trips, flags override keys, bad recipes fail clearly."""

from __future__ import annotations

import pytest
import yaml

from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import RecipeError
from hf_mudsc.publish.recipe import DESTINATION_KEYS, RECIPE_FILENAME, Recipe


def _parse(*argv: str):
    return build_parser().parse_args(["merge", *argv])


def test_yaml_round_trip_keeps_every_key(tmp_path):
    recipe = Recipe(models=["org/a@" + "1" * 40, "/data/b"], calibration="org/ds:cfg:train", method="zipit",
                    matcher="align", alpha=0.25, num_samples=64, batch_size=8, seed=3, zip_decay=0.7,
                    zip_budget=0.5, independent_heads=True, reference_compat=True, image_column="img",
                    text_column="sentence")
    path = tmp_path / RECIPE_FILENAME
    recipe.save(path)
    assert Recipe.load(path) == recipe
    assert path.read_text().startswith("# hf-mudsc merge recipe")


def test_written_recipe_leaves_out_destinations_and_records_the_version(tmp_path):
    recipe = Recipe(models=["a", "b"], calibration="c", output="out", push_to_hub="org/m", private=True,
                    overwrite=True)
    data = yaml.safe_load(recipe.to_yaml())
    assert not set(DESTINATION_KEYS) & set(data)
    assert data["hf_mudsc_version"]
    assert data["models"] == ["a", "b"] and data["calibration"] == "c"
    reloaded = Recipe.load(recipe.save(tmp_path / "r.yaml"))
    assert reloaded.output is None and reloaded.push_to_hub is None and not reloaded.overwrite
    assert reloaded.merge_options() == recipe.merge_options()


def test_every_merge_flag_has_a_recipe_key():
    merge_parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.items()
                        if a[0] == "merge")[1]
    # -q/-v: the global verbosity flags, which every command takes after it too (not merge options)
    # --commit-message ... --create-pr: how --push-to-hub commits, no recipe key (as --token)
    dests = {action.dest for action in merge_parser._actions} - {"help", "recipe", "token", "quiet", "verbose",
                                                                 "commit_message", "commit_description", "revision",
                                                                 "create_pr"}
    assert dests == set(Recipe.keys())


def test_flags_override_recipe_keys(tmp_path):
    path = Recipe(models=["org/a", "org/b"], calibration="org/ds:train", alpha=0.3, seed=4,
                  independent_heads=True).save(tmp_path / "r.yaml")
    recipe = build_recipe(_parse("--recipe", str(path), "--alpha", "0.9", "--no-independent-heads",
                                 "--output", "out"))
    assert recipe.alpha == 0.9 and recipe.independent_heads is False
    assert recipe.seed == 4 and recipe.models == ["org/a", "org/b"]  # untouched keys come from the file
    assert recipe.output == "out"
    recipe = build_recipe(_parse("--recipe", str(path), "x/1", "x/2", "--method", "average", "-o", "o"))
    assert recipe.models == ["x/1", "x/2"] and recipe.method == "average"


def test_defaults_without_a_recipe_equal_the_merge_api_defaults():
    import inspect

    import hf_mudsc

    recipe = build_recipe(_parse("a", "b", "--calibration", "c", "--output", "o"))
    signature = inspect.signature(hf_mudsc.merge).parameters
    for key, value in recipe.merge_options().items():
        assert signature[key].default == value, key


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"models": ["a", "b"], "calibration": "c", "alpah": 0.5}, "unknown key(s) ['alpah']"),
        ({"models": "a", "calibration": "c"}, "`models` must be a list"),
        ({"models": ["a", "b"], "calibration": "c", "alpha": "high"},
         "alpha must be a number or 'auto' (CLI: --alpha)"),
        ({"models": ["a", "b"], "calibration": "c", "seed": 1.5}, "seed must be an int (CLI: --seed)"),
        ({"models": ["a", "b"], "calibration": "c", "independent_heads": "yes please"},
         "`independent_heads` must be bool"),
        ({"models": ["a", "b"], "calibration": "c", "batch_size": True}, "batch_size must be an int"),
        ({"models": ["a", "b"], "method": None}, "method must be a string (CLI: --method), got None"),
        ({"models": ["a", "b"], "image_column": 3}, "`image_column` must be str"),
    ],
)
def test_bad_recipe_values_are_named(data, needle):
    with pytest.raises(RecipeError) as caught:
        Recipe.from_dict(data)
    assert needle in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"models": ["a"]}, "two or more parent models"),
        ({"method": "no_such_method"}, "unknown merge method 'no_such_method'; choose one of: auto, mudsc"),
        ({"matcher": "hungarian"}, "unknown matcher"),
        ({"alpha": 1.5}, "alpha must lie in [0, 1]"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"zip_decay": 0.0}, "zip_decay must lie in (0, 1]"),
        ({"zip_budget": -1.0}, "zip_budget must be a finite number >= 0"),
        ({"calibration": None, "method": "mudsc"}, "needs calibration data: pass --calibration"),
        ({"push_to_hub": "just-a-name"}, "push_to_hub= (CLI: --push-to-hub) must look like `org/name`"),
        ({"statistics_dtype": "float16"},
         "statistics_dtype must be one of float32, float64 (CLI: --statistics-dtype), got 'float16'"),
    ],
)
def test_invalid_recipes_fail_validation(changes, needle):
    recipe = Recipe(models=["a", "b"], calibration="c").override(**changes)
    with pytest.raises(RecipeError) as caught:
        recipe.validate()
    assert needle in str(caught.value)


def test_data_free_methods_need_no_calibration():
    Recipe(models=["a", "b"], method="weight_matching").validate()
    Recipe(models=["a", "b"], method="average").validate()


def test_missing_or_malformed_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file"):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a, b\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        Recipe.load(listed)


def test_cli_reports_recipe_errors_with_exit_code_2(capsys):
    from hf_mudsc.cli.main import main

    assert main(["merge", "only-one", "--calibration", "c", "--output", "o"]) == 2
    assert "two or more parent models" in capsys.readouterr().err


# ---------------------------------------------------------------- keys only the command line may set (issue 10.6)
COMMAND_LINE_ONLY = [
    ("output", "elsewhere", "--output DIR"),
    ("push_to_hub", "victim/repo", "--push-to-hub ORG/NAME"),
    ("overwrite", True, "--overwrite"),
    ("private", True, "--private"),
    ("allow_pickle", True, "--allow-pickle"),
]


@pytest.mark.parametrize(("key", "value", "flag"), COMMAND_LINE_ONLY)
def test_a_recipe_file_may_not_set_destination_or_trust_keys(tmp_path, key, value, flag):
    path = tmp_path / RECIPE_FILENAME
    path.write_text(yaml.safe_dump({"models": ["org/a", "org/b"], "calibration": "org/ds:train", key: value}))
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    message = str(caught.value)
    assert f"sets `{key}`, which a recipe may not set; pass {flag} on the command line" in message
    assert RECIPE_FILENAME in message and "\n" not in message


@pytest.mark.parametrize(("key", "value", "flag"), COMMAND_LINE_ONLY)
def test_the_cli_refuses_such_a_recipe_even_with_the_flag_given(tmp_path, capsys, key, value, flag):
    """The refusal comes first: no output folder appears, although --output is on the command line too."""
    from hf_mudsc.cli.main import main

    path = tmp_path / RECIPE_FILENAME
    path.write_text(yaml.safe_dump({"models": [str(tmp_path / "a"), str(tmp_path / "b")], "method": "average",
                                    key: value}))
    out = tmp_path / "out"
    assert main(["merge", "--recipe", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"sets `{key}`, which a recipe may not set; pass {flag} on the command line" in err
    assert "Traceback" not in err and not out.exists() and not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(("key", "value"), [("output", None), ("push_to_hub", None), ("overwrite", False),
                                            ("private", False), ("allow_pickle", False)])
def test_a_recipe_stating_the_default_of_such_a_key_still_loads(tmp_path, key, value):
    """hf-mudsc 0.1.0 wrote `allow_pickle: false` into every recipe; a default asks for nothing, so it is ignored."""
    path = tmp_path / RECIPE_FILENAME
    path.write_text(yaml.safe_dump({"models": ["org/a", "org/b"], "calibration": "org/ds:train", key: value}))
    recipe = Recipe.load(path)
    assert getattr(recipe, key) == getattr(Recipe(), key)


def test_written_recipes_and_the_card_block_hold_no_command_line_only_key(tmp_path):
    recipe = Recipe(models=["a", "b"], calibration="c", allow_pickle=True, output="out", push_to_hub="org/m",
                    private=True, overwrite=True)
    for data in (yaml.safe_load(recipe.to_yaml()), recipe.to_dict(reproducible=True),
                 yaml.safe_load(recipe.save(tmp_path / RECIPE_FILENAME).read_text())):
        assert {"allow_pickle", *DESTINATION_KEYS}.isdisjoint(data), data
    assert Recipe.load(tmp_path / RECIPE_FILENAME).merge_options() == recipe.merge_options()


def test_the_cli_flags_still_set_those_keys(tmp_path):
    path = Recipe(models=["org/a", "org/b"], calibration="org/ds:train").save(tmp_path / "r.yaml")
    recipe = build_recipe(_parse("--recipe", str(path), "--output", "o", "--push-to-hub", "me/m", "--private",
                                 "--overwrite", "--allow-pickle"))
    assert (recipe.output, recipe.push_to_hub, recipe.private, recipe.overwrite, recipe.allow_pickle) == (
        "o", "me/m", True, True, True)


# A mudsc_recipe.yaml exactly as the previous release (commit dcb5a50) wrote it next to every merged model.
PREVIOUS_RELEASE_RECIPE = """\
# hf-mudsc merge recipe. Reproduce the merge with:
#   hf-mudsc merge --recipe mudsc_recipe.yaml --output merged-model
# Parents are pinned to the commits that were used; flags on the command line override keys.
hf_mudsc_version: 0.1.0
models:
- org/a@0123456789abcdef0123456789abcdef01234567
- /data/b
calibration: /data/cal:train
method: mudsc
matcher: zip
alpha: 0.5
num_samples: 64
batch_size: 32
seed: 0
zip_decay: 0.5
zip_budget: 1.0
independent_heads: false
reference_compat: false
statistics_dtype: float32
image_column: null
text_column: null
allow_pickle: false
"""


def test_a_recipe_written_by_the_previous_release_still_loads(tmp_path):
    path = tmp_path / RECIPE_FILENAME
    path.write_text(PREVIOUS_RELEASE_RECIPE)
    recipe = Recipe.load(path).validate()
    assert recipe.models == ["org/a@0123456789abcdef0123456789abcdef01234567", "/data/b"]
    assert recipe.calibration == "/data/cal:train"
    assert (recipe.method, recipe.matcher, recipe.alpha, recipe.num_samples, recipe.batch_size) == (
        "mudsc", "zip", 0.5, 64, 32)
    assert (recipe.zip_decay, recipe.zip_budget, recipe.seed, recipe.statistics_dtype) == (0.5, 1.0, 0, "float32")
    assert recipe.independent_heads is False and recipe.reference_compat is False and recipe.allow_pickle is False
    # Written again, it keeps every merge key (only the command-line-only `allow_pickle` is left out).
    again = Recipe.load(recipe.save(tmp_path / "again.yaml")).validate()
    assert again.merge_options() == recipe.merge_options()



@pytest.mark.parametrize(("models", "method"), [(["a", "b"], "mudsc"), (["a", "b", "c"], "regmean")])
def test_a_method_that_needs_data_suggests_data_free_methods_that_fit_the_parents(models, method):
    with pytest.raises(RecipeError) as caught:
        Recipe(models=models, method=method).validate()
    message = str(caught.value)
    assert f"method {method!r} needs calibration data" in message
    assert "--method weight_matching / ties / linear" in message


def test_data_free_suggestions_take_the_number_of_parents_given():
    from hf_mudsc.methods import METHODS
    from hf_mudsc.methods.registry import data_free_methods

    two, three = data_free_methods(2), data_free_methods(3)
    assert two[:3] == ["weight_matching", "ties", "linear"] and "average" in two and "slerp" in two
    assert "average" not in three and "slerp" not in three  # both merge exactly two parents
    assert all(not METHODS[name].needs_data and not METHODS[name].needs_calibration for name in two)


def test_the_published_recipe_names_local_folders_by_name_and_keeps_every_other_byte(tmp_path):
    """Parents, base and calibration given as folders of this machine are named by folder name in the copy pushed to
    the Hub (names YAML would misread are quoted), Hub references are untouched, and re-running that copy is refused
    until each local entry is given again."""
    from hf_mudsc.publish.recipe import published_text

    hub = "org/model@" + "a" * 40
    recipe = Recipe(models=["/home/alice/runs/yes", "/home/alice/a: b/ckpt 3", hub], method="weight_matching",
                    base="/home/alice/base", calibration="/home/alice/data/calib:train")
    local = recipe.to_yaml()
    published = published_text(local)
    assert "/home/alice" not in published
    renamed = (local.replace("- /home/alice/runs/yes\n", "- 'yes'\n").replace("- '/home/alice/a: b/ckpt 3'\n",
                                                                              "- ckpt 3\n")
               .replace("base: /home/alice/base\n", "base: base\n")
               .replace("calibration: /home/alice/data/calib:train\n", "calibration: calib:train\n"))
    assert published.endswith(renamed) and renamed != local
    assert [line for line in published[:-len(renamed)].splitlines() if line.startswith("#   ")] == [
        "#   models[0]: yes", "#   models[1]: ckpt 3", "#   base: base", "#   calibration: calib:train"]
    assert Recipe.from_dict(yaml.safe_load(published)) == recipe.override(
        models=["yes", "ckpt 3", hub], base="base", calibration="calib:train")
    hub_only = Recipe(models=[hub, "org/other@" + "b" * 40], method="weight_matching").to_yaml()
    assert published_text(hub_only) == hub_only

    path = tmp_path / RECIPE_FILENAME
    path.write_text(published)
    parser = build_parser()
    folders = [tmp_path / name for name in ("p0", "p1", "p2", "b")]
    for folder in folders:  # folders a run would load (their weights file by name: build_recipe reads none)
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
    args = parser.parse_args(["merge", *map(str, folders[:3]), "--recipe", str(path), "--output", "x"])
    with pytest.raises(RecipeError, match=r"base `base`, calibration `calib:train` were local folders .*--base PATH; "
                                          r"--calibration PATH"):
        build_recipe(args)
    args = parser.parse_args(["merge", *map(str, folders[:3]), "--recipe", str(path), "--base", str(folders[3]),
                              "--calibration", f"{folders[3]}:train", "--output", "x"])
    assert build_recipe(args).models == list(map(str, folders[:3]))


# ---------------------------------------------------------------- names YAML reads as numbers (`1e5`, `123`)
def test_name_keys_read_an_exponent_scalar_as_the_text_written(tmp_path):
    """The exponent resolver made `models: [1e5, 2e3]` floats (an older recipe naming folders `1e5`): keys that hold
    names or paths read such a plain scalar as the text written, as YAML 1.1 did; number keys still read numbers."""
    path = tmp_path / RECIPE_FILENAME
    path.write_text("models: [1e5, 2e3]\nbase: 1E-2\ncalibration: 1e5\nimage_column: 3e0\n"
                    "method: average\nrefit_lambda: 1e-3\nseed: 12\n")
    recipe = Recipe.load(path)
    assert recipe.models == ["1e5", "2e3"]
    assert (recipe.base, recipe.calibration, recipe.image_column) == ("1E-2", "1e5", "3e0")
    assert (recipe.refit_lambda, recipe.seed) == (1e-3, 12)
    # Written back, they are quoted, and read back as the same text.
    assert Recipe.load(recipe.save(tmp_path / "again.yaml")) == recipe


@pytest.mark.parametrize(("key", "flag"), [("output", "--output DIR"), ("push_to_hub", "--push-to-hub ORG/NAME")])
def test_a_number_shaped_destination_is_still_refused_as_a_destination(tmp_path, key, flag):
    path = tmp_path / RECIPE_FILENAME
    path.write_text(f"models: [org/a, org/b]\ncalibration: org/ds:train\n{key}: 1e5\n")
    with pytest.raises(RecipeError, match=f"sets `{key}`, which a recipe may not set; pass {flag}"):
        Recipe.load(path)


@pytest.mark.parametrize("text", ["models: [yes, org/b]", "models: [123, org/b]", "models: [a, b]\nbase: 12",
                                  "models: [a, b]\nimage_column: 3", "models: [a, b]\ncalibration: 1.5"])
def test_another_number_or_bool_under_a_name_key_is_refused_naming_the_key_and_quoting(tmp_path, text):
    """YAML always read these as numbers or booleans (never as text): refused, saying how to write such a name."""
    path = tmp_path / RECIPE_FILENAME
    path.write_text(f"{text}\nmethod: average\n")
    key = text.rpartition("\n")[2].partition(":")[0]
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    message = str(caught.value)
    assert key in message and "quote" in message and "\n" not in message, message


def test_rerunning_a_recipe_whose_calibration_was_given_in_memory_says_so(tmp_path, capsys):
    """QA s19: after `save_merged` of a merge given a `Dataset` object, `merge --recipe` said "refit 'gate' needs
    calibration data: pass --calibration ... or --refit none", as if the recipe had been written without data."""
    import datasets
    from test_cli import save_parents_and_data

    import hf_mudsc
    from hf_mudsc.cli.main import main

    a, b, calibration = save_parents_and_data(tmp_path)
    merged = hf_mudsc.merge([str(a), str(b)], datasets.load_from_disk(str(calibration)), method="zipit",
                            num_samples=16, batch_size=8, progress=False)
    recipe = hf_mudsc.save_merged(merged, tmp_path / "m") / RECIPE_FILENAME
    capsys.readouterr()  # the setup's lines
    assert main(["merge", "--recipe", str(recipe), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "given in memory" in err and "not recorded" in err, err
    assert "pass the same data with --calibration" in err and "--refit none" not in err, err
    # `inspect RECIPE` refused it with the generic message: it shows it, saying the data is to be given.
    assert main(["inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "calibration: given in memory to hf_mudsc.merge, not recorded, 16 samples" in out, out
    assert "to give:     the calibration data" in out, out
    assert f"Run it with `hf-mudsc merge --recipe {recipe} --calibration DATA --output DIR`." in out, out
    # Given again with --calibration, it runs; a recipe written without data keeps its own message.
    assert main(["merge", "--recipe", str(recipe), "--calibration", str(calibration),
                 "--output", str(tmp_path / "x")]) == 0
    plain = tmp_path / "plain.yaml"
    Recipe(models=[str(a), str(b)], method="zipit").save(plain)
    assert main(["merge", "--recipe", str(plain), "--output", str(tmp_path / "y")]) == 2
    assert "given in memory" not in capsys.readouterr().err


def test_the_readme_names_the_keys_a_recipe_may_not_set():
    """QA s22: the README said "Every flag is a recipe key (`num_samples`, `push_to_hub`, ...)", but a recipe that sets
    push_to_hub (or output, overwrite, dry_run, allow_pickle, private) is refused and `token` is no key at all."""
    from pathlib import Path

    from hf_mudsc.publish.recipe import COMMAND_LINE_ONLY_KEYS

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    sentence = readme[readme.index("Every merge option's flag is a recipe key"):][:600]
    sentence = sentence[:sentence.index("unless you ask")]
    assert "`push_to_hub`, ...)" not in readme
    assert all(f"`{key}`" in sentence for key in COMMAND_LINE_ONLY_KEYS), sentence
    assert "`token` is not a recipe key" in sentence and "token" not in Recipe.keys()
