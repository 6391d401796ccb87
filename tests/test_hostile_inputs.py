"""Hostile inputs found by the robustness audit (s11): each test is a defect that was real, its fix the smallest.

Every refusal is one line naming the problem and the fix, raised before any weights are loaded, and its size does
not grow with the input (a value is shown shortened, never whole).
"""

from __future__ import annotations

import time

import pytest

from hf_mudsc.cli.main import main
from hf_mudsc.errors import OptionError, RecipeError
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.recipe import Recipe
from hf_mudsc.solve.layer_ranges import MAX_BLOCKS, parse_layer_swap


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
    with pytest.raises(RecipeError, match=r"is not valid YAML: key 'alpha' is given twice \(line 4, column 1\)"):
        Recipe.load(path)
    path.write_text("models: [a, b]\n<<: {alpha: 0.3}\nseed: 1\n")  # a merge key is not a repeated key
    assert Recipe.load(path).alpha == 0.3
