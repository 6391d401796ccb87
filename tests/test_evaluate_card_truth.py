"""What `hf-mudsc evaluate` and the card say about the evaluation must be true: the data named as it is (never a
placeholder that reads like a Hub dataset id), one dataset per `model-index` result, no NaN published as a score,
every name from a config escaped in the solver table, and a pushed merge of local folders asking for `--parents`."""

from __future__ import annotations

import math
import re

import datasets
import evaluate
import numpy as np
import pytest
from factories import make_model
from huggingface_hub import ModelCard
from PIL import Image
from test_card import card_with_mudsc, markup_of
from test_card import merged as merged  # noqa: F401  (the card tests' merged model, a fixture)
from test_evaluation import MERGED_LOGITS, PARENT_A_LOGITS, PARENT_B_LOGITS, RANGES, table_model, table_tasks
from transformers import ViTImageProcessor

import hf_mudsc.evaluate.harness as harness
from hf_mudsc.cli.main import main
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.evaluate.metrics import compute_metric
from hf_mudsc.evaluate.results import EvaluationResult
from hf_mudsc.evaluate.tasks import TaskData, spec_task_data
from hf_mudsc.publish.card import render_card, update_card_evaluation
from hf_mudsc.publish.folder import record_files
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe, published_text

# A Hub repo id as the Hub accepts it (`name` or `org/name`): what a model-index dataset `type` is read as.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
BLANK_CARD = "---\nlibrary_name: transformers\n---\n\n# merged\n\n## Usage\n\nx\n"


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def table_models():
    merged = table_model(MERGED_LOGITS, ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"], RANGES)
    return merged, table_model(PARENT_A_LOGITS, ["a0", "a1"]), table_model(PARENT_B_LOGITS, ["b0", "b1", "b2"])


def _evaluation_table(text: str) -> list[list[str]]:
    """The card's Evaluation table, one list of cells per row (header and rule left out)."""
    section = text.split("## Evaluation\n\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in section]


# -------------------------------------------------------------- 1: data that is no Hub dataset says so
def test_in_memory_data_is_named_as_in_memory_not_by_a_placeholder(table_models):
    merged, parent_a, parent_b = table_models
    result = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), progress=False)
    for info in result.tasks.values():  # nothing is known of where tensors came from: no invented name or split
        assert info["dataset"] is None and info["split"] is None
    card = update_card_evaluation(BLANK_CARD, result.card_rows())
    index = ModelCard(str(card)).data.eval_results
    assert len(index) == 3
    for entry in index:
        assert entry.dataset_type not in ("dataset", "test") and not HUB_ID.match(entry.dataset_type), entry
        assert "in-memory" in entry.dataset_name and entry.dataset_split is None
    for row in _evaluation_table(card.text):
        assert row[1] == "in-memory data" and row[2] == "—", row


def test_a_named_in_memory_dataset_keeps_its_name_and_split(table_models):
    merged, parent_a, parent_b = table_models
    tasks = {task: TaskData(data, name="org/digits", split="validation") for task, data in table_tasks().items()}
    result = evaluate_merge(merged, [parent_a, parent_b], tasks, progress=False)
    index = ModelCard(str(update_card_evaluation(BLANK_CARD, result.card_rows()))).data.eval_results
    assert {(e.dataset_type, e.dataset_name, e.dataset_split) for e in index} == {
        ("org/digits", "org/digits", "validation")}


def _table_folder(path, ids: list[int], labels: list[int]):
    datasets.Dataset.from_dict({"pixel_values": [[float(i)] for i in ids], "label": labels}).save_to_disk(path)
    return path


