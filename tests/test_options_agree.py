"""Every merge option is declared once (`hf_mudsc.options.MergeOptions`): the places derived from the declaration
agree — merge()'s keywords, the `hf-mudsc merge` flags, the recipe keys, the recorded `config.mudsc` keys and the
card's settings rows — and a new option declared in one place shows up in all of them."""

from __future__ import annotations

import argparse
import inspect
import re
from dataclasses import dataclass

import pytest
import torch
import yaml
from factories import make_batches, make_model

import hf_mudsc
from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import add_arguments, build_recipe
from hf_mudsc.errors import OptionError, RecipeError
from hf_mudsc.methods import METHODS
from hf_mudsc.options import CardRow, MergeOptions, flag, number_or_auto, option
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import COMMAND_LINE_ONLY_KEYS, DESTINATION_KEYS, Recipe

# merge()'s keywords that are not merge options: how to reach the Hub, progress bars, the processor object, the choice
# `auto` made before the caller loaded the parents.
NON_OPTION_KEYWORDS = {"token", "progress", "processor", "auto_choice"}
# config.mudsc keys that describe the result, not an option.
RESULT_KEYS = {"library", "version", "parents", "parent_revisions", "parent_licenses", "base_license",
               "num_calibration_samples", "refit_examples",
               "group_match_values", "solve_start", "start_objectives", "parent_relation", "correspondence_check",
               "method_choice_reason", "base_revision", "base_source", "warnings", "alpha_auto", "size_budget",
               "refit_gate", "out_dtype_reason", "head_reordered", "processor_note"}
# CLI arguments that are not options: the recipe file to run and the Hub token (never recorded).
# (--quiet/--verbose: the global verbosity flags, which every command takes after it too)
# --commit-message, --commit-description, --revision, --create-pr: how --push-to-hub commits (huggingface_hub's
# options, `publish.hub.CommitOptions`), like --token no recipe key: a recipe says what to merge.
NON_OPTION_FLAGS = {"--recipe", "--token", "--help", "--quiet", "--verbose", "--commit-message", "--commit-description",
                    "--revision", "--create-pr"}


def merge_keyword_mismatch(options: type[MergeOptions]) -> set[str]:
    """The names in which merge()'s keyword-only arguments and the declared keyword options differ."""
    keywords = {name for name, parameter in inspect.signature(hf_mudsc.merge).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    return keywords ^ (set(options.names(keyword=True)) | NON_OPTION_KEYWORDS)


def _merge_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["merge"]


@pytest.fixture(scope="module")
def merged():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a busy machine
    try:
        return hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)],
                              make_batches("vit_cls", num_batches=2), progress=False)
    finally:
        torch.set_num_threads(threads)


def test_merge_keywords_are_the_declared_keyword_options_with_their_defaults():
    assert merge_keyword_mismatch(MergeOptions) == set()
    parameters = inspect.signature(hf_mudsc.merge).parameters
    for field in MergeOptions.option_fields():
        if field.metadata["keyword"]:
            assert parameters[field.name].default == field.default, field.name
    assert list(inspect.signature(hf_mudsc.merge).parameters)[:2] == ["models", "calibration"]


def test_cli_flags_are_the_declared_options_with_their_help_and_shape():
    parser = _merge_parser()
    long_flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")
                  and not s.startswith("--no-")}
    assert long_flags == {flag(name) for name in MergeOptions.names()} | NON_OPTION_FLAGS
    by_dest = {a.dest: a for a in parser._actions}
    assert by_dest["models"].option_strings == []  # the parents are positional
    for field in MergeOptions.option_fields():
        action = by_dest[field.name]
        expected_help = field.metadata["help"]() if callable(field.metadata["help"]) else field.metadata["help"]
        assert action.help.startswith(expected_help), field.name
        assert action.help.endswith(f"(default: {field.default})") == field.metadata["show_default"], field.name
        if field.metadata["kind"] == "bool":
            assert action.option_strings == [flag(field.name), "--no-" + flag(field.name)[2:]], field.name
    assert by_dest["output"].option_strings == ["--output", "-o"]
    assert by_dest["matcher"].choices == ["align", "zip"]
    assert by_dest["method"].choices == ["auto", *hf_mudsc.METHODS]
    assert by_dest["batch_size"].type is int and by_dest["refit_lambda"].type is float
    assert by_dest["alpha"].type is number_or_auto  # a number, or "auto"


