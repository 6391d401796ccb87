"""Evaluation harness: shipped metrics, per-task / joint / ensemble scoring, CLIP zero-shot,
`hf-mudsc evaluate` and `hf-mudsc demo` end to end. Known answers are worked out by hand in the comments."""

from __future__ import annotations

import json
import logging
import math

import datasets
import numpy as np
import pytest
import torch
from factories import TEXT, make_model
from huggingface_hub import ModelCard
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ViTImageProcessor,
)
from transformers.modeling_outputs import ImageClassifierOutput

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.evaluate.metrics import F1, Accuracy, compute_metric, load_metric
from hf_mudsc.evaluate.results import EvaluationResult
from hf_mudsc.evaluate.tasks import tasks_from_dataset
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

pytestmark = pytest.mark.usefixtures("one_thread_module")


# --------------------------------------------------------------------------------------------- metrics
def test_accuracy_metric_known_answers():
    assert Accuracy(keep_in_memory=True).compute(predictions=[1, 2, 3], references=[1, 2, 0]) == {
        "accuracy": pytest.approx(2 / 3)
    }
    weighted = Accuracy(keep_in_memory=True).compute(
        predictions=[1, 2, 3], references=[1, 2, 0], sample_weight=[1.0, 1.0, 2.0]
    )
    assert weighted["accuracy"] == pytest.approx(0.5)
    metric = load_metric("accuracy")
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[1], references=[1])
    assert metric.compute()["accuracy"] == pytest.approx(2 / 3)


def test_f1_metric_is_macro_f1():
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 2, fp 0, fn 1 -> 4/5; macro = 11/15
    assert F1(keep_in_memory=True).compute(predictions=[0, 0, 1, 1], references=[0, 1, 1, 1])[
        "f1"
    ] == pytest.approx(11 / 15)
    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 4, 50), rng.integers(0, 5, 50)
    assert compute_metric("f1", predictions, references) == pytest.approx(
        f1_score(references, predictions, average="macro")
    )


def test_metrics_refuse_empty_input_and_unknown_names_offline():
    with pytest.raises(EvaluationError, match="zero samples"):
        compute_metric("accuracy", [], [])
    with pytest.raises(EvaluationError, match="not shipped with hf_mudsc"):
        load_metric("surely_not_a_metric_xyz")


# ---------------------------------------------------------------------------- hand-built table models
class TableConfig(PretrainedConfig):
    model_type = "hf_mudsc_table_test"


class TableForImageClassification(PreTrainedModel):
    """Returns fixed logits per sample: `pixel_values[:, 0]` is the sample id, `table[id]` its logits."""

    config_class = TableConfig
    main_input_name = "pixel_values"

    def __init__(self, config: TableConfig, table: list[list[float]]) -> None:
        super().__init__(config)
        self.table = torch.tensor(table, dtype=torch.float32)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values: torch.Tensor) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.table[pixel_values[:, 0].long()])


def table_model(
    table: list[list[float]], labels: list[str], ranges: dict | None = None
) -> TableForImageClassification:
    config = TableConfig(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    if ranges is not None:
        config.task_label_ranges = ranges
    return TableForImageClassification(config, table).eval()


# Task A: samples 0-3, labels [0, 1, 1, 0]; task B: samples 4-6, labels [2, 0, 1] (task-local ids).
MERGED_LOGITS = [  # classes: a0 a1 | b0 b1 b2
    [3, 1, 0, 0, 5],  # A: 0 right;  joint 4 (b2) wrong
    [0, 2, 1, 0, 0],  # A: 1 right;  joint 1 right
    [2, 1, 0, 0, 0],  # A: 0 wrong;  joint 0 wrong
    [4, 0, 1, 1, 1],  # A: 0 right;  joint 0 right
    [9, 0, 0, 1, 2],  # B: 2 right;  joint 0 wrong
    [0, 0, 3, 1, 0],  # B: 0 right;  joint 2 right
    [0, 0, 1, 0, 2],  # B: 2 wrong;  joint 4 wrong
]
PARENT_A_LOGITS = [[2, 0], [0, 1], [0, 3], [0, 1], [5, 0], [0, 0.5], [1, 0]]  # right on 0, 1, 2 of A
PARENT_B_LOGITS = [
    [0, 0, 0],
    [0, 0, 8],
    [0, 0, 0],
    [0, 0, 0],
    [0, 0, 1],
    [1, 0, 0],
    [0, 2, 0],
]  # B: all right
RANGES = {"alpha": [0, 2], "beta": [2, 5]}


def table_tasks() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        "alpha": (torch.arange(4.0)[:, None], torch.tensor([0, 1, 1, 0])),
        "beta": (torch.arange(4.0, 7.0)[:, None], torch.tensor([2, 0, 1])),
    }


@pytest.fixture(scope="module")
def table_models():
    merged = table_model(
        MERGED_LOGITS, ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"], RANGES
    )
    parent_a = table_model(PARENT_A_LOGITS, ["a0", "a1"])
    parent_b = table_model(PARENT_B_LOGITS, ["b0", "b1", "b2"])
    return merged, parent_a, parent_b