def test_a_local_folder_is_named_by_its_folder_and_marked_local_in_the_model_index(table_models, tmp_path):
    merged, parent_a, parent_b = table_models
    tasks = {"alpha": str(_table_folder(tmp_path / "alpha-set", [0, 1, 2, 3], [0, 1, 1, 0])),
             "beta": str(_table_folder(tmp_path / "beta-set", [4, 5, 6], [2, 0, 1]))}
    result = evaluate_merge(merged, [parent_a, parent_b], tasks, progress=False)
    assert result.tasks["alpha"]["dataset"] == "alpha-set" and result.tasks["alpha"]["split"] is None
    card = update_card_evaluation(BLANK_CARD, result.card_rows())
    index = {e.task_name: e for e in ModelCard(str(card)).data.eval_results}
    for task in ("alpha", "beta"):
        entry = index[task]
        # the folder's name, labelled: a bare `alpha-set` would read as (and link to) a Hub dataset of that name
        assert not HUB_ID.match(entry.dataset_type) and f"{task}-set" in entry.dataset_type
        assert "local folder" in entry.dataset_name and entry.dataset_split is None
    assert str(tmp_path) not in card.content
    rows = {row[0]: row for row in _evaluation_table(card.text)}
    assert rows["alpha"][1:3] == ["alpha-set (local folder)", "—"]


def test_a_specs_dataset_config_reaches_the_model_index(table_models):
    """`org/glue:sst2:validation` was named `org/glue` with split `validation`: the config the rows came from was lost,
    so the model-index claimed the figures for the dataset's default config."""
    merged, parent_a, parent_b = table_models
    data = table_tasks()
    tasks = {"alpha": spec_task_data("org/glue:sst2:validation", data["alpha"]),
             "beta": spec_task_data("org/glue:mnli:validation", data["beta"])}
    result = evaluate_merge(merged, [parent_a, parent_b], tasks, progress=False)
    assert result.tasks["alpha"]["config"] == "sst2"
    index = ModelCard(str(update_card_evaluation(BLANK_CARD, result.card_rows()))).data.eval_results
    assert [(e.task_name, e.dataset_type, e.dataset_config, e.dataset_split) for e in index] == [
        ("alpha", "org/glue", "sst2 (alpha)", "validation"), ("beta", "org/glue", "mnli (beta)", "validation"),
        ("joint (all tasks)", "org/glue", "joint (all tasks)", "validation")]  # one dataset, two configs: none named


# ------------------------------------------------------------ 3: one dataset per model-index result
def test_a_joint_figure_over_several_datasets_stays_out_of_the_model_index(table_models):
    merged, parent_a, parent_b = table_models
    data = table_tasks()
    tasks = {"alpha": TaskData(data["alpha"], name="org/alpha", split="test"),
             "beta": TaskData(data["beta"], name="org/beta", split="test")}
    result = evaluate_merge(merged, [parent_a, parent_b], tasks, progress=False)
    card = update_card_evaluation(BLANK_CARD, result.card_rows())
    index = ModelCard(str(card)).data.eval_results
    assert [(e.task_name, e.dataset_type) for e in index] == [("alpha", "org/alpha"), ("beta", "org/beta")]
    joint = [row for row in _evaluation_table(card.text) if row[0].startswith("joint")]
    assert len(joint) == 1 and joint[0][1] == "org/alpha + org/beta"  # the table still shows it, and on what
    assert float(joint[0][-1].strip("*")) == pytest.approx(result.score("merged", "joint"), abs=5e-5)


def test_a_joint_figure_over_one_dataset_is_in_the_model_index_under_that_dataset(table_models):
    merged, parent_a, parent_b = table_models
    tasks = {task: TaskData(data, name="org/both", split="test") for task, data in table_tasks().items()}
    result = evaluate_merge(merged, [parent_a, parent_b], tasks, progress=False)
    index = ModelCard(str(update_card_evaluation(BLANK_CARD, result.card_rows()))).data.eval_results
    joint = [e for e in index if e.task_name.startswith("joint")]
    assert [(e.dataset_type, e.dataset_split) for e in joint] == [("org/both", "test")]
    assert joint[0].metric_value == pytest.approx(result.score("merged", "joint"))


