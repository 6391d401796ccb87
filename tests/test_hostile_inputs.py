"""Hostile inputs found by the robustness audit (s11): each test is a defect that was real, its fix the smallest.

Every refusal is one line naming the problem and the fix, raised before any weights are loaded, and its size does
not grow with the input (a value is shown shortened, never whole).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from factories import vit_folder

from hf_mudsc.cli.main import main
from hf_mudsc.errors import OptionError, RecipeError
from hf_mudsc.option_values import MAX_BLOCKS, parse_layer_swap
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.recipe import Recipe


def _one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- layer_swap: a range is counted, never expanded


@pytest.mark.parametrize("text", ["1:0-99999999999999999999", f"1:{MAX_BLOCKS}", "0:0-1,1:5-100000000"])
def test_a_layer_swap_range_past_any_model_is_refused_without_expanding_it(text):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"models have at most {MAX_BLOCKS} blocks"):
        parse_layer_swap(text)
    assert time.perf_counter() - start < 1.0


def test_the_cli_refuses_a_huge_layer_swap_range_in_one_line(tmp_path, capsys):
    code = main(["merge", "a", "b", "--method", "layer_swap", "--layer-swap", "1:0-99999999999999999999",
                 "--output", str(tmp_path / "out")])
    assert code == 2
    line = _one_line_error(capsys)
    assert "layer_swap '1:0-99999999999999999999'" in line and "(CLI: --layer-swap)" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- values are shown shortened in messages


# A "billion laughs" in one line: 9**9 'x' reached through aliases; printed whole it is gigabytes.
BOMB = ("[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
        "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
        "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]]")


@pytest.mark.parametrize(("key", "needle"), [
    ("weights", "weights must be a list of numbers (CLI: --weights)"),
    ("calibration", "`calibration` must be str"),
    ("alpha", "alpha must be a number or 'auto' (CLI: --alpha)"),
    ("models", "every entry of `models` must be a non-empty string"),
])
def test_an_alias_bomb_in_a_recipe_is_refused_in_one_short_line(tmp_path, capsys, key, needle):
    path = tmp_path / "bomb.yaml"
    path.write_text(("" if key == "models" else "models: [a, b]\n") + f"{key}: [{BOMB}]\n")
    start = time.perf_counter()
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert needle in line and len(line) < 600, line[:700]
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


def test_a_long_unknown_key_list_and_a_long_string_are_shortened(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("models: [a, b]\n" + "".join(f"k{i}: 1\n" for i in range(20000)))
    with pytest.raises(RecipeError, match="unknown key") as caught:
        Recipe.load(path)
    assert len(str(caught.value)) < 2000
    with pytest.raises(OptionError, match="`text_column` must be str") as caught:
        MergeOptions.check("text_column", ["x" * 10**6])
    assert len(str(caught.value)) < 600


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("method", {"a": 1}, "method must be a string (CLI: --method), got {'a': 1} (dict)"),
    ("method", {"{0}": "{1}"}, "method must be a string (CLI: --method), got {'{0}': '{1}'} (dict)"),
    ("weights", {1, 2}, "weights must be a list of numbers (CLI: --weights), got {1, 2} (set)"),
    ("batch_size", "{oops}", "batch_size must be an int (CLI: --batch-size), got '{oops}' (str)"),
])
def test_a_value_with_braces_is_named_not_formatted(key, value, needle):
    """`method: {a: 1}` crashed with KeyError: the message template was formatted a second time with the value in."""
    with pytest.raises(OptionError) as caught:
        MergeOptions.check(key, value)
    assert str(caught.value) == needle
    with pytest.raises(RecipeError) as caught:
        Recipe.from_dict({"models": ["a", "b"], key: value})
    assert str(caught.value) == f"recipe: {needle}"


def test_the_cli_names_a_mapping_given_as_a_method(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("models: [a, b]\nmethod: {a: 1}\n")
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "method must be a string (CLI: --method), got {'a': 1} (dict)" in _one_line_error(capsys)


# ---------------------------------------------------------------- the recipe file itself


@pytest.mark.parametrize(("text", "needle"), [
    ("models: [a, b\n", "line 2, column 1"),
    ("models: [a, b]\n? [x, y]\n: 1\n", "found unhashable key (line 2, column 3)"),
    ("models: [a, b]\nalpha: !!python/object/apply:os.system ['touch pwned']\n",
     "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system' "
     "(line 2, column 8)"),
    ("models: [a, b]\n---\nmodels: [c, d]\n", "expected a single document in the stream"),
])
def test_invalid_yaml_is_reported_in_one_line_with_its_position(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert f"{str(path)!r} is not valid YAML" in line and needle in line, line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("raw", [b"models: [a, b]\ntext_column: caf\xe9\n", "models: [a, b]\n".encode("utf-16"),
                                 b"\xff\xfe\xfa\n"])
def test_a_recipe_that_is_not_utf8_is_named(tmp_path, capsys, raw):
    path = tmp_path / "latin.yaml"
    path.write_bytes(raw)
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert f"recipe {str(path)!r} is not UTF-8 text" in line and "save it as UTF-8" in line, line


def test_an_integer_too_long_to_read_is_named_with_its_recipe(tmp_path, capsys):
    path = tmp_path / "long.yaml"
    path.write_text("models: [a, b]\nnum_samples: 1" + "0" * 5000 + "\n")
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert f"{str(path)!r} is not valid YAML" in line and "4300 digits" in line, line


def test_a_key_given_twice_is_refused(tmp_path):
    """YAML keeps the last of two equal keys silently: `alpha: 0.1` above `alpha: 0.9` would merge at 0.9."""
    path = tmp_path / "twice.yaml"
    path.write_text("models: [a, b]\nalpha: 0.1\nseed: 1\nalpha: 0.9\n")
    with pytest.raises(RecipeError, match=r"twice.yaml.: key .alpha. is given twice \(line 4, column 1\); give each"):
        Recipe.load(path)
    path.write_text("models: [a, b]\n<<: {alpha: 0.3}\nseed: 1\n")  # a merge key is not a repeated key
    assert Recipe.load(path).alpha == 0.3


# ---------------------------------------------------------------- parent folders: config.json read with care


@pytest.mark.parametrize(("raw", "needle"), [
    ("null", "config.json is not a JSON object (got null)"),
    ("[1, 2]", "config.json is not a JSON object (got a list)"),
    ('"vit"', "config.json is not a JSON object (got a string)"),
    ("{not json", "config.json is not valid JSON (line 1, column 2"),
    ("", "config.json is not valid JSON (line 1, column 1"),
    (b'{"model_type": "vit", "x": "caf\xe9"}', "config.json is not UTF-8 JSON"),
    ('{"hidden_size": 32}', "config.json names no model_type"),
    ('{"model_type": 5}', "config.json names no model_type"),
    # JSON has no NaN or Infinity (Python reads them): two parents with `layer_norm_eps: NaN` were refused as
    # having "different configurations ... nan vs nan"
    ('{"model_type": "vit", "layer_norm_eps": NaN}', "config.json gives layer_norm_eps as NaN"),
    ('{"model_type": "vit", "text_config": {"x": [1, -Infinity]}}', "config.json gives text_config.x as -Infinity"),
])
def test_a_config_that_is_no_json_object_is_refused_in_one_line(tmp_path, raw, needle):
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = vit_folder(tmp_path / "vit", raw=raw)
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message and needle in message and str(folder) in message, message
    assert "restore the config.json saved with the weights" in message


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: c.update(hidden_size="32"), "hidden_size"),
    (lambda c: c.update(model_type="../../etc"), "model type `../../etc`"),
])
def test_a_config_transformers_cannot_read_is_refused_in_one_line(tmp_path, edit, needle):
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = vit_folder(tmp_path / "vit", edit=edit)
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message and "cannot read the config of" in message and needle in message, message


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: c.update(num_labels=10**9), "num_labels is 1000000000"),
    (lambda c: c.update(id2label=None, num_labels=10**9), "num_labels is 1000000000"),
    (lambda c: c.update(num_hidden_layers=10**9), "num_hidden_layers is 1000000000"),
    (lambda c: c.update(num_attention_heads=-4), "num_attention_heads is -4"),
    # sizes (not only counts): a negative hidden_size ended in torch's "Expected cond to be True" traceback
    (lambda c: c.update(hidden_size=-32), "hidden_size is -32"),
    (lambda c: c.update(intermediate_size=-1), "intermediate_size is -1"),
    (lambda c: c.update(patch_size=-4), "patch_size is -4"),
    (lambda c: c.update(image_size=-16), "image_size is -16"),  # (-16 // 4)**2 patches: it even loaded
])
def test_absurd_counts_in_a_config_are_refused_before_transformers_expands_them(tmp_path, edit, needle):
    """transformers turns num_labels into one id2label entry per label (10**9 took 23 GB) and builds one module per
    layer: the counts are checked on the JSON first."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = vit_folder(tmp_path / "vit", edit=edit)
    start = time.perf_counter()
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert "\n" not in message and needle in message and "restore the config.json saved with the weights" in message