def test_per_task_joint_average_of_merged_parents_and_ensemble(table_models):
    merged, parent_a, parent_b = table_models
    result = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), batch_size=2, progress=False)
    score = result.score
    assert score("merged", "alpha") == pytest.approx(3 / 4)
    assert score("merged", "beta") == pytest.approx(2 / 3)
    assert score("merged", "average") == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert score("merged", "joint") == pytest.approx(3 / 7)  # samples 1, 3 and 5
    # A parent answers only its own task; on the joint test it is right at most on its own samples.
    assert score("parent_a", "alpha") == pytest.approx(3 / 4) and score("parent_a", "beta") is None
    assert score("parent_a", "joint") == pytest.approx(3 / 7) and score("parent_a", "average") is None
    assert score("parent_b", "beta") == pytest.approx(1.0) and score("parent_b", "alpha") is None
    assert score("parent_b", "joint") == pytest.approx(3 / 7)
    # Ensemble: per-head softmax, concatenated. Per task = the parents'. Joint: sample 1 goes to b2
    # (B is sure: softmax 0.999 > A's 0.731), 3 is wrong for A anyway; 4: A's 0.993 beats B's 0.576 (wrong),
    # 5: A's 0.622 beats B's right 0.576 (wrong), 6: B's 0.787 beats A's 0.731 (right) -> 0, 2, 6 right.
    assert score("ensemble", "alpha") == pytest.approx(3 / 4) and score("ensemble", "beta") == pytest.approx(
        1.0
    )
    assert score("ensemble", "average") == pytest.approx(7 / 8)
    assert score("ensemble", "joint") == pytest.approx(3 / 7)
    assert result.tasks["alpha"]["num_samples"] == 4 and result.tasks["beta"]["label_range"] == [2, 5]
    assert list(result.scores) == ["parent_a", "parent_b", "ensemble", "merged"]


def test_results_json_round_trip_card_rows_and_table(table_models, tmp_path):
    merged, parent_a, parent_b = table_models
    result = evaluate_merge(
        {"mine": merged},
        [parent_a, parent_b],
        list(table_tasks().values()),
        metrics=["accuracy", "f1"],
        progress=False,
    )
    path = result.save(tmp_path / "eval.json")
    again = EvaluationResult.load(path)
    assert again.scores == result.scores and again.tasks == result.tasks and again.merged == ["mine"]
    assert json.loads(path.read_text())["metrics"] == ["accuracy", "f1"]
    rows = result.card_rows()
    assert [(r.task, r.metric) for r in rows] == [
        ("alpha", "accuracy"),
        ("beta", "accuracy"),
        ("joint (all tasks)", "accuracy"),
        ("alpha", "f1"),
        ("beta", "f1"),
        ("joint (all tasks)", "f1"),
    ]
    assert rows[0].merged == pytest.approx(3 / 4) and rows[0].parent_a == pytest.approx(3 / 4)
    assert rows[0].parent_b is None and rows[2].ensemble == pytest.approx(3 / 7)
    table = result.table()
    assert "| mine | 0.7500 | 0.6667 | 0.4286 | 0.7083 |" in table
    assert "| parent_a | 0.7500 | - | 0.4286 | - |" in table


def test_shared_label_set_scores_each_parent_on_every_task():
    labels = ["x", "y"]
    merged = table_model([[1, 0], [0, 1], [1, 0]], labels)
    parent_a = table_model([[1, 0], [1, 0], [1, 0]], labels)
    parent_b = table_model([[0, 3], [0, 2], [0, 3]], labels)
    data = {
        "one": (torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1])),
        "two": (torch.tensor([[2.0]]), ["x"]),
    }
    result = evaluate_merge(merged, [parent_a, parent_b], data, progress=False)
    assert result.score("merged", "one") == 1.0 and result.score("merged", "two") == 1.0
    assert result.score("parent_a", "one") == 0.5 and result.score("parent_b", "two") == 0.0
    assert result.score("parent_b", "average") == pytest.approx(0.25)
    # ensemble = mean softmax: sample 0 -> x (0.73+0.05)/2 < y (0.27+0.95)/2: wrong;
    # 1 -> y (0.27+0.88)/2: right; 2 -> y: wrong.
    assert result.score("ensemble", "joint") == pytest.approx(1 / 3)


def test_one_dataset_with_joint_labels_or_a_task_column(table_models):
    merged, parent_a, parent_b = table_models
    ids = list(range(7))
    joint_labels = [0, 1, 1, 0, 4, 2, 3]
    data = datasets.Dataset.from_dict(
        {
            "pixel_values": [[float(i)] for i in ids],
            "label": joint_labels,
            "task": ["alpha"] * 4 + ["beta"] * 3,
            "local": [0, 1, 1, 0, 2, 0, 1],
        }
    )
    expected = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), progress=False).scores
    by_range = tasks_from_dataset(data, ["alpha", "beta"], RANGES)
    assert evaluate_merge(merged, [parent_a, parent_b], by_range, progress=False).scores == expected
    by_column = tasks_from_dataset(data, ["alpha", "beta"], task_column="task", label_column="local")
    assert evaluate_merge(merged, [parent_a, parent_b], by_column, progress=False).scores == expected
    shuffled = data.shuffle(seed=0)
    by_column = tasks_from_dataset(
        shuffled.to_iterable_dataset(), ["alpha", "beta"], task_column="task", label_column="local"
    )
    assert evaluate_merge(merged, [parent_a, parent_b], by_column, progress=False).scores == expected


def test_bad_evaluation_input_gets_clear_errors(table_models):
    merged, parent_a, parent_b = table_models
    tasks = table_tasks()
    with pytest.raises(EvaluationError, match=r"unknown task\(s\) \['gamma'\]"):
        evaluate_merge(merged, None, {"gamma": tasks["alpha"]}, progress=False)
    with pytest.raises(EvaluationError, match="parent A has 3 labels but task 'alpha' has 2"):
        evaluate_merge(merged, [parent_b, parent_a], tasks, progress=False)
    with pytest.raises(EvaluationError, match="label 5 is outside its classes 0..1"):
        evaluate_merge(merged, None, {"alpha": (torch.zeros(1, 1), torch.tensor([5]))}, progress=False)
    with pytest.raises(EvaluationError, match="label 'zz' is not one of its classes"):
        evaluate_merge(merged, None, {"alpha": (torch.zeros(1, 1), ["zz"])}, progress=False)
    with pytest.raises(EvaluationError, match="no label column"):
        data = datasets.Dataset.from_dict({"pixel_values": [[0.0]], "target": [0]})
        evaluate_merge(merged, None, {"alpha": data}, progress=False)
    with pytest.raises(EvaluationError, match="3 datasets for 2 tasks"):
        evaluate_merge(merged, None, [tasks["alpha"]] * 3, progress=False)
    with pytest.raises(EvaluationError, match="not shipped"):
        evaluate_merge(merged, None, tasks, metrics=["bogus_metric_xyz"], progress=False)


