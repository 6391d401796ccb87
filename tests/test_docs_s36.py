"""Session 36, "every documented example runs and says the truth": what a user copying from the README, the public
docstrings and `--help` met that the text did not say, and checks that keep the text and the code together."""

from __future__ import annotations

import importlib
import inspect
import logging
import re

import pytest

import hf_mudsc
from hf_mudsc.options import MergeOptions


def public_functions() -> list[tuple[str, object]]:
    """Every function of `hf_mudsc.__all__` (classes and data carry their own documentation)."""
    return [(name, getattr(hf_mudsc, name)) for name in hf_mudsc.__all__
            if inspect.isfunction(getattr(hf_mudsc, name))]


@pytest.mark.parametrize(("name", "function"), public_functions(), ids=[name for name, _ in public_functions()])
def test_every_public_function_names_each_of_its_parameters_in_its_docstring(name, function):
    """`help(hf_mudsc.evaluate_merge)` said nothing of its image_column, text_column, progress and trust_remote_code
    keywords, and `help(hf_mudsc.from_pretrained)` nothing of token and allow_pickle: each parameter is named
    (`name` or `name:`) in the docstring, and each `Args:` entry names a real parameter."""
    doc = inspect.getdoc(function) or ""
    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    undocumented = [p.name for p in parameters if not re.search(rf"`{p.name}`|^ *(?:\w+, )*{p.name}(?:, \w+)*:", doc,
                                                                  flags=re.MULTILINE)]
    assert undocumented == [], f"{name}: {undocumented}"
    if "Args:" in doc:
        args = re.split(r"^(?:Returns|Raises|Yields):", doc.split("Args:", 1)[1], flags=re.MULTILINE)[0]
        entries = {each.strip() for line in re.findall(r"^ {4}([a-z_][a-z_, ]*):", args, flags=re.MULTILINE)
                   for each in line.split(",")}
        names = {p.name for p in inspect.signature(function).parameters.values()}
        assert entries <= names, f"{name}: {entries - names}"


@pytest.mark.parametrize("option", [name for name in MergeOptions.names(keyword=True)
                                    if isinstance(MergeOptions.option_field(name).metadata["choices"], tuple)])
def test_merge_docstring_names_every_value_a_choice_option_takes(option):
    """`help(hf_mudsc.merge)` listed out_dtype's values as "float32", "float16", "bfloat16" while the README, `--help`
    and the check take "float64" too: the docstring entry of every option with fixed choices names each one."""
    args = hf_mudsc.merge.__doc__.split("Args:", 1)[1].split("Returns:", 1)[0]
    entry = re.search(rf"^ {{8}}{option}:(.*?)(?=^ {{8}}[a-z_, ]+:|\Z)", args, flags=re.MULTILINE | re.DOTALL)
    assert entry is not None, option
    missing = [value for value in MergeOptions.option_field(option).metadata["choices"]
               if f'"{value}"' not in entry.group(1) and f"`{value}`" not in entry.group(1)]
    assert missing == [], f"{option}: {missing}"


def hub_bars_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hugging Face's bar switch on for one test, whatever the environment and earlier tests left: the variable unset
    (huggingface_hub read it at import: its constant too), and no `disable_progress_bars()` in force (one made
    under HF_HUB_DISABLE_PROGRESS_BARS=1 outlives its `enable_progress_bars()`, which that variable refuses)."""
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})


def test_the_hugging_face_switch_for_progress_bars_turns_off_hf_mudscs_bars_too(monkeypatch, capsys, caplog):
    """`HF_HUB_DISABLE_PROGRESS_BARS=1 python merge.py` (or `huggingface_hub.utils.disable_progress_bars()`, which
    transformers' `disable_progress_bar()` calls) on a terminal: transformers' and the Hub's bars were gone, but the
    calibration, solve and refit bars were still drawn; now they log their INFO lines instead, as in a log file."""
    from huggingface_hub import utils as hub_utils

    from hf_mudsc import progress

    monkeypatch.setattr(progress, "interactive", lambda: True)  # as on a terminal
    hub_bars_on(monkeypatch)
    with progress.Progress(desc="calibration", unit="samples", total=4) as bar:  # the switch on: a bar
        bar.update(4)
    assert "calibration: 100%" in capsys.readouterr().err
    hub_utils.disable_progress_bars()
    try:
        with caplog.at_level(logging.INFO, logger="hf_mudsc"):
            with progress.Progress(desc="calibration", unit="samples", total=4) as bar:
                bar.update(4)
    finally:
        hub_utils.enable_progress_bars()
    assert "%|" not in capsys.readouterr().err
    assert any("calibration" in record.getMessage() for record in caplog.records), caplog.records


def test_the_readme_says_how_a_python_user_sees_the_log_and_its_example_shows_it(tmp_path):
    """README: "The log, `config.mudsc["method_choice_reason"]` and the card say which and why" — but from Python
    `hf_mudsc.merge(...)` printed no INFO line and no document said how to see them (the library, like transformers,
    adds no handler). The README's `logging` example, run as printed, shows the method chosen and why."""
    import os
    import subprocess
    import sys

    from readme_examples import readme_example

    example = readme_example("logging")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("INFO:hf_mudsc.load.relation:parents: independent",
                 "INFO:hf_mudsc.pipeline:merged model_a, model_b with weight_matching"):
        assert line in example and re.search(rf"^{line}", result.stderr, flags=re.MULTILINE), result.stderr
    assert "%|" not in result.stderr  # progress=False: no bar, no line


def test_a_parent_object_built_in_memory_is_not_said_to_differ_from_a_checkpoint_named_after_its_class(caplog):
    """The README's logging example, `merge([ViTForImageClassification(config), ...])`, logged "the
    ViTForImageClassification object given as a parent does not hold the weights of 'ViTForImageClassification'":
    a model built in memory has no `name_or_path`, and its class name was looked up as a folder or Hub repo."""
    from factories import make_model

    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], method="weight_matching", progress=False)
    said = [record.getMessage() for record in caplog.records]
    assert not [line for line in said if "does not hold the weights" in line], said


