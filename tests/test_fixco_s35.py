"""Session 35's card/options reviewer's findings: line breaks a reader needs kept, recipes told from other JSON files,
hints that blamed the wrong thing, one wording for duplicate keys, distinct chart names."""

from __future__ import annotations

import io
import logging

from hf_mudsc.load.references import EscapedControls


class Pipe:
    """A worker's end of the pipe as the scheduler reads it: the messages given, then closed."""

    def __init__(self, incoming: list[tuple]) -> None:
        self.incoming = list(incoming)

    def recv(self) -> tuple:
        if self.incoming:
            return self.incoming.pop(0)
        raise EOFError


def test_the_service_logs_a_failed_jobs_traceback_on_several_lines_with_its_controls_escaped(tmp_path):
    """`hf-mudsc serve`, a job failing: its log showed "job X failed:\\nTraceback...\\n  File" on one line."""
    from hf_mudsc.serve.scheduler import Running, Scheduler
    from hf_mudsc.serve.store import JobStore

    trace = ("Traceback (most recent call last):\n  File \"/srv/x.py\", line 3, in run\n    go()\n"
             "RuntimeError: label 'cat\x1b[2J\u202e'")
    store = JobStore(tmp_path / "state")
    job_id = store.add({"models": ["a/b", "c/d"]}, output=None, repo_id=None, dry_run=False, has_token=False)
    store.update(job_id, status="running")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapedControls())  # as `configure_logging` gives the service's stderr handler
    logger = logging.getLogger("hf_mudsc.serve.scheduler")
    logger.addHandler(handler)
    try:
        Scheduler(store)._copy_messages(job_id, Running(process=None, conn=Pipe([("traceback", logging.ERROR, trace)])))
    finally:
        logger.removeHandler(handler)
        store.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"job {job_id} failed:" and lines[1] == "Traceback (most recent call last):", lines
    assert lines[-1] == "RuntimeError: label 'cat\\x1b[2J\\u202e'", lines


def test_an_hf_mudsc_record_without_keep_lines_stays_one_line():
    """A label "cat\\nERROR forged" in an hf_mudsc log line must still not forge a line of its own."""
    record = logging.LogRecord("hf_mudsc.x", logging.INFO, __file__, 1, "label %s", ("cat\nERROR forged",), None)
    EscapedControls().filter(record)
    assert record.getMessage() == "label cat\\nERROR forged"


def test_an_adapters_list_of_spec_problems_prints_as_a_list_and_a_name_with_a_line_break_stays_escaped(
        monkeypatch, capsys):
    """`hf-mudsc merge`, an adapter spec misfitting: "does not fit the model:\\n  - group ..." printed on one line."""
    from hf_mudsc.cli import inspect as inspect_command
    from hf_mudsc.cli.main import main
    from hf_mudsc.errors import SpecError

    forged = "x.\nERROR forged"  # a parameter name, repr'd by the spec as every name is
    problems = ("group 'mlp': no parameter 'fc1.weight'", f"parameter {forged!r} is in no group")

    def refuse(args: object) -> int:
        raise SpecError("the vit permutation spec does not fit the model:\n  - " + "\n  - ".join(problems),
                        problems=problems)

    monkeypatch.setattr(inspect_command, "run", refuse)
    assert main(["inspect", "some-folder"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["hf-mudsc inspect: error: the vit permutation spec does not fit the model:",
                     "  - group 'mlp': no parameter 'fc1.weight'",
                     "  - parameter 'x.\\nERROR forged' is in no group"], lines


def test_an_error_naming_a_value_with_a_line_break_unquoted_stays_one_line(monkeypatch, capsys):
    """`hf-mudsc inspect` failing on a label "cat\\nERROR forged" named in its message must not forge a line."""
    from hf_mudsc.cli import inspect as inspect_command
    from hf_mudsc.cli.main import main

    def refuse(args: object) -> int:
        raise ValueError("label cat\nERROR forged is unknown")

    monkeypatch.setattr(inspect_command, "run", refuse)
    assert main(["inspect", "some-folder"]) == 1
    assert capsys.readouterr().err.splitlines() == ["hf-mudsc inspect: error: label cat\\nERROR forged is unknown"]


def merged_folder_files(tmp_path):
    """A folder holding what a merge writes beside the weights: config.json and eval_results.json."""
    import json

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8, "num_labels": 3,
        "torch_dtype": "float32", "seed": 0, "mudsc": {"method": "x"}}))
    (folder / "eval_results.json").write_text(json.dumps({"metrics": ["accuracy"], "tasks": ["t"], "scores": {}}))
    return folder


