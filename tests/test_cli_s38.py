"""Session 38's hunt of the CLI and recipes: option agreement, recipes, errors before heavy work, inspect/demo flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import run_cli
from factories import vit_cli_case

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> tuple[list[str], str]:
    """Two tiny ViT parent folders and a saved calibration dataset (`factories.vit_cli_case`)."""
    return vit_cli_case(tmp_path_factory.mktemp("case"))


def no_loading(*args: object, **kwargs: object) -> None:
    raise AssertionError("the parents were located or loaded before the refusal")


@pytest.mark.parametrize("spec", ["", "data:config:split:extra", "data:", "org/ds@:train"])
def test_a_malformed_calibration_spec_is_refused_before_any_parent_is_read(case, tmp_path, monkeypatch, capsys,
                                                                            spec):
    """`hf-mudsc merge A B -o OUT --calibration 'a:b:c:d'` read the parents' configs (or the Hub) first, exit 1."""
    parents, _ = case
    monkeypatch.setattr("hf_mudsc.load.parents.load_parents_and_base", no_loading)
    code, err = run_cli(["merge", *parents, "-o", str(tmp_path / "out"), "--calibration", spec], capsys)
    assert code == 2 and len(err) == 1 and "calibration spec" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value"), [("--image-column", ""), ("--image-column", " "), ("--text-column", "")])
def test_an_empty_column_name_is_refused_before_any_parent_is_read(case, tmp_path, monkeypatch, capsys, flag, value):
    """`hf-mudsc merge A B --calibration D --image-column "" -o OUT` opened the parents and the data first, exit 1."""
    parents, calibration = case
    monkeypatch.setattr("hf_mudsc.load.parents.load_parents_and_base", no_loading)
    code, err = run_cli(["merge", *parents, "-o", str(tmp_path / "out"), "--calibration", calibration, flag, value],
                        capsys)
    assert code == 2 and len(err) == 1 and flag in err[0] and "empty" in err[0], err


def test_an_empty_output_is_refused_not_ignored_beside_a_push(case, monkeypatch, capsys):
    """`hf-mudsc merge A B -o "$UNSET" --push-to-hub org/x` dropped --output silently and went on to push only."""
    parents, _ = case
    monkeypatch.setattr("hf_mudsc.load.parents.load_parents_and_base", no_loading)
    monkeypatch.setattr("hf_mudsc.publish.hub.check_target", no_loading)
    for given in ([], ["--push-to-hub", "org/merged"]):
        code, err = run_cli(["merge", *parents, "--method", "linear", "-o", "", *given], capsys)
        assert code == 2 and len(err) == 1 and "--output" in err[0] and "empty" in err[0], err


def test_a_batch_size_without_calibration_data_is_said_to_have_no_effect(case, tmp_path, capsys):
    """`hf-mudsc merge A B --method linear --batch-size 8 -o OUT` ignored --batch-size without a word (--num-samples
    warned)."""
    import json

    parents, _ = case
    out = tmp_path / "out"
    code, _ = run_cli(["merge", *parents, "--method", "linear", "--batch-size", "8", "-o", str(out)], capsys)
    warnings = json.loads((out / "config.json").read_text())["mudsc"]["warnings"]
    assert code == 0 and any("--batch-size" in text and "no effect" in text for text in warnings), warnings


@pytest.fixture(scope="module")
def merged(case, tmp_path_factory) -> Path:
    """A data-free merge of the two parents, written by the CLI."""
    from hf_mudsc.cli.main import main

    parents, _ = case
    out = tmp_path_factory.mktemp("merged") / "out"
    assert main(["merge", *parents, "--method", "linear", "-o", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("argv", [["-d", "a:b:c:d"], ["-d", ""], ["-d", "org/ds@:train"], ["-d", "DATA:"],
                                  ["-d", "DATA", "--output-json", ""], ["-d", "DATA", "--label-column", ""],
                                  ["-d", "DATA", "--task-column", " "]])
def test_evaluate_refuses_a_malformed_spec_or_an_empty_value_before_loading_the_model(merged, case, monkeypatch,
                                                                                     capsys, argv):
    """`hf-mudsc evaluate DIR -d 'a:b:c:d'` loaded the merged model (from the Hub too) before refusing, exit 1;
    `--output-json ""` was dropped silently."""
    _, data = case
    monkeypatch.setattr("hf_mudsc.load.parents.load_parent", no_loading)
    argv = [value.replace("DATA", data) for value in argv]
    code, err = run_cli(["evaluate", str(merged), *argv, "--no-parents"], capsys)
    assert code == 2 and len(err) == 1 and "--" in err[0], err



@pytest.mark.parametrize("name", ["a" * 300, "a" * 300 + "/plots"], ids=["long", "under-long"])
def test_inspect_refuses_an_output_name_too_long_in_one_line(merged, tmp_path, monkeypatch, capsys, name):
    """`hf-mudsc inspect DIR -o $(printf 'a%.0s' {1..300})` ended in a traceback (OSError: File name too long)."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["inspect", str(merged), "-o", name], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("hf-mudsc inspect: error: --output"), err
    assert list(tmp_path.iterdir()) == []


LONG = "a" * 300  # one name past the usual 255-byte limit


@pytest.mark.parametrize("argv", [["inspect", LONG], ["inspect", f"{LONG}.yaml"],
                                  ["merge", f"./{LONG}", "PARENT", "-o", "out"],
                                  ["merge", "--recipe", f"{LONG}.yaml", "-o", "out"],
                                  ["merge", "PARENT", "PARENT", "--method", "ties", "--base", f"./{LONG}", "-o", "out"],
                                  ["evaluate", f"./{LONG}", "-d", "DATA"],
                                  ["evaluate", "MERGED", "-d", "DATA", "--parents", f"./{LONG}", "PARENT"],
                                  ["push", f"./{LONG}", "org/name"]],
                         ids=["inspect", "inspect-recipe", "merge-parent", "merge-recipe", "merge-base", "evaluate",
                              "evaluate-parents", "push"])
def test_a_path_too_long_for_the_system_is_one_line_not_a_traceback(case, merged, tmp_path, monkeypatch, capsys,
                                                                    argv):
    """`hf-mudsc inspect $(printf 'a%.0s' {1..300})` (and merge's parents, --recipe, --base, evaluate's DIR and
    --parents, push's folder) ended in a traceback: OSError [Errno 36] File name too long."""
    parents, data = case
    argv = [{"PARENT": parents[0], "DATA": data, "MERGED": str(merged)}.get(value, value) for value in argv]
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv, capsys)
    assert code in (1, 2) and len(err) == 1 and err[0].startswith(f"hf-mudsc {argv[0]}: error: "), err
    assert "too long" in err[0] and LONG not in err[0], err


def test_an_empty_parent_on_the_command_line_gets_no_yaml_advice(case, tmp_path, capsys):
    """`hf-mudsc merge "$UNSET" A -o OUT` said "quote a name YAML reads as something else (`'yes'`, `'null'`)"."""
    parents, _ = case
    code, err = run_cli(["merge", "", parents[0], "--method", "linear", "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "YAML" not in err[0] and "empty" in err[0], err
