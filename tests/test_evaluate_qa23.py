"""`hf-mudsc evaluate` after QA session 23: the model-index names the rows a cut figure scored (or no split), local
names only in the card, options checked before loading, folders hf-mudsc did not write left alone."""

from __future__ import annotations

import datasets
import pytest
import torch
from factories import make_model
from huggingface_hub import ModelCard, ModelCardData

from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.evaluate.tasks import TaskData, tasks_from_dataset
from hf_mudsc.publish.card import EvalRow, first_rows_split, set_eval_results, update_card_evaluation

pytestmark = pytest.mark.usefixtures("one_thread_module")

RANGES = {"pets": [0, 3], "cars": [3, 6]}


@pytest.fixture(scope="module")
def two_task_model():
    """A tiny ViT with a concatenated head of two 3-class tasks (no parents: the card rows are the merged model's)."""
    model = make_model("vit_cls", 3, num_labels=6)
    model.config.task_label_ranges = RANGES
    return model


def _model_index(rows) -> dict[str, tuple[str | None, str]]:
    """Task name -> (split, dataset name) of each model-index result, as the Hub reads the front matter back."""
    card = update_card_evaluation(ModelCard("---\nlicense: mit\n---\n# m\n"), rows, model_name="m")
    return {r.task_name: (r.dataset_split, r.dataset_name) for r in ModelCard(str(card)).data.eval_results}


# ------------------------------------------------ 1. the model-index names the rows a cut figure scored
def test_a_cut_figure_of_one_dataset_holding_every_task_names_no_false_split(two_task_model):
    """One dataset holding every task (rows 0-11 pets, 12-23 cars, joint label ids) and `num_samples=4`: cars scored
    ITS first 4 rows (dataset rows 12-15) but the model-index said `test[:4]` (pets' rows), and the joint row (8
    rows) said `test`. Neither is a slice of the split: no split, and the dataset's name says which rows."""
    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(24, 1, 16, 16).tolist(),
                                       "label": [i % 3 for i in range(12)] + [3 + i % 3 for i in range(12)]})
    tasks = tasks_from_dataset(data, list(RANGES), RANGES, name="joint_test", split="test", local=True)
    cut = evaluate_merge(two_task_model, None, tasks, num_samples=4, progress=False)
    index = _model_index(cut.card_rows())
    assert index["cars"] == (None, "joint_test (local folder), rows: first 4")
    assert index["pets"] == (None, "joint_test (local folder), rows: first 4")
    joint = next(name for name in index if name.startswith("joint"))
    assert index[joint] == (None, "joint_test (local folder), rows: first 4 + first 4")
    whole = _model_index(evaluate_merge(two_task_model, None, tasks, progress=False).card_rows())
    assert set(whole.values()) == {("test", "joint_test (local folder)")}  # every row: the whole split, unmarked


def test_a_cut_figure_of_data_without_a_split_says_so_in_the_model_index(two_task_model):
    """`--dataset ./test_a --num-samples 5` (a save_to_disk Dataset: no split): the model-index had no split and
    nothing saying only 5 of its rows were scored."""
    data = {task: TaskData((torch.randn(8, 1, 16, 16), [i % 3 for i in range(8)]), name=f"{task}_test", local=True)
            for task in RANGES}
    index = _model_index(evaluate_merge(two_task_model, None, data, num_samples=5, progress=False).card_rows())
    assert index["pets"] == (None, "pets_test (local folder), rows: first 5")
    whole = _model_index(evaluate_merge(two_task_model, None, data, progress=False).card_rows())
    assert whole["pets"] == (None, "pets_test (local folder)")


# ------------------------------------------------------ 2. a sliced split cut again is composed
@pytest.mark.parametrize(("split", "count", "expected"), [
    ("test", 5, "test[:5]"), ("test[5:15]", 5, "test[5:10]"), ("test[:10]", 5, "test[:5]"),
    ("test[10:]", 3, "test[10:13]"), ("test[-10:]", 4, "test[-10:-6]"), ("test[-10:]", 10, "test[-10:]"),
    ("test[:10%]", 5, None), ("test[10%:20%]", 5, None), ("train+test", 5, None),
    ("test[:10%](pct1_dropremainder)", 5, None)])
def test_the_first_rows_of_a_sliced_split_are_named_by_one_slice(split, count, expected):
    """`./imgf_a:test[5:15]` with `--num-samples 5` published `test[5:15][:5]`, which `datasets` refuses: the slices
    compose into one (`test[5:10]`); a percent slice cannot be composed without the split's size: no split."""
    assert first_rows_split(split, count) == expected
    row = EvalRow(task="pets", dataset="org/pets", merged=0.5, split=split, rows=f"first {count}")
    data = set_eval_results(ModelCardData(pipeline_tag="image-classification"), [row], model_name="m")
    result = data.eval_results[0]
    assert result.dataset_split == expected
    assert result.dataset_name == ("org/pets" if expected else f"org/pets, rows: first {count}")
    if expected is not None:
        from datasets import ReadInstruction

        ReadInstruction.from_spec(expected)  # a split string `datasets` reads