def test_too_few_parents_is_refused_saying_how_many_were_given():
    """`hf_mudsc.merge([model])` said "merge takes a list of two or more parents ..., got list": the user did pass a
    list; the line now says it held one parent."""
    from factories import make_model

    with pytest.raises(hf_mudsc.MergeInputError) as refused:
        hf_mudsc.merge([make_model("vit_cls", 1)])
    assert "got a list of 1 parent" in str(refused.value) and "got list" not in str(refused.value)


def test_save_merged_of_a_model_merge_did_not_return_names_the_public_functions(tmp_path):
    """`hf_mudsc.save_merged(stock_model, ...)` said it writes "models returned by hf_mudsc.pipeline", a module no
    user calls: the line names `hf_mudsc.merge` / `hf_mudsc.from_pretrained`."""
    from factories import make_model

    with pytest.raises(ValueError, match="carries no merge recipe") as refused:
        hf_mudsc.save_merged(make_model("vit_cls", 1), tmp_path / "out")
    assert "hf_mudsc.merge" in str(refused.value) and "hf_mudsc.pipeline" not in str(refused.value)
    assert not (tmp_path / "out").exists()



def _subparsers() -> dict:
    import argparse

    from hf_mudsc.cli.main import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_no_help_shows_a_default_in_python_syntax(command):
    """`hf-mudsc demo --help` showed `--seeds A B ... (default: (0, 1))`: a Python tuple, which typed back
    (`--seeds (0, 1)`) is refused. Each default is shown as it is typed (`0 1`), and typed so it parses to itself."""
    parser = _subparsers()[command]
    text = " ".join(parser.format_help().split())
    assert not re.findall(r"\(default: [(\[][^)]*[)\]]", text)
    for action in parser._actions:
        if isinstance(action.default, (list, tuple)) and action.option_strings and action.nargs not in (0, None):
            shown = " ".join(map(str, action.default))
            flag_name = max(action.option_strings, key=len)
            assert f"(default: {shown})" in text, (flag_name, shown)
            parsed = getattr(parser.parse_known_args([flag_name, *shown.split()])[0], action.dest)
            assert list(parsed) == list(action.default), (flag_name, parsed)


def _attribute_docstrings(cls: type) -> set[str]:
    """The fields of `cls` documented by a string right after them (an attribute docstring, as Sphinx reads it)."""
    import ast
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {statement.target.id for statement, following in zip(body, body[1:])
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)}


@pytest.mark.parametrize("name", [name for name in hf_mudsc.__all__ if inspect.isclass(getattr(hf_mudsc, name))
                                  and __import__("dataclasses").is_dataclass(getattr(hf_mudsc, name))])
def test_every_field_and_method_of_a_public_class_is_documented(name):
    """`help(merged.merge_report)` listed `matches`, `refit`, `starts`, ... with no word on any (their meaning was in
    source comments only), and `EvaluationResult.score` / `to_dict` had no docstring: every field of a public class is
    named in its docstring or has an attribute docstring, and every public method or property has a docstring."""
    import dataclasses

    cls = getattr(hf_mudsc, name)
    doc = inspect.getdoc(cls) or ""
    undocumented = [f.name for f in dataclasses.fields(cls) if f.name not in _attribute_docstrings(cls)
                    and not re.search(rf"`{f.name}`|^ *(?:\w+, )*{f.name}(?:, \w+)*:", doc, flags=re.MULTILINE)]
    assert undocumented == [], f"{name}: {undocumented}"
    bare = [member for member, value in vars(cls).items() if not member.startswith("_")
            and (isinstance(value, (property, classmethod, staticmethod)) or inspect.isfunction(value))
            and not inspect.getdoc(getattr(cls, member))]
    assert bare == [], f"{name}: {bare}"


