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
                                  ["-d", "DATA", "--output-json", ""], ["-d", "DATA", "--label-column", ""]])
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


@pytest.mark.parametrize("flag", ["--task-column", "--label-column", "--output-json"])
def test_an_empty_evaluate_value_is_refused_by_its_flag_where_the_flag_is_accepted(merged, case, tmp_path,
                                                                                  monkeypatch, capsys, flag):
    """`hf-mudsc evaluate DIR -d a=DATA -d b=DATA --task-column " "` was not refused as empty (a single --dataset
    was refused for another reason)."""
    _, data = case
    monkeypatch.setattr("hf_mudsc.load.parents.load_parent", no_loading)
    code, err = run_cli(["evaluate", str(merged), "-d", f"task_0={data}", "-d", f"task_1={data}", flag, " ",
                         "--no-parents"], capsys)
    assert code == 2 and len(err) == 1 and flag in err[0] and "empty" in err[0], err


def test_an_empty_task_spec_is_refused_before_the_model_loads_unless_a_file_has_that_name(merged, case, tmp_path,
                                                                                          monkeypatch, capsys):
    """`hf-mudsc evaluate DIR -d "task_0=$UNSET"` loaded the model, then failed: "Couldn't reach 'task_0='", exit 1."""
    _, data = case
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["evaluate", str(merged), "-d", "task_0=", "--no-parents"], capsys)
    assert code == 2 and len(err) == 1 and "'task_0='" in err[0] and "empty" in err[0], err
    (tmp_path / "task_0=").mkdir()  # a folder of that very name: the spec names it (refused later for its content)
    code, err = run_cli(["evaluate", str(merged), "-d", "task_0=", "--no-parents"], capsys)
    assert not any("empty" in line for line in err), err


def in_memory_recipe(folder: Path, parents: list[str]) -> Path:
    """A recipe as a merge given its calibration data in memory writes it (no `calibration`, the note instead)."""
    from hf_mudsc.publish.recipe import IN_MEMORY_NOTE, Recipe

    path = Recipe(models=parents).save(folder / "mudsc_recipe.yaml", calibration_in_memory=True)
    assert IN_MEMORY_NOTE in path.read_text()
    return path


def test_inspect_of_an_in_memory_recipe_is_not_refused_for_a_folder_named_like_its_stand_in(case, tmp_path,
                                                                                            monkeypatch, capsys):
    """`cd folder-with-DATA/ && hf-mudsc inspect RECIPE` (data given in memory) said "calibration spec 'DATA' is
    ambiguous", exit 2."""
    from cli_runs import run_cli_output

    parents, _ = case
    recipe = in_memory_recipe(tmp_path, parents)
    (tmp_path / "DATA").mkdir()
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli_output(["inspect", str(recipe)], capsys)
    assert code == 0 and "ambiguous" not in err, err
    assert "given in memory" in out and "--calibration DATA" in out, out


def write_recipe_with_empty_column(folder: Path, parents: list[str], key: str) -> Path:
    """A recipe as a data-free merge given `--image-column ""` wrote it before such a value was refused."""
    from hf_mudsc.publish.recipe import Recipe

    path = Recipe(models=parents, method="linear").save(folder / "old_recipe.yaml")
    text = path.read_text()
    assert f"\n{key}: null\n" in text
    path.write_text(text.replace(f"\n{key}: null\n", f"\n{key}: ''\n"))
    return path


@pytest.mark.parametrize("key", ["image_column", "text_column"])
def test_a_recipe_recording_an_empty_column_is_refused_naming_the_file_and_the_key(case, tmp_path, capsys, key):
    """`hf-mudsc merge --recipe OLD.yaml -o OUT` (OLD.yaml: `image_column: ''`) said "leave --image-column out",
    a flag never passed, and did not name the file."""
    parents, _ = case
    recipe = write_recipe_with_empty_column(tmp_path, parents, key)
    for argv in (["merge", "--recipe", str(recipe), "-o", str(tmp_path / "out")], ["inspect", str(recipe)]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and len(err) == 1, err
        assert str(recipe) in err[0] and f"delete `{key}`" in err[0] and "leave" not in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_job_recording_an_empty_column_is_refused_naming_the_key(tmp_path):
    """POST a recipe with `image_column: ''` (a merge of an earlier release wrote it): "leave --image-column out"."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.serve.jobs import parse_job

    with pytest.raises(RecipeError, match="delete `image_column`") as refused:
        parse_job({"models": ["user/a", "user/b"], "method": "linear", "output": "m", "image_column": ""}, tmp_path)
    assert "--image-column" not in str(refused.value)


FAKE_SECRET = "Q7" * 17  # 34 characters, as a token's after its `hf_`


@pytest.mark.parametrize("tail", [f"hf_{FAKE_SECRET}.yaml", f"x/hf_{FAKE_SECRET}"])
def test_a_path_too_long_shows_nothing_of_a_token_it_holds(tmp_path, monkeypatch, capsys, tail):
    """`hf-mudsc inspect ./$(printf 'a%.0s' {1..300})/hf_<34 chars>.yaml` showed the 34 secret characters: the path
    was shortened to its last 40 characters before tokens were hidden, cutting off the `hf_` they are found by."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["inspect", f"./{LONG}/{tail}"], capsys)
    assert len(err) == 1 and "too long" in err[0], err
    assert FAKE_SECRET[:8] not in err[0] and FAKE_SECRET[-8:] not in err[0], err


def test_a_path_past_path_max_is_said_to_be_too_long_as_a_whole(tmp_path, monkeypatch, capsys):
    """`hf-mudsc inspect a/b/c/...` (5000 bytes, every name short) was told to use "a name of at most 255 bytes"."""
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["inspect", "/".join(["b" * 200] * 25)], capsys)
    assert code == 1 and len(err) == 1 and "whole path" in err[0] and "255" not in err[0], err


def test_a_path_too_long_names_the_second_path_of_an_error_when_that_is_the_long_one():
    """An OSError of a rename or link (`os.replace(short, LONG)`) named the short first path, not the long one."""
    import errno
    import os

    from hf_mudsc.cli.main import name_too_long

    long_path = f"/tmp/{LONG}-target"
    error = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "/tmp/short", None, long_path)
    line = name_too_long(error, "merge")
    assert line is not None and "-target" in line and "/tmp/short'" not in line, line


def test_holds_model_hides_only_a_name_too_long_not_every_os_error(tmp_path, monkeypatch):
    """An I/O error reading a folder (EIO, EACCES) was answered "holds no model" by `holds_model`, so hidden."""
    import errno

    from hf_mudsc.cli.inspect import holds_model

    def failing(self: Path) -> bool:
        raise OSError(errno.EIO, "Input/output error", str(self))

    monkeypatch.setattr(Path, "is_dir", failing)
    with pytest.raises(OSError):
        holds_model(tmp_path)