def test_inspect_given_a_merged_folders_config_json_names_the_folder_to_pass_not_a_recipes_unknown_keys(
        tmp_path, capsys):
    """`hf-mudsc inspect DIR/config.json` said "recipe ... has unknown key(s) [...] (did you mean ...)"."""
    from hf_mudsc.cli.main import main

    folder = merged_folder_files(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": {"vocab": {' + ", ".join(f'"w{i}": {i}' for i in range(99999))
                                           + "}}}")  # past a recipe's 1 MB
    (folder / "labels.json").write_text('["cat", "dog"]')
    for name in ("config.json", "eval_results.json", "tokenizer.json", "labels.json"):
        assert main(["inspect", str(folder / name)]) == 1
        err = capsys.readouterr().err
        assert "neither a merged-model folder nor a recipe file" in err, err
        assert f"hf-mudsc inspect {folder}" in err and "unknown key" not in err and "did you mean" not in err, err


def test_a_json_recipe_is_still_inspected_as_a_recipe(tmp_path, capsys):
    """`hf-mudsc inspect r.json` holding {"models": [...], "alpah": 0.3}: still the recipe's refusal, with its hint."""
    from hf_mudsc.cli.main import main

    recipe = tmp_path / "r.json"
    recipe.write_text('{"models": ["a/b", "c/d"], "alpah": 0.3}')
    assert main(["inspect", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['alpah'] (did you mean `alpha`?)" in err, err


def test_a_mapping_of_mostly_unknown_keys_gets_no_did_you_mean():
    """`hf-mudsc merge --recipe DIR/config.json`: "unknown key(s) [...] (did you mean: `seeds` -> `seed`, ...?)"."""
    import pytest

    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    with pytest.raises(RecipeError) as refused:
        Recipe.from_dict({"model_type": "vit", "seeds": 1, "architectures": [], "hidden_size": 3, "alpha": 0.5})
    assert "unknown key(s)" in str(refused.value) and "did you mean" not in str(refused.value), refused.value
    with pytest.raises(RecipeError) as typo:
        Recipe.from_dict({"models": ["a", "b"], "alpah": 0.5, "sed": 1, "alpha": 0.4, "seed": 3})
    assert "did you mean: `alpah` -> `alpha`, `sed` -> `seed`?" in str(typo.value), typo.value


def test_an_unknown_flags_value_is_not_blamed_as_a_stray_model(tmp_path, capsys):
    """`hf-mudsc merge A B -o x --frobnicate 3` said "a MODEL given apart from the others is not read"."""
    import pytest

    from hf_mudsc.cli.main import main

    with pytest.raises(SystemExit) as ended:
        main(["merge", "org/a", "org/b", "-o", str(tmp_path / "x"), "--frobnicate", "3"])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "unrecognized arguments: --frobnicate 3" in err, err
    assert "apart from the others" not in err, err
    with pytest.raises(SystemExit):  # a MODEL given apart, no unknown flag: the hint stays
        main(["merge", "org/a", "--alpha", "0.3", "org/b", "-o", str(tmp_path / "x")])
    assert "a MODEL given apart from the others is not read" in capsys.readouterr().err


def test_a_key_given_twice_is_refused_in_one_wording_in_json_and_yaml(tmp_path):
    """r.json {"alpha": 0.3, "alpha": 0.7}: "'r.json' is not valid JSON: key ...", worded unlike r.yaml's refusal."""
    import pytest

    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    said = {}
    for name, text in (("r.json", '{\n\t"models": ["a", "b"],\n\t"alpha": 0.3,\n\t"alpha": 0.7\n}\n'),
                       ("r.yaml", "models: [a, b]\nalpha: 0.3\nalpha: 0.7\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(RecipeError) as refused:
            Recipe.load(path)
        said[name] = str(refused.value)
    assert said["r.json"] == f"{str(tmp_path / 'r.json')!r}: key 'alpha' is given twice; give each key once"
    assert said["r.yaml"] == (f"{str(tmp_path / 'r.yaml')!r}: key 'alpha' is given twice (line 3, column 1); give "
                              "each key once")


def test_a_json_recipe_starting_with_a_byte_order_mark_is_read(tmp_path):
    """r.json saved by Notepad (UTF-8 BOM) and indented with tabs: "not valid YAML: found character '\\t'"."""
    from hf_mudsc.publish.recipe import Recipe

    path = tmp_path / "r.json"
    path.write_bytes(b'\xef\xbb\xbf{\n\t"models": ["org/a", "org/b"],\n\t"alpha": 0.25\n}\n')
    recipe = Recipe.load(path)
    assert recipe.models == ["org/a", "org/b"] and recipe.alpha == 0.25


def test_two_long_merged_model_names_alike_but_in_the_middle_stay_distinct_in_the_chart():
    """evaluate `vit-cars-pets-seed1-mudsc-final` and `...seed2...`: the chart drew both `vit-cars-pe…-mudsc-final`."""
    from hf_mudsc.evaluate.results import EvaluationResult
    from hf_mudsc.publish.plots import accuracy_figure, drawn_names

    merged = ["vit-cars-pets-seed1-mudsc-final", "vit-cars-pets-seed2-mudsc-final", "ab" * 40 + "1", "ab" * 40 + "2"]
    tasks = {name: {"dataset": "org/d", "split": "test"} for name in ("cars-and-pets-test-split-one",
                                                                      "cars-and-pets-test-split-two")}
    scores = {**{name: {task: {"accuracy": 0.5} for task in tasks} for name in merged},
              "parent_a": {task: {"accuracy": 0.9} for task in tasks}}
    axes = accuracy_figure(EvaluationResult(metrics=["accuracy"], tasks=tasks, scores=scores,
                                            merged=merged).to_dict()).axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    ticks = [label.get_text() for label in axes.get_xticklabels()]
    assert len(set(legend)) == len(legend) == 5 and len(set(ticks)) == len(ticks), (legend, ticks)
    assert max(map(len, legend + ticks)) <= 60, (legend, ticks)  # still cut: a long name cannot push the axes out
    assert drawn_names(["short", "vit-cars-pets-seed9-mudsc-final-and-more"]) == [
        "short", "vit-cars-pe…nal-and-more"]  # a cut name that collides with none keeps the usual cut


def test_the_recipe_override_line_writes_the_files_values_as_yaml(tmp_path, monkeypatch, caplog):
    """merge --recipe r.yaml (independent_heads: true) --no-independent-heads logged "over independent_heads: True"."""
    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.merge import build_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("models: [org/a, org/b]\nindependent_heads: true\nalpha: 0.3\nmethod: mudsc\n"
                                     "calibration: org/ds:train\nnum_samples: null\n")
    args = build_parser(available=["merge"]).parse_args(
        ["merge", "--recipe", "r.yaml", "--no-independent-heads", "--alpha", "0.5", "--num-samples", "64",
         "--dry-run"])
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        build_recipe(args)
    said = [r.getMessage() for r in caplog.records if "overrid" in r.getMessage()]
    assert len(said) == 1 and "--no-independent-heads over independent_heads: true;" in said[0], said
    assert "alpha: 0.3" in said[0] and "num_samples: null" in said[0] and "True" not in said[0], said