@pytest.mark.parametrize("renamed", [False, True])
def test_a_config_far_larger_than_its_weights_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, capsys,
                                                                                      renamed):
    """Both parents say hidden_size 10**9 (so they agree) over a 65 kB checkpoint: from_pretrained would allocate
    68 GB before noticing the shapes differ. The parameter count is compared with the safetensors header first
    (whatever the checkpoint's tensor names)."""
    from safetensors.torch import load_file, save_file
    from transformers import ViTForImageClassification

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained was called: the model was allocated")

    monkeypatch.setattr(ViTForImageClassification, "from_pretrained", never)
    huge = lambda c: c.update(hidden_size=10**9, intermediate_size=10**9)  # noqa: E731
    a, b = vit_folder(tmp_path / "a", edit=huge), vit_folder(tmp_path / "b", edit=huge)
    if renamed:  # a checkpoint whose names the model does not use: only the count can tell
        for folder in (a, b):
            tensors = load_file(folder / "model.safetensors")
            save_file({f"legacy.{k}": v for k, v in tensors.items()}, folder / "model.safetensors")
    out = tmp_path / "out"
    capsys.readouterr()  # the folders' save_pretrained progress
    assert main(["merge", str(a), str(b), "--method", "weight_matching", "--output", str(out)]) == 1
    line = _one_line_error(capsys)
    assert f"'{a}': config.json describes a model of " in line and ", but model.safetensors holds 16," in line
    assert "restore the config.json saved with the weights" in line
    assert not out.exists()


# ---------------------------------------------------------------- tokens never echoed by the argument parser

TOKEN = "hf_FAKEFAKEFAKE1234567890"


@pytest.mark.parametrize("argv", [
    ["inspect", "some/model", "--token", TOKEN],  # inspect has no --token flag
    ["inspect", "some/model", f"--token={TOKEN}"],
    ["merge", "a", "b", "--output", "o", "--tokn", TOKEN],  # a typo of the flag
    ["merge", "a", "b", "--output", "o", "--batch-size", TOKEN],  # a token where a number goes
    ["inspect", "some/model", "--token", "s3cr3t-not-hf-shaped"],
])
def test_argument_errors_never_echo_a_token(capsys, argv):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and TOKEN not in err and "s3cr3t-not-hf-shaped" not in err, err
    assert "***" in err


LONG_TOKEN = "hf_" + "Z" * 34  # the shape of a real token (`TOKEN_SHAPE`)


@pytest.mark.parametrize("argv", [
    ["inspect", LONG_TOKEN],  # `hf-mudsc inspect $HF_TOKEN`: the variable meant for another flag
    ["evaluate", LONG_TOKEN, "--dataset", "d:test"],
    ["push", f"/tmp/{LONG_TOKEN}", "user/merged"],
    ["merge", "--recipe", f"/tmp/{LONG_TOKEN}.yaml", "--output", "/tmp/never-written"],
])
def test_command_errors_never_echo_a_token_given_in_place_of_a_path(capsys, argv):
    """Argument errors were redacted, but a command's own error (`'<the token>' is not a model folder`) named it."""
    assert main(argv) in (1, 2)
    err = capsys.readouterr().err
    assert "error:" in err and LONG_TOKEN not in err and "***" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["output", "image_column", "text_column", "layer_swap"])
def test_a_token_given_in_any_text_option_is_refused_without_echoing_it(tmp_path, capsys, name):
    """QA s20: a token pasted as `output` (or `image_column`, `text_column`) was accepted: it became the output
    folder's name and the card's title, was stored in the service's job record and echoed by the calibration's
    error. Every text option refuses a token-shaped value in one line that does not show it, before any work —
    `merge()`, a recipe and the CLI alike (models, base, calibration and push_to_hub already did)."""
    from factories import make_model

    import hf_mudsc

    flag = "--" + name.replace("_", "-")
    argv = ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "linear", flag, LONG_TOKEN, "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "looks like a Hugging Face access token (not shown)" in err and LONG_TOKEN not in err, err
    assert len(err.strip().splitlines()) == 1, err
    recipe = Recipe(models=["a", "b"], method="linear")
    with pytest.raises((OptionError, RecipeError)) as caught:  # `output` as the CLI and the service set it
        recipe.override(output=LONG_TOKEN) if name == "output" else Recipe.from_dict(
            {"models": ["a", "b"], "method": "linear", name: LONG_TOKEN}, source="job").validate()
    assert LONG_TOKEN not in str(caught.value) and "(not shown)" in str(caught.value)
    if name != "output":  # a merge option of merge(), checked before any weights are read
        parents = [make_model("vit_cls", seed=seed) for seed in (0, 1)]
        with pytest.raises(ValueError) as caught:
            hf_mudsc.merge(parents, method="linear", **{name: LONG_TOKEN})
        assert LONG_TOKEN not in str(caught.value) and "(not shown)" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_save_merged_refuses_a_token_as_the_folder_name(tmp_path):
    """The folder's name becomes the card's title and the recipe's `output` comment: a token pasted as the folder
    (`save_merged(m, os.environ["HF_TOKEN"])`) would be published there. Refused before anything is written."""
    from factories import make_model

    import hf_mudsc

    merged = hf_mudsc.merge([make_model("vit_cls", seed=seed) for seed in (0, 1)], method="linear", progress=False)
    with pytest.raises(ValueError) as caught:
        hf_mudsc.save_merged(merged, tmp_path / LONG_TOKEN)
    assert LONG_TOKEN not in str(caught.value) and "(not shown)" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- evaluate writes only over files it wrote


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A merged folder (CLI, with the writer's marker), a plain save_pretrained folder with its owner's card, and
    a labelled image dataset."""
    import datasets
    import numpy as np
    from PIL import Image
    from test_cli import save_parents_and_data

    root = tmp_path_factory.mktemp("evaluate_hostile")
    a, b, calibration = save_parents_and_data(root)
    merged = root / "merged"
    assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(merged),
                 "--method", "zipit", "--num-samples", "16", "--batch-size", "8", "--refit", "none"]) == 0
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(6)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2] * 2})
    data.cast_column("image", datasets.Image()).save_to_disk(root / "test-data")
    foreign = root / "their-model"
    import shutil

    shutil.copytree(a, foreign)
    (foreign / "README.md").write_text("# their own card\n")
    return merged, foreign, root / "test-data"


def _evaluate(model, data, *extra: str) -> int:
    tasks = ["vit-a=", "vit-b="] if (model / "mudsc_recipe.yaml").exists() else [""]
    datasets = [item for task in tasks for item in ("--dataset", f"{task}{data}")]
    return main(["evaluate", str(model), "--no-parents", "--no-ensemble", *datasets, *extra])


@pytest.mark.parametrize("target", ["user-file", "model-config", "model-weights", "a-folder"])
def test_evaluate_never_replaces_a_file_it_did_not_write_with_its_json(evaluated, tmp_path, capsys, monkeypatch,
                                                                        target):
    merged, _, data = evaluated
    path = {"user-file": tmp_path / "notes.json", "model-config": merged / "config.json",
            "model-weights": merged / "model.safetensors", "a-folder": tmp_path}[target]
    if target == "user-file":
        path.write_text('{"mine": true}\n')
    before = path.read_bytes() if path.is_file() else None
    import hf_mudsc.load.parents as parents

    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    capsys.readouterr()
    assert _evaluate(merged, data, "--output-json", str(path)) == 1
    line = _one_line_error(capsys)
    assert f"refusing to replace {str(path)!r} with the results" in line and "--output-json" in line, line
    assert (path.read_bytes() if path.is_file() else None) == before


def test_evaluate_does_not_read_a_json_file_of_gigabytes_to_decide_whether_to_replace_it(evaluated, tmp_path, capsys,
                                                                                         monkeypatch):
    """`--output-json PATH` may replace a results file, read to tell: a 2 GB (sparse) file was read whole first."""
    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES

    merged, _, data = evaluated
    path = tmp_path / "big.json"
    with path.open("ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)
    read_text = Path.read_text

    def guarded(self, *args, **kwargs):
        if self == path:
            pytest.fail("the file was read whole")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", guarded)
    capsys.readouterr()
    assert _evaluate(merged, data, "--output-json", str(path)) == 1
    assert f"refusing to replace {str(path)!r} with the results" in _one_line_error(capsys)


def test_evaluate_leaves_the_card_of_a_folder_it_did_not_write_alone(evaluated, capsys, monkeypatch):
    _, foreign, data = evaluated
    import hf_mudsc.load.parents as parents

    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    capsys.readouterr()
    assert _evaluate(foreign, data) == 1
    line = _one_line_error(capsys)
    assert f"refusing to replace {str(foreign / 'README.md')!r} with the results" in line and "--no-card" in line
    assert (foreign / "README.md").read_text() == "# their own card\n"
    assert not (foreign / "eval_results.json").exists()


def test_evaluate_rewrites_its_own_results_and_card_again(evaluated, tmp_path, capsys):
    merged, foreign, data = evaluated
    for _ in range(2):  # the second run replaces what the first wrote: recorded in the marker, or its own JSON
        assert _evaluate(merged, data) == 0
        assert _evaluate(merged, data, "--output-json", str(tmp_path / "results.json")) == 0
    assert "model-index" in (merged / "README.md").read_text() and (merged / "eval_results.json").is_file()
    assert _evaluate(foreign, data, "--no-card", "--output-json", str(tmp_path / "theirs.json")) == 0
    assert (foreign / "README.md").read_text() == "# their own card\n"


# ---------------------------------------------------------------- running out of memory is one line, not a traceback


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 8192000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line_naming_the_dry_run(tmp_path, capsys, monkeypatch, error):
    """What torch raised when a recipe listed 1000 parents (the statistics of 1000 x 32 units need 8 GB)."""
    import hf_mudsc.cli.merge as merge_cli

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(merge_cli, "execute", out_of_memory)
    assert main(["merge", "a", "b", "--method", "weight_matching", "--output", str(tmp_path / "out")]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("hf-mudsc merge: error: out of memory") and "--dry-run" in line, line
    assert "Traceback" not in line


# ---------------------------------------------------------------- calibration data that is code


def test_a_calibration_folder_holding_a_dataset_script_is_refused_in_one_line(tmp_path, capsys):
    """datasets refuses the script with a RuntimeError (it never runs it): that surfaced as a traceback. (The data
    is opened once the parents' configs are checked, so the parents exist here.)"""
    from factories import make_model

    parents = []
    for seed in (0, 1):
        make_model("vit_cls", seed).save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    folder = tmp_path / "evilds"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "evilds.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    out = tmp_path / "out"
    capsys.readouterr()  # the set-up's progress bars (off only if an earlier in-process CLI run had left them off)
    code = main(["merge", *parents, "--method", "zipit", "--calibration", f"{folder}:train", "--output", str(out)])
    assert code == 1
    line = _one_line_error(capsys)
    assert f"calibration dataset '{folder}:train' is a dataset script (evilds.py)" in line, line
    assert "never runs" in line and "save_to_disk" in line
    assert not marker.exists() and not out.exists()


# ---------------------------------------------------------------- parent folders: links out are not followed


def _save_vit_with_processor(folder):
    from factories import make_model
    from transformers import ViTImageProcessor

    make_model("vit_cls", seed=0).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["preprocessor_config.json", "model.safetensors", "config.json"])
def test_a_parent_file_linking_out_of_its_folder_is_refused(tmp_path, name):
    """A folder unpacked from someone else's archive may link a file the merge reads (and writes back into the
    merged model, maybe pushed) to any file of this machine, e.g. ~/.cache/huggingface/token."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / name).rename(elsewhere / name)
    (folder / name).symlink_to(elsewhere / name)
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{str(folder)!r}: {name} is a symbolic link to {str(elsewhere / name)!r}, outside the folder" in message
    assert "copy the file into the folder" in message


def test_a_file_linking_out_from_a_subfolder_of_a_parent_is_refused(tmp_path):
    """transformers also reads files in a parent's subfolders (a tokenizer's `additional_chat_templates/*.jinja`) and
    the writer saves them into the merged model: a link there to the stored Hub token was copied into the merged
    folder (and its push); only the folder's own entries were checked."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    secret = tmp_path / "token"
    secret.write_text("hf_not_a_real_token")
    (folder / "additional_chat_templates" / "deeper").mkdir(parents=True)
    (folder / "additional_chat_templates" / "deeper" / "leak.jinja").symlink_to(secret)
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert (f"{str(folder)!r}: additional_chat_templates/deeper/leak.jinja is a symbolic link to {str(secret)!r}, "
            "outside the folder") in message