def test_recipe_keys_are_the_parents_plus_the_declared_options(tmp_path):
    assert Recipe.keys() == ["models", *MergeOptions.names()]
    assert set(COMMAND_LINE_ONLY_KEYS) == set(MergeOptions.names(recipe=False)) == {
        "allow_pickle", "dry_run", "output", "push_to_hub", "private", "overwrite"}
    assert COMMAND_LINE_ONLY_KEYS == {"allow_pickle": "--allow-pickle", "dry_run": "--dry-run",
                                      "output": "--output DIR", "push_to_hub": "--push-to-hub ORG/NAME",
                                      "private": "--private", "overwrite": "--overwrite"}
    assert DESTINATION_KEYS == ("output", "push_to_hub", "private", "overwrite")
    written = yaml.safe_load(Recipe(models=["a", "b"], calibration="c").save(tmp_path / "r.yaml").read_text())
    assert list(written) == ["hf_mudsc_version", "models", *MergeOptions.names(recipe=True)]


def test_config_mudsc_records_exactly_the_recorded_options_and_the_report_recipe_the_recipe_keys(merged):
    mudsc = merged.config.mudsc
    assert set(mudsc) - RESULT_KEYS == set(MergeOptions.names(recorded=True))
    assert RESULT_KEYS <= set(mudsc)
    assert set(merged.merge_report.recipe) == {"models", *MergeOptions.names(recipe=True)}


def test_card_settings_rows_are_the_options_declared_with_a_card_row(merged):
    card = str(render_card(merged, Recipe(models=["org/a", "org/b"], calibration="org/ds:train")))
    table = card.split("## Merge", 1)[1].split("\n## ", 1)[0]
    labels = re.findall(r"^\| ([^|]+?) \| .* \|$", table, flags=re.MULTILINE)
    rows = sorted((f.metadata["card"] for f in MergeOptions.option_fields() if f.metadata["card"] is not None),
                  key=lambda row: row.position)
    # Rows of the per-method options mudsc does not read (and of the base, none here) are hidden.
    used = METHODS[merged.config.mudsc["method"]].used_options(MergeOptions())
    hidden = {"Base model"} | {f.metadata["card"].label for f in MergeOptions.option_fields()
                               if f.metadata["per_method"] and f.metadata["card"] and f.name not in used}
    declared = [label for label in dict.fromkeys(row.label for row in rows) if label not in hidden]
    assert labels == ["Setting", *declared, "Solver sweeps", "Parent relation"]
    assert "| Zip decay / budget | 0.5 / 1.0 |" in table and "| Seed | 0 |" in table


def test_matchers_are_defined_once():
    from hf_mudsc import options
    from hf_mudsc.solve import matchers

    assert options.MATCHERS is matchers.MATCHERS


# ------------------------------------------------------------------------------------- adding an option


def _check_dummy(name: str, value: int, cli: str) -> None:
    if value < 1:
        raise OptionError(f"dummy_level must be >= 1 {cli}, got {value}")


@dataclass
class DummyRecipe(Recipe):
    """A recipe with one more option, declared in one place (a field)."""

    dummy_level: int = option(3, kind="int", check=_check_dummy, metavar="N", recorded=True,
                              card=CardRow(10, "Dummy level"), help="a dummy option for this test")