# ------------------------------------ 3, 7. results never written into a folder they do not belong to
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders with hf-mudsc's marker (a tiny ViT standing for a merge: the refusals come before any load), a
    plain save_pretrained fine-tune (no marker) and an existing data folder for `--dataset`."""
    from factories import vit_folder

    from hf_mudsc.publish.folder import record_files

    root = tmp_path_factory.mktemp("qa23_folders")
    for name in ("merged", "other"):
        vit_folder(root / name)
        (root / name / "eval_results.json").write_text('{"hf_mudsc_version": "0", "scores": {}}\n')
        record_files(root / name)
    vit_folder(root / "fine-tune")
    (root / "data").mkdir()
    return root


def _refused_before_loading(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI with every model load failing the test; (exit code, its one error line)."""
    import hf_mudsc.load.parents as parents
    from hf_mudsc.cli.main import main

    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    capsys.readouterr()
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO", "WARN"))]
    assert len(lines) == 1, lines
    return code, lines[0]


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def test_no_card_may_not_replace_the_folders_own_results_file_nor_another_merged_folders(folders, monkeypatch,
                                                                                         capsys):
    """`--no-card --output-json DIR/eval_results.json` replaced the folder's results file and left its card: the two
    then described different runs (and push uploads both); `--output-json OTHER/eval_results.json` wrote this model's
    scores into another merged folder. Both refused in one line, exit 2, before any model loads."""
    merged, other = folders / "merged", folders / "other"
    before = {folder: _snapshot(folder) for folder in (merged, other)}
    base = ["evaluate", str(merged), "--dataset", str(folders / "data"), "--no-parents"]
    code, line = _refused_before_loading(monkeypatch, capsys, [*base, "--no-card", "--output-json",
                                                               str(merged / "eval_results.json")])
    assert code == 2 and "the folder's own results file" in line and "--no-card" in line, line
    for inside in (merged / "scores.json", merged / "sub" / "scores.json"):  # any other file in it, too
        code, line = _refused_before_loading(monkeypatch, capsys, [*base, "--no-card", "--output-json", str(inside)])
        assert code == 2 and f"--output-json {str(inside)!r} is inside the evaluated folder" in line, line
        assert "--no-card leaves the folder as it is" in line, line
    assert not (merged / "sub").exists()
    for extra in (["--no-card"], []):
        code, line = _refused_before_loading(monkeypatch, capsys, [*base, *extra, "--output-json",
                                                                   str(other / "eval_results.json")])
        assert code == 2 and f"inside {str(other)!r}, another model folder hf-mudsc wrote" in line, line
    assert {folder: _snapshot(folder) for folder in (merged, other)} == before


def test_a_folder_hf_mudsc_did_not_write_gets_no_results_file(folders, monkeypatch, capsys):
    """Evaluating a plain fine-tune (save_pretrained, no marker) wrote `eval_results.json` into it. Refused before
    loading, asking for --no-card (the results then go only where --output-json names)."""
    folder = folders / "fine-tune"
    before = _snapshot(folder)
    code, line = _refused_before_loading(monkeypatch, capsys, ["evaluate", str(folder), "--dataset",
                                                               str(folders / "data"), "--no-parents"])
    assert code == 1 and "hf-mudsc did not write that folder" in line and "--no-card" in line, line
    assert _snapshot(folder) == before


# ------------------------------------------------------------- 4. a local metric is named by its name
SIDEFX = '''import datasets
import evaluate


class Sidefx(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="", citation="", features=datasets.Features(
            {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"sidefx": sum(p == r for p, r in zip(predictions, references)) / len(references)}
'''