def test_links_out_in_subfolders_no_loader_reads_do_not_refuse_a_training_folder(tmp_path):
    """A training run's folder may hold `wandb/`, `runs/` or a `data` link pointing anywhere: transformers reads none
    of them, and refusing the parent for them asked users to clean up folders the merge never reads."""
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    (folder / "wandb").mkdir()
    (folder / "wandb" / "latest-run").symlink_to(tmp_path)
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "optimizer.pt").symlink_to(tmp_path / "elsewhere.pt")
    assert load_parent(folder).processor is not None


@pytest.mark.parametrize("where", ["top", "subfolder"])
def test_a_symbolic_link_loop_in_a_parent_folder_is_one_line(tmp_path, where):
    """`Path.resolve` raises on a link loop: the merge ended in a `RuntimeError: Symlink loop` traceback."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    inner = folder if where == "top" else folder / "additional_chat_templates"
    inner.mkdir(exist_ok=True)
    (inner / "a").symlink_to(inner / "b")
    (inner / "b").symlink_to(inner / "a")
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message
    name = "a" if where == "top" else "additional_chat_templates/a"
    assert f"{str(folder)!r}: {name} is a symbolic link that never reaches a file (a loop); remove it" in message


def test_links_inside_the_folder_and_a_hub_cache_snapshot_still_load(tmp_path):
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    (folder / "weights").mkdir()
    (folder / "model.safetensors").rename(folder / "weights" / "model.safetensors")
    (folder / "model.safetensors").symlink_to(Path("weights") / "model.safetensors")
    assert load_parent(folder).processor is not None
    # The Hub cache's layout: snapshots/<sha>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "hub" / "models--org--vit"
    snapshot, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, path in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        (blobs / f"blob{index}").write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{index}")
    assert load_parent(snapshot).processor is not None


# ---------------------------------------------------------------- inspect: a merged folder's files are data


@pytest.mark.parametrize("name", ["config.json", "merge_diagnostics.json", "eval_results.json"])
def test_inspect_refuses_a_file_of_gigabytes_before_reading_it(evaluated, tmp_path, capsys, monkeypatch, name):
    """A merged folder is downloaded data: a 2 GB (sparse) merge_diagnostics.json took 4.2 GB of memory before
    `inspect` said it was no JSON."""
    import shutil

    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES

    merged, _, _ = evaluated
    folder = tmp_path / "copy"
    shutil.copytree(merged, folder)
    with (folder / name).open("ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)  # sparse: no disk used
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail(f"{name} was read whole"))
    capsys.readouterr()
    assert main(["inspect", str(folder), "--no-plots"]) == 1
    line = _one_line_error(capsys)
    assert f"{str(folder)!r}: {name} is {SIDE_FILE_MAX_BYTES + 1:,} bytes, more than" in line, line


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("merge_diagnostics.json", "[1, 2]",
     "holds a malformed hf-mudsc file (merge_diagnostics.json: it holds a JSON list, not an object)"),
    ("eval_results.json", "[1, 2]", "holds a malformed hf-mudsc file (eval_results.json: it holds a JSON list"),
    ("eval_results.json", '{"scores": 5, "metrics": "x"}',
     "holds a malformed hf-mudsc file (eval_results.json: metrics is 'x', not a list of texts)"),
    # QA s24: a value of the wrong type is named with its key (was Python's "Unknown format code 'f'").
    ("merge_diagnostics.json", '{"format": 1, "method": "zipit", "groups": [{"name": "g", "width": 2, '
                               '"value": "x", "blended": "y"}]}',
     "holds a malformed hf-mudsc file (merge_diagnostics.json: groups[0].value is 'x', not a number)"),
    ("merge_diagnostics.json", '{"format": 1, "method": "zipit", "groups": [{"name": "g", "width": 2, "bogus": 1}]}',
     "holds a malformed hf-mudsc file (merge_diagnostics.json: groups[0] has an unknown key 'bogus')"),
])
def test_inspect_names_a_malformed_file_in_one_line(evaluated, tmp_path, capsys, name, content, needle):
    import shutil

    merged, _, _ = evaluated
    folder = tmp_path / "copy"
    shutil.copytree(merged, folder)
    (folder / name).write_text(content)
    capsys.readouterr()
    assert main(["inspect", str(folder), "--no-plots"]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("hf-mudsc inspect: error: ") and needle in line, line
    if "malformed" in needle:
        assert f"{str(folder)!r} holds a malformed" in line and "write the folder again" in line


@pytest.mark.parametrize(("models", "shown_as"), [(None, "NoneType"), (7, "int"), ({"a": "x", "b": "y"}, "dict")])
def test_merge_names_parents_that_are_not_a_list(models, shown_as):
    """`merge(None, ...)` raised `TypeError: object of type 'NoneType' has no len()`."""
    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    with pytest.raises(MergeInputError, match=f"merge takes a list of two or more parents .*, got {shown_as}$"):
        hf_mudsc.merge(models, None, method="average")


# ---------------------------------------------------------------- nesting and size


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000])
def test_a_recipe_nested_too_deeply_is_refused_in_one_line(tmp_path, capsys, value):
    path = tmp_path / "deep.yaml"
    path.write_text(f"models: {value}\n")
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert f"{str(path)!r} is not valid YAML: it is nested too deeply" in line, line


def test_a_recipe_file_of_megabytes_is_refused_before_it_is_parsed(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("models: [a, b]\n" + "# padding\n" * 200_000)
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    line = _one_line_error(capsys)
    assert f"recipe {str(path)!r} is 2,000,015 bytes; a recipe is a few hundred" in line, line


def test_a_config_nested_too_deeply_is_refused_in_one_line(tmp_path):
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = vit_folder(tmp_path / "vit", raw='{"model_type": "vit", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(LoadError, match="config.json is not valid JSON: it is nested too deeply"):
        load_parent(folder)


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "vocab.txt", "chat_template.jinja",
                                  "additional_chat_templates/tool_use.jinja"])
def test_a_side_file_of_gigabytes_in_a_parent_folder_is_refused_before_it_is_read(tmp_path, monkeypatch, name):
    """A Hub repo's config and processor files over `SIDE_FILE_MAX_BYTES` are refused from its file list; a folder's
    (an unpacked archive, a cached snapshot used offline) were read whole: a 3 GB sparse config.json (no disk used)
    took 6.7 GB of memory and 30 s before "not valid JSON". A tokenizer's chat templates (`.jinja`, at the top or in
    `additional_chat_templates/`) were not measured: a 300 MiB one was read whole."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import SIDE_FILE_MAX_BYTES, load_parent

    folder = vit_folder(tmp_path / "vit")
    (folder / name).parent.mkdir(exist_ok=True)
    with (folder / name).open("ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)  # sparse: no disk used

    def refuse(*args, **kwargs):
        raise AssertionError("a side file of gigabytes was read")

    monkeypatch.setattr("hf_mudsc.load.parents.check_config_json", refuse)
    monkeypatch.setattr("hf_mudsc.load.parents.load_processor", refuse)
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert f"{name} is {SIDE_FILE_MAX_BYTES + 1:,} bytes, more than the {SIDE_FILE_MAX_BYTES:,}" in message, message
    assert "\n" not in message and str(folder) in message


@pytest.mark.parametrize(("body", "content_type"), [
    ('{"models": ' + "[" * 100_000 + "]" * 100_000 + "}", "application/json"),
    ("models: " + "[" * 5000 + "]" * 5000, "application/yaml"),
])
def test_the_service_answers_a_request_nested_too_deeply_with_400(tmp_path, body, content_type):
    """The JSON/YAML parser's RecursionError was an internal server error (500)."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    # addressed to this machine: a key-less service answers only loopback Host headers
    client = TestClient(create_app(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False)
    answer = client.post("/api/jobs", content=body, headers={"content-type": content_type})
    assert answer.status_code == 400, answer.text[:300]
    assert "is nested too deeply" in answer.json()["error"]


def test_a_processor_file_nested_too_deeply_is_skipped_like_any_unreadable_one(tmp_path):
    """transformers' JSON reader raised RecursionError through `load_processor` (a traceback for the merge)."""
    from hf_mudsc.load.processors import load_processor

    folder = _save_vit_with_processor(tmp_path / "vit")
    (folder / "preprocessor_config.json").write_text(
        '{"image_processor_type": "ViTImageProcessor", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert load_processor(folder) is None


def test_a_parent_folder_whose_path_is_not_utf8_is_named_as_such(tmp_path):
    """safetensors cannot open a path that is not UTF-8: the error called the intact file truncated or corrupt and
    told the user to download it again."""
    import os
    import shutil

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    odd = tmp_path / os.fsdecode(b"vit-\xff")
    shutil.move(folder, odd)
    with pytest.raises(LoadError) as caught:
        load_parent(odd)
    message = str(caught.value)
    assert "\n" not in message
    assert "path holds bytes that are not UTF-8 text" in message and "rename the folder" in message, message
    assert "corrupt" not in message


def test_a_tokenizer_config_without_a_vocabulary_is_no_tokenizer(tmp_path):
    """A partial copy holding `tokenizer_config.json` but no vocabulary file passed the presence gate, and
    transformers built a 5-token tokenizer from it: every word became [UNK] in calibration and in the merged
    folder's shipped tokenizer, silently."""
    from factories import make_model
    from transformers import BertTokenizer

    from hf_mudsc.load.processors import load_processor

    folder = tmp_path / "bert"
    model = make_model("bert_cls", 1)
    model.save_pretrained(folder)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"t{i}" for i in range(model.config.vocab_size - 5)]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    assert len(load_processor(folder).get_vocab()) == model.config.vocab_size
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "tokenizer_config.json").is_file()
    assert load_processor(folder) is None


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_a_shard_index_pointing_out_of_the_folder_is_refused(tmp_path, shard):
    """`model.safetensors.index.json` names the shard files: one outside the folder would be read as the parent's
    weights (another model of this machine, merged and maybe pushed)."""
    import json

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "model.safetensors").rename(elsewhere / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(elsewhere / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        key: shard for key in keys}}))
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert f"model.safetensors.index.json names the shard {shard!r}, outside the folder" in message, message


