"""The model card: front matter that the Hub's own parser reads back, and a body that documents the merge."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import yaml
from factories import make_batches, make_model
from huggingface_hub import ModelCard

import hf_mudsc
from hf_mudsc.publish.card import (
    EvalRow,
    ParentInfo,
    calibration_dataset_id,
    pipeline_tag_for,
    render_card,
    template_path,
)
from hf_mudsc.publish.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
SHA_A, SHA_B = "a" * 40, "b" * 40


def _labelled(seed: int, labels: list[str]):
    model = make_model("vit_cls", seed)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config._name_or_path = f"org/vit-{'ab'[seed - 1]}"
    return model


@pytest.fixture(scope="module")
def merged():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a busy machine
    try:
        return hf_mudsc.merge([_labelled(1, ["zero", "one", "two"]), _labelled(2, ["cat", "dog", "eel"])],
                              make_batches("vit_cls", num_batches=2), progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def recipe():
    return Recipe(models=[f"org/vit-a@{SHA_A}", f"org/vit-b@{SHA_B}"], calibration="org/calib-images:train",
                  num_samples=32, push_to_hub="org/merged")


PARENTS = [ParentInfo("org/vit-a", "org/vit-a", None, SHA_A),
           ParentInfo("org/vit-b@v2", "org/vit-b", "v2", SHA_B)]


def markup_of(text: str) -> str:
    """`text` without its code spans: a code span shows its text literally, so only the rest can be markup."""
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", text)


def card_with_mudsc(merged, **entries) -> ModelCard:
    """The merge card of `merged` rendered with these `config.mudsc` entries replaced (restored afterwards)."""
    saved = dict(merged.config.mudsc)
    merged.config.mudsc = {**saved, **entries}
    try:
        return ModelCard(str(render_card(merged, Recipe(models=["org/vit-a", "org/vit-b"], calibration="c"),
                                         parents=PARENTS)))
    finally:
        merged.config.mudsc = saved


def test_front_matter_parses_back_with_the_hub_library(merged, recipe):
    card = ModelCard(str(render_card(merged, recipe, parents=PARENTS)))
    data = card.data
    assert data.library_name == "transformers"
    assert data.base_model == ["org/vit-a", "org/vit-b"]
    assert data.base_model_relation == "merge"
    assert data.pipeline_tag == "image-classification"
    assert {"merge", "mudsc", "model-merging", "image-classification", "vit"} <= set(data.tags)
    assert data.datasets == ["org/calib-images"]
    assert data.eval_results is None and "model-index" not in card.content.split("---")[1]


def test_calibration_data_the_merge_did_not_read_is_not_listed_as_its_dataset(merged, recipe):
    """QA s20 left it: a Hub dataset given to a merge that read none of it (`linear`, no refit) stayed in the front
    matter's `datasets` (the Hub shows it as data the model was built from) while the body said "given, not read"."""
    saved = dict(merged.config.mudsc)
    merged.config.mudsc = {**saved, "num_calibration_samples": 0}
    try:
        card = ModelCard(str(render_card(merged, recipe, parents=PARENTS)))
    finally:
        merged.config.mudsc = saved
    assert card.data.datasets is None
    row = next(line for line in card.content.splitlines() if line.startswith("| Calibration data |"))
    assert "org/calib-images" in row and "not read" in row, row


