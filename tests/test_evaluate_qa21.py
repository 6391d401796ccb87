"""`hf-mudsc evaluate` after QA session 21: data or parents of another task refused, the folder's card and results
file always one evaluation, truncated runs said so, Hub recipes never pointing at local folders, macro-F1 named."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from factories import make_model
from PIL import Image
from transformers import ViTImageProcessor

from hf_mudsc.cli.main import main
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.batches import check_class_label_ids
from hf_mudsc.evaluate.harness import evaluate_merge

PROCESSOR = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
CLASSES = {"pets": ["cat", "dog", "eel"], "cars": ["bus", "van", "taxi"]}

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _named(model, labels: list[str]):
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    return model


@pytest.fixture(scope="module")
def pets_and_cars(tmp_path_factory):
    """QA's set-up, smaller: parents `pets` and `cars` (3 named classes each), a linear merge of them by the CLI, and
    each task's test data (30 images, a ClassLabel of its class names)."""
    root = tmp_path_factory.mktemp("pets_and_cars")
    for seed, (name, labels) in enumerate(CLASSES.items()):
        _named(make_model("vit_cls", seed, num_labels=3), labels).save_pretrained(root / name)
        PROCESSOR.save_pretrained(root / name)
    out = root / "merged"
    assert main(["merge", str(root / "pets"), str(root / "cars"), "--output", str(out), "--method", "linear"]) == 0
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(30)]
    for task, labels in CLASSES.items():
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=labels)})
        datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(30)]},
                                   features=features).save_to_disk(root / f"{task}_test")
    return root, out


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------ 1. data or parents of another task are refused
def test_a_class_label_naming_none_of_the_tasks_classes_is_refused_naming_both_sets():
    """`--dataset pets=./cars_test`: a ClassLabel `bus, van, taxi` against the task's `cat, dog, eel` shares no name,
    and was read by id (pets scored on cars' rows, published). Refused naming the task and both sets; transformers'
    default names (`LABEL_0`, ...) on either side say nothing about the classes and stay read by id."""
    with pytest.raises(EvaluationError, match=r"task 'pets'.*\['bus', 'van', 'taxi'\].*\['cat', 'dog', 'eel'\]") as e:
        check_class_label_ids(CLASSES["cars"], CLASSES["pets"], "pets")
    assert "\n" not in str(e.value)
    with pytest.raises(EvaluationError, match=r"'fox'"):  # one class the task does not have, the rest at their ids
        check_class_label_ids(["cat", "dog", "fox"], CLASSES["pets"], "pets")
    check_class_label_ids(["LABEL_0", "LABEL_1", "LABEL_2"], CLASSES["pets"], "pets")
    check_class_label_ids(CLASSES["pets"], ["LABEL_0", "LABEL_1", "LABEL_2"], "pets")
    check_class_label_ids(["cat", "dog"], CLASSES["pets"], "pets")  # the first classes only, at their ids