def test_a_new_option_is_one_declaration_cli(capsys):
    parser = argparse.ArgumentParser(prog="merge")
    add_arguments(parser, DummyRecipe)
    parser.print_help()
    assert "--dummy-level N" in capsys.readouterr().out
    given = ["org/a", "org/b", "--calibration", "c", "--output", "o"]
    assert build_recipe(parser.parse_args([*given, "--dummy-level", "4"]), DummyRecipe).dummy_level == 4
    assert build_recipe(parser.parse_args(given), DummyRecipe).dummy_level == 3
    with pytest.raises(RecipeError, match=r"^dummy_level must be >= 1 \(CLI: --dummy-level\), got 0$"):
        build_recipe(parser.parse_args([*given, "--dummy-level", "0"]), DummyRecipe)


def test_a_new_option_is_one_declaration_recipe_file(tmp_path):
    path = DummyRecipe(models=["org/a", "org/b"], calibration="c", dummy_level=5).save(tmp_path / "r.yaml")
    assert yaml.safe_load(path.read_text())["dummy_level"] == 5
    assert DummyRecipe.load(path).validate().dummy_level == 5
    assert "dummy_level" in DummyRecipe.keys()
    with pytest.raises(RecipeError, match=r"`dummy_level` .*|dummy_level must be an int \(CLI: --dummy-level\)"):
        DummyRecipe.from_dict({"models": ["a", "b"], "dummy_level": "high"})
    with pytest.raises(RecipeError, match=r"dummy_level must be >= 1 \(CLI: --dummy-level\), got -2"):
        DummyRecipe.from_dict({"models": ["a", "b"], "calibration": "c", "dummy_level": -2}).validate()


def test_a_new_option_is_one_declaration_keywords_and_card(merged):
    assert "dummy_level" in DummyRecipe.names(keyword=True, recorded=True)
    assert DummyRecipe.from_keywords(dummy_level=2).dummy_level == 2
    with pytest.raises(OptionError, match=r"dummy_level must be >= 1 \(CLI: --dummy-level\), got 0"):
        DummyRecipe.from_keywords(dummy_level=0)
    with pytest.raises(OptionError, match=r"unknown keyword argument\(s\) \['dummy_levle'\]"):
        DummyRecipe.from_keywords(dummy_levle=2)
    # merge() must then take the keyword too: the agreement check names exactly the missing one.
    assert merge_keyword_mismatch(DummyRecipe) == {"dummy_level"}
    card = str(render_card(merged, DummyRecipe(models=["org/a", "org/b"], calibration="c", dummy_level=7)))
    assert "| Seed | 0 |\n| Dummy level | 7 |\n| Solver sweeps |" in card


def test_merge_docstring_documents_every_keyword():
    """merge()'s docstring is written for Python users (its own words), but it must name every keyword."""
    args = hf_mudsc.merge.__doc__.split("Args:", 1)[1].split("Returns:", 1)[0]
    documented = {name.strip() for line in re.findall(r"^ {8}([a-z_, ]+):", args, flags=re.MULTILINE)
                  for name in line.split(",")}
    keywords = {name for name, parameter in inspect.signature(hf_mudsc.merge).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords - documented == set()
    assert documented - {"models", "calibration"} <= keywords


@pytest.mark.parametrize(("flag_name", "stated"), [("--zip-decay", "in (0, 1]"), ("--zip-budget", ">= 0"),
                                                   ("--gamma", "in [0, 1)"), ("--epsilon", "in (0, 0.5)"),
                                                   ("--pcb-ratio", "in (0, 1]")])
def test_merge_help_states_the_range_its_check_refuses_outside(flag_name, stated, capsys):
    """README hunt s29: "`hf-mudsc merge --help` gives each one's meaning, range and default", but five range-checked
    flags stated no range."""
    from hf_mudsc.cli.main import main

    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    entry = text[text.rindex(flag_name + " "):][:400]  # its entry in the options list, after the usage line
    assert stated in entry, entry