def test_inputs_modes_are_restored(table_models):
    merged, _, _ = table_models
    merged.train()
    evaluate_merge(merged, None, {"alpha": table_tasks()["alpha"]}, progress=False)
    assert merged.training
    merged.eval()


def test_a_submodules_mode_and_the_callers_hooks_are_restored_and_the_hooks_do_not_run(table_models):
    """Evaluation scores the model as its weights define it: a hook the caller left on it (here one that turns every
    prediction wrong) does not run, and each submodule gets its own mode back — not only the top module."""
    merged, _, _ = table_models
    tasks = {"alpha": table_tasks()["alpha"]}
    clean = evaluate_merge(merged, None, tasks, progress=False).score("merged", "alpha")
    merged.extra = nn.Dropout()
    merged.extra.train()
    handle = merged.register_forward_hook(lambda module, args, output: ImageClassifierOutput(logits=-output.logits))
    try:
        assert evaluate_merge(merged, None, tasks, progress=False).score("merged", "alpha") == clean
        assert merged.extra.training and not merged.training
        assert merged(torch.zeros(1, 1)).logits[0, 0] == -MERGED_LOGITS[0][0]  # the caller's hook is still there
    finally:
        handle.remove()
        del merged.extra


def _joint_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"pixel_values": [[float(i)] for i in range(7)], "label": [0, 1, 1, 0, 4, 2, 3]}
    )


def _two_process_evaluation(out_dir: str) -> None:
    from hf_mudsc.calibrate.distributed import process_info

    torch.set_num_threads(1)
    merged = table_model(
        MERGED_LOGITS, ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"], RANGES
    )
    parents = [table_model(PARENT_A_LOGITS, ["a0", "a1"]), table_model(PARENT_B_LOGITS, ["b0", "b1", "b2"])]
    rank, _ = process_info()
    results = {
        "tensors": evaluate_merge(merged, parents, table_tasks(), batch_size=2, progress=False),
        "dataset": evaluate_merge(
            merged,
            parents,
            tasks_from_dataset(_joint_dataset(), ["alpha", "beta"], RANGES),
            batch_size=2,
            progress=False,
        ),
    }
    saved = {k: None if v is None else v.to_dict() for k, v in results.items()}
    # A bad label in rank 1's shard only (rows are strided): both processes must raise, none may hang.
    try:
        bad = {"alpha": (torch.arange(4.0)[:, None], torch.tensor([0, 7, 1, 0]))}
        evaluate_merge(merged, None, bad, progress=False)
        saved["error"] = None
    except EvaluationError as error:
        saved["error"] = str(error)
    torch.save(saved, f"{out_dir}/rank{rank}.pt")


def test_two_processes_score_shards_and_the_main_process_gets_the_whole_result(table_models, tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_two_process_evaluation, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    merged, parent_a, parent_b = table_models
    expected = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), progress=False)
    for name in ("tensors", "dataset"):
        assert ranks[1][name] is None  # only the main process gets (and writes) results
        assert ranks[0][name]["scores"] == expected.scores, name
        assert ranks[0][name]["tasks"]["alpha"]["num_samples"] == 4
    assert "label 7 is outside its classes" in ranks[1]["error"]
    assert "failed on another process" in ranks[0]["error"] and "label 7" in ranks[0]["error"]