def test_the_cli_refuses_to_score_a_task_on_another_tasks_data_and_writes_nothing(pets_and_cars, capsys):
    root, out = pets_and_cars
    before = (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--dataset", f"pets={root / 'cars_test'}", "--dataset",
                 f"cars={root / 'pets_test'}", "--no-parents"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "task 'pets'" in line and "['bus', 'van', 'taxi']" in line and "['cat', 'dog', 'eel']" in line, line
    assert (out / "README.md").read_text() == before and not (out / "eval_results.json").exists()


def test_clip_class_names_naming_none_of_the_datas_classes_are_refused():
    """`--class-names pets=zebra,horse,...` against a ClassLabel `cat, dog, eel`: the prompts would be scored against
    rows of other classes by id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{word: 5 + i for i, word in enumerate(["zebra", "horse", "owl", "a"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")
    model = make_model("clip", 1)
    features = datasets.Features({"pixel_values": datasets.Array3D((3, 16, 16), "float32"),
                                  "label": datasets.ClassLabel(names=CLASSES["pets"])})
    data = datasets.Dataset.from_dict({"pixel_values": torch.randn(4, 3, 16, 16).numpy(), "label": [0, 1, 2, 0]},
                                      features=features)
    with pytest.raises(EvaluationError, match=r"task 'pets'.*\['cat', 'dog', 'eel'\].*\['zebra', 'horse', 'owl'\]"):
        evaluate_merge(model, None, {"pets": data}, class_names={"pets": ["zebra", "horse", "owl"]},
                       processor=tokenizer, prompt_template="a {}", progress=False)


def test_parents_given_in_another_order_than_the_merge_are_refused_before_scoring(monkeypatch):
    """`--parents cars pets` for a merge of pets then cars scored parent A (cars) on task pets: its labels are not the
    task's classes. Refused in one line naming the order to give, before any forward pass."""
    from hf_mudsc.evaluate import harness

    pets, cars = (_named(make_model("vit_cls", seed, num_labels=3), CLASSES[name])
                  for seed, name in enumerate(CLASSES))
    merged = _named(make_model("vit_cls", 5, num_labels=6),
                    [f"{task}: {label}" for task, labels in CLASSES.items() for label in labels])
    merged.config.task_label_ranges = {"pets": [0, 3], "cars": [3, 6]}
    data = {"pets": (torch.randn(4, 1, 16, 16), [0, 1, 2, 0])}
    monkeypatch.setattr(harness, "_predict", lambda *a, **k: pytest.fail("scored"))
    refused = r"parent A .*\['bus', 'van', 'taxi'\] \(the classes of task 'cars'\), not those of task 'pets'"
    with pytest.raises(EvaluationError, match=refused) as e:
        evaluate_merge(merged, [cars, pets], data, progress=False)
    assert "\n" not in str(e.value) and "merge order, one per task: pets, cars" in str(e.value)
    unnamed = [make_model("vit_cls", seed, num_labels=3) for seed in (0, 1)]  # LABEL_0...: nothing to compare
    monkeypatch.setattr(harness, "_predict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("scored")))
    with pytest.raises(RuntimeError, match="scored"):
        evaluate_merge(merged, unnamed, data, progress=False)


# ------------------------------------------ 2. the folder's card and eval_results.json are always one evaluation
def _card_figures(folder) -> dict[str, float]:
    from huggingface_hub import ModelCard

    return {result.task_name: result.metric_value for result in ModelCard.load(folder / "README.md").data.eval_results
            if result.task_name in CLASSES}


def _json_figures(path) -> dict[str, float]:
    from hf_mudsc.evaluate.results import EvaluationResult

    return {task: EvaluationResult.load(path).score("merged", task) for task in CLASSES}


def test_the_folders_card_and_results_file_describe_the_same_evaluation_whatever_output_json_names(
        pets_and_cars, tmp_path):
    """QA: evaluate DIR, then evaluate DIR --num-samples 7 --output-json other.json: the card said 7 rows' figures,
    DIR/eval_results.json still the 30 rows' — and both were pushed. The folder's results file now always follows
    its card (and --output-json gets a copy); --no-card leaves the folder's files alone."""
    root, out = pets_and_cars
    flags = ["--dataset", f"pets={root / 'pets_test'}", "--dataset", f"cars={root / 'cars_test'}", "--no-parents"]
    assert main(["evaluate", str(out), *flags]) == 0
    full = _json_figures(out / "eval_results.json")
    assert _card_figures(out) == pytest.approx(full)
    assert "| accuracy | 30 |" in (out / "README.md").read_text()
    other = tmp_path / "other.json"
    assert main(["evaluate", str(out), *flags, "--num-samples", "7", "--output-json", str(other)]) == 0
    seven = _json_figures(other)
    assert seven != full  # 7 rows score otherwise than 30: the check below can fail
    assert _json_figures(out / "eval_results.json") == seven and _card_figures(out) == pytest.approx(seven)
    from hf_mudsc.evaluate.results import EvaluationResult

    assert EvaluationResult.load(out / "eval_results.json").tasks["pets"]["num_samples"] == 7
    text = (out / "README.md").read_text()
    assert "| pets | pets_test (local folder) | — | accuracy | first 7 |" in text and "first N rows" in text
    before = {name: (out / name).read_bytes() for name in ("README.md", "eval_results.json")}
    assert main(["evaluate", str(out), *flags, "--no-card", "--output-json", str(tmp_path / "alone.json")]) == 0
    assert main(["evaluate", str(out), *flags, "--no-card"]) == 0
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _json_figures(tmp_path / "alone.json") == full


# --------------------------------------------------------------- 3. a truncated evaluation says so on the card
def test_the_card_table_says_how_many_rows_each_figure_scored_and_that_they_are_the_first():
    """`--num-samples 10` published figures of 10 rows as the task's with nothing saying so: the table's Rows
    column says `first 10` (and the joint row each task's), a full run the count."""
    from hf_mudsc.publish.card import evaluation_section

    model = _named(make_model("vit_cls", 3, num_labels=6),
                   [f"{task}: {label}" for task, labels in CLASSES.items() for label in labels])
    model.config.task_label_ranges = {"pets": [0, 3], "cars": [3, 6]}
    data = {task: (torch.randn(12, 1, 16, 16), [i % 3 for i in range(12)]) for task in CLASSES}
    cut = evaluate_merge(model, None, data, num_samples=5, progress=False)
    assert cut.tasks["pets"]["num_samples"] == 5 and cut.tasks["pets"]["first_rows"] is True
    table = evaluation_section(cut.card_rows())
    assert "| Task | Dataset | Split | Metric | Rows |" in table and "only the first N rows" in table
    assert "| pets | in-memory data | — | accuracy | first 5 |" in table
    assert "| accuracy | first 5 + first 5 |" in table  # the joint row
    whole = evaluation_section(evaluate_merge(model, None, data, progress=False).card_rows())
    assert "| pets | in-memory data | — | accuracy | 12 |" in whole and "| accuracy | 24 |" in whole
    assert "first" not in whole


# ------------------------------------------------- 4. a recipe from the Hub never points at a folder of this machine
@pytest.mark.parametrize("entry", ["{abs}", "../{name}", "~/{name}", "./{name}", "{name}/../{name}"])
def test_a_hub_recipe_naming_a_local_path_is_refused_asking_for_parents(tmp_path, monkeypatch, entry):
    """A Hub repo whose recipe names `/tmp/x/digits-0-4` made `evaluate evil/m-abs` load and score that folder of
    this machine as a parent. Any path is refused in one line asking for --parents; a Hub id, and a bare folder name
    found in the current directory (the documented way to evaluate a merge pushed from local folders), still load."""
    from hf_mudsc.cli.evaluate import recipe_parents
    from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    for name in ("digits-0-4", "work/digits-0-4"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "work")
    local = entry.format(abs=tmp_path / "digits-0-4", name="digits-0-4")
    path = tmp_path / RECIPE_FILENAME
    path.write_text(Recipe(models=[f"org/vit-a@{'a' * 40}", local]).to_yaml())
    with pytest.raises(ValueError, match=r"parent B `.*digits-0-4` .*from the Hub.*--parents") as error:
        recipe_parents(path, "evil/m-abs", from_hub=True)
    assert "\n" not in str(error.value)
    assert recipe_parents(path, "./merged") == [f"org/vit-a@{'a' * 40}", local]  # a folder's own recipe: as before
    path.write_text(Recipe(models=[f"org/vit-a@{'a' * 40}", "digits-0-4"]).to_yaml())
    assert recipe_parents(path, "evil/m-abs", from_hub=True) == [f"org/vit-a@{'a' * 40}", "digits-0-4"]


# ------------------------------------------------------------------------- 5. macro-F1 is called macro-F1
def test_f1_is_published_as_macro_f1_in_the_table_and_the_model_index():
    """`--metric f1` is macro-F1, but the card and model-index called it `f1` (micro-F1 equals accuracy for one label
    per row: a reader could not tell). The table says `f1 (macro)`; the model-index keeps type `f1` (the Hub's metric
    id) with name `f1 (macro)` and args `average: macro`; accuracy is unchanged."""
    from huggingface_hub import ModelCard

    from hf_mudsc.publish.card import evaluation_section, update_card_evaluation

    model = make_model("vit_cls", 4)
    result = evaluate_merge(model, None, {"pets": (torch.randn(8, 1, 16, 16), [i % 2 for i in range(8)])},
                            metrics=["accuracy", "f1"], progress=False)
    rows = result.card_rows()
    assert "| pets | in-memory data | — | f1 (macro) |" in evaluation_section(rows)
    assert "| pets | in-memory data | — | accuracy |" in evaluation_section(rows)
    card = update_card_evaluation(ModelCard("---\nlicense: mit\n---\n# m\n"), rows, model_name="m")
    again = ModelCard(str(card))  # as the Hub reads the front matter back
    by_type = {(r.task_name, r.metric_type): r for r in again.data.eval_results}
    f1 = by_type[("pets", "f1")]
    assert f1.metric_name == "f1 (macro)" and f1.metric_args == {"average": "macro"}
    accuracy = by_type[("pets", "accuracy")]
    assert accuracy.metric_name == "accuracy" and accuracy.metric_args is None


def test_the_model_index_names_a_truncated_figures_rows_as_a_split_slice():
    """The table said `first 7`, but the `model-index` (what the Hub's leaderboards read) named the whole `test`
    split for a figure of its first 7 rows. A truncated row's split is `test[:7]` (the `datasets` slice that reads
    exactly those rows); a full one stays `test`."""
    from huggingface_hub import ModelCardData

    from hf_mudsc.publish.card import EvalRow, set_eval_results

    rows = [EvalRow(task="pets", dataset="org/pets", merged=0.5, split="test", rows="first 7"),
            EvalRow(task="cars", dataset="org/cars", merged=0.6, split="validation", rows="30"),
            EvalRow(task="dogs", dataset="org/dogs", merged=0.7, split=None, rows="first 4")]
    data = set_eval_results(ModelCardData(pipeline_tag="image-classification"), rows, model_name="m")
    assert [result.dataset_split for result in data.eval_results] == ["test[:7]", "validation", None]