def test_a_local_metric_is_named_by_its_folder_not_its_path(two_task_model, tmp_path):
    """`--metric /abs/metrics/sidefx --trust-remote-code`: the absolute path was the metric's name in the card's
    front matter (`metrics:`), the model-index (`type`, `name`) and the table. Results and card name it `sidefx`, as
    they name a local dataset; a local metric named like a shipped one, or two named alike, are refused."""
    from hf_mudsc.errors import EvaluationError
    from hf_mudsc.evaluate.names import check_metric_names

    folder = tmp_path / "metrics" / "sidefx"
    folder.mkdir(parents=True)
    (folder / "sidefx.py").write_text(SIDEFX)
    data = {task: (torch.randn(6, 1, 16, 16), [i % 3 for i in range(6)]) for task in RANGES}
    result = evaluate_merge(two_task_model, None, data, metrics=["accuracy", str(folder)], trust_remote_code=True,
                            progress=False)
    assert result.metrics == ["accuracy", "sidefx"]
    assert result.score("merged", "pets", "sidefx") == result.score("merged", "pets", "accuracy")
    card = str(update_card_evaluation(ModelCard("---\nlicense: mit\n---\n# m\n"), result.card_rows(), model_name="m"))
    assert str(tmp_path) not in card and "sidefx" in card
    assert {r.metric_type for r in ModelCard(card).data.eval_results} == {"accuracy", "sidefx"}
    (tmp_path / "f1").mkdir()
    with pytest.raises(EvaluationError, match="named like the shipped metric 'f1'"):
        check_metric_names([str(tmp_path / "f1")])
    (tmp_path / "other" / "sidefx").mkdir(parents=True)
    with pytest.raises(EvaluationError, match="both named 'sidefx'"):
        check_metric_names([str(folder), str(tmp_path / "other" / "sidefx")])


# ------------------------------------------------- 5. a CLIP prompt template is checked before anything loads
@pytest.mark.parametrize(("template", "said"), [("a {} in {}", "2 replacement field"),
                                                ("a {} of {style}", "{style}"), ("a photo", "none"),
                                                ("a {0}", "{0}"), ("a {} {", "not a format string")])
def test_a_prompt_template_without_exactly_one_field_is_refused_before_loading(folders, monkeypatch, capsys,
                                                                               template, said):
    """`--prompt-template "a {} in {}"` ended in an IndexError traceback (`{style}`: KeyError) after every model
    loaded, `"a photo"` was refused only then. One line, exit 2, before loading; the API raises EvaluationError before
    it loads a model."""
    from hf_mudsc.errors import EvaluationError

    code, line = _refused_before_loading(monkeypatch, capsys, [
        "evaluate", str(folders / "merged"), "--dataset", str(folders / "data"), "--prompt-template", template])
    assert code == 2 and line.count("--prompt-template") == 1 and said in line, line
    with pytest.raises(EvaluationError, match="prompt template"):
        evaluate_merge(str(folders / "absent"), None, {"pets": "unused"}, prompt_template=["a {}", template])