# ------------------------------------------------------------------------------------------ CLIP zero-shot
def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """`<bos> word ... <eos>` with the tiny CLIP's special ids (bos 57, eos 58, pad 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "<bos>": TEXT["bos_token_id"], "<eos>": TEXT["eos_token_id"]}
    vocab.update({w: 5 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", TEXT["bos_token_id"]), ("<eos>", TEXT["eos_token_id"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="<bos>", eos_token="<eos>"
    )


def test_clip_zero_shot_matches_clips_own_image_text_logits():
    names = {"pets": ["cat", "dog"], "fish": ["eel", "cod", "ray"]}
    words = [w for ws in names.values() for w in ws] + ["photo", "of", "a"]
    tokenizer = word_tokenizer(words)
    model_a, model_b = make_model("clip", seed=0), make_model("clip", seed=1)
    images = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = tokenizer(
        [f"a photo of {n}" for ws in names.values() for n in ws], padding=True, return_tensors="pt"
    )
    with torch.no_grad():  # CLIP's own path: logits_per_image over all five class prompts
        own = [
            m(
                input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], pixel_values=images
            ).logits_per_image
            for m in (model_a, model_b)
        ]
    # Labels: task "pets" = images 0-4, "fish" = 5-9, chosen as model A's argmax within the task for the first
    # three images of each task and deliberately something else for the rest.
    pets_pred, fish_pred = own[0][:5, :2].argmax(1), own[0][5:, 2:].argmax(1)
    pets_labels = torch.cat([pets_pred[:3], 1 - pets_pred[3:]])
    fish_labels = torch.cat([fish_pred[:3], (fish_pred[3:] + 1) % 3])
    data = {"pets": (images[:5], pets_labels), "fish": (images[5:], fish_labels)}
    backend = tokenizer.backend_tokenizer
    tokenizer.model_max_length = 16  # prompts cut at 16 tokens: a call with truncation switches it on
    backend.no_padding()  # as a tokenizer comes from its folder (the prompts above switched padding on)
    before = (backend.truncation, backend.padding)
    result = evaluate_merge(
        model_a,
        [model_a, model_b],
        data,
        processor=tokenizer,
        class_names=names,
        prompt_template="a photo of {}",
        batch_size=4,
        progress=False,
    )
    assert result.score("merged", "pets") == pytest.approx(3 / 5)
    assert result.score("merged", "fish") == pytest.approx(3 / 5)
    assert (backend.truncation, backend.padding) == before  # the prompts leave the tokenizer as it was
    joint_labels = torch.cat([pets_labels, fish_labels + 2])
    expected_joint = float((own[0].argmax(1) == joint_labels).float().mean())
    assert result.score("merged", "joint") == pytest.approx(expected_joint)
    assert result.score("parent_a", "joint") == pytest.approx(expected_joint)  # the same model
    # Every CLIP scores every task; the ensemble averages both parents' softmaxes over all classes.
    expected_b = float((own[1][5:, 2:].argmax(1) == fish_labels).float().mean())
    assert result.score("parent_b", "fish") == pytest.approx(expected_b)
    ensemble = (own[0].softmax(1) + own[1].softmax(1)) / 2
    expected_ensemble = float((ensemble.argmax(1) == joint_labels).float().mean())
    assert result.score("ensemble", "joint") == pytest.approx(expected_ensemble)
    assert result.tasks["fish"]["classes"] == ["eel", "cod", "ray"]


def test_clip_needs_class_names_and_a_tokenizer():
    model = make_model("clip", seed=0)
    data = {"pets": (torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))}
    with pytest.raises(EvaluationError, match="needs the class names of task 'pets'"):
        evaluate_merge(model, None, data, processor=word_tokenizer(["cat"]), progress=False)
    with pytest.raises(EvaluationError, match="needs a tokenizer"):
        evaluate_merge(model, None, data, class_names={"pets": ["cat", "dog"]}, progress=False)


def test_raw_text_columns_are_tokenized_with_the_processor():
    tokenizer = word_tokenizer(["good", "bad", "movie", "plot"])
    model = make_model("bert_cls", seed=0, num_labels=2)
    texts = ["good movie", "bad plot", "good plot plot", "bad", "movie"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).logits.argmax(1)
    labels = [
        int(p) if i < 3 else 1 - int(p) for i, p in enumerate(predictions)
    ]  # 3 of 5 right by construction
    data = datasets.Dataset.from_dict({"text": texts, "label": labels})
    result = evaluate_merge(model, None, [data], processor=tokenizer, batch_size=2, progress=False)
    assert result.task_names == ["task_0"] and result.score("merged", "task_0") == pytest.approx(3 / 5)


# ------------------------------------------------------------------------------------- evaluate command
def _images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(count)]


@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory):
    """Two tiny ViTs with different label sets merged by the CLI (zipit), plus per-task test datasets."""
    root = tmp_path_factory.mktemp("evaluate_cli")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for name, seed, labels in (("vit-a", 1, ["zero", "one", "two"]), ("vit-b", 2, ["cat", "dog"])):
        model = make_model("vit_cls", seed, num_labels=len(labels))
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    calibration = datasets.Dataset.from_dict({"image": _images(0, 24)}).cast_column("image", datasets.Image())
    calibration.save_to_disk(root / "calibration")
    out = root / "merged"
    assert (
        main(
            [
                "merge",
                str(root / "vit-a"),
                str(root / "vit-b"),
                "--calibration",
                str(root / "calibration"),
                "--output",
                str(out),
                "--method",
                "zipit",
                "--num-samples",
                "24",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    rng = np.random.default_rng(1)
    tests = {}
    for task, count, classes in (("vit-a", 12, 3), ("vit-b", 10, 2)):
        labels = rng.integers(0, classes, count).tolist()
        data = datasets.Dataset.from_dict({"image": _images(hash(task) % 100, count), "label": labels})
        data.cast_column("image", datasets.Image()).save_to_disk(root / f"test-{task}")
        tests[task] = root / f"test-{task}"
    part_a = datasets.load_from_disk(str(tests["vit-a"])).map(
        lambda row: {"task": "vit-a", "local": row["label"]}
    )
    part_b = datasets.load_from_disk(str(tests["vit-b"])).map(
        lambda row: {"task": "vit-b", "local": row["label"], "label": row["label"] + 3}
    )
    joint = datasets.concatenate_datasets([part_a, part_b]).shuffle(seed=0)
    joint.save_to_disk(root / "test-joint")
    return root, out, tests


def test_evaluate_cli_writes_json_and_model_index_like_the_python_api(merged_folder, capsys):
    root, out, tests = merged_folder
    before = (out / "model.safetensors").read_bytes()
    code = main(
        [
            "evaluate",
            str(out),
            "--dataset",
            f"vit-a={tests['vit-a']}",
            "--dataset",
            f"vit-b={tests['vit-b']}",
            "--batch-size",
            "5",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| parent A |" in printed and "| ensemble |" in printed and "| merged |" in printed
    saved = EvaluationResult.load(out / "eval_results.json")
    expected = evaluate_merge(
        str(out),
        [str(root / "vit-a"), str(root / "vit-b")],
        {t: datasets.load_from_disk(str(p)) for t, p in tests.items()},
        progress=False,
    )
    assert saved.scores == expected.scores
    assert saved.tasks["vit-a"]["num_samples"] == 12 and saved.tasks["vit-b"]["dataset"] == "test-vit-b"
    card = ModelCard.load(out / "README.md")
    index = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index[("vit-a", "accuracy")] == pytest.approx(expected.score("merged", "vit-a"))
    # the joint figure holds two datasets' rows: each model-index result names one dataset, so it is in the table only
    assert ("joint (all tasks)", "accuracy") not in index
    joint = "| joint (all tasks) | test-vit-a (local folder) + test-vit-b (local folder) | — | accuracy |"
    assert joint in card.text and f"**{expected.score('merged', 'joint'):.4f}** |" in card.text
    assert card.data.base_model is None and "## Evaluation" in card.text and "# merged" in card.text
    assert (out / "model.safetensors").read_bytes() == before  # weights untouched
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".hf_mudsc_output.json"]  # no temp files


def test_evaluate_cli_dataset_to_task_mappings_agree(merged_folder, tmp_path):
    root, out, tests = merged_folder
    reference = None
    for index, argv in enumerate(
        [
            ["--dataset", str(tests["vit-a"]), "--dataset", str(tests["vit-b"])],  # in task order
            ["--dataset", str(root / "test-joint")],  # one dataset, labels in the joint head's ids
            ["--dataset", str(root / "test-joint"), "--task-column", "task", "--label-column", "local"],
        ]
    ):
        json_path = tmp_path / f"{index}.json"
        assert main(["evaluate", str(out), *argv, "--no-card", "--output-json", str(json_path)]) == 0
        scores = EvaluationResult.load(json_path).scores
        reference = reference or scores
        assert scores == reference


def test_evaluate_cli_errors_name_the_fix(merged_folder, tmp_path, capsys):
    _, out, tests = merged_folder
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--dataset",
                f"nope={tests['vit-a']}",
                "--no-card",
                "--output-json",
                str(tmp_path / "x.json"),
            ]
        )
        == 2  # an unknown task name: an invalid command line
    )
    assert "unknown task(s) ['nope']" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--dataset",
                str(tests["vit-a"]),
                "--label-column",
                "missing",
                "--no-card",
                "--output-json",
                str(tmp_path / "x.json"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "1 datasets for the model's 2 tasks" in err or "no label column" in err
    assert main(["evaluate", str(tmp_path / "absent"), "--dataset", str(tests["vit-a"])]) == 2  # before any loading
    assert "is not a model folder" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--dataset", str(tmp_path / "no-data:test")]) == 2  # before any loading
    assert f"no file or folder '{tmp_path / 'no-data'}'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------------- demo
def test_demo_end_to_end_writes_model_card_recipe_and_prints_the_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf-mudsc-demo"
    argv = [
        "demo",
        "--output",
        str(out),
        "--hidden-size",
        "32",
        "--epochs",
        "3",
        "--num-samples",
        "64",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    for label in (
        "parent A (digits 0-4)",
        "ensemble (A+B)",
        "mudsc (zip)",
        "mudsc (align)",
        "zipit",
        "activation_align",
        "weight_matching",
        "| average |",
    ):
        assert label in printed, label
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        RECIPE_FILENAME,
        "eval_results.json",
        "preprocessor_config.json",
    } <= names
    card = ModelCard.load(out / "README.md")
    assert {r.task_name for r in card.data.eval_results} == {"digits-0-4", "digits-5-9", "joint (all tasks)"}
    result = EvaluationResult.load(out / "eval_results.json")
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.task_label_ranges == {"digits-0-4": [0, 5], "digits-5-9": [5, 10]}
    assert model.config.mudsc["method"] == "mudsc" and model.config.mudsc["matcher"] == "zip"
    from hf_mudsc.testing import toy

    splits = toy.digit_splits(num_channels=3)  # the demo exports RGB models
    again = evaluate_merge(
        model,
        None,
        {
            "digits-0-4": (splits.task_a.test_pixel_values, splits.task_a.test_labels),
            "digits-5-9": (splits.task_b.test_pixel_values, splits.task_b.test_labels),
        },
        progress=False,
    )
    for view in ("digits-0-4", "digits-5-9", "joint"):
        assert again.score("merged", view) == pytest.approx(result.score("mudsc (zip) + refit", view))

    # The recipe records the refit that ran (resolved, as `hf-mudsc merge` records it), and the command the demo
    # prints re-runs the exact merge: it pins the demo's one torch thread (float sums depend on the thread count).
    assert Recipe.load(out / RECIPE_FILENAME).refit == model.config.mudsc["refit"] == "gate"
    assert f"`OMP_NUM_THREADS=1 hf-mudsc merge --recipe {out / RECIPE_FILENAME} --output merged`" in printed
    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 sets in a fresh process
    try:
        assert main(["merge", "--recipe", str(out / RECIPE_FILENAME), "--output", str(tmp_path / "rebuilt")]) == 0
    finally:
        torch.set_num_threads(threads)
    rebuilt = (tmp_path / "rebuilt" / "model.safetensors").read_bytes()
    assert rebuilt == (out / "model.safetensors").read_bytes()

    # A second run: refused without --overwrite; with it, parents come from the cache (no training).
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err

    def no_training(*args, **kwargs):
        raise AssertionError("the demo retrained although its parents are cached")

    monkeypatch.setattr("hf_mudsc.testing.toy.train_vit", no_training)
    assert main([*argv, "--overwrite"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert math.isclose(
        EvaluationResult.load(out / "eval_results.json").score("mudsc (zip) + refit", "joint"),
        result.score("mudsc (zip) + refit", "joint"),
    )


def test_the_light_metric_names_are_the_shipped_metrics():
    """`evaluate --help` lists the shipped metrics from a torch-free module; it must list exactly those."""
    from hf_mudsc.evaluate.metrics import SHIPPED_METRICS
    from hf_mudsc.evaluate.names import SHIPPED_METRIC_NAMES

    assert SHIPPED_METRIC_NAMES == tuple(SHIPPED_METRICS) == ("accuracy", "f1")


# Task A's logits run small, task B's large: the raw argmax over the concatenation picks B's classes on A's
# samples 0-2; each task's softmax first (the ensemble's rule) decides samples 0 and 1 right.
SCALED_LOGITS = [  # classes: a0 a1 | b0 b1 b2
    [2, 0, 5, 4, 4.5],  # A label 0: raw b0 (wrong); per task a0 0.881 > b0 0.506 (right)
    [0, 1, 6, 5.5, 5],  # A label 1: raw b0 (wrong); per task a1 0.731 > b0 0.506 (right)
    [0, 0.5, 3, 0, 0],  # A label 1: raw b0 (wrong); per task b0 0.909 > a1 0.622 (wrong)
    [3, 0, 0, 0, 0],    # A label 0: right either way
    [0, 0, 0, 0, 9],    # B label b2: right either way
    [1, 0, 7, 0, 0],    # B label b0: right either way
    [0.1, 0, 3, 3.2, 0],  # B label b1: raw b1; per task b1 0.535 > a0 0.525 (right either way)
]


def test_a_concatenated_merged_head_decides_jointly_by_each_tasks_softmax_like_the_ensemble(table_models):
    _, parent_a, parent_b = table_models
    labels = ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"]
    merged = table_model(SCALED_LOGITS, labels, RANGES)
    result = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), batch_size=3, progress=False)
    assert result.score("merged", "joint") == pytest.approx(6 / 7)  # the raw argmax would score 4 / 7
    assert result.score("merged", "alpha") == pytest.approx(1.0) and result.score("merged", "beta") == 1.0
    # The public helper is the rule the joint figure scores.
    logits = torch.tensor(SCALED_LOGITS)
    joint = hf_mudsc.joint_probabilities(logits, merged.config)
    assert joint.argmax(-1).tolist() == [0, 1, 2, 0, 4, 2, 3]
    assert torch.allclose(joint[:, :2].sum(-1), torch.ones(7)) and torch.allclose(joint[:, 2:].sum(-1), torch.ones(7))
    assert torch.allclose(joint[:, 2:], logits[:, 2:].softmax(-1))


def test_joint_probabilities_reads_the_ranges_in_label_order_and_refuses_a_mismatch():
    # config.json is written with sorted keys: the loaded mapping can list B's task first.
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0]])
    config = TableConfig(id2label=dict(enumerate("abcde")), task_label_ranges={"zeta": [0, 2], "beta": [2, 5]})
    expected = torch.cat([logits[:, :2].softmax(-1), logits[:, 2:].softmax(-1)], dim=-1)
    assert torch.allclose(hf_mudsc.joint_probabilities(logits, config), expected)
    assert torch.allclose(hf_mudsc.joint_probabilities(logits, {"beta": [2, 5], "zeta": [0, 2]}), expected)
    # One shared label set (no ranges): a plain softmax.
    assert torch.allclose(hf_mudsc.joint_probabilities(logits, TableConfig()), logits.softmax(-1))
    with pytest.raises(ValueError, match="cover 5 labels but the logits have 4"):
        hf_mudsc.joint_probabilities(logits[:, :4], {"a": [0, 2], "b": [2, 5]})
    with pytest.raises(ValueError, match="overlap or leave gaps"):
        hf_mudsc.joint_probabilities(logits, {"a": [0, 2], "b": [3, 5]})


def test_joint_probabilities_reads_a_config_json_dict_and_refuses_other_mappings_in_one_line(tmp_path):
    """A config read with json.load (what config.json holds) failed with "'float' object is not iterable": it is read
    as the config it is; a mapping that is neither a config nor task ranges is refused naming what it takes."""
    logits = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0], [0.5, -1.0, 2.0, 1.0, 0.0]])
    config = TableConfig(id2label=dict(enumerate("abcde")), task_label_ranges={"zeta": [0, 2], "beta": [2, 5]})
    config.save_pretrained(tmp_path)
    as_json = json.loads((tmp_path / "config.json").read_text())
    assert torch.equal(hf_mudsc.joint_probabilities(logits, as_json), hf_mudsc.joint_probabilities(logits, config))
    plain = TableConfig()
    plain.save_pretrained(tmp_path / "plain")
    plain_json = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert torch.equal(hf_mudsc.joint_probabilities(logits, plain_json), logits.softmax(-1))
    with pytest.raises(EvaluationError) as refused:
        hf_mudsc.joint_probabilities(logits, {"alpha": 0.5, "task_a": [0, 2]})
    assert str(refused.value) == (
        "joint_probabilities takes the merged model's config (model.config, or its config.json as a dict) or its "
        "task_label_ranges (task -> [first id, end id)); got a mapping with 'alpha': 0.5")
    with pytest.raises(ValueError, match=r"^config.task_label_ranges must map each task"):
        hf_mudsc.joint_probabilities(logits, {**as_json, "task_label_ranges": {"a": 1.0}})


def test_the_raw_joint_rule_scores_merged_head_and_ensemble_by_their_raw_logits(table_models):
    _, parent_a, parent_b = table_models
    labels = ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"]
    merged = table_model(SCALED_LOGITS, labels, RANGES)
    result = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), batch_size=3, progress=False,
                            joint_rule="raw")
    assert result.score("merged", "joint") == pytest.approx(4 / 7)  # samples 3-6; A's 0-2 go to B's b0
    assert result.score("merged", "alpha") == pytest.approx(1.0)  # per task: no rule involved
    # Ensemble, raw (A's logits then B's): 0 -> a0 (right), 1 -> b2 (8; wrong), 2 -> a1 (right), 3 -> a1 (wrong),
    # 4 -> a0 (5; wrong), 5 -> b0 (1 > 0.5; right), 6 -> b1 (2 > 1; right). Per-head softmax gives 3 / 7.
    assert result.score("ensemble", "joint") == pytest.approx(4 / 7)
    assert result.definitions["joint_rule"] == "raw" and "raw concatenated logits" in result.definitions["joint"]
    assert [row.task for row in result.card_rows()][-1] == "joint (all tasks, raw logits)"  # the card says which
    per_task = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), batch_size=3, progress=False)
    assert per_task.definitions["joint_rule"] == "per_task"
    assert [row.task for row in per_task.card_rows()][-1] == "joint (all tasks)"
    # A result saved before the rule was recorded reads as the default rule.
    assert EvaluationResult.from_dict({**per_task.to_dict(), "definitions": {}}).card_rows()[-1].task == \
        "joint (all tasks)"
    with pytest.raises(EvaluationError, match="joint_rule must be one of per_task, raw, got 'softmax'"):
        evaluate_merge(merged, [parent_a, parent_b], table_tasks(), progress=False, joint_rule="softmax")


def test_clip_class_names_given_in_another_order_than_the_class_label_are_read_by_name_and_repeats_refused():
    """`class_names={"pets": ["dog", "cat"]}` on a ClassLabel column listing cat, dog: the ids were read in the given
    order, so every row was scored against the other class (accuracy 0 for a perfect model). A name given twice
    makes two identical prompts, so the second can never win: refused."""
    tokenizer = word_tokenizer(["cat", "dog", "photo", "of", "a"])
    model = make_model("clip", seed=0)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    given = ["dog", "cat"]
    prompts = tokenizer([f"a photo of {n}" for n in given], padding=True, return_tensors="pt")
    with torch.no_grad():
        answers = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                        pixel_values=images).logits_per_image.argmax(1).tolist()
    features = datasets.Features({"pixel_values": datasets.Array3D((3, 16, 16), "float32"),
                                  "label": datasets.ClassLabel(names=["cat", "dog"])})
    rows = {"pixel_values": images.numpy(), "label": [["cat", "dog"].index(given[a]) for a in answers]}
    data = {"pets": datasets.Dataset.from_dict(rows, features=features)}
    result = evaluate_merge(model, None, data, processor=tokenizer, class_names={"pets": given},
                            prompt_template="a photo of {}", progress=False)
    assert result.score("merged", "pets") == 1.0
    with pytest.raises(EvaluationError, match=r"class names of task 'pets' name 'cat' twice") as error:
        evaluate_merge(model, None, data, processor=tokenizer, class_names={"pets": ["cat", "cat", "dog"]},
                       progress=False)
    assert "\n" not in str(error.value)


def test_a_joint_figure_on_some_tasks_data_is_not_called_all_tasks(table_models):
    """Scoring one task of two still gave a card row "joint (all tasks)" (and its model-index entry), though only
    that task's rows were scored: the row names the tasks whose data it holds."""
    merged, parent_a, parent_b = table_models
    alpha = {"alpha": table_tasks()["alpha"]}
    result = evaluate_merge(merged, [parent_a, parent_b], alpha, progress=False)
    assert [row.task for row in result.card_rows()] == ["alpha", "joint (all classes, data of alpha only)"]
    assert "only the data of alpha was scored" in result.definitions["joint"]
    again = EvaluationResult.from_dict(result.to_dict())
    assert again.card_rows()[-1].task == "joint (all classes, data of alpha only)"
    full = evaluate_merge(merged, [parent_a, parent_b], table_tasks(), progress=False)
    assert full.card_rows()[-1].task == "joint (all tasks)"


