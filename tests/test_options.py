"""Every merge option is checked in one place, before anything is loaded: the API, a recipe file and the CLI
give the same one-line message (naming the CLI flag too), and the option error comes before the missing parents."""

from __future__ import annotations

import math

import numpy as np
import pytest
from factories import recipe_refusal

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.errors import OptionError
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.recipe import Recipe

# (option, bad value, fragment of the message)
BAD_OPTIONS = [
    ("zip_budget", math.nan, "zip_budget must be a finite number >= 0 (CLI: --zip-budget), got nan"),
    ("zip_budget", math.inf, "zip_budget must be a finite number >= 0 (CLI: --zip-budget), got inf"),
    ("zip_budget", -1.0, "zip_budget must be a finite number >= 0 (CLI: --zip-budget), got -1.0"),
    ("zip_decay", math.nan, "zip_decay must lie in (0, 1] (CLI: --zip-decay), got nan"),
    ("zip_decay", 0.0, "zip_decay must lie in (0, 1] (CLI: --zip-decay), got 0.0"),
    ("zip_decay", 1.5, "zip_decay must lie in (0, 1] (CLI: --zip-decay), got 1.5"),
    ("alpha", math.nan, "alpha must lie in [0, 1] (CLI: --alpha), got nan"),
    ("alpha", -0.1, "alpha must lie in [0, 1] (CLI: --alpha), got -0.1"),
    ("batch_size", 0, "batch_size must be >= 1 (CLI: --batch-size), got 0"),
    ("batch_size", 100_000, "batch_size 100000 is absurdly large (CLI: --batch-size); the limit is 65536"),
    ("num_samples", 0, "num_samples must be >= 1, or None for the whole split ('all' on the command line) "
                    "(CLI: --num-samples), got 0"),
    ("seed", -1, "seed must be >= 0 (CLI: --seed; torch generators take non-negative seeds), got -1"),
]
# Wrong types: only the API and a recipe file can pass them (argparse converts flags).
BAD_TYPES = [
    ("batch_size", 2.5, "batch_size must be an int (CLI: --batch-size), got 2.5 (float)"),
    ("batch_size", True, "batch_size must be an int (CLI: --batch-size), got True (bool)"),
    ("num_samples", "10", "num_samples must be an int (CLI: --num-samples), got '10' (str)"),
    ("seed", 1.0, "seed must be an int (CLI: --seed), got 1.0 (float)"),
    ("alpha", "0.5", "alpha must be a number or 'auto' (CLI: --alpha), got '0.5' (str)"),
    ("zip_budget", None, "zip_budget must be a number (CLI: --zip-budget), got None (NoneType)"),
    ("matcher", "hungarian", "unknown matcher 'hungarian'; choose one of: align, zip (CLI: --matcher)"),
    # Every declared keyword is checked by merge() too, not only the numeric ones.
    ("independent_heads", "yes", "`independent_heads` must be bool, got 'yes' (str)"),
    ("reference_compat", 1, "`reference_compat` must be bool, got 1 (int)"),
    ("text_column", 3, "`text_column` must be str, got 3 (int)"),
    ("image_column", ["img"], "`image_column` must be str, got ['img'] (list)"),
]


@pytest.mark.parametrize(("option", "value", "needle"), BAD_OPTIONS + BAD_TYPES)
def test_the_api_checks_options_before_loading_anything(tmp_path, option, value, needle):
    """Parents and calibration do not exist: if the option were checked later, their error would come first."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(hf_mudsc.MergeInputError) as caught:
        hf_mudsc.merge(missing, str(tmp_path / "no-data"), progress=False, **{option: value})
    assert needle in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("option", "value", "needle"), BAD_OPTIONS)
def test_the_cli_checks_options_before_loading_anything(tmp_path, capsys, option, value, needle):
    out = tmp_path / "out"
    code = main(["merge", str(tmp_path / "no-a"), str(tmp_path / "no-b"), "--calibration", str(tmp_path / "no-data"),
                 "--output", str(out), "--" + option.replace("_", "-"), str(value)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(("option", "value", "needle"), BAD_OPTIONS + BAD_TYPES)
def test_a_recipe_file_gets_the_same_checks(tmp_path, option, value, needle):
    assert needle.split(" (CLI")[0] in recipe_refusal(tmp_path, option, value)


def test_valid_edge_values_pass(tmp_path):
    recipe = Recipe(models=["a", "b"], calibration="c", alpha=1.0, zip_decay=1.0, zip_budget=0.0, batch_size=65536,
                    num_samples=1, seed=2**63)
    assert recipe.validate() is recipe


def test_the_calibration_help_names_the_methods_that_read_data(capsys):
    """`--calibration`'s help said every method but weight_matching and average needs it; linear, ties and the other
    tensor-wise methods read none (the README merges them without data)."""
    from hf_mudsc.methods.registry import METHODS

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--calibration SPEC calibration data")
    calibration_help = text[start:text.index("--method {", start)]
    reading = {name for name, method in METHODS.items() if method.needs_calibration or method.needs_data}
    named = {name for name in METHODS if f" {name}," in calibration_help or f" {name};" in calibration_help
             or f" {name}." in calibration_help or f" {name} " in calibration_help}
    assert reading and named == reading, (sorted(named), sorted(reading))


BOOL_OPTIONS = [field.name for field in MergeOptions.option_fields() if field.metadata["kind"] == "bool"]


@pytest.mark.parametrize("name", BOOL_OPTIONS)
def test_every_bool_option_takes_a_numpy_bool_as_a_python_bool(name):
    """`independent_heads=np.bool_(True)` was refused as "must be bool, got np.True_ (bool)" while numpy ints and
    floats were taken: a numpy bool is a bool (recorded as Python's, so the config and recipe stay JSON)."""
    for value in (np.bool_(True), np.bool_(False)):
        checked = MergeOptions.check_type(name, value)
        assert type(checked) is bool and checked is bool(value)
    with pytest.raises(OptionError, match=rf"^`{name}` must be bool, got (np\.int64\()?1\)? \(int64\)$"):
        MergeOptions.check_type(name, np.int64(1))  # a number is still not a bool
    with pytest.raises(OptionError, match=rf"^`{name}` must be bool, got array"):
        MergeOptions.check_type(name, np.array([True]))


def test_merge_keywords_take_a_numpy_bool():
    options = MergeOptions.from_keywords(independent_heads=np.bool_(True), reference_compat=np.False_)
    assert options.independent_heads is True and options.reference_compat is False