# ------------------------------------------------- 6. options that change nothing are refused
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP saved with save_pretrained (config read before any weight) and a 2-class image dataset."""
    from PIL import Image

    root = tmp_path_factory.mktemp("qa23_clip")
    make_model("clip", seed=0).save_pretrained(root / "clip")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (16, 16))] * 2, "label": [0, 1]},
                               features=features).save_to_disk(root / "pets")
    return root


def test_clip_options_that_change_nothing_are_refused(clip_folder, folders, monkeypatch, capsys):
    """`--class-names petz=...` on a CLIP scoring `pets` was dropped without a word; on a ViT classifier
    `--class-names` and `--prompt-template` were accepted and ignored. Both refused in one line, exit 2, before any
    weights load (the API: EvaluationError)."""
    from hf_mudsc.errors import EvaluationError

    code, line = _refused_before_loading(monkeypatch, capsys, [
        "evaluate", str(clip_folder / "clip"), "--dataset", f"pets={clip_folder / 'pets'}", "--no-card",
        "--class-names", "petz=lion,tiger"])
    assert code == 2 and "--class-names names task(s) petz, which no --dataset scores" in line and "pets" in line
    for flags, said in ((["--class-names", "vit-a=a,b,c"], "--class-names"),
                        (["--prompt-template", "x {}"], "--prompt-template")):
        code, line = _refused_before_loading(monkeypatch, capsys, [
            "evaluate", str(folders / "merged"), "--dataset", str(clip_folder / "pets"), "--no-parents", *flags])
        assert code == 2 and f"{said} make a CLIP model's zero-shot prompts and have no effect" in line, line
    data = {task: (torch.randn(4, 1, 16, 16), [0, 1, 2, 0]) for task in RANGES}
    with pytest.raises(EvaluationError, match="classifier head"):
        evaluate_merge(make_model("vit_cls", 3, num_labels=6), None, data, class_names={"pets": ["a", "b", "c"]},
                       progress=False)


# ------------------------------------------ 8. a merge that cannot be scored is refused from its config
@pytest.mark.parametrize("head", ["regression", "multi_label"])
def test_a_regression_or_multi_label_merge_is_refused_before_any_weights_load(folders, clip_folder, monkeypatch,
                                                                              capsys, tmp_path, head):
    """A merge of two regression parents (task ranges one wide) was refused only after the merged model and every
    parent were loaded; the config says it. The API (a folder) and the CLI refuse it before any load."""
    from hf_mudsc.errors import EvaluationError
    from hf_mudsc.publish.folder import record_files

    folder = tmp_path / head
    model = make_model("vit_cls", 0, num_labels=2 if head == "regression" else 6)
    if head == "regression":
        model.config.task_label_ranges, model.config.problem_type = {"a": [0, 1], "b": [1, 2]}, "regression"
    else:
        model.config.task_label_ranges, model.config.problem_type = RANGES, "multi_label_classification"
    model.save_pretrained(folder)
    record_files(folder)
    said = "regression head" if head == "regression" else "multi-label head"
    import hf_mudsc.load.parents as parents

    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(EvaluationError, match=said):
        evaluate_merge(str(folder), [str(folders / "merged")] * 2, ["unused", "unused"], progress=False)
    code, line = _refused_before_loading(monkeypatch, capsys, [
        "evaluate", str(folder), "--dataset", str(clip_folder / "pets"), "--dataset", str(clip_folder / "pets"),
        "--parents", str(folders / "merged"), str(folders / "other")])
    assert code == 1 and said in line and repr(str(folder)) in line, line


# ------------------------------------------------------------------ 9. evaluate takes --token
def test_evaluate_takes_a_token_for_its_hub_reads_and_never_shows_it(folders, clip_folder, monkeypatch, capsys):
    """The token refusal says "CLI: --token", but `hf-mudsc evaluate --token x` was `unrecognized arguments`.
    evaluate reads from the Hub (a model id, its recipe's parents, datasets), so it takes --token as merge and push
    do: handed to the loads, never printed."""
    import hf_mudsc.load.parents as parents
    from hf_mudsc.cli.main import main
    from hf_mudsc.errors import LoadError

    token = "hf_" + "Ab1" * 11
    given = []

    def load_parent(reference, *, token=None, **_):
        given.append(token)
        raise LoadError("not here")

    monkeypatch.setattr(parents, "load_parent", load_parent)
    capsys.readouterr()
    assert main(["evaluate", str(folders / "merged"), "--dataset", str(clip_folder / "pets"), "--no-parents",
                 "--token", token]) == 1
    captured = capsys.readouterr()
    assert given == [token] and "not here" in captured.err
    assert token not in captured.err + captured.out


def test_a_model_hf_mudsc_did_not_merge_is_not_called_merged(folders, tmp_path, capsys):
    """`evaluate FINE_TUNE --no-card --output-json r.json`: a plain fine-tune (no marker, no recipe) was scored and
    printed as `merged`. It is `model` in the table and the results; a folder a merge wrote stays `merged`."""
    import json

    from hf_mudsc.cli.main import main

    data = tmp_path / "pixels"
    datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 1, 16, 16).tolist(),
                                "label": [0, 1, 2, 0]}).save_to_disk(data)
    capsys.readouterr()
    assert main(["evaluate", str(folders / "fine-tune"), "--dataset", str(data), "--no-card", "--output-json",
                 str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| model |" in out and "| merged |" not in out, out
    assert json.loads((tmp_path / "r.json").read_text())["merged"] == ["model"]


@pytest.mark.parametrize("into", ["dataset", "parent"])
def test_output_json_inside_an_input_is_refused_before_loading(folders, monkeypatch, capsys, into):
    """QA s23 (hostile inputs): `--output-json DATA/results.json` (the evaluation data's folder) or `PARENT/x.json`
    (a folder given to --parents) was written into the input; merge and inspect refuse outputs inside inputs."""
    merged, data, parent = folders / "merged", folders / "data", folders / "fine-tune"
    target = (data if into == "dataset" else parent) / "results.json"
    before = {folder: _snapshot(folder) for folder in (data, parent)}
    code, line = _refused_before_loading(monkeypatch, capsys, [
        "evaluate", str(merged), "--dataset", str(data), "--parents", str(parent), str(folders / "other"),
        "--output-json", str(target)])
    assert code == 2 and f"--output-json {str(target)!r} is inside the" in line, line
    assert "inputs are never modified" in line, line
    assert {folder: _snapshot(folder) for folder in (data, parent)} == before and not target.exists()


def test_a_tilde_in_output_json_and_recipe_is_the_home_folder(folders, monkeypatch, capsys, tmp_path):
    """QA s23: `--output-json=~/r.json` (no shell expands `~` after `=`) created a folder literally named `~` in the
    working folder; `merge --recipe=~/x.yaml` looked for `./~/x.yaml`."""
    import argparse

    from hf_mudsc.cli.main import build_parser

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    parser = build_parser()
    evaluate_args = parser.parse_args(["evaluate", "m", "--dataset", "d", "--output-json=~/r.json"])
    merge_args = parser.parse_args(["merge", "--recipe=~/x.yaml"])
    assert isinstance(evaluate_args, argparse.Namespace)
    assert evaluate_args.output_json == str(home / "r.json") and merge_args.recipe == str(home / "x.yaml")
