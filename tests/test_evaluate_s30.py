"""`evaluate_merge` after the session-30 evaluate hunt: a task column's ClassLabel read by name, a CLIP spec string's
class names, several merged models' label orders, CLIP class names shared by tasks, torch-formatted data, scorer and
task names that clash with the results' entries, early refusals, task ranges that are not the model's, and the
chart's title after `--metric f1`."""

from __future__ import annotations

import datasets
import pytest
import torch
from factories import make_model
from test_evaluation import word_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from hf_mudsc import evaluate_merge
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.tasks import TaskData, tasks_from_dataset

pytestmark = pytest.mark.usefixtures("one_thread_module")

BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
RANGES = {"a": [0, 2], "b": [2, 4]}


def bert(labels: list[str], bias: list[float], task_ranges: dict | None = None, seed: int = 0):
    """A classifier that always predicts by `bias` (its head's weight is zero)."""
    torch.manual_seed(seed)
    config = BertConfig(**BERT, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={n: i for i, n in enumerate(labels)})
    if task_ranges is not None:
        config.task_label_ranges = task_ranges
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    return model


def rows(labels: list, **columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": [[1, 5, 6, 2]] * len(labels),
                                       "attention_mask": [[1] * 4] * len(labels), "label": labels, **columns})


def tensors(labels: list) -> tuple[dict, list]:
    ids = torch.tensor([[1, 5, 6, 2]] * len(labels))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def test_task_column_classlabel_is_read_by_its_names():
    merged = bert(["a: positive", "a: negative", "b: positive", "b: negative"], [0, 5, 0, 5], RANGES)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "attention_mask": datasets.Sequence(datasets.Value("int64")),
                                  "task": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    data = datasets.Dataset.from_dict({"input_ids": [[1, 5, 6, 2]] * 8, "attention_mask": [[1] * 4] * 8,
                                       "task": ["a"] * 4 + ["b"] * 4, "label": [0, 0, 0, 1] * 2}, features=features)
    result = evaluate_merge(merged, None, tasks_from_dataset(data, ["a", "b"], task_column="task"), progress=False)
    assert {task: result.score("merged", task) for task in "ab"} == {"a": 0.75, "b": 0.75}


def test_task_column_classlabel_naming_every_tasks_classes_is_refused():
    merged = bert(["a: x", "a: y", "b: p", "b: q"], [0, 5, 0, 5], RANGES)
    data = rows([0, 1, 2, 3], task=["a", "a", "b", "b"]).cast_column(
        "label", datasets.ClassLabel(names=["x", "y", "p", "q"]))
    with pytest.raises(EvaluationError, match="several tasks") as error:
        evaluate_merge(merged, None, tasks_from_dataset(data, ["a", "b"], task_column="task"), progress=False)
    assert "\n" not in str(error.value)