def test_the_readme_shell_commands_run_in_order_do_not_write_one_output_twice():
    """README's first command runs `hf-mudsc demo`; "Seeing a merge" then gave `hf-mudsc demo && hf-mudsc inspect
    hf-mudsc-demo`, whose demo is refused (its folder exists, no --overwrite), so `&&` never ran the inspect. A user
    running the README's commands in order writes each default output folder once."""
    import shlex

    from readme_examples import README, shell_lines

    commands = [shlex.split(command, comments=True) for line in shell_lines(README.read_text(encoding="utf-8"))
                if "hf-mudsc demo" in line for command in line.split("&&")]
    demos = [words for words in commands if words[:2] == ["hf-mudsc", "demo"]
             and not {"--output", "-o", "--overwrite"} & set(words)]
    assert len(demos) == 1, demos


def test_no_two_readme_commands_write_the_same_output_folder():
    """"Reproduce a merge from its recipe" wrote `--output rebuilt` twice in one block (and a third time below), and
    "Distributed calibration" `merged-vit` twice: run in order, the second is refused (the folder exists). Every
    `hf-mudsc merge` of the README writing a folder (no --dry-run, no --overwrite) names a folder of its own."""
    import shlex
    from collections import Counter

    from readme_examples import README, shell_lines

    outputs = []
    for line in shell_lines(README.read_text(encoding="utf-8")):
        if "hf-mudsc merge" not in line and "hf_mudsc merge" not in line:
            continue
        words = shlex.split(line, comments=True)
        if {"--dry-run", "--overwrite"} & set(words):
            continue
        outputs += [words[at + 1] for at, word in enumerate(words) if word in ("--output", "-o")]
    assert [name for name, count in Counter(outputs).items() if count > 1] == [], outputs


def test_the_readme_names_every_two_parent_method_where_it_says_which_methods_take_any_number():
    """README "N parents": "... `linear` and the same-base methods take any number ...; `average` merges two" — but
    `slerp`, a same-base method, refuses a third parent: the sentence names every method that takes two only."""
    from readme_examples import README

    from hf_mudsc.methods import METHODS

    text = " ".join(README.read_text(encoding="utf-8").split())
    sentence = text[text.index("**N parents, a base and the default method.**"):][:600]
    two_only = [name for name, method in METHODS.items() if method.num_parents == 2]
    said = re.search(r";((?: `\w+`,?)+(?: and `\w+`)?) merges? two", sentence)
    assert said is not None, sentence
    assert sorted(re.findall(r"`(\w+)`", said.group(1))) == sorted(two_only), said.group(0)


def test_hf_mudscs_bars_are_drawn_after_the_command_line_ran_in_the_same_process(tmp_path, monkeypatch, capsys):
    """`hf_mudsc.cli.main.main([...])` run in-process (a notebook, a test) switches Hugging Face's bars off for its
    own run (no terminal) and left them so; hf_mudsc's bars, which follow the user's switch, took that for the user's
    choice: a later merge on a terminal must still draw its bars."""
    import os

    from huggingface_hub import utils as hub_utils

    from hf_mudsc import progress
    from hf_mudsc.cli.main import LIBRARY_BAR_SWITCHES, main

    for name in LIBRARY_BAR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    hub_bars_on(monkeypatch)
    try:
        assert main(["inspect", str(tmp_path / "missing"), "--no-plots"]) != 0
        monkeypatch.setattr(progress, "interactive", lambda: True)
        capsys.readouterr()
        with progress.Progress(desc="calibration", unit="samples", total=4) as bar:
            bar.update(4)
        assert "calibration: 100%" in capsys.readouterr().err
    finally:
        hub_utils.enable_progress_bars()
        for name in LIBRARY_BAR_SWITCHES:
            os.environ.pop(name, None)


def test_a_method_auto_chose_without_its_data_names_the_flag_that_gives_it(tmp_path, capsys):
    """`hf-mudsc merge A B --output m` (parents of different seeds, no data) said "method 'auto' chose 'mudsc' ...,
    which needs calibration data ...; pass calibration, or merge without data: method='weight_matching' (CLI:
    --method)": the method's flag was named, the data's not (`--method mudsc` alone says "pass --calibration")."""
    from factories import make_model

    from hf_mudsc.cli.main import main

    for seed, name in ((1, "a"), (2, "b")):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "m")]) != 0
    err = capsys.readouterr().err
    assert "chose 'mudsc'" in err and "needs calibration data" in err and "(CLI: --calibration)" in err, err