# --------------------------------------------------------------------- 4: no NaN published as a score
class _Returns(evaluate.Metric):
    """A metric that returns `VALUE` whatever it is given."""

    VALUE: object = None

    def _info(self) -> evaluate.MetricInfo:
        features = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
        return evaluate.MetricInfo(description="", citation="", inputs_description="", features=features)

    def _compute(self, predictions, references):
        return {"odd": self.VALUE}


BAD_VALUES = [math.nan, math.inf, -math.inf, None, "0.9", [0.9], np.float64("nan")]


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_a_metric_value_that_is_no_finite_number_is_refused_in_one_line(value):
    module = type("Odd", (_Returns,), {"VALUE": value})(keep_in_memory=True)
    with pytest.raises(EvaluationError) as caught:
        compute_metric("odd", [0, 1], [0, 1], module=module)
    message = str(caught.value)
    assert "'odd'" in message and "finite number" in message and "\n" not in message


def test_evaluate_merge_refuses_a_nan_metric_naming_it_and_the_view(table_models, monkeypatch):
    merged, parent_a, parent_b = table_models
    shipped = harness.load_metric
    monkeypatch.setattr(harness, "load_metric", lambda name, **kw: type("Odd", (_Returns,), {"VALUE": math.nan})(
        keep_in_memory=True) if name == "odd" else shipped(name, **kw))
    with pytest.raises(EvaluationError, match=r"metric 'odd' returned nan .*not a finite number"):
        evaluate_merge(merged, [parent_a, parent_b], table_tasks(), metrics=["accuracy", "odd"], progress=False)


NAN_METRIC = '''
import datasets
import evaluate


class NanMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"nan_metric": float("nan")}
'''


def test_the_cli_writes_no_results_and_no_card_when_a_metric_returns_nan(tmp_path, capsys):
    model = tmp_path / "model"
    make_model("vit_cls", 1).save_pretrained(model)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(model)
    (model / RECIPE_FILENAME).write_text(Recipe(models=["org/a", "org/b"]).to_yaml())  # a card would be rendered
    record_files(model)  # a folder hf-mudsc wrote: one it did not is never written into
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(4)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0]}).cast_column(
        "image", datasets.Image()).save_to_disk(tmp_path / "evalset")
    metric = tmp_path / "nan_metric"
    metric.mkdir()
    (metric / "nan_metric.py").write_text(NAN_METRIC)
    before = sorted(p.name for p in model.iterdir())
    capsys.readouterr()  # the set-up's progress bars
    assert main(["evaluate", str(model), "--dataset", str(tmp_path / "evalset"), "--no-parents", "--metric",
                 "accuracy", "--metric", str(metric), "--trust-remote-code"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(metric) in err and "finite number" in err, err
    assert sorted(p.name for p in model.iterdir()) == before  # no eval_results.json, no README.md


@pytest.mark.parametrize("column", ["merged", "parent_a", "ensemble", "parent_c"])
def test_the_card_refuses_a_score_that_is_no_finite_number(column):
    row = {"task": "t", "dataset": "org/d", "merged": 0.5, "parent_a": 0.4, "parent_b": 0.3, column: math.nan}
    with pytest.raises(ValueError) as caught:
        update_card_evaluation(BLANK_CARD, [row])
    message = str(caught.value)
    assert column in message and "'t'" in message and "finite" in message and "\n" not in message


def test_a_results_file_holding_nan_does_not_reach_the_card():
    result = EvaluationResult(metrics=["accuracy"], tasks={"t": {"dataset": "org/d", "split": "test"}},
                              scores={"merged": {"t": {"accuracy": math.nan}, "joint": {"accuracy": 0.5}}})
    with pytest.raises(ValueError, match="finite"):
        update_card_evaluation(BLANK_CARD, result.card_rows())


# ------------------------------------------------------------------- 2: the solver table's cells
HOSTILE = "x|y\n## Usage\n<script>alert(1)</script> ``` `z`"


def test_start_names_and_the_parent_relation_stay_text_inside_their_cells(merged):  # noqa: F811
    card = card_with_mudsc(merged, start_objectives={HOSTILE: 0.25, "weight": 0.5}, solve_start=HOSTILE,
                           parent_relation={"relation": HOSTILE, "weight_distance": 0.125})
    markup = markup_of(card.text)
    assert "<script" not in markup
    assert re.findall(r"^## Usage", card.text, flags=re.MULTILINE) == ["## Usage"]  # the card's own only
    table = card.text.split("| Setting | Value |\n|---|---|\n")[1].split("\n\n")[0].splitlines()
    cells = {}
    for label in ("Solver sweeps", "Parent relation"):
        lines = [line for line in table if line.startswith(f"| {label} |")]
        assert len(lines) == 1, table
        assert lines[0].endswith(" |") and len(re.findall(r"(?<!\\)\|", lines[0])) == 3, lines[0]
        cells[label] = lines[0]
    assert "0.2500" in cells["Solver sweeps"] and "0.5000" in cells["Solver sweeps"]
    assert "0.125" in cells["Parent relation"]


# ------------------------------------------------ 5: a pushed merge of local folders needs --parents
def _published_merge(folder, parents: list[str]):
    """A tiny classifier saved as a merge whose recipe is the copy a push of local parents uploads."""
    make_model("vit_cls", 1).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    local = Recipe(models=parents).to_yaml()
    (folder / RECIPE_FILENAME).write_text(published_text(local))
    return folder


def _evalset(path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(4)]
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0]}).cast_column(
        "image", datasets.Image()).save_to_disk(path)
    return path