# ---------------------------------------------------------------- a Hub card may not point at this machine's folders


def test_a_hub_parents_card_naming_a_local_folder_as_base_is_ignored(hub_cli, local_hub, tmp_path):
    """`base_model: /home/me/private-model` in a Hub parent's card made the merge read that folder as the base
    (task arithmetic's result then carries it, and may be pushed)."""
    from test_cli import save_parents_and_data

    hub_emulator = local_hub  # the CLI runs in this process against the emulator
    a, b, _ = save_parents_and_data(tmp_path / "inputs")
    private = tmp_path / "private-base"
    import shutil

    shutil.copytree(a, private)
    for name, folder in (("user/a", a), ("user/b", b)):
        (folder / "README.md").write_text(f"---\nbase_model: {private}\n---\n# card\n")
        hub_emulator.upload_folder(name, folder, "parent")
    out = tmp_path / "out"
    proc = hub_cli("merge", "user/a", "user/b", "--method", "task_arithmetic", "--output", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"its Hub model card names base_model {str(private)!r}, a local path: ignored" in proc.stderr
    assert "method 'task_arithmetic' needs the parents' common base model and none was given" in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------- options that overflow float32


@pytest.mark.parametrize(("weights", "needle"), [
    ([1e308, 1e308], "weights must be 0 or of magnitude 1e-30 to 1e+30"),
    ([1e-320, 1e-320], "weights must be 0 or of magnitude 1e-30 to 1e+30"),
    ([1e31, 1.0], "weights must be 0 or of magnitude 1e-30 to 1e+30"),
])
def test_weights_that_overflow_float32_are_refused_up_front(weights, needle):
    """`--weights 1e308 1e308` (or 1e-320, which float32 rounds to 0) wrote a model full of NaN and said nothing."""
    with pytest.raises(OptionError, match="weights must") as caught:
        MergeOptions.check("weights", weights)
    assert needle in str(caught.value) and "(CLI: --weights)" in str(caught.value)


def test_a_merge_whose_weights_come_out_non_finite_is_refused_before_it_is_returned(monkeypatch):
    """The last guard: whatever produced them (the largest weights and scaling on large task vectors ...), NaN/inf
    merged weights are never returned or written."""
    import torch
    from factories import make_model

    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    a, b, base = make_model("vit_cls", 1), make_model("vit_cls", 2), make_model("vit_cls", 3)
    with torch.no_grad():  # large but finite parents (under the per-parent limit): the options overflow, not them
        for parent in (a, b):
            for param in parent.parameters():
                param.mul_(1e37)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], None, method="task_arithmetic", base=base, scaling=100)
    message = str(caught.value)
    assert "the merged model has NaN or infinite values in " in message and " tensors (e.g. '" in message, message
    assert "scaling= (CLI: --scaling)" in message and "weights= (CLI: --weights)" in message
    assert all(torch.isfinite(p).all() for p in a.parameters())  # inputs untouched


# ---------------------------------------------------------------- calibration files pyarrow would crash on