@pytest.fixture
def logger_levels_kept():
    """The levels `main()` sets for its run (`configure_logging`), put back after the test."""
    from hf_mudsc.cli.main import HTTP_LOGGERS

    loggers = [logging.getLogger(name) for name in ("", "hf_mudsc", *HTTP_LOGGERS)]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def bar_drawn(capsys: pytest.CaptureFixture[str]) -> bool:
    """Whether an hf_mudsc progress bar drew itself (on a terminal, patched by the caller) rather than logging."""
    from hf_mudsc import progress

    capsys.readouterr()
    with progress.Progress(desc="calibration", unit="samples", total=4) as bar:
        bar.update(4)
    return "calibration: 100%" in capsys.readouterr().err


def test_the_users_own_bar_switch_still_works_after_the_command_line_ran_in_the_same_process(
        tmp_path, monkeypatch, capsys, logger_levels_kept):
    """`huggingface_hub.utils.disable_progress_bars(); main(["-q", "inspect", ...])` in one process: hf_mudsc drew
    its bars again afterwards and no later call of the switch turned them off (/tmp/review-docs/leak.py)."""
    from huggingface_hub import utils as hub_utils

    from hf_mudsc import progress
    from hf_mudsc.cli.main import LIBRARY_BAR_SWITCHES, main

    for name in LIBRARY_BAR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    hub_bars_on(monkeypatch)
    monkeypatch.setattr(progress, "interactive", lambda: True)  # as on a terminal or in a notebook
    hub_utils.disable_progress_bars()  # the user's own choice
    try:
        assert not bar_drawn(capsys)
        assert main(["-q", "inspect", str(tmp_path / "missing"), "--no-plots"]) != 0
        assert hub_utils.are_progress_bars_disabled()
        assert not bar_drawn(capsys)
        hub_utils.enable_progress_bars()
        assert bar_drawn(capsys)
        hub_utils.disable_progress_bars()
        assert not bar_drawn(capsys)
    finally:
        hub_utils.enable_progress_bars()


def test_a_command_line_run_in_process_leaves_the_libraries_bar_switches_as_it_found_them(
        tmp_path, monkeypatch, capsys, logger_levels_kept):
    """`main(["-q", "inspect", ...])` (or stderr no terminal) in a notebook left HF_HUB_DISABLE_PROGRESS_BARS=1 and
    HF_DATASETS_DISABLE_PROGRESS_BARS=1 in `os.environ` and the Hub's, transformers' and datasets' bars off."""
    import os

    import datasets
    import transformers
    from huggingface_hub import utils as hub_utils

    from hf_mudsc.cli.main import LIBRARY_BAR_SWITCHES, main

    for name in LIBRARY_BAR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    hub_bars_on(monkeypatch)
    monkeypatch.setattr(importlib.import_module("datasets.utils.tqdm"), "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(importlib.import_module("datasets.utils.tqdm"), "_hf_datasets_progress_bars_disabled", False)
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    try:
        for argv in (["-q"], []):  # -q; no terminal under pytest
            assert main([*argv, "inspect", str(tmp_path / "missing"), "--no-plots"]) != 0
            assert [name for name in LIBRARY_BAR_SWITCHES if name in os.environ] == []
            assert not hub_utils.are_progress_bars_disabled()
            assert transformers.utils.logging.is_progress_bar_enabled()
            assert datasets.is_progress_bar_enabled()
    finally:
        for name in LIBRARY_BAR_SWITCHES:
            os.environ.pop(name, None)
        if not transformers_on:  # as the environment had it (HF_HUB_DISABLE_PROGRESS_BARS=1: off)
            transformers.utils.logging.disable_progress_bar()


def test_transformers_imported_by_a_command_line_run_keeps_bars_off_under_the_users_variable(monkeypatch):
    """`HF_HUB_DISABLE_PROGRESS_BARS=1`, transformers first imported by an in-process `main(["-q", "merge", ...])`:
    putting the switches back turned transformers' bars on (read from the Hub's switch states, not its variable), so
    the next -q merge drew 'Loading weights' bars (tests/test_cli_verbosity.py failed under that variable)."""
    import warnings

    import transformers

    from hf_mudsc.cli.main import restore_library_bars

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)  # as huggingface_hub read it at import
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})
    monkeypatch.setattr(transformers.utils.logging, "_tqdm_active", True)  # put back after the test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Cannot enable progress bars" warning either
        restore_library_bars({}, None, None, {"HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                                "HF_DATASETS_DISABLE_PROGRESS_BARS": None})
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert hub_tqdm.progress_bar_states == {}
