"""Session 35, options: every place that reads a merge option (the CLI, a recipe, `hf_mudsc.merge`, the dry run)
refuses what the merge would refuse, in one line naming the option, before anything is loaded."""

from __future__ import annotations

import pytest
from cli_runs import run_cli, run_cli_output


@pytest.mark.parametrize("argv, named", [
    (["--alpha", "0.3", "--alpha", "0.7"], "--alpha"),
    (["--calibration", "X:train", "--calibration", "Y:train"], "--calibration"),
    (["--slerp-t", "0", "0.5", "1", "--slerp-t", "1"], "--slerp-t"),
    (["--weights", "1", "2", "--weights", "3", "4"], "--weights"),
    (["--rescale", "--no-rescale"], "--rescale"),
    (["-o", "out-a", "--output", "out-b"], "--output"),
    (["--alph", "0.3", "--alpha=0.7"], "--alpha"),
    (["--token", "hf_AAAAAAAAAAAAAAAAAAAAAAAAAA", "--token", "hf_BBBBBBBBBBBBBBBBBBBBBBBBBB"], "--token"),
])
def test_a_flag_given_twice_is_refused(argv, named, capsys, tmp_path, monkeypatch):
    """hf-mudsc merge A B --alpha 0.3 --alpha 0.7 --dry-run: argparse kept 0.7 silently."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["merge", "a", "b", *argv, "--dry-run"], capsys)
    assert code == 2
    assert len(lines) == 1, lines
    assert f"{named} " in lines[0] and "once" in lines[0], lines
    assert "hf_A" not in lines[0] and "hf_B" not in lines[0]


def test_flags_meant_to_repeat_still_repeat(capsys, tmp_path, monkeypatch):
    """hf-mudsc evaluate DIR -d a:test -d b:test --metric accuracy --metric f1: append flags keep every value."""
    from hf_mudsc.cli.main import build_parser

    args = build_parser(available=["evaluate"]).parse_args(
        ["-v", "-v", "evaluate", "dir", "-d", "a:test", "-d", "b:test", "--metric", "accuracy", "--metric", "f1"])
    assert args.dataset == ["a:test", "b:test"] and args.metric == ["accuracy", "f1"] and args.verbose == 2


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key, meant", [("alpah", "alpha"), ("batch-size", "batch_size"),
                                       ("calibraton", "calibration")])
def test_a_recipe_key_misspelt_names_the_closest_key(key, meant, tmp_path, capsys, monkeypatch):
    """hf-mudsc merge --recipe r.yaml (alpah: 0.3) --dry-run: the valid keys were listed, the one meant not named."""
    monkeypatch.chdir(tmp_path)
    _recipe(tmp_path, f"models: [org/a, org/b]\n{key}: 0.3\n")
    code, lines = run_cli(["merge", "--recipe", "r.yaml", "--dry-run"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"did you mean `{meant}`" in lines[0], lines


def test_a_recipe_key_far_from_any_names_none(tmp_path, capsys, monkeypatch):
    """hf-mudsc merge --recipe r.yaml (zzzz: 1): no guess is offered for a key close to none."""
    monkeypatch.chdir(tmp_path)
    _recipe(tmp_path, "models: [org/a, org/b]\nzzzz: 1\n")
    code, lines = run_cli(["merge", "--recipe", "r.yaml", "--dry-run"], capsys)
    assert code == 2 and "did you mean" not in lines[0] and "unknown key(s) ['zzzz']" in lines[0]


def test_a_service_job_key_misspelt_names_the_closest_key(tmp_path):
    """POST /api/jobs {"models": [...], "alpah": 0.3}: the 400 listed the valid keys, not the one meant."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.serve.jobs import check_job

    with pytest.raises(RecipeError, match="did you mean `alpha`"):
        check_job({"models": ["org/a", "org/b"], "alpah": 0.3, "output": "x"}, tmp_path)


def test_a_merge_keyword_misspelt_names_the_closest_option():
    """hf_mudsc.merge(["org/a", "org/b"], alpah=0.3): Python's TypeError named no option meant."""
    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    with pytest.raises(MergeInputError, match=r"did you mean `alpha`") as caught:
        hf_mudsc.merge(["org/a", "org/b"], alpah=0.3)
    assert isinstance(caught.value, TypeError)  # what Python raised before: callers catching it still do
    assert "\n" not in str(caught.value)