def test_a_json_calibration_file_nested_too_deeply_is_refused_before_pyarrow_reads_it(tmp_path):
    """pyarrow's JSON reader dies of a segmentation fault on nesting ~20,000 deep: no message, exit code 139."""
    from hf_mudsc.calibrate.datasets import load_calibration_dataset
    from hf_mudsc.errors import CalibrationError

    path = tmp_path / "deep.json"
    path.write_text('{"text": "a [ \\" { in a string", "x": ' + "[" * 30_000 + "]" * 30_000 + "}\n")
    with pytest.raises(CalibrationError, match=r"deep.json' nests values more than 1,000 deep"):
        load_calibration_dataset(f"{path}:train")
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"text": "brackets [[[[ and \\\\\\" quotes {{{ inside a string"}\n' * 3)
    assert [row["text"] for row in load_calibration_dataset(f"{fine}:train")][:1] == [
        'brackets [[[[ and \\" quotes {{{ inside a string']


def test_an_arrow_calibration_file_that_is_no_arrow_is_refused_before_pyarrow_reads_it(tmp_path):
    """Random bytes named .arrow: pyarrow refuses them, but the process then sometimes aborts at exit (134)."""
    from hf_mudsc.calibrate.datasets import load_calibration_dataset
    from hf_mudsc.errors import CalibrationError

    path = tmp_path / "noise.arrow"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CalibrationError, match=r"noise.arrow' is not an Arrow file"):
        load_calibration_dataset(f"{path}:train")


def test_a_decompression_bomb_image_is_named_in_one_line(tmp_path, capsys):
    """Pillow refuses a 400-megapixel PNG (388 kB on disk) with DecompressionBombError: that was a traceback."""
    from PIL import Image
    from test_cli import save_parents_and_data

    a, b, _ = save_parents_and_data(tmp_path / "inputs")
    folder = tmp_path / "images" / "train" / "cls"
    folder.mkdir(parents=True)
    Image.new("L", (16, 16)).save(folder / "a.png")
    Image.new("L", (20000, 20000)).save(folder / "b.png")
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["merge", str(a), str(b), "--calibration", f"{tmp_path / 'images'}:train", "--method", "zipit",
                 "--output", str(out)])
    assert code == 1
    line = _one_line_error(capsys)
    assert "is too large to decode safely (Image size (400000000 pixels) exceeds limit" in line, line
    assert "remove or shrink that image" in line and not out.exists()


# ---------------------------------------------------------------- inspect RECIPE checks what it describes


@pytest.mark.parametrize(("text", "needle"), [
    ("models: [a, b]\nmethod: mudsc\ncalibration: c\nalpha: 5\n", "alpha must lie in [0, 1] (CLI: --alpha), got 5.0"),
    ("models: [a, b]\nmethod: weight_matching\nmatcher: nope\n", "unknown matcher 'nope'"),
])
def test_inspect_refuses_a_recipe_that_cannot_run(tmp_path, capsys, text, needle):
    """It printed `would merge ...` for a recipe whose alpha or matcher the merge refuses; exit 2, as `merge --recipe`
    refuses it (QA s21: it was 1)."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["inspect", str(path)]) == 2
    assert needle in _one_line_error(capsys)


def test_inspect_describes_a_recipe_of_the_default_method(tmp_path, capsys):
    """`method: auto` (the default, also when the key is left out) failed with `unknown merge method 'auto'`."""
    path = tmp_path / "r.yaml"
    path.write_text("models: [org/a, org/b]\n")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "would merge: org/a, org/b" in out and "method:      auto (chosen from how the parents relate)" in out


# ---------------------------------------------------------------- weights stored as integers are not weights


def _quantized_folder(folder, kind: str, dtype, seed: int = 0, extra: dict | None = None):
    """A tiny `kind` model saved with save_pretrained, one MLP weight then stored as `dtype` (as a quantized
    checkpoint stores its weights, the scales in side tensors) and `extra` tensors added to the file."""
    from factories import make_model
    from safetensors.torch import load_file, save_file

    make_model(kind, seed=seed).save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    name = next(key for key in sorted(tensors) if key.endswith("intermediate.dense.weight"))
    if dtype is not None:
        tensors[name] = (tensors[name] * 100).clamp(-100, 100).to(dtype)
    tensors.update(extra or {})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, name


@pytest.mark.parametrize(("kind", "dtype", "shown_as"), [
    ("vit_cls", "int8", "int8"), ("vit_cls", "uint8", "uint8"), ("vit_cls", "bool", "bool"),
    ("vit_cls", "int32", "int32"), ("bert_cls", "int8", "int8"),
])
def test_a_parent_with_integer_weights_is_refused_before_any_weights_are_loaded(tmp_path, monkeypatch, kind, dtype,
                                                                                  shown_as):
    """An int8 weight (a quantized checkpoint: its integers mean nothing without their scales) was cast to float32
    and merged as if it were a weight: a garbage model, no warning. The safetensors header says the dtype."""
    import torch
    import transformers

    import hf_mudsc
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import model_class_for

    good = _quantized_folder(tmp_path / "good", kind, None, seed=0)[0]
    bad, name = _quantized_folder(tmp_path / "bad", kind, getattr(torch, dtype), seed=1)
    cls = model_class_for(transformers.AutoConfig.from_pretrained(bad))
    monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    for method in ("average", "task_arithmetic"):  # loaded whole, and read one tensor at a time (streaming)
        with pytest.raises(LoadError) as caught:
            hf_mudsc.merge([good, bad], None, method=method, base=good if method == "task_arithmetic" else None)
        message = str(caught.value)
        assert "\n" not in message, message
        assert (f"{str(bad)!r}: its weight {name!r} is stored as {shown_as}, "
                "not as float16/bfloat16/float32/float64 floating-point numbers") in message
        assert "dequantize it" in message and "float checkpoint" in message, message


def test_integer_buffers_a_checkpoint_carries_still_load(tmp_path):
    """Older BERT checkpoints store the `position_ids` buffer (int64) next to the weights: a buffer, not a weight."""
    import torch

    import hf_mudsc

    extra = {"bert.embeddings.position_ids": torch.arange(24).unsqueeze(0)}
    a = _quantized_folder(tmp_path / "a", "bert_cls", None, seed=0, extra=extra)[0]
    b = _quantized_folder(tmp_path / "b", "bert_cls", None, seed=1, extra=extra)[0]
    merged = hf_mudsc.merge([a, b], None, method="average")
    assert all(torch.isfinite(p).all() for p in merged.parameters())
    base = _quantized_folder(tmp_path / "base", "bert_cls", None, seed=2, extra=extra)[0]  # a parent is refused
    assert hf_mudsc.merge([a, b], None, method="task_arithmetic", base=base) is not None


@pytest.mark.parametrize("key", ["bert.encoder.layer.0.intermediate.dense.position_ids",
                                 "bert.encoder.layer.1.attention.self.token_type_ids"])
def test_an_integer_tensor_named_like_a_buffer_elsewhere_is_refused(tmp_path, monkeypatch, key):
    """Integer tensors were let through when their last name component was any buffer's (`position_ids`,
    `token_type_ids`), wherever they sat: a quantized checkpoint's integer tensor so named slipped past the check.
    Only a stored key that loads as one of the model's buffers (as transformers names it: `lazy.stored_keys`) may be
    an integer; the real buffer, even under its legacy name without the `bert.` prefix, still loads."""
    import torch
    import transformers

    import hf_mudsc
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import model_class_for

    good = _quantized_folder(tmp_path / "good", "bert_cls", None, seed=0,
                             extra={"embeddings.position_ids": torch.arange(24).unsqueeze(0)})[0]
    bad = _quantized_folder(tmp_path / "bad", "bert_cls", None, seed=1,
                            extra={key: torch.zeros(2, 3, dtype=torch.int8)})[0]
    assert hf_mudsc.merge([good, good], None, method="average", progress=False) is not None
    cls = model_class_for(transformers.AutoConfig.from_pretrained(bad))
    monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(LoadError) as caught:
        hf_mudsc.merge([good, bad], None, method="average", progress=False)
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"{str(bad)!r}: its weight {key!r} is stored as int8, not as float16/bfloat16/float32/float64" in message


def test_a_model_object_with_integer_parameters_is_refused(tmp_path):
    import torch
    from factories import make_model

    import hf_mudsc
    from hf_mudsc.errors import LoadError

    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    layer = b.vit.layers[0].mlp.fc1
    layer.weight = torch.nn.Parameter((layer.weight * 100).to(torch.int8), requires_grad=False)
    with pytest.raises(LoadError) as caught:
        hf_mudsc.merge([a, b], None, method="average")
    message = str(caught.value)
    assert "its weight 'vit.layers.0.mlp.fc1.weight' is stored as int8" in message, message
    assert layer.weight.dtype == torch.int8  # the object is left as it is


@pytest.mark.parametrize(("dtype", "shown_as"), [("float8_e4m3fn", "float8_e4m3"), ("float8_e5m2", "float8_e5m2")])
def test_a_parent_with_float8_weights_is_refused_before_any_weights_are_loaded(tmp_path, monkeypatch, dtype,
                                                                                shown_as):
    """A scaled fp8 checkpoint keeps its scales in side tensors, like int8; its header's F8_E4M3 read as "float"
    and the raw values were cast to float32 and merged. Only float16/bfloat16/float32/float64 weights are weights."""
    import torch
    import transformers
    from safetensors import safe_open

    import hf_mudsc
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import model_class_for

    good = _quantized_folder(tmp_path / "good", "vit_cls", None, seed=0)[0]
    bad, name = _quantized_folder(tmp_path / "bad", "vit_cls", getattr(torch, dtype), seed=1)
    with safe_open(bad / "model.safetensors", "pt") as stored:  # the header says fp8, as a Hub fp8 file's does
        assert stored.get_slice(name).get_dtype() == shown_as.upper().replace("FLOAT8", "F8")
    cls = model_class_for(transformers.AutoConfig.from_pretrained(bad))
    monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    for method in ("average", "task_arithmetic"):
        with pytest.raises(LoadError) as caught:
            hf_mudsc.merge([good, bad], None, method=method, base=good if method == "task_arithmetic" else None)
        message = str(caught.value)
        assert "\n" not in message, message
        assert f"{str(bad)!r}: its weight {name!r} is stored as {shown_as}" in message, message
        assert "dequantize it" in message, message


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_the_dry_run_refuses_quantized_weights_as_the_merge_does(tmp_path, dtype):
    """A dry run reads the same safetensors headers: it must not plan (and name an fp8 `out_dtype` for) a merge the
    merge itself refuses; an integer buffer (BERT's position_ids) is still no refusal. (A guard: locating a parent
    checks its headers, so the plan refused these already.)"""
    import torch

    import hf_mudsc
    from hf_mudsc.errors import LoadError

    good = _quantized_folder(tmp_path / "good", "vit_cls", None, seed=0)[0]
    bad, name = _quantized_folder(tmp_path / "bad", "vit_cls", getattr(torch, dtype), seed=1)
    with pytest.raises(LoadError) as caught:
        hf_mudsc.merge([good, bad], None, method="average", dry_run=True)
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"{str(bad)!r}: its weight {name!r} is stored as" in message, message
    extra = {"bert.embeddings.position_ids": torch.arange(24).unsqueeze(0)}
    a = _quantized_folder(tmp_path / "a", "bert_cls", None, seed=0, extra=extra)[0]
    b = _quantized_folder(tmp_path / "b", "bert_cls", None, seed=1, extra=extra)[0]
    plan = hf_mudsc.merge([a, b], None, method="average", dry_run=True)
    assert plan.out_dtype == "float32", plan.out_dtype  # the buffers' int64 is not the weights' dtype


def test_a_model_object_with_float8_parameters_is_refused(tmp_path):
    import torch
    from factories import make_model

    import hf_mudsc
    from hf_mudsc.errors import LoadError

    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    layer = b.vit.layers[0].mlp.fc1
    layer.weight = torch.nn.Parameter(layer.weight.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(LoadError, match="its weight 'vit.layers.0.mlp.fc1.weight' is stored as float8_e4m3fn"):
        hf_mudsc.merge([a, b], None, method="average")


def test_a_pickle_parent_with_integer_weights_is_refused_too(tmp_path):
    """Under allow_pickle the dtypes come from unpickling onto the meta device (no tensor data read)."""
    import torch
    from safetensors.torch import load_file

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder, name = _quantized_folder(tmp_path / "bad", "vit_cls", torch.int8)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=f"its weight '{name}' is stored as int8, "
                                        "not as float16/bfloat16/float32/float64 floating-point numbers"):
        load_parent(folder, allow_pickle=True)


# ---------------------------------------------------------------- weights float32 cannot compute with


def _counted(batches):
    """The batches as a one-pass stream that records how many were taken."""
    taken = []

    def stream():
        for batch in batches:
            taken.append(batch)
            yield batch

    return stream(), taken


@pytest.mark.parametrize(("kind", "tensor"), [("vit_cls", "vit.embeddings.patch_embeddings.projection.weight"),
                                              ("bert_cls", "bert.embeddings.word_embeddings.weight")])
def test_a_parent_with_weights_near_the_float32_limit_is_refused_at_the_first_calibration_batch(monkeypatch, kind,
                                                                                                 tensor):
    """Finite weights of 3e38 make inf/NaN activations: that surfaced after calibration as "similarity contains NaN
    entries", naming neither the parent nor the layer."""
    import torch
    from factories import make_batches, make_model

    import hf_mudsc
    import hf_mudsc.pipeline as pipeline
    from hf_mudsc.errors import MergeInputError

    a, b = make_model(kind, 0), make_model(kind, 1)
    with torch.no_grad():
        dict(b.named_parameters())[tensor].fill_(3e38)
    monkeypatch.setattr(pipeline, "correlations_from", lambda *a, **k: pytest.fail("calibration went on"))
    stream, taken = _counted(make_batches(kind, num_batches=4, batch_size=4))
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], stream, method="zipit", refit="none", progress=False)
    message = str(caught.value)
    assert "\n" not in message and len(taken) == 1, (len(taken), message)
    assert message.startswith("parent B's activations are infinite or NaN at group "), message
    assert "after 4 calibration examples" in message and "out of the range float32 holds" in message, message
    assert "re-export that parent's checkpoint" in message, message