@pytest.mark.parametrize("stream", [False, True])
def test_one_dataset_with_a_joint_label_outside_every_task_is_refused_not_dropped(table_models, stream):
    """A row of one dataset for every task whose joint label (7, -1) lies in no task's range was left out of every
    task without a word: the figures then claimed the split while scoring part of it."""
    merged, parent_a, parent_b = table_models
    data = datasets.Dataset.from_dict({"pixel_values": [[float(i)] for i in range(7)],
                                       "label": [0, 1, 1, 0, 4, 7, 3]})
    data = data.to_iterable_dataset() if stream else data
    with pytest.raises(EvaluationError, match=r"label 7 is no id of the merged model's joint head \(0\.\.4\)") as error:
        evaluate_merge(merged, [parent_a, parent_b], tasks_from_dataset(data, ["alpha", "beta"], RANGES),
                       progress=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stream", [False, True])
def test_one_dataset_with_a_row_of_no_task_of_the_model_is_refused_not_dropped(table_models, stream):
    """With a task column, a row naming a task the model does not have ('gamma') was left out of every task without
    a word, so the figures claimed the split while scoring part of it."""
    merged, parent_a, parent_b = table_models
    data = datasets.Dataset.from_dict({"pixel_values": [[float(i)] for i in range(5)], "local": [0, 1, 1, 0, 2],
                                       "task": ["alpha", "alpha", "gamma", "beta", "beta"]})
    data = data.to_iterable_dataset() if stream else data
    tasks = tasks_from_dataset(data, ["alpha", "beta"], task_column="task", label_column="local")
    with pytest.raises(EvaluationError, match=r"task column 'task' holds 'gamma', no task of the merged") as error:
        evaluate_merge(merged, [parent_a, parent_b], tasks, progress=False)
    assert "\n" not in str(error.value)


def test_loading_results_of_gigabytes_is_refused_before_reading_them(tmp_path):
    """`EvaluationResult.load` read the file whole: one padded to gigabytes (sparse) took that much memory first."""
    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES

    path = tmp_path / "eval_results.json"
    path.write_text("{}")
    with open(path, "ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)
    with pytest.raises(ValueError, match="eval_results.json is .* bytes"):
        EvaluationResult.load(path)


# ------------------------------------------------------------------- one dataset for several tasks (QA s19)
def _no_loading(monkeypatch) -> None:
    """Any model load fails the test: the refusal must come before the weights."""
    import hf_mudsc.load.parents

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was refused")

    monkeypatch.setattr(hf_mudsc.load.parents, "load_parent", refuse)


@pytest.mark.parametrize("holding", ["joint-labels", "task-column"])
def test_one_dataset_that_holds_one_task_of_several_is_refused_before_loading_naming_the_fix(
        merged_folder, tmp_path, capsys, monkeypatch, holding):
    """`--dataset ./test-vit-a` alone for a model of two tasks was read as one dataset holding every task; after
    loading every model it failed with "task(s) ['vit-b'] have no evaluation rows" (exit 1)."""
    root, out, tests = merged_folder
    if holding == "joint-labels":
        flags = ["--dataset", str(tests["vit-a"])]
    else:
        only_a = datasets.load_from_disk(str(root / "test-joint")).filter(lambda row: row["task"] == "vit-a")
        only_a.save_to_disk(tmp_path / "only-a")
        flags = ["--dataset", str(tmp_path / "only-a"), "--task-column", "task", "--label-column", "local"]
    _no_loading(monkeypatch)
    json_path = tmp_path / "x.json"
    capsys.readouterr()  # the setup's own datasets bars (filter, save), drawn unless an earlier test left them off
    assert main(["evaluate", str(out), *flags, "--no-card", "--output-json", str(json_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "no row of task(s) ['vit-b']" in err and "--dataset vit-a=SPEC --dataset vit-b=SPEC" in err, err
    assert not json_path.exists()


def test_one_dataset_holding_every_task_is_still_scored(merged_folder, tmp_path):
    """The check above refuses only a dataset that lacks a task: one holding both (joint labels) still scores."""
    root, out, _ = merged_folder
    json_path = tmp_path / "joint.json"
    assert main(["evaluate", str(out), "--dataset", str(root / "test-joint"), "--no-card",
                 "--output-json", str(json_path)]) == 0
    saved = EvaluationResult.load(json_path)
    assert saved.tasks["vit-a"]["num_samples"] == 12 and saved.tasks["vit-b"]["num_samples"] == 10


def test_a_task_missing_from_a_streamed_dataset_for_every_task_is_refused_naming_the_fix(merged_folder):
    """A stream cannot be checked before reading it: the late error names the fix (one dataset per task)."""
    root, out, tests = merged_folder
    data = datasets.load_from_disk(str(tests["vit-a"])).to_iterable_dataset()
    ranges = {"vit-a": (0, 3), "vit-b": (3, 5)}
    with pytest.raises(EvaluationError, match=r"task\(s\) \['vit-b'\] have no evaluation rows") as error:
        evaluate_merge(str(out), None, tasks_from_dataset(data, list(ranges), ranges), progress=False)
    message = str(error.value)
    assert "\n" not in message and "one dataset per task" in message and "--dataset vit-a=SPEC" in message


def test_a_clip_model_with_datasets_not_named_by_task_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """CLIP has no task names of its own: `--dataset X` without TASK= was refused only after loading (~11 s);
    the config says it is CLIP."""
    make_model("clip", seed=0).save_pretrained(tmp_path / "clip-merged")
    (tmp_path / "no-data").mkdir()  # data that exists (a missing folder is refused first, also before loading)
    _no_loading(monkeypatch)
    capsys.readouterr()  # the setup's own transformers bar (writing shards), drawn unless an earlier test left it off
    assert main(["evaluate", str(tmp_path / "clip-merged"), "--dataset", str(tmp_path / "no-data"),
                 "--no-parents", "--no-card", "--output-json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "CLIP has no task names" in err and "TASK=SPEC" in err, err


# ------------------------------------------------------------------- evaluation data named as such (QA s19)
def test_evaluation_data_that_cannot_be_loaded_is_called_evaluation_data_naming_its_task(merged_folder, tmp_path,
                                                                                         capsys, monkeypatch):
    """The loader is calibration's: `--dataset vit-a=./nope` said "calibration dataset './nope' not found", and a
    bare folder name "calibration spec 'test-vit-b' is ambiguous"."""
    root, out, tests = merged_folder
    monkeypatch.chdir(root)
    assert main(["evaluate", str(out), "--dataset", f"vit-a={tests['vit-a']}", "--dataset", "vit-b=test-vit-b",
                 "--no-card", "--output-json", str(tmp_path / "x.json")]) == 2  # with the flags, before loading
    err = capsys.readouterr().err
    assert "evaluation spec 'test-vit-b' is ambiguous" in err and "calibration" not in err, err
    nope = tmp_path / "nope"
    assert main(["evaluate", str(out), "--dataset", f"vit-a={nope}", "--dataset", f"vit-b={tests['vit-b']}",
                 "--no-card", "--output-json", str(tmp_path / "x.json")]) == 2  # a missing path: before loading
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--dataset vit-a={nope}: no file or folder '{nope}'" in err and "calibration" not in err, err
    with pytest.raises(EvaluationError, match=r"evaluation dataset '.*nope' \(task 'vit-b'\) not found") as error:
        evaluate_merge(str(out), None, {"vit-a": str(tests["vit-a"]), "vit-b": str(nope)}, progress=False)
    assert "calibration" not in str(error.value)


def test_an_evaluation_run_logs_evaluation_data_not_calibration(merged_folder, tmp_path, caplog):
    """Every evaluate run logged `calibration from dataset: ...` once per task."""
    _, out, tests = merged_folder
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        assert main(["evaluate", str(out), "--dataset", f"vit-a={tests['vit-a']}", "--dataset",
                     f"vit-b={tests['vit-b']}", "--no-card", "--output-json", str(tmp_path / "x.json")]) == 0
    said = [record.getMessage() for record in caplog.records if record.name.startswith("hf_mudsc")]
    assert not [line for line in said if "calibrat" in line.lower()], said
    read = [line for line in said if " from " in line and "columns" in line]
    assert [line.split(" from ")[0] for line in read] == ["evaluation data of task 'vit-a'",
                                                          "evaluation data of task 'vit-b'"], said


@pytest.mark.parametrize("joint_rule", ["per_task", "raw"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_are_refused_not_read_as_predictions(joint_rule, bad):
    """torch's argmax takes NaN as the largest value: a merge whose logits were all NaN scored 1.0 per task on
    data labelled class 0, and the figure was published."""
    table = [row[:] for row in MERGED_LOGITS]
    table[5][1] = bad
    merged = table_model(table, ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"], RANGES)
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge(merged, None, table_tasks(), progress=False, joint_rule=joint_rule)
    message = str(caught.value)
    assert "\n" not in message
    assert "merged gives logits that are not finite (NaN or inf) on 1 of 3 rows of task 'beta'" in message, message


def test_a_regression_head_with_several_outputs_is_refused_before_scoring():
    """`problem_type: regression` with two outputs (two scores per row) was scored by argmax accuracy, its figures
    written into the card's model-index; only a one-output head was refused."""
    merged = table_model(MERGED_LOGITS, ["alpha: a0", "alpha: a1", "beta: b0", "beta: b1", "beta: b2"], RANGES)
    merged.config.problem_type = "regression"
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge(merged, None, table_tasks(), progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "has a regression head (problem_type 'regression':" in message, message