def test_a_misspelt_flag_names_the_closest_flag(tmp_path, capsys, monkeypatch):
    """hf-mudsc merge A B --alpah 0.3 --dry-run: `unrecognized arguments: --alpah 0.3`, nothing meant named."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["merge", "a", "b", "--alpah", "0.3", "--dry-run"], capsys)
    assert code == 2
    assert "--alpah" in lines[-1] and "did you mean --alpha" in lines[-1], lines


def test_a_flag_over_a_recipe_key_says_it_wins(tmp_path, capsys, monkeypatch, caplog):
    """hf-mudsc merge --recipe r.yaml (alpha: 0.3) --alpha 0.7 --dry-run: the flag won, and nothing said so."""
    import logging

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.merge import build_recipe

    monkeypatch.chdir(tmp_path)
    _recipe(tmp_path, "models: [org/a, org/b]\nalpha: 0.3\nseed: 4\nmethod: mudsc\ncalibration: org/ds:train\n")
    args = build_parser(available=["merge"]).parse_args(
        ["merge", "org/c", "org/d", "--recipe", "r.yaml", "--alpha", "0.7", "--seed", "4", "--batch-size", "8",
         "--dry-run"])
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        recipe = build_recipe(args)
    assert recipe.alpha == 0.7 and recipe.models == ["org/c", "org/d"]
    said = [r.getMessage() for r in caplog.records if "overrid" in r.getMessage()]
    assert len(said) == 1, said
    assert "--alpha 0.7" in said[0] and "alpha: 0.3" in said[0] and "models" in said[0]
    assert "--seed" not in said[0]  # the same value: nothing overridden
    assert "batch" not in said[0]  # not in the file: nothing overridden


@pytest.mark.parametrize("key", ["num_samples", "refit_samples"])
def test_all_in_a_recipe_says_null(key, tmp_path):
    """mudsc_recipe.yaml `num_samples: all` (the CLI's word, --num-samples all): refused without saying `null`."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    path = _recipe(tmp_path, f"models: [org/a, org/b]\ncalibration: org/ds:train\n{key}: all\n")
    with pytest.raises(RecipeError, match=rf"{key}: null") as caught:
        Recipe.load(path)
    assert "\n" not in str(caught.value)


def test_all_from_python_says_none():
    """hf_mudsc.merge(["org/a", "org/b"], num_samples="all"): refused without saying None."""
    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    with pytest.raises(MergeInputError, match=r"num_samples=None"):
        hf_mudsc.merge(["org/a", "org/b"], num_samples="all")


def test_a_recipe_alias_bomb_is_refused_fast_when_published(tmp_path):
    """hf-mudsc push DIR --allow-changed, its mudsc_recipe.yaml holding nested aliases (billion laughs) and a local
    parent: the published copy's check compared the 9**12 expanded values (hours), it is refused at once."""
    import time

    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import published_text

    lines = [f"models: [{tmp_path}, {tmp_path}]", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 13)]
    start = time.monotonic()
    with pytest.raises(RecipeError, match="not a recipe as hf-mudsc writes it"):
        published_text("\n".join(lines) + "\n")
    assert time.monotonic() - start < 5


def test_a_json_recipe_indented_with_tabs_reads_as_the_service_reads_it(tmp_path):
    """hf-mudsc merge --recipe r.json (json.dumps(indent='\\t')): `not valid YAML: found character '\\t'`, where a
    service job of the same text is read."""
    import json

    from hf_mudsc.publish.recipe import Recipe

    path = tmp_path / "r.json"
    path.write_text(json.dumps({"models": ["org/a", "org/b"], "alpha": 0.25, "method": "mudsc"}, indent="\t"))
    recipe = Recipe.load(path)
    assert recipe.models == ["org/a", "org/b"] and recipe.alpha == 0.25 and recipe.method == "mudsc"


def test_a_json_recipe_key_given_twice_is_refused(tmp_path):
    """r.json {"alpha": 0.3, "alpha": 0.7} indented with tabs: refused naming the key, as in YAML and a service job."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    path = tmp_path / "r.json"
    path.write_text('{\n\t"models": ["org/a", "org/b"],\n\t"alpha": 0.3,\n\t"alpha": 0.7\n}\n')
    with pytest.raises(RecipeError, match="'alpha' is given twice"):
        Recipe.load(path)


def test_inspect_reads_the_json_recipe_merge_runs(tmp_path, capsys, monkeypatch):
    """hf-mudsc inspect r.json: `neither a merged-model folder nor a recipe file (*.yaml)`, though `merge --recipe
    r.json` runs it: the plan of a recipe was refused."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text(json.dumps({"models": ["org/a", "org/b"]}))
    code, out, err = run_cli_output(["inspect", "r.json"], capsys)
    assert code == 0, err
    assert "would merge: org/a, org/b" in out


def test_a_parent_given_apart_from_the_others_is_named(tmp_path, capsys, monkeypatch):
    """hf-mudsc merge org/a --alpha 0.3 org/b --dry-run: `hf-mudsc: error: unrecognized arguments: org/b` under the
    top-level usage, as if org/b were no parent."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["merge", "org/a", "--alpha", "0.3", "org/b", "--dry-run"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("hf-mudsc merge: error:") and "org/b" in lines[0] and "together" in lines[0], lines


def test_an_empty_recipe_path_is_refused(tmp_path, capsys, monkeypatch):
    """hf-mudsc merge org/a org/b --recipe "$UNSET" --dry-run: the empty path read as no recipe, and the merge ran
    with the defaults instead of the recipe meant."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["merge", "org/a", "org/b", "--recipe", "", "--dry-run"], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--recipe" in lines[0] and "empty" in lines[0], lines