def test_when_one_parent_overflows_on_huge_data_the_message_names_the_data_s_scale_too():
    """QA s24: pixel values of 1e20 overflowed one parent's activations, and the message blamed that parent's weights
    alone ("its weights are out of the range float32 holds ... re-export that parent's checkpoint"). Both causes are
    named now, with the data's largest input value, so a user sees which is far off."""
    import torch
    from factories import make_batches, make_model

    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    batches = make_batches("vit_cls", num_batches=2, batch_size=4)
    for batch in batches:
        batch["pixel_values"] *= 1e15
    largest = float(batches[0]["pixel_values"].abs().max())
    b = make_model("vit_cls", 1)
    with torch.no_grad():
        b.vit.embeddings.patch_embeddings.projection.weight.mul_(1e6)  # B amplifies the data more than A
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([make_model("vit_cls", 0), b], batches, method="zipit", refit="none", progress=False)
    message = str(caught.value)
    assert message.startswith("parent B's activations are infinite or NaN at group "), message
    assert f"or the calibration data's values (up to {largest:.3g} in pixel_values) are too large for it" in message
    assert message.endswith("check the data's scale, re-export that parent's checkpoint, or merge without it")


def test_calibration_data_that_is_not_finite_is_named_not_the_parents():
    import torch
    from factories import make_batches, make_model

    import hf_mudsc
    from hf_mudsc.errors import CalibrationError

    batches = make_batches("vit_cls", num_batches=2, batch_size=4)
    batches[0]["pixel_values"][0, 0, 0, 0] = float("inf")
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], batches, method="zipit", refit="none",
                       progress=False)
    message = str(caught.value)  # since session 28 refused at the batch, before any forward, on every method's pass
    assert message.startswith("calibration pixel_values hold NaN or inf in 1 of the 4 examples of a batch"), message
    assert "drop or fix those examples" in message and "parent" not in message, message
    assert torch.isinf(batches[0]["pixel_values"]).any()  # the data is left as it was


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_a_merge_that_overflows_on_extreme_parent_weights_names_the_parent_not_the_options(method):
    """Methods without calibration never write inf/NaN (`refuse_non_finite`), but the refusal blamed the options
    (`use moderate weights= / scaling=`) when default options met parent weights of 3e38."""
    import torch
    from factories import make_model

    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    a, b, base = make_model("vit_cls", 0), make_model("vit_cls", 1), make_model("vit_cls", 2)
    with torch.no_grad():
        b.vit.layers[0].mlp.fc1.weight.fill_(3e38)
        a.vit.layers[0].mlp.fc1.weight.fill_(3e38)
        base.vit.layers[0].mlp.fc1.weight.fill_(-3e38)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], None, method=method, base=base, progress=False)
    message = str(caught.value)
    assert "the merged model has NaN or infinite values in 1 tensors (e.g. 'vit.layers.0.mlp.fc1.weight')" in message
    assert "'vit.layers.0.mlp.fc1.weight' of parent A holds values up to 3e+38" in message, message
    assert "re-export that checkpoint" in message and "scaling=" not in message, message


# ---------------------------------------------------------------- more parents than memory holds


def _recipe_of(tmp_path, count: int, method: str) -> Path:
    """A recipe merging one tiny ViT folder (with its processor) listed `count` times with `method`, on a
    calibration split."""
    from test_cli import save_parents_and_data

    a, _, calibration = save_parents_and_data(tmp_path / "inputs")
    path = tmp_path / "many.yaml"
    path.write_text("models:\n" + f"  - {a}\n" * count + f"calibration: {calibration}:train\nmethod: {method}\n")
    return path