def test_body_documents_parents_method_settings_match_quality_and_recipe(merged, recipe):
    content = str(render_card(merged, recipe, parents=PARENTS))
    assert "[org/vit-a](https://huggingface.co/org/vit-a)" in content
    assert f"(https://huggingface.co/org/vit-b/tree/{SHA_B})" in content and f"`{SHA_B[:10]}`" in content
    paper = "([paper](https://arxiv.org/abs/2403.01753))"
    assert f"MuDSC (merging under dual-space constraints)** {paper}" in content
    assert "| Balance factor α (weight share) | 0.5 |" in content
    assert "| Matcher | zip |" in content
    samples = merged.config.mudsc["num_calibration_samples"]
    assert samples == 32 and f"| Calibration samples | {samples} |" in content
    for name, value in merged.config.mudsc["group_match_values"].items():
        assert f"| `{name}` | {value:.4f} |" in content
    assert "| vit-a | 0 – 2 |" in content and "| vit-b | 3 – 5 |" in content
    assert 'AutoModelForImageClassification.from_pretrained("org/merged")' in content
    assert f"hf_mudsc {hf_mudsc.__version__}" in content
    block = re.search(r"```yaml\n(.*?)```", content, re.S).group(1)
    assert Recipe.from_dict(yaml.safe_load(block)) == Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))
    assert "push_to_hub" not in block  # the written recipe leaves destinations out


def test_parents_default_to_the_recipe_and_local_folders_are_not_base_models(merged, tmp_path):
    local = tmp_path / "vit-local"
    local.mkdir()
    recipe = Recipe(models=[f"org/vit-a@{SHA_A}", str(local)], calibration=str(tmp_path))
    card = render_card(merged, recipe)
    assert card.data.base_model == ["org/vit-a"]
    assert card.data.datasets is None  # a local calibration folder is no Hub dataset
    assert f"/org/vit-a/tree/{SHA_A}" in card.content
    assert "| B | `vit-local` (local folder) | — |" in card.content
    only_local = render_card(merged, Recipe(models=[str(local), str(local)], calibration="c"))
    assert only_local.data.base_model is None and "base_model_relation" not in only_local.content


def test_evaluation_results_fill_the_model_index_and_the_table(merged, recipe):
    rows = [
        {"task": "vit-a", "dataset": "org/digits", "merged": 0.91, "parent_a": 0.97, "parent_b": 0.12,
         "ensemble": 0.94},
        EvalRow(task="joint", dataset="org/digits", merged=0.8, split="validation"),
    ]
    card = ModelCard(str(render_card(merged, recipe, parents=PARENTS, eval_results=rows)))
    results = card.data.eval_results
    got = [(r.task_name, r.dataset_type, r.dataset_config, r.metric_type, r.metric_value, r.dataset_split)
           for r in results]
    assert got == [
        ("vit-a", "org/digits", "vit-a", "accuracy", 0.91, "test"),
        ("joint", "org/digits", "joint", "accuracy", 0.8, "validation"),
    ]
    assert all(r.task_type == "image-classification" for r in results)
    assert card.data.model_name == "org/merged"
    # `datasets` lists what the model was built from (the Hub: "datasets used to train this model"): the calibration
    # data, not the evaluation data, which the model-index names (and the Hub links from there).
    assert card.data.datasets == ["org/calib-images"]
    assert "| vit-a | org/digits | test | accuracy | 0.9700 | 0.1200 | 0.9400 | **0.9100** |" in card.content
    assert "| joint | org/digits | validation | accuracy | — | — | — | **0.8000** |" in card.content
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['acc'\]"):
        render_card(merged, recipe, eval_results=[{"task": "t", "dataset": "d", "merged": 1.0, "acc": 1}])