def _check_asks_for_parents(err: str, names: list[str]) -> None:
    """One error line (after any log lines), asking for --parents and naming each local parent."""
    errors = [line for line in err.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(errors) == 1 and errors[0].startswith("hf-mudsc evaluate: error: "), err
    err = errors[0]
    assert "--parents" in err and "folder name" in err and "cannot load" not in err, err
    for name in names:
        assert f"`{name}`" in err, err


def test_a_downloaded_merge_of_local_folders_asks_for_parents(tmp_path, capsys, monkeypatch):
    elsewhere = tmp_path / "merged-on-another-machine"
    elsewhere.mkdir()
    model = _published_merge(tmp_path / "downloaded", [str(elsewhere / "vit-a"), str(elsewhere / "vit-b")])
    data = _evalset(tmp_path / "evalset")
    monkeypatch.chdir(tmp_path)  # no folder named vit-a or vit-b here
    capsys.readouterr()  # the set-up's progress bars
    assert main(["evaluate", str(model), "--dataset", str(data), "--no-card"]) == 1
    _check_asks_for_parents(capsys.readouterr().err, ["vit-a", "vit-b"])
    assert not (model / "eval_results.json").exists()
    # Only the local parent is named when the other was a Hub model.
    model_b = _published_merge(tmp_path / "downloaded-b", [f"org/vit-a@{'a' * 40}", str(elsewhere / "vit-b")])
    capsys.readouterr()  # the set-up's progress bars (off only if an earlier in-process CLI run had left them off)
    assert main(["evaluate", str(model_b), "--dataset", str(data), "--no-card"]) == 1
    err = capsys.readouterr().err
    _check_asks_for_parents(err, ["vit-b"])
    assert "org/vit-a" not in err
    # --parents or --no-parents evaluate it.
    assert main(["evaluate", str(model), "--dataset", str(data), "--no-card", "--no-parents"]) == 0


def test_evaluate_of_a_hub_merge_of_local_folders_asks_for_parents(hub_cli, local_hub, tmp_path, monkeypatch):
    elsewhere = tmp_path / "merged-on-another-machine"
    elsewhere.mkdir()
    model = _published_merge(tmp_path / "upload", [str(elsewhere / "vit-a"), str(elsewhere / "vit-b")])
    local_hub.upload_folder("user/local-merge", model, "merged model")
    data = _evalset(tmp_path / "evalset")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    done = hub_cli("evaluate", "user/local-merge", "--dataset", str(data), token=None)  # in this process
    assert done.returncode == 1, done.stderr
    _check_asks_for_parents(done.stderr, ["vit-a", "vit-b"])
    assert "user/local-merge" in done.stderr and list(work.iterdir()) == []


def test_a_parents_revision_stays_one_code_span_inside_its_cell(merged):  # noqa: F811
    """A recipe may name a parent `org/name@REVISION` with any text after the `@` (a downloaded recipe, or one
    written by hand): the Parents table showed it between single backticks, unescaped."""
    revision = "v`1|x\n## Usage <script>"
    card = ModelCard(str(render_card(merged, Recipe(models=[f"org/vit-a@{revision}", "org/vit-b"], calibration="c"))))
    table = card.text.split("| | Model | Revision |\n|---|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert len(table) == 2 and all(len(re.findall(r"(?<!\\)\|", line)) == 4 for line in table), table
    assert re.findall(r"^## Usage", card.text, flags=re.MULTILINE) == ["## Usage"]
    assert "<script" not in markup_of("\n".join(table))  # a code span's text


def test_an_unknown_method_name_or_version_in_the_config_adds_no_heading_or_markup(merged):  # noqa: F811
    """A card rendered from a folder's config (evaluate without a README) read `method` and `version` from it and put
    them on the page as they were: the intro and the closing line gained a heading and HTML."""
    card = card_with_mudsc(merged, method=HOSTILE, version=HOSTILE)
    assert re.findall(r"^## Usage", card.text, flags=re.MULTILINE) == ["## Usage"]
    assert not re.search(r"^<script", card.text, flags=re.MULTILINE)
    prose = [line for line in card.text.splitlines() if "hf_mudsc" in line and not line.startswith(("```", "pip"))]
    assert prose and all("<script" not in markup_of(line) for line in prose), prose


# ------------------------------------------------ 6: the card's accuracy chart shows the card's results
def test_evaluating_a_folder_again_redraws_its_accuracy_chart_from_the_new_results(tmp_path, capsys):
    """The demo's folder (and one `inspect` drew into) links `plots/accuracy.png` from its card: `evaluate` replaced
    the card's Evaluation table and eval_results.json but left the chart drawn from the earlier results, so the card
    showed two sets of figures. The chart is redrawn, and the folder stays hf-mudsc's own (push, --overwrite)."""
    from hf_mudsc.publish.folder import unlisted_files

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed in (1, 2):
        make_model("vit_cls", seed).save_pretrained(tmp_path / f"vit-{seed}")
        processor.save_pretrained(tmp_path / f"vit-{seed}")
    merged = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "vit-1"), str(tmp_path / "vit-2"), "--method", "linear",
                 "--output", str(merged)]) == 0
    rng = np.random.default_rng(0)
    for name, labels in (("first", [0, 1, 2, 0, 1, 2]), ("second", [2, 2, 2, 1, 1, 0])):
        images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in labels]
        datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column(
            "image", datasets.Image()).save_to_disk(tmp_path / name)
    assert main(["evaluate", str(merged), "--dataset", str(tmp_path / "first")]) == 0
    assert main(["inspect", str(merged)]) == 0  # draws plots/accuracy.png into the folder, as the demo does
    first_chart = (merged / "plots" / "accuracy.png").read_bytes()

    assert main(["evaluate", str(merged), "--dataset", str(tmp_path / "second")]) == 0
    assert main(["inspect", str(merged), "--output", str(tmp_path / "fresh")]) == 0  # drawn from the new results
    fresh = (tmp_path / "fresh" / "accuracy.png").read_bytes()
    assert fresh != first_chart
    assert (merged / "plots" / "accuracy.png").read_bytes() == fresh
    assert unlisted_files(merged, check_content=True) == ([], [])