@pytest.mark.parametrize("method", ["mudsc", "weight_matching"])
def test_a_parent_count_whose_statistics_cannot_fit_is_refused_before_any_weights_are_loaded(tmp_path, capsys,
                                                                                               monkeypatch, method):
    """400 parents failed after ~100 s of loading, out of memory in calibration: the statistics are 8·(N·n)² bytes
    per group — 12.4 GB for 400 tiny ViTs, known from the config before any weights are read."""
    import hf_mudsc.load.parents as parents
    import hf_mudsc.plan as plan

    monkeypatch.setattr(plan, "available_memory", lambda: 2 * 10**9)
    monkeypatch.setattr(parents, "_finish", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    recipe = _recipe_of(tmp_path, 400, method)
    capsys.readouterr()
    start = time.perf_counter()
    assert main(["merge", "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 1
    line = _one_line_error(capsys)
    assert time.perf_counter() - start < 60
    assert f"merging 400 parents with {method} needs at least " in line, line
    needs = "12.45 GB of activation statistics (8·(N·n)² bytes per group: " if method == "mudsc" else "2.95 GB for"
    assert needs in line and "but 2.00 GB of memory is available" in line, line
    assert "merge at most " in line and "parents at a time" in line and "(CLI: --method)" in line, line
    assert not (tmp_path / "out").exists()


def test_auto_refuses_the_memory_its_choice_needs_before_calibration(tmp_path, capsys, monkeypatch):
    """`auto` chooses from the parents' weights, so its parents are loaded first; the method it chose is checked
    before the calibration allocates its statistics."""
    from test_cli import save_parents_and_data

    import hf_mudsc.calibrate.distributed as distributed
    import hf_mudsc.plan as plan

    # 20 tiny ViTs: 1.6 MB of weights pass the check before loading; 31 MB of statistics fail it after the choice.
    monkeypatch.setattr(plan, "available_memory", lambda: 10**7)
    monkeypatch.setattr(distributed, "collect_statistics_distributed",
                        lambda *a, **k: pytest.fail("calibration started"))
    a, b, calibration = save_parents_and_data(tmp_path / "inputs")
    path = tmp_path / "auto.yaml"
    path.write_text("models:\n" + f"  - {a}\n  - {b}\n" * 10 + f"calibration: {calibration}:train\n")
    capsys.readouterr()
    assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 1
    line = _one_line_error(capsys)
    assert "method 'auto' chose 'mudsc'" in line and "merging 20 parents with mudsc needs at least " in line, line
    assert "31.13 MB of activation statistics" in line and "but 10.00 MB of memory is available" in line, line
    assert not (tmp_path / "out").exists()


def _labelled(model, names):
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return model


@pytest.mark.parametrize("given", ["folders", "models", "cli"])
def test_a_parent_copied_to_parent_as_label_order_is_counted_by_the_memory_check(tmp_path, monkeypatch, capsys,
                                                                                  given):
    """A parent listing A's labels in another order is deep-copied with its head reordered (`head_reordered`): one
    more parent's weights held at once, which the floor left out — a merge that fit by the check's count could run
    out of memory there. It is known from the configs, so the check counts it before any weights are read."""
    from factories import make_model

    import hf_mudsc
    import hf_mudsc.load.parents as parents
    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.methods.registry import METHODS

    a = _labelled(make_model("vit_cls", 0), ["cat", "dog", "fox"])
    b = _labelled(make_model("vit_cls", 1), ["dog", "fox", "cat"])
    same = _labelled(make_model("vit_cls", 2), ["cat", "dog", "fox"])
    weights = 4 * sum(p.numel() for p in a.parameters())
    loading = 0 if given == "models" else 2
    floor = sum(plan.memory_floor(a, 2, METHODS["weight_matching"], loading=loading).values())
    monkeypatch.setattr(plan, "available_memory", lambda: int(floor + weights / 2))  # less than the copy
    if given != "models":
        for name, model in (("a", a), ("b", b), ("same", same)):
            model.save_pretrained(tmp_path / name)
        a, b, same = tmp_path / "a", tmp_path / "b", tmp_path / "same"
        monkeypatch.setattr(parents, "_finish", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    if given == "cli":
        capsys.readouterr()
        assert main(["merge", str(a), str(b), "--method", "weight_matching", "--output", str(tmp_path / "out")]) == 1
        message = _one_line_error(capsys)
        assert not (tmp_path / "out").exists()
    else:
        with pytest.raises(MergeInputError) as caught:
            hf_mudsc.merge([a, b], None, method="weight_matching", refit="none", progress=False)
        message = str(caught.value)
        assert "\n" not in message, message
    assert f"{weights / 1e3:.2f} kB for parent B copied in parent A's label order" in message, message
    assert f"of parent weights ({loading} loaded whole)" in message or not loading, message
    if given == "models":  # the same labels in the same order: no copy, and the same floor fits
        assert hf_mudsc.merge([a, same], None, method="weight_matching", refit="none", progress=False) is not None


def _merge_with_base(entry: str, parents: list[str], base: str, method: str, out: Path, capsys) -> str:
    """Merge `parents` with `base` by `method` from the CLI (`entry` "cli", into `out`) or from Python: the one-line
    refusal, or "" when it merged."""
    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    if entry == "cli":
        capsys.readouterr()
        code = main(["merge", *parents, "--base", base, "--method", method, "--output", str(out)])
        return _one_line_error(capsys) if code else ""
    try:
        hf_mudsc.merge(parents, None, method=method, base=base, progress=False)
    except MergeInputError as error:
        return str(error)
    return ""


@pytest.mark.parametrize("entry", ["cli", "python"])
def test_a_base_loaded_whole_is_counted_by_the_memory_check(tmp_path, monkeypatch, capsys, entry):
    """The floor counted the parents loaded whole but not the base, one more model held at once: a merge that fit by
    the check could run out of memory loading it. A base loaded whole counts one parent's weights (a floor one parent
    larger), a streamed one (a tensor-wise method) nothing — refused or merged before any weights are read."""
    from factories import make_model

    import hf_mudsc.load.parents as parents
    import hf_mudsc.plan as plan
    from hf_mudsc.methods.registry import METHODS

    model = make_model("bert_cls", 0)
    weights = 4 * sum(p.numel() for p in model.parameters())
    without = plan.memory_floor(model, 2, METHODS["pcb"], loading=2)
    with_base = plan.memory_floor(model, 2, METHODS["pcb"], loading=2, base=True)
    assert sum(with_base.values()) == sum(without.values()) + weights
    assert plan.memory_floor(model, 2, METHODS["ties"], loading=1, base=False) == plan.memory_floor(
        model, 2, METHODS["ties"], loading=1)
    folders = []
    for name, seed in (("a", 0), ("b", 1), ("base", 2)):
        make_model("bert_cls", seed).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    a, b, base = folders
    monkeypatch.setattr(plan, "available_memory", lambda: int(sum(without.values()) + weights / 2))
    loaded = []
    real = parents._load_weights
    monkeypatch.setattr(parents, "_load_weights", lambda located: loaded.append(located.reference) or real(located))
    for method in ("pcb", "ties"):  # pcb loads the base whole: refused; ties streams it (and parent B): merged
        message = _merge_with_base(entry, [a, b], base, method, tmp_path / method, capsys)
        if method == "pcb":
            assert message and "\n" not in message, message
            assert f"{weights / 1e3:.2f} kB for the base loaded whole" in message, message
            assert "of parent weights (2 loaded whole)" in message, message
            assert loaded == [], loaded
        else:
            assert message == "" and loaded == [a], (message, loaded)


@pytest.mark.parametrize("entry", ["cli", "python"])
def test_a_base_copied_to_parent_as_label_order_is_counted_by_the_memory_check(tmp_path, monkeypatch, capsys, entry):
    """A base listing parent A's labels in another order is copied whole to A's order before the merge: one more model
    held next to the base, which the floor left out (it counted the parents' copies only) — a merge that fit by the
    check could run out of memory there. Known from the configs, it is counted before any weights are read (and in
    the dry run's estimate); a base in A's order is not copied, nor is a streamed one (a meta model and the head)."""
    from factories import make_model

    import hf_mudsc
    import hf_mudsc.load.parents as parents
    import hf_mudsc.plan as plan
    from hf_mudsc.methods.registry import METHODS

    names = ["cat", "dog", "fox"]
    models = {"a": _labelled(make_model("vit_cls", 0), names), "b": _labelled(make_model("vit_cls", 1), names),
              "same": _labelled(make_model("vit_cls", 2), names),
              "other": _labelled(make_model("vit_cls", 3), ["dog", "fox", "cat"])}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    a, b, same, other = (str(tmp_path / name) for name in models)
    weights = 4 * sum(p.numel() for p in models["a"].parameters())
    floor = plan.memory_floor(models["a"], 2, METHODS["pcb"], loading=2, base=True)
    assert sum(plan.memory_floor(models["a"], 2, METHODS["pcb"], loading=2, base=True, base_copy=True).values()) == (
        sum(floor.values()) + weights)
    if entry == "python":  # the dry run's peak counts the copy too
        estimates = {base: hf_mudsc.merge([a, b], method="pcb", base=base, dry_run=True).estimate.peak_memory_bytes
                     for base in (same, other)}
        assert estimates[other] == pytest.approx(estimates[same] + weights)
    monkeypatch.setattr(plan, "available_memory", lambda: int(sum(floor.values()) + weights / 2))
    loaded = []
    real = parents._load_weights
    monkeypatch.setattr(parents, "_load_weights", lambda located: loaded.append(located.reference) or real(located))
    for base, method in ((other, "pcb"), (same, "pcb"), (other, "ties")):  # only pcb's whole base in another order
        loaded.clear()
        out = tmp_path / f"out-{method}-{Path(base).name}"
        message = _merge_with_base(entry, [a, b], base, method, out, capsys)
        if (base, method) == (other, "pcb"):
            assert message and "\n" not in message, message
            assert f"{weights / 1e3:.2f} kB for the base copied in parent A's label order" in message, message
            assert f"{weights / 1e3:.2f} kB for the base loaded whole" in message, message
            assert loaded == [] and not out.exists(), loaded
        else:
            assert message == "", message


@pytest.mark.parametrize("kind", ["bert_cls", "vit_cls"])
@pytest.mark.parametrize("entry", ["cli", "python"])
def test_auto_refuses_the_memory_its_choice_needs_before_any_parent_is_loaded_whole(tmp_path, capsys, monkeypatch,
                                                                                    entry, kind):
    """`auto` loaded every parent whole (minutes for a long recipe) before its choice was checked: its choice is now
    made on the parents read one tensor at a time, and checked before any parent is loaded whole — for ViT too,
    whose checkpoint keys transformers renames as it loads them (the lazy view renames them likewise)."""
    import datasets
    import torch
    from factories import make_model, vit_cli_case

    import hf_mudsc
    import hf_mudsc.load.parents as parents
    import hf_mudsc.plan as plan
    from hf_mudsc.methods.registry import METHODS

    if kind == "vit_cls":
        folders, calibration = vit_cli_case(tmp_path)
        assert calibration == str(tmp_path / "calibration")
    else:
        folders = [str(tmp_path / "p0"), str(tmp_path / "p1")]
        for seed, folder in enumerate(folders):
            make_model(kind, seed).save_pretrained(folder)
        generator = torch.Generator().manual_seed(0)
        data = datasets.Dataset.from_dict({"input_ids": torch.randint(5, 60, (16, 12), generator=generator).tolist(),
                                           "attention_mask": [[1] * 12] * 16})
        data.save_to_disk(tmp_path / "calibration")
    floor = plan.memory_floor(make_model(kind), 20, METHODS["mudsc"], loading=20)
    available = int(floor["weights"] + floor["statistics"] / 2)  # the parents fit, mudsc's statistics do not
    monkeypatch.setattr(plan, "available_memory", lambda: available)
    monkeypatch.setattr(parents, "_load_weights", lambda *a, **k: pytest.fail("a parent was loaded whole"))
    models = folders * 10
    capsys.readouterr()
    if entry == "cli":
        path = tmp_path / "auto.yaml"
        path.write_text("models:\n" + "".join(f"  - {m}\n" for m in models)
                        + f"calibration: {tmp_path / 'calibration'}\n")
        assert main(["merge", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 1
        line = _one_line_error(capsys)
    else:
        with pytest.raises(hf_mudsc.errors.MergeInputError) as caught:
            hf_mudsc.merge(models, str(tmp_path / "calibration"))
        line = str(caught.value)
    assert "method 'auto' chose 'mudsc'" in line and "merging 20 parents with mudsc needs at least " in line, line
    assert f"{floor['statistics'] / 1e6:.2f} MB of activation statistics" in line, line
    assert "of parent weights (20 loaded whole)" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("related", ["independent", "shared base"])
def test_auto_choosing_before_loading_merges_as_choosing_after_loading(tmp_path, monkeypatch, related):
    """The choice made on the parents read one tensor at a time (folders) is the one made on the loaded parents
    (model objects): the same method, relation and merged weights — mudsc for different inits, linear (its parents
    then read one tensor at a time) for fine-tunes of one base."""
    import datasets
    import torch
    from factories import make_model

    import hf_mudsc
    import hf_mudsc.pipeline as pipeline

    a = make_model("bert_cls", 0)
    if related == "independent":
        b = make_model("bert_cls", 1)
    else:
        b = make_model("bert_cls", 0)
        with torch.no_grad():
            for parameter in b.parameters():
                parameter.add_(0.01 * parameter.abs().mean() * torch.randn_like(parameter))
    for name, model in (("a", a), ("b", b)):
        model.save_pretrained(tmp_path / name)
    generator = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(5, 60, (16, 12), generator=generator).tolist(),
                                       "attention_mask": [[1] * 12] * 16})
    calibration = data if related == "independent" else None
    early = []
    choose = pipeline.auto_before_loading
    monkeypatch.setattr(pipeline, "auto_before_loading", lambda *a, **k: early.append(1) or choose(*a, **k))
    from_folders = hf_mudsc.merge([tmp_path / "a", tmp_path / "b"], calibration, progress=False)
    assert early == [1]
    from_objects = hf_mudsc.merge([a, b], calibration, progress=False)
    assert early == [1]  # model objects: chosen after loading, as before
    for key in ("method", "parent_relation", "method_choice_reason"):
        assert from_folders.config.mudsc[key] == from_objects.config.mudsc[key], key
    assert from_folders.config.mudsc["method"] == ("mudsc" if related == "independent" else "linear")
    objects = dict(from_objects.named_parameters())
    for name, tensor in from_folders.named_parameters():
        assert torch.equal(tensor, objects[name]), name


@pytest.mark.parametrize(("method", "streamed"), [("linear", True), ("ties", True), ("weight_matching", False)])
def test_the_cli_reads_the_parents_of_a_tensor_wise_method_one_tensor_at_a_time(tmp_path, monkeypatch, method,
                                                                                streamed):
    """merge() streams the parents after the first for a tensor-wise method (memory does not grow with N), but the
    CLI loaded every parent whole before calling it: a long recipe of large parents ran out of memory loading."""
    from factories import make_model

    import hf_mudsc

    folders = []
    for seed in range(3):
        make_model("bert_cls", seed).save_pretrained(tmp_path / f"p{seed}")
        folders.append(str(tmp_path / f"p{seed}"))
    seen = {}

    def capture(parents, calibration, **kwargs):
        seen["lazy"] = [parent.parameters is not None for parent in parents]
        seen["base_lazy"] = kwargs["base"] is not None and kwargs["base"].parameters is not None
        raise hf_mudsc.errors.MergeInputError("stop here")

    monkeypatch.setattr(hf_mudsc, "merge", capture)
    extra = ["--base", folders[0]] if method == "ties" else []
    assert main(["merge", *folders, "--method", method, *extra, "--output", str(tmp_path / "out")]) == 1
    assert seen["lazy"] == [False, streamed, streamed]
    assert seen["base_lazy"] == (method == "ties")


GIB = 2**30


def _fake_machine(tmp_path, monkeypatch, own: str, limits: dict[str, tuple[str, int]]):
    """A fake /proc (128 GiB free, this process in the cgroups `own` lists, /proc/self/cgroup's lines) and
    /sys/fs/cgroup tree (`limits`: folder under the cgroup root -> (limit as the file says it, usage)), read by
    `available_memory` in place of the machine's."""
    import hf_mudsc.memory as memory

    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {256 * GIB // 1024} kB\nMemAvailable: {128 * GIB // 1024} kB\n"
                                  "SwapFree: 0 kB\n")
    (proc / "self" / "cgroup").write_text(own)
    for folder, (limit, usage) in limits.items():
        path = cgroup / folder
        path.mkdir(parents=True, exist_ok=True)
        v1 = folder.split("/")[0] == "memory"
        (path / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(f"{limit}\n")
        (path / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
    monkeypatch.setattr(memory, "PROC_ROOT", str(proc))
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(cgroup))
    return memory


NO_LIMIT_V1 = str(2**63 - 4096)  # what cgroup v1 shows for "no limit"


@pytest.mark.parametrize(("own", "limits", "room"), [
    # cgroup v2 at the root (a container's own namespace): memory.max less memory.current
    ("0::/\n", {".": (str(10 * GIB), 4 * GIB)}, 6 * GIB),
    # v2, the process in a nested cgroup: its own limit counts, the root has none
    ("0::/user.slice/job\n", {"user.slice/job": (str(3 * GIB), GIB), "user.slice": ("max", 9 * GIB)}, 2 * GIB),
    # v2, nested: an ancestor's limit is tighter than the process's own
    ("0::/a/b\n", {"a/b": ("max", GIB), "a": (str(5 * GIB), 4 * GIB)}, GIB),
    # v1 (this machine's layout): the memory controller's nested path, the root unlimited
    ("4:memory:/process_api/5c5d\n3:cpuset:/\n0::/\n",
     {"memory": (NO_LIMIT_V1, 50 * GIB), "memory/process_api/5c5d": (str(8 * GIB), 3 * GIB)}, 5 * GIB),
    # v1 with controllers mounted together
    ("7:memory,hugetlb:/job\n", {"memory/job": (str(2 * GIB), GIB)}, GIB),
    # the listed path is not in this mount namespace (the host's path): the root's limit
    ("0::/host/path/of/this/container\n", {".": (str(7 * GIB), 2 * GIB)}, 5 * GIB),
    # no limit anywhere: the machine's free memory
    ("4:memory:/process_api/x\n", {"memory": (NO_LIMIT_V1, GIB), "memory/process_api/x": (NO_LIMIT_V1, GIB)},
     128 * GIB),
    ("0::/a\n", {"a": ("max", GIB)}, 128 * GIB),
])
def test_the_memory_available_is_capped_by_the_limit_of_the_processs_own_cgroup(tmp_path, monkeypatch, own,
                                                                                 limits, room):
    """Inside a container /proc/meminfo shows the host's memory; the cgroup's limit is what the merge can get. Only
    the cgroup root's limit was read: a process in a nested cgroup (cgroup v1 `memory:/process_api/<id>`, as on
    this machine, or a v2 slice) saw no limit and a check that passed until the kernel killed the merge."""
    memory = _fake_machine(tmp_path, monkeypatch, own, limits)
    assert memory.available_memory() == room


@pytest.mark.parametrize("entry", ["cli", "python"])
def test_raw_calibration_images_without_a_processor_are_refused_before_any_weights_are_loaded(tmp_path, capsys,
                                                                                               monkeypatch, entry):
    """Parents that ship no image processor cannot preprocess an `image` column: that was found only after every
    parent was loaded (after ~100 s for the 400-parent recipe); the columns and processors are known before."""
    from test_cli import save_parents_and_data

    import hf_mudsc
    import hf_mudsc.load.parents as parents
    from hf_mudsc.errors import CalibrationError

    a, b, calibration = save_parents_and_data(tmp_path / "inputs")
    for folder in (a, b):
        (folder / "preprocessor_config.json").unlink()
    monkeypatch.setattr(parents, "_finish", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    needle = ("the calibration data lacks column(s) ['pixel_values'] that the models need; found columns ['image', "
              "'label']. Column 'image' holds raw image, but the parents ship no image processor")
    if entry == "cli":
        capsys.readouterr()
        assert main(["merge", str(a), str(b), "--calibration", f"{calibration}:train", "--method", "zipit",
                     "--output", str(tmp_path / "out")]) == 1
        assert needle in _one_line_error(capsys)
    else:
        with pytest.raises(CalibrationError, match=re.escape(needle)):
            hf_mudsc.merge([a, b], f"{calibration}:train", method="zipit", progress=False)
    assert not (tmp_path / "out").exists()


def _link_out(folder, name, elsewhere):
    """Move `folder/name` to `elsewhere` and leave a symbolic link to it in its place."""
    elsewhere.mkdir(exist_ok=True)
    target = elsewhere / name
    (folder / name).rename(target)
    (folder / name).symlink_to(target)
    return target


def test_a_parent_object_whose_folder_links_its_processor_out_is_refused(tmp_path):
    """A model object's processor is read from its `name_or_path` folder: a link out of it was read unchecked
    (the folder itself is refused, `test_a_parent_file_linking_out_of_its_folder_is_refused`)."""
    from transformers import ViTForImageClassification

    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    model = ViTForImageClassification.from_pretrained(folder)
    assert load_parent(model).processor is not None  # read from the folder while it holds the file itself
    target = _link_out(folder, "preprocessor_config.json", tmp_path / "elsewhere")
    with pytest.raises(LoadError) as caught:
        load_parent(model)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{str(folder)!r}: preprocessor_config.json is a symbolic link to {str(target)!r}, outside the folder" \
        in message


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json"])
def test_a_cached_hub_snapshot_linking_a_processor_file_out_of_the_cache_is_refused(tmp_path, monkeypatch, name):
    """Offline, a Hub parent is read from its cache snapshot, whose files link into the repo's `blobs/`; one linking
    anywhere else (a cache unpacked from someone's archive) was read as the processor unchecked."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import load_parent

    folder = _save_vit_with_processor(tmp_path / "vit")
    repo = tmp_path / "hub" / "models--org--vit"
    sha = "a" * 40
    snapshot, blobs = repo / "snapshots" / sha, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for index, path in enumerate(sorted(p for p in folder.iterdir() if p.is_file())):
        (blobs / f"blob{index}").write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{index}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert load_parent("org/vit", cache_dir=tmp_path / "hub").processor is not None
    (snapshot / name).unlink()
    outside = tmp_path / "outside.json"
    outside.write_bytes((folder / name).read_bytes())
    if name == "config.json":  # read before the processor's check: it must be refused before it is parsed
        outside.write_text('{"model_type": "not-a-model-type-xyz"}')
    (snapshot / name).symlink_to(outside)
    with pytest.raises(LoadError) as caught:
        load_parent("org/vit", cache_dir=tmp_path / "hub")
    message = str(caught.value)
    assert "\n" not in message
    assert f"'org/vit': {name} is a symbolic link to {str(outside)!r}, outside the folder" in message


def test_a_parent_folder_that_also_reads_as_a_hub_id_is_merged_with_a_warning(tmp_path, monkeypatch, caplog):
    """`merge org/vit-a org/vit-b` with a folder `./org/vit-b` here merged the folder without a word (zero Hub
    requests): the user may have meant the Hub repository. The folder still wins (local layouts like `models/vit`
    are common), and the log says how to say either."""
    from hf_mudsc.load.parents import load_parent

    _save_vit_with_processor(tmp_path / "org" / "vit-b")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        assert load_parent("org/vit-b").processor is not None
    assert "'org/vit-b' is a folder here and also reads as a Hub id" in caplog.text, caplog.text
    assert "'./org/vit-b'" in caplog.text and "'org/vit-b@main'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_parent("./org/vit-b")
    assert "reads as a Hub id" not in caplog.text