def test_clip_spec_string_reads_the_class_names_of_its_classlabel(tmp_path):
    model = make_model("clip", seed=0)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    features = datasets.Features({"pixel_values": datasets.Array3D((3, 16, 16), "float32"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    data = datasets.Dataset.from_dict({"pixel_values": images.numpy(), "label": [0, 1] * 3}, features=features)
    data.save_to_disk(tmp_path / "pets")
    tokenizer = word_tokenizer(["cat", "dog", "photo", "of", "a"])
    given = evaluate_merge(model, None, {"pets": data}, processor=tokenizer, progress=False)
    spec = evaluate_merge(model, None, {"pets": str(tmp_path / "pets")}, processor=tokenizer, progress=False)
    assert spec.score("merged", "pets") == given.score("merged", "pets")
    assert spec.tasks["pets"]["classes"] == ["cat", "dog"]


def test_merged_models_listing_their_labels_in_other_orders_are_not_read_by_the_first():
    first, second = bert(["cat", "dog"], [5, 0]), bert(["dog", "cat"], [0, 5])
    data = TaskData(tensors(["cat", "cat", "cat", "dog"]))
    try:
        both = evaluate_merge({"ab": first, "ba": second}, None, [data], progress=False)
    except EvaluationError as error:  # refused, never scored against the first model's labels
        assert "\n" not in str(error) and "'ba'" in str(error) and "separately" in str(error)
    else:
        assert both.score("ab", "task_0") == both.score("ba", "task_0") == 0.75


def test_clip_class_name_of_two_tasks_counts_either_in_the_joint_view():
    model = make_model("clip", seed=0)
    tokenizer = word_tokenizer(["cat", "dog", "bird", "photo", "of", "a"])
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    features = datasets.Features({"pixel_values": datasets.Array3D((3, 16, 16), "float32"),
                                  "label": datasets.Value("int64")})
    names = {"a": ["cat", "dog"], "b": ["cat", "bird"]}
    with torch.no_grad():
        prompts = tokenizer([f"a photo of {n}" for n in ["cat", "dog", "bird"]], padding=True, return_tensors="pt")
        picks = model(**prompts, pixel_values=images).logits_per_image.argmax(1)  # over the three distinct prompts
    joint_ids = {0: (0, 0), 1: (0, 1), 2: (1, 1)}  # distinct prompt -> (task index, its class id there)
    assert len({int(p) for p in picks}) > 1
    task_of = [joint_ids[int(p)][0] for p in picks]
    data = {task: datasets.Dataset.from_dict(
        {"pixel_values": images[[i for i, t in enumerate(task_of) if t == index]].numpy(),
         "label": [joint_ids[int(p)][1] for p, t in zip(picks, task_of) if t == index]}, features=features)
        for index, task in enumerate(names)}
    data["b"] = datasets.concatenate_datasets([data["b"], datasets.Dataset.from_dict(  # b's cats: task a's prompt
        {"pixel_values": images[[i for i, p in enumerate(picks) if p == 0]].numpy(),
         "label": [0] * int((picks == 0).sum())}, features=features)])
    result = evaluate_merge(model, None, data, processor=tokenizer, prompt_template="a photo of {}", class_names=names,
                            progress=False)
    assert result.score("merged", "joint") == 1.0  # every row is labelled with the model's own pick
    assert "(cat)" in result.definitions["joint"] and "either task counts as right" in result.definitions["joint"]


@pytest.mark.parametrize("by", ["joint ids", "task column"])
def test_torch_formatted_data_for_every_task_is_read_like_plain_data(by):
    merged = bert(["a: x", "a: y", "b: p", "b: q"], [5, 0, 0, 5], RANGES)
    if by == "joint ids":
        data, how = rows([0, 1, 2, 3]), {"task_ranges": RANGES}
    else:
        data, how = rows([0, 1, 0, 1], task=[0, 0, 1, 1]), {"task_column": "task"}
    plain = evaluate_merge(merged, None, tasks_from_dataset(data, ["a", "b"], **how), progress=False)
    torch_format = evaluate_merge(merged, None, tasks_from_dataset(data.with_format("torch"), ["a", "b"], **how),
                                  progress=False)
    assert torch_format.scores["merged"] == plain.scores["merged"]


@pytest.mark.parametrize("name", ["parent_a", "ensemble", "parent_c"])
def test_merged_model_named_like_another_scorer_is_refused(name):
    parents = [bert(["cat", "dog"], [5, 0]), bert(["cat", "dog"], [5, 0], seed=1)]
    with pytest.raises(EvaluationError, match=f"'{name}'") as error:
        evaluate_merge({name: bert(["cat", "dog"], [0, 5])}, parents, [tensors([0, 0, 0, 1])], progress=False)
    assert "\n" not in str(error.value) and "rename" in str(error.value)


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A merged folder of tasks a, b and its two parents' folders; `loaded` lists every folder loaded."""
    bert(["a: x", "a: y", "b: p", "b: q"], [0] * 4, RANGES).save_pretrained(tmp_path / "merged")
    bert(["x", "y"], [0, 0]).save_pretrained(tmp_path / "pa")
    bert(["p", "q"], [0, 0]).save_pretrained(tmp_path / "pb")
    import hf_mudsc.load.parents as parents

    loaded = []
    real = parents.load_parent

    def counting(reference, *args, **kwargs):
        loaded.append(reference)
        return real(reference, *args, **kwargs)

    monkeypatch.setattr(parents, "load_parent", counting)
    return tmp_path, loaded


@pytest.mark.parametrize("case", ["unknown task", "three parents", "three datasets"])
def test_wrong_tasks_or_parents_are_refused_before_any_model_loads(saved, case):
    root, loaded = saved
    parents = [str(root / "pa"), str(root / "pb")]
    data = tensors([0, 1])
    given = {"unknown task": (parents, {"a": data, "petz": data}),
             "three parents": ([*parents, str(root / "pb")], [data, data]),
             "three datasets": (parents, [data, data, data])}[case]
    with pytest.raises(EvaluationError, match="petz|3 parents|3 datasets"):
        evaluate_merge(str(root / "merged"), *given, progress=False)
    assert loaded == []


def test_task_ranges_other_than_the_models_are_refused():
    merged = bert(["a: x", "a: y", "b: p", "b: q"], [5, 0, 0, 5], RANGES)
    data = rows([0, 0, 0, 3])
    right = evaluate_merge(merged, None, tasks_from_dataset(data, ["a", "b"], RANGES), progress=False)
    assert right.score("merged", "a") == right.score("merged", "b") == 1.0
    with pytest.raises(EvaluationError, match=r"\[2, 4\]|\(2, 4\)") as error:
        evaluate_merge(merged, None, tasks_from_dataset(data, ["a", "b"], {"a": [2, 4], "b": [0, 2]}),
                       progress=False)
    assert "\n" not in str(error.value) and "task_label_ranges" in str(error.value)


@pytest.mark.parametrize("name", ["joint", "average"])
def test_task_named_like_a_view_is_refused_with_one_label_set(name):
    model = bert(["cat", "dog"], [5, 0])
    with pytest.raises(EvaluationError, match=f"'{name}'.*reserved"):
        evaluate_merge(model, None, {name: tensors([0, 0]), "other": tensors([1, 1])}, progress=False)


def test_cli_refuses_a_task_named_like_a_view(tmp_path, capsys):
    from hf_mudsc.cli.main import main

    bert(["cat", "dog"], [5, 0]).save_pretrained(tmp_path / "m")
    for name, label in (("cats", 0), ("dogs", 1)):
        rows([label] * 2).save_to_disk(tmp_path / name)
    code = main(["evaluate", str(tmp_path / "m"), "--dataset", f"joint={tmp_path / 'cats'}", "--dataset",
                 f"other={tmp_path / 'dogs'}", "--no-card", "--output-json", str(tmp_path / "r.json")])
    assert code != 0
    assert "'joint'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


F1_RESULTS = {"metrics": ["f1"], "metric_args": {"f1": {"average": "macro"}}, "tasks": {"a": {}, "b": {}},
              "scores": {"merged": {"a": {"f1": 0.5}, "b": {"f1": 0.7}, "joint": {"f1": 0.6}}}}


def test_chart_of_f1_results_is_titled_by_its_metric(tmp_path):
    from hf_mudsc.evaluate.results import EvaluationResult
    from hf_mudsc.publish.plots import draw_plots

    (plot,) = draw_plots(tmp_path / "plots", None, F1_RESULTS)
    assert plot.title == "F1 (macro)" and "accuracy" not in plot.caption and "f1 (macro)" in plot.caption
    # the record says how its metrics were computed, so a chart drawn from the file alone can say it
    record = EvaluationResult(metrics=["accuracy", "f1"], tasks={}, scores={}, merged=["merged"]).to_dict()
    assert record["metric_args"] == {"f1": {"average": "macro"}}
    older = {key: value for key, value in F1_RESULTS.items() if key != "metric_args"}  # written before it was kept
    assert draw_plots(tmp_path / "older", None, older)[0].title == "F1"


def test_evaluate_redrawing_the_chart_retitles_it_in_the_card(tmp_path):
    from hf_mudsc.cli.evaluate import update_card
    from hf_mudsc.evaluate.results import EvaluationResult
    from hf_mudsc.publish.plots import draw_plots

    (before,) = draw_plots(tmp_path / "plots", None, {**F1_RESULTS, "metrics": ["accuracy"], "scores": {
        "merged": {"a": {"accuracy": 0.5}}}})
    (tmp_path / "README.md").write_text(
        f"---\nlicense: mit\n---\n# m\n\n## Diagnostics\n\n**{before.title}** — {before.caption}.\n\n"
        f"![{before.title}](plots/accuracy.png)\n", encoding="utf-8")
    result = EvaluationResult(metrics=["f1"], tasks={"a": {"dataset": "d", "split": "test", "num_samples": 4,
                                                           "label_range": [0, 2], "classes": ["x", "y"]}},
                              scores={"merged": {"a": {"f1": 0.5}, "joint": {"f1": 0.5}}}, merged=["merged"])
    (chart,) = draw_plots(tmp_path / "plots", None, result)
    update_card(tmp_path, None, result, chart=chart)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "**Accuracy**" not in card and "![Accuracy]" not in card
    assert f"**F1 (macro)** — {chart.caption}." in card and "![F1 (macro)](plots/accuracy.png)" in card


def test_a_parent_named_like_an_evaluation_view_gets_a_task_name_evaluate_accepts():
    """Review s30: a parent saved in a folder named `joint` gave the merged model a task `joint`, which evaluate then
    refuses as a view's name, with no way around it (the tasks must be the config's). The merge names such a task by
    the parent's letter too (`joint_a`), as it does a name two parents share."""
    from transformers import ViTConfig

    from hf_mudsc.apply.classifier import RESERVED_TASK_NAMES, distinct_task_names
    from hf_mudsc.evaluate.names import AVERAGE, JOINT

    assert set(RESERVED_TASK_NAMES) == {JOINT, AVERAGE}
    configs = []
    for name in ("joint", "pets", "average"):
        config = ViTConfig()
        config._name_or_path = f"/somewhere/{name}"
        configs.append(config)
    assert distinct_task_names(configs) == ("joint_a", "pets", "average_c")