def test_every_task_keeps_its_own_model_index_entry_through_the_dataset_config(merged, recipe):
    """The Hub groups model-index results by (task type, dataset, config, split) and keeps one task name per
    group: the card puts each row's task into the config, so tasks sharing a dataset and split stay apart."""
    rows = [
        {"task": "digits-0-4", "dataset": "org/digits", "merged": 0.9},
        {"task": "digits-0-4", "dataset": "org/digits", "metric": "f1", "merged": 0.85},
        {"task": "digits-5-9", "dataset": "org/digits", "merged": 0.7},
        {"task": "joint (all tasks)", "dataset": "org/digits", "merged": 0.6},
        {"task": "topic", "dataset": "glue", "dataset_config": "sst2", "merged": 0.5},
        {"task": "intent", "dataset": "glue", "dataset_config": "intent", "merged": 0.4},
    ]
    text = str(render_card(merged, recipe, parents=PARENTS, eval_results=rows))
    card = ModelCard(text)  # the Hub library parses (and validates) the front matter back
    got = {(r.task_name, r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {
        ("digits-0-4", "digits-0-4", "accuracy"): 0.9,
        ("digits-0-4", "digits-0-4", "f1"): 0.85,
        ("digits-5-9", "digits-5-9", "accuracy"): 0.7,
        ("joint (all tasks)", "joint (all tasks)", "accuracy"): 0.6,
        ("topic", "sst2 (topic)", "accuracy"): 0.5,
        ("intent", "intent", "accuracy"): 0.4,  # a config equal to the task name is not repeated
    }
    results = yaml.safe_load(text.split("---")[1])["model-index"][0]["results"]
    assert [(r["task"]["name"], r["dataset"]["config"], [m["type"] for m in r["metrics"]]) for r in results] == [
        ("digits-0-4", "digits-0-4", ["accuracy", "f1"]),  # one task's metrics share one entry
        ("digits-5-9", "digits-5-9", ["accuracy"]),
        ("joint (all tasks)", "joint (all tasks)", ["accuracy"]),
        ("topic", "sst2 (topic)", ["accuracy"]),
        ("intent", "intent", ["accuracy"]),
    ]
    assert EvalRow(task="t", dataset="d", merged=1.0).model_index_config == "t"


def test_a_token_given_to_the_cli_reaches_neither_recipe_nor_card(merged, monkeypatch):
    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.merge import build_recipe

    secret = "hf_secretCardTokenShouldNeverAppear"
    monkeypatch.setenv("HF_TOKEN", secret)
    args = build_parser().parse_args(["merge", "org/a", "org/b", "--calibration", "org/c:train", "--token",
                                      secret, "--push-to-hub", "org/m", "--output", "o"])
    recipe = build_recipe(args)
    assert secret not in recipe.to_yaml(reproducible=False)
    assert secret not in str(render_card(merged, recipe))


@pytest.mark.parametrize(
    ("kind", "tag"),
    [("vit_cls", "image-classification"), ("bert_cls", "text-classification"),
     ("clip", "zero-shot-image-classification"), ("vit", "feature-extraction"),
     ("clip_text", "feature-extraction")],
)
def test_pipeline_tag_follows_the_model_class(kind, tag):
    assert pipeline_tag_for(make_model(kind)) == tag


def test_calibration_dataset_id_only_for_hub_specs(tmp_path):
    assert calibration_dataset_id("org/ds:train") == "org/ds"
    assert calibration_dataset_id("org/ds:cfg:train[:100]") == "org/ds"
    assert calibration_dataset_id("mnist:test") == "mnist"
    assert calibration_dataset_id(str(tmp_path)) is None
    assert calibration_dataset_id(f"{tmp_path}:train") is None
    assert calibration_dataset_id("./data:train") is None
    assert calibration_dataset_id(None) is None


def test_template_is_the_canonical_file_and_ships_in_the_wheel():
    assert template_path() == ROOT / "model_cards" / "merged_model.md.jinja"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["hf_mudsc.model_cards"] == "model_cards"
    assert "*.jinja" in setuptools["package-data"]["hf_mudsc.model_cards"]
    # The package list is explicit (discovery cannot map model_cards/): every sub-package must be in it.
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_mudsc").rglob("__init__.py")}
    missing = found - set(setuptools["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"


def test_every_package_data_pattern_names_files_that_exist_and_the_type_hints_ship():
    """pyproject listed `templates/*.jinja` and `py.typed` for hf_mudsc, neither of which existed: a pattern that
    matches nothing ships nothing (a template moved away would go unnoticed), and without `py.typed` (PEP 561) a
    type checker ignores the installed package's type hints."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {package: ROOT / setuptools.get("package-dir", {}).get(package, package.replace(".", "/"))
               for package in setuptools["package-data"]}
    empty = [(package, pattern) for package, patterns in setuptools["package-data"].items() for pattern in patterns
             if not list(folders[package].glob(pattern))]
    assert not empty, f"package-data patterns that match no file: {empty}"
    assert "py.typed" in setuptools["package-data"]["hf_mudsc"]


@pytest.mark.skipif(sys.platform == "win32", reason="paths")
def test_a_custom_template_can_be_used(merged, recipe, tmp_path):
    custom = tmp_path / "mine.md.jinja"
    custom.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} by {{ method_name }}\n")
    card = render_card(merged, recipe, parents=PARENTS, template=custom)
    assert card.content.endswith("# org/merged by mudsc\n") and card.data.base_model_relation == "merge"


def test_local_references_are_shown_by_name(tmp_path):
    from hf_mudsc.load.references import display_name

    (tmp_path / "calib").mkdir()
    assert display_name(str(tmp_path / "calib")) == "calib"
    assert display_name(f"{tmp_path / 'calib'}:train") == "calib:train"
    assert display_name("/no/such/folder/parent-a") == "parent-a"
    assert display_name("org/dataset:config:train") == "org/dataset:config:train"
    assert display_name("org/model@v2") == "org/model@v2"


def test_home_relative_references_are_shown_by_name_in_the_merged_config(tmp_path, monkeypatch):
    """QA s21: `merge '~/private/projectX/vit-a' --calibration '~/private/projectX/calib'` wrote both paths in
    full into config.json's `mudsc` (pushed with the model); docs/design.md §8: local folders by their last
    component."""
    from hf_mudsc.load.references import display_name

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "private" / "calib").mkdir(parents=True)
    assert display_name("~/private/calib") == "calib"
    assert display_name("~/private/calib:train") == "calib:train"
    assert display_name("~/private/gone") == "gone"
    assert display_name("org/model@v2") == "org/model@v2"


def test_a_relative_local_calibration_spec_with_a_split_is_recorded_by_name(tmp_path, monkeypatch):
    """Bug hunt s29: `--calibration ../private/alice/calib:train` was written into config.json's `mudsc` (pushed
    with the model) as typed: the relative path with its `:split` was neither absolute nor an existing path, so it
    kept the machine's layout (and read like a Hub dataset id). By the folder's name, as the card shows it."""
    from hf_mudsc.load.references import display_name

    data = tmp_path / "private" / "alice" / "calib"
    data.mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert display_name("../private/alice/calib:train") == "calib:train"
    assert display_name("../private/alice/calib") == "calib"
    assert display_name("org/dataset:config:train") == "org/dataset:config:train"
    assert display_name(f"{data}:train") == "calib:train"


def test_update_card_evaluation_replaces_only_its_section_and_the_model_index():
    from hf_mudsc.publish.card import update_card_evaluation

    text = "---\nlicense: mit\ntags:\n- merge\n---\n\n# my merge\n\nIntro kept.\n\n## Notes\n\nKept too.\n"
    row = {"task": "t", "dataset": "org/data", "merged": 0.5, "parent_a": 0.25}
    first = update_card_evaluation(text, [row])
    assert first.text.startswith("\n# my merge\n\nIntro kept.\n\n## Notes\n\nKept too.\n\n## Evaluation\n")
    assert "| t | org/data | test | accuracy | 0.2500 | — | — | **0.5000** |" in first.text
    assert first.data.license == "mit" and first.data.tags == ["merge"] and first.data.model_name == "my merge"
    second = update_card_evaluation(str(first), [{**row, "merged": 0.75}])
    assert second.text.count("## Evaluation") == 1 and "**0.7500**" in second.text and "0.5000" not in second.text
    assert [r.metric_value for r in second.data.eval_results] == [0.75]
    assert second.data.datasets is None  # evaluation data is named by the model-index only


def test_the_evaluation_table_has_a_column_per_parent_for_n_parents():
    from hf_mudsc.publish.card import EvalRow, evaluation_section

    rows = [{"task": "a", "dataset": "org/d", "merged": 0.5, "parent_a": 0.9, "parent_b": 0.1, "parent_c": 0.2,
             "ensemble": 0.6},
            {"task": "joint (all tasks)", "dataset": "org/d", "merged": 0.4}]
    text = evaluation_section(rows)
    assert "| Task | Dataset | Split | Metric | Parent A | Parent B | Parent C | Ensemble | Merged |" in text
    assert "| a | org/d | test | accuracy | 0.9000 | 0.1000 | 0.2000 | 0.6000 | **0.5000** |" in text
    assert "| joint (all tasks) | org/d | test | accuracy | — | — | — | — | **0.4000** |" in text
    assert EvalRow.from_any(rows[0]).parent_scores == (0.9, 0.1, 0.2)
    # two parents: the table as before
    assert "| Parent A | Parent B | Ensemble | Merged |" in evaluation_section(rows[1:])
    with pytest.raises(ValueError, match="parent_d.*parent_c"):  # a gap in the letters is a typo, not a column
        EvalRow.from_any({k: v for k, v in {**rows[0], "parent_d": 0.3}.items() if k != "parent_c"})


def test_evaluation_card_rows_carry_every_parent():
    from hf_mudsc.evaluate.results import EvaluationResult

    scores = {name: {"t": {"accuracy": value}} for name, value in
              (("merged", 0.5), ("parent_a", 0.9), ("parent_b", 0.8), ("parent_c", 0.7), ("ensemble", 0.6))}
    result = EvaluationResult(scores=scores, tasks={"t": {"dataset": "org/d", "split": "test"}},
                              metrics=["accuracy"], merged=["merged"])
    row = result.card_rows()[0]
    assert row.parent_scores == (0.9, 0.8, 0.7) and row.ensemble == 0.6


def test_the_card_says_whose_processor_scored_each_column_when_they_differ():
    """When the parents' processors differ, each model is scored on its own processor's inputs; the card's table
    says so (and says nothing when one processor made every input)."""
    from hf_mudsc.evaluate.results import EvaluationResult
    from hf_mudsc.publish.card import evaluation_section

    scores = {name: {"t": {"accuracy": value}} for name, value in
              (("merged", 0.5), ("parent_a", 0.9), ("parent_b", 0.8), ("ensemble", 0.6))}
    processors = {"merged": "parent_a's", "parent_a": "own", "parent_b": "own",
                  "ensemble": "each parent's as in its row"}
    result = EvaluationResult(scores=scores, tasks={"t": {"dataset": "org/d", "split": "test"}},
                              metrics=["accuracy"], merged=["merged"], processors=processors)
    section = evaluation_section(result.card_rows())
    note = next(line for line in section.splitlines() if "processor" in line.lower())
    for shown in ("Parent A: own", "Parent B: own", "Ensemble: each parent's as in its row",
                  "Merged: parent A's"):
        assert shown in note
    alike = EvaluationResult(scores=scores, tasks=result.tasks, metrics=["accuracy"], merged=["merged"])
    assert "processor" not in evaluation_section(alike.card_rows()).lower()
    assert EvaluationResult.from_dict(result.to_dict()).processors == processors  # the JSON keeps the record


HOSTILE_NAMES = ["a|b", "x\n## Usage\n| y", "<script>alert(1)</script>", "[x](javascript:alert(1))", "`tick`", "\\|"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_stay_inside_their_evaluation_cell_and_a_re_evaluation_replaces_every_row(name):
    from hf_mudsc.publish.card import update_card_evaluation

    text = "---\nlicense: mit\n---\n\n# my merge\n\n## Notes\n\nKept.\n"
    row = {"task": name, "dataset": name, "split": name, "metric": "accuracy", "merged": 0.5, "parent_a": 0.25}
    card = ModelCard(str(update_card_evaluation(text, [row])))
    assert card.data.eval_results[0].task_name == name  # the front matter holds the name as it is (valid YAML)
    table = [line for line in card.text.splitlines() if line.startswith("|")]
    assert len(table) == 3 and all(line.count("|") - line.count("\\|") == 9 for line in table), table
    assert "<script" not in card.text and "[x](javascript:" not in card.text
    assert not re.search(r"^## Usage", card.text, flags=re.MULTILINE)
    again = update_card_evaluation(str(card), [{"task": "clean", "dataset": "org/data", "merged": 0.9}])
    assert "0.5000" not in again.text and "0.2500" not in again.text and "Kept." in again.text
    assert [r.task_name for r in again.data.eval_results] == ["clean"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_task_and_parent_names_stay_inside_their_cells_in_the_merge_card(merged, name):
    config = merged.config  # the merged model is reused: only its task names change
    saved = dict(config.task_label_ranges)
    config.task_label_ranges = {name: [0, 3], "other": [3, 6]}
    try:
        card = ModelCard(str(render_card(merged, Recipe(models=["org/vit-a", "org/vit-b"], calibration="c"),
                                         parents=[ParentInfo(name), ParentInfo("org/vit-b", "org/vit-b")])))
    finally:
        config.task_label_ranges = saved
    markup = markup_of(card.text)
    assert "<script" not in markup and "[x](javascript:" not in markup
    assert not re.search(r"^## Usage\n\|", card.text, flags=re.MULTILINE)
    tasks = card.text.split("| Task | Label ids |\n|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert len(tasks) == 2 and all(line.count("|") - line.count("\\|") == 3 for line in tasks), tasks
    parents = card.text.split("| | Model | Revision |\n|---|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert len(parents) == 2 and all(line.count("|") - line.count("\\|") == 4 for line in parents), parents


def test_a_re_evaluation_names_the_model_index_by_the_title_as_written_not_as_escaped(merged):
    from hf_mudsc.publish.card import update_card_evaluation

    card = render_card(merged, Recipe(models=["org/vit-a", "org/vit-b"], calibration="c"),
                       parents=[ParentInfo("a|b <i>"), ParentInfo("org/vit-b", "org/vit-b")])
    assert card.data.model_name is None  # no results yet: the title alone names the model
    again = update_card_evaluation(str(card), [{"task": "t", "dataset": "org/data", "merged": 0.5}])
    assert again.data.model_name == "merged-a|b <i>-vit-b"


def test_a_local_calibration_folder_with_a_hostile_name_stays_inside_its_settings_cell(merged, tmp_path):
    """The settings table showed a local calibration folder's name as it is: a `|` or a line break in it split the
    row or ended the table (and a line `## Usage` became a heading)."""
    folder = tmp_path / "cal|ib\n## Usage\nx"
    folder.mkdir()
    card = ModelCard(str(render_card(merged, Recipe(models=["org/vit-a", "org/vit-b"], calibration=str(folder)),
                                     parents=PARENTS)))
    settings = card.text.split("| Setting | Value |\n|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert all(line.startswith("| ") and line.count("|") - line.count("\\|") == 3 for line in settings), settings
    assert any("cal\\|ib ## Usage x" in line for line in settings), settings


def test_the_recipe_block_stays_one_code_block_whatever_a_folder_name_holds(merged, tmp_path):
    """The recipe sat in a ``` fence; a local folder named with a line of backticks closed it early, so the rest of
    the recipe (here `<script>`) became the page's Markdown/HTML."""
    folder = tmp_path / "x\n```\n<script>y"
    folder.mkdir()
    text = str(render_card(merged, Recipe(models=["org/vit-a", "org/vit-b"], calibration=str(folder)),
                           parents=PARENTS))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"(`{3,})yaml", line))
    fence = re.fullmatch(r"(`{3,})yaml", lines[start]).group(1)
    end = next(i for i in range(start + 1, len(lines))
               if re.fullmatch(r" {0,3}`{" + str(len(fence)) + r",} *", lines[i]))
    assert any("<script>" in line for line in lines[start:end])
    after = markup_of("\n".join(lines[end:]))
    assert "<script>" not in after and "\n<script>" not in text
    assert "calibration:" in "\n".join(lines[start:end]) and "seed:" in "\n".join(lines[start:end])


def test_what_a_merged_config_records_cannot_add_headings_or_markup_to_the_card(merged):
    """`hf-mudsc evaluate` renders a card from the folder's config when it has none: the config's warnings, method
    reason and group names went onto the page as they were, so a line break added a heading and HTML went through."""
    hostile = "x\n## Usage\n<script>alert(1)</script> | y"
    card = card_with_mudsc(merged, warnings=[hostile], method_choice_reason=hostile,
                           group_match_values={hostile: 0.5})
    markup = markup_of(card.text)
    assert "<script" not in markup
    assert re.findall(r"^## Usage", card.text, flags=re.MULTILINE) == ["## Usage"]  # the card's own only
    # (the A-B fusion share is a third column: the merge's diagnostics hold it)
    groups = card.text.split("| Group | Match value | A–B fusions |\n|---|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert len(groups) == 1 and groups[0].count("|") - groups[0].count("\\|") == 4, groups


def test_the_card_says_whose_processor_preprocessed_the_data_when_parent_a_has_none(tmp_path):
    """QA s22 (r12): parent A has no image processor, parent B has one, and B's preprocessed the raw calibration
    images; the card said "the parents were merged without one"."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    for name, seed in (("a", 1), ("b", 2)):
        make_model("vit_cls", seed).save_pretrained(tmp_path / name)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.2], image_std=[0.3])
    processor.save_pretrained(tmp_path / "b")
    pixels = np.random.default_rng(0).integers(0, 255, (8, 16, 16), dtype=np.uint8)
    data = datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels]})
    merged = hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], data, method="mudsc", refit="none",
                            progress=False)
    card = (hf_mudsc.save_merged(merged, tmp_path / "merged") / "README.md").read_text()
    assert "merged without one" not in card
    assert ("No processor is saved with it: parent A has none, and parent B's preprocessed the raw calibration "
            "data") in card


def test_zips_match_value_is_not_called_the_parents_agreement_and_the_a_b_share_is_shown(merged, recipe, tmp_path):
    """QA s22: the card said zip's match value was the "mean similarity of the matched units (1.0 = the parents' units
    agree perfectly)" while it also counts fusions within one parent (a group at 0.92 fused no unit of A with B). The
    card says what the value is for zip and shows each group's A-B fusion share, as `hf-mudsc inspect` does; so does
    the match-quality plot's caption."""
    from hf_mudsc.publish.plots import draw_plots

    assert merged.config.mudsc["matcher"] == "zip"
    content = str(render_card(merged, recipe, parents=PARENTS))
    section = content.split("## Match quality per layer")[1].split("\n## ")[0]
    assert "agree perfectly" not in section and "within one parent" in section and "A–B fusions" in section
    groups = merged.merge_report.diagnostics.groups
    for group in groups:
        share = "-" if group.cross_fraction is None else f"{100 * group.cross_fraction:.0f}%"
        value = merged.config.mudsc["group_match_values"][group.name]
        assert f"| `{group.name}` | {value:.4f} | {share} |" in section, section
    assert "|---|---|---|" in section
    # align's value is the similarity of fused A-B pairs: its text stays as it was
    aligned = str(card_with_mudsc(merged, matcher="align"))
    assert "1.0 = the parents' units agree perfectly" in aligned
    caption = next(p.caption for p in draw_plots(tmp_path, merged.merge_report.diagnostics)
                   if p.name == "match_quality")
    assert "within one parent" in caption
