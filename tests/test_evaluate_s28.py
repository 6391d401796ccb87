"""`hf-mudsc evaluate` after the session-28 bug hunt: `--output-json` checked before the work and never splitting a
folder's card from its results, recipe parents treated as inputs, files in a written folder's subfolders recorded,
and label and task columns given as `ClassLabel`s read by name."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from factories import make_model
from PIL import Image
from transformers import ViTImageProcessor

from hf_mudsc.cli.main import main
from hf_mudsc.publish.folder import MARKER_FILENAME

pytestmark = pytest.mark.usefixtures("one_thread_module")

LABELS = {"zoo": ["lion", "seal", "yak"], "art": ["oil", "ink"]}


def _images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(count)]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Parents `zoo` (3 classes) and `art` (2) merged by the CLI (average: no data needed), each task's test set
    (12 and 10 rows) and one dataset holding both with a text `task` column and task-local labels."""
    root = tmp_path_factory.mktemp("evaluate_s28")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed, (name, labels) in enumerate(LABELS.items(), start=1):
        model = make_model("vit_cls", seed, num_labels=len(labels))
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    assert main(["merge", str(root / "zoo"), str(root / "art"), "--method", "average", "--output",
                 str(root / "merged"), "-q"]) == 0
    rng = np.random.default_rng(1)
    parts = []
    for seed, (task, count) in enumerate((("zoo", 12), ("art", 10))):
        labels = rng.integers(0, len(LABELS[task]), count).tolist()
        data = datasets.Dataset.from_dict({"image": _images(seed, count), "label": labels})
        data = data.cast_column("image", datasets.Image())
        data.save_to_disk(root / f"test-{task}")
        parts.append(data.map(lambda row, task=task: {"task": task}))
    datasets.concatenate_datasets(parts).save_to_disk(root / "both")
    return root


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith(("INFO", "WARN"))]
    assert len(lines) == 1, lines
    return lines[0]


def _files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_output_json_that_cannot_be_written_is_refused_before_the_work_and_splits_nothing(case, tmp_path,
                                                                                               capsys, monkeypatch):
    """`--output-json labels.json/r.json` (under a file) failed after the whole evaluation, and by then the folder's
    eval_results.json held the new run while its card still showed the old one."""
    import shutil

    import hf_mudsc.load.parents as parents

    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged)
    flags = ["--dataset", f"zoo={case / 'test-zoo'}", "--dataset", f"art={case / 'test-art'}", "--no-parents"]
    assert main(["evaluate", str(merged), *flags, "-q"]) == 0
    before = _files(merged)
    (tmp_path / "labels.json").write_text("{}")
    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    capsys.readouterr()
    target = tmp_path / "labels.json" / "r.json"
    assert main(["evaluate", str(merged), *flags, "--num-samples", "3", "--output-json", str(target)]) == 2
    line = _error(capsys)
    assert f"--output-json {str(target)!r} is under the file {str(tmp_path / 'labels.json')!r}" in line, line
    assert _files(merged) == before


def test_an_output_json_inside_a_parent_the_recipe_names_is_refused_like_one_of_parents(case, tmp_path, capsys,
                                                                                         monkeypatch):
    """Refused with `--parents zoo art`; with the same parents read from the recipe it was written into `zoo/`."""
    import hf_mudsc.load.parents as parents

    monkeypatch.setattr(parents, "load_parent", lambda *a, **k: pytest.fail("loaded before refusing"))
    before = _files(case / "zoo")
    capsys.readouterr()
    assert main(["evaluate", str(case / "merged"), "--dataset", f"zoo={case / 'test-zoo'}", "--dataset",
                 f"art={case / 'test-art'}", "--no-card", "--output-json", str(case / "zoo" / "results.json")]) == 2
    line = _error(capsys)
    assert "is inside the parent folder" in line and "inputs are never modified" in line, line
    assert _files(case / "zoo") == before


def test_an_output_json_in_a_subfolder_of_the_evaluated_folder_is_recorded_as_its_own(case, tmp_path):
    """`--output-json DIR/plots/r.json` was written but not listed in DIR's marker: `merge --output DIR --overwrite`
    then refused DIR as holding a file hf-mudsc did not write."""
    import shutil

    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged)
    assert main(["evaluate", str(merged), "--dataset", f"zoo={case / 'test-zoo'}", "--dataset",
                 f"art={case / 'test-art'}", "--no-parents", "--output-json", str(merged / "plots" / "r.json"),
                 "-q"]) == 0
    assert "plots/r.json" in json.loads((merged / MARKER_FILENAME).read_text())["files"]
    assert main(["merge", str(case / "zoo"), str(case / "art"), "--method", "average", "--output", str(merged),
                 "--overwrite", "-q"]) == 0
    assert not (merged / "plots" / "r.json").exists()


def _scores(case, tmp_path, flags, name="r.json"):
    """Run evaluate with `flags` (no card, no parents), return the results JSON."""
    out = tmp_path / name
    assert main(["evaluate", str(case / "merged"), *flags, "--no-parents", "--no-card", "--output-json", str(out),
                 "-q"]) == 0
    return json.loads(out.read_text())


def _figures(result):
    return ({task: info["num_samples"] for task, info in result["tasks"].items()}, result["scores"])


def test_a_task_column_that_is_a_class_label_is_read_by_its_names(case, tmp_path):
    """`class_encode_column('task')` makes the task column `ClassLabel(['art', 'zoo'])`: its ids were read as the
    tasks' parent-order indices, so zoo was scored on art's rows and the reverse, without a word."""
    both = datasets.load_from_disk(str(case / "both"))
    encoded = both.class_encode_column("task")
    assert encoded.features["task"].names == ["art", "zoo"]
    encoded.save_to_disk(tmp_path / "encoded")
    plain = _scores(case, tmp_path, ["--dataset", str(case / "both"), "--task-column", "task"], "plain.json")
    coded = _scores(case, tmp_path, ["--dataset", str(tmp_path / "encoded"), "--task-column", "task"], "coded.json")
    assert _figures(coded) == _figures(plain)
    assert _figures(plain)[0] == {"zoo": 12, "art": 10}


def test_a_task_column_is_read_for_datasets_named_by_task(case, tmp_path):
    """`--dataset zoo=./both --dataset art=./both --task-column task` scored each task on every row (the other
    task's too): the task column was ignored for datasets given as TASK=SPEC."""
    named = _scores(case, tmp_path, ["--dataset", f"zoo={case / 'both'}", "--dataset", f"art={case / 'both'}",
                                     "--task-column", "task"], "named.json")
    plain = _scores(case, tmp_path, ["--dataset", str(case / "both"), "--task-column", "task"], "plain.json")
    assert _figures(named)[0] == {"zoo": 12, "art": 10}
    assert _figures(named)[1]["merged"]["zoo"] == _figures(plain)[1]["merged"]["zoo"]
    one = _scores(case, tmp_path, ["--dataset", f"art={case / 'both'}", "--task-column", "task"], "one.json")
    assert _figures(one)[0] == {"art": 10}


def _joint_ids(case, tmp_path, names=None):
    """The both-task rows labelled with the merged head's joint ids (zoo 0-2, art 3-4), the label column plain or a
    ClassLabel of `names` (ids relabelled to follow them)."""
    both = datasets.load_from_disk(str(case / "both"))
    joint = [label + (0 if task == "zoo" else 3) for label, task in zip(both["label"], both["task"])]
    data = both.remove_columns(["label", "task"]).add_column("label", joint)
    head = ["zoo: lion", "zoo: seal", "zoo: yak", "art: oil", "art: ink"]
    if names is not None:
        def named(joint: int) -> int:
            full = head[joint]
            return names.index(full) if full in names else names.index(full.split(": ")[1])

        data = data.map(lambda row: {"label": named(row["label"])})
        data = data.cast_column("label", datasets.ClassLabel(names=names))
    folder = tmp_path / f"joint-{'plain' if names is None else len(names)}-{abs(hash(tuple(names or ()))) % 1000}"
    data.save_to_disk(folder)
    return folder


@pytest.mark.parametrize("names", [["ink", "lion", "oil", "seal", "yak"],
                                   ["art: ink", "art: oil", "zoo: lion", "zoo: seal", "zoo: yak"]])
def test_one_dataset_of_joint_labels_that_is_a_class_label_is_read_by_its_names(case, tmp_path, names):
    """One dataset for every task, its label column a ClassLabel naming the classes in another order (sorted, as an
    imagefolder makes it): its ids were read as the head's joint ids, so rows went to the wrong task and class."""
    plain = _scores(case, tmp_path, ["--dataset", str(_joint_ids(case, tmp_path))], "plain.json")
    named = _scores(case, tmp_path, ["--dataset", str(_joint_ids(case, tmp_path, names))], "named.json")
    assert _figures(plain)[0] == {"zoo": 12, "art": 10}
    assert _figures(named) == _figures(plain)


def test_one_dataset_of_joint_labels_naming_a_class_the_head_lacks_is_refused(case, tmp_path, capsys):
    """A single task's own test set (ClassLabel naming its classes only, ids 0..k-1) given once for every task was
    read as joint ids: its rows were scored as another task's."""
    data = datasets.load_from_disk(str(case / "test-art")).cast_column("label", datasets.ClassLabel(names=["oil",
                                                                                                          "gold"]))
    data.save_to_disk(tmp_path / "art-only")
    capsys.readouterr()
    assert main(["evaluate", str(case / "merged"), "--dataset", str(tmp_path / "art-only"), "--no-parents",
                 "--no-card", "--output-json", str(tmp_path / "r.json")]) == 1
    line = _error(capsys)
    assert "'gold'" in line and "no class of the merged model" in line, line


def test_a_missing_label_in_a_class_label_read_by_name_names_the_task_and_the_fix(case, tmp_path, capsys):
    """A -1 (missing) label in a ClassLabel given in another class order ended in datasets' bare `Invalid integer
    class label -1`."""
    data = datasets.load_from_disk(str(case / "test-art"))
    labels = list(data["label"])
    labels[2] = -1
    data = data.remove_columns("label").add_column("label", labels).cast_column(
        "label", datasets.ClassLabel(names=["ink", "oil"]))
    data.save_to_disk(tmp_path / "art-missing")
    capsys.readouterr()
    assert main(["evaluate", str(case / "merged"), "--dataset", f"art={tmp_path / 'art-missing'}", "--no-parents",
                 "--no-card", "--output-json", str(tmp_path / "r.json")]) == 1
    line = _error(capsys)
    assert "task 'art'" in line and "-1" in line and "drop or fill the rows without one" in line, line


def test_two_local_folders_of_one_name_are_two_datasets_for_the_joint_row(case, tmp_path):
    """`--dataset ./a/test --dataset ./b/test`: the joint figure went into the model-index as a result on one
    dataset (`test (local folder)`), which holds only one task's rows."""
    import shutil

    for task, where in (("zoo", "a"), ("art", "b")):
        shutil.copytree(case / f"test-{task}", tmp_path / where / "test")
    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged)
    assert main(["evaluate", str(merged), "--dataset", f"zoo={tmp_path / 'a' / 'test'}", "--dataset",
                 f"art={tmp_path / 'b' / 'test'}", "--no-parents", "-q"]) == 0
    card = (merged / "README.md").read_text()
    front = card.split("---", 2)[1]
    assert "joint" not in front, front
    assert "test (local folder) + test (local folder)" in card.split("---", 2)[2]


def test_a_task_column_class_label_naming_no_task_is_read_by_its_ids_as_task_indices(case, tmp_path):
    """A task ClassLabel whose names are not the model's task names (`animals`, `paintings`) keeps meaning task
    indices, as before names were read."""
    both = datasets.load_from_disk(str(case / "both"))
    indices = both.map(lambda row: {"task": 0 if row["task"] == "zoo" else 1})
    indices.cast_column("task", datasets.ClassLabel(names=["animals", "paintings"])).save_to_disk(tmp_path / "idx")
    plain = _scores(case, tmp_path, ["--dataset", str(case / "both"), "--task-column", "task"], "plain.json")
    coded = _scores(case, tmp_path, ["--dataset", str(tmp_path / "idx"), "--task-column", "task"], "idx.json")
    assert _figures(coded) == _figures(plain)


def test_a_task_column_applies_to_the_named_datasets_that_hold_it(case, tmp_path):
    """`--dataset zoo=./both --dataset art=./test-art --task-column task`: the column picks zoo's rows of `both`;
    `test-art`, which has no such column, is art's data as it is."""
    mixed = _scores(case, tmp_path, ["--dataset", f"zoo={case / 'both'}", "--dataset", f"art={case / 'test-art'}",
                                     "--task-column", "task"], "mixed.json")
    assert _figures(mixed)[0] == {"zoo": 12, "art": 10}


def test_a_failed_output_json_write_leaves_the_folders_results_and_card_as_they_were(case, tmp_path, monkeypatch):
    """The folder's eval_results.json was written first: when writing --output-json then failed, it held the new run
    while the card still showed the old one."""
    import shutil
    from pathlib import Path

    merged = tmp_path / "merged"
    shutil.copytree(case / "merged", merged)
    flags = ["--dataset", f"zoo={case / 'test-zoo'}", "--dataset", f"art={case / 'test-art'}", "--no-parents"]
    assert main(["evaluate", str(merged), *flags, "-q"]) == 0
    before = _files(merged)
    target = tmp_path / "copy.json"
    write_text = Path.write_text

    def failing(self, *args, **kwargs):  # the copy's text, written to its temporary sibling first
        if self.parent == target.parent and self.name.startswith(f".{target.name}."):
            raise OSError("disk full")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        main(["evaluate", str(merged), *flags, "--num-samples", "3", "--output-json", str(target), "-q"])
    assert _files(merged) == before


@pytest.mark.parametrize(("kind", "length"), [("bert_cls", 30), ("roberta_cls", 23)])
def test_evaluation_input_ids_longer_than_the_model_reads_are_one_line(kind, length):
    """Pre-tokenized test data of 30 tokens for a model of 24 positions (RoBERTa: 22 readable) ended in torch's
    `The expanded size of the tensor` traceback; merge refused the same data in one line."""
    from hf_mudsc.errors import EvaluationError
    from hf_mudsc.evaluate.harness import evaluate_merge

    model = make_model(kind, 1, num_labels=2)
    ids = torch.randint(5, 55, (8, length), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "label": [0, 1] * 4})
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge({"merged": model}, None, [data], progress=False)
    message = str(caught.value)
    assert "\n" not in message and f"input_ids hold sequences of {length} tokens" in message, message
    assert "truncation=True" in message


def test_an_evaluation_batch_the_model_cannot_run_is_one_line_naming_model_and_columns():
    """An input the model cannot embed ended in `IndexError: index out of range in self`. (Session 32: the case was
    `token_type_ids` 2 for a model of 2 types, now refused naming type_vocab_size, tests/test_text_s32.py; position
    ids past the positions stand for any other such input.)"""
    from hf_mudsc.errors import EvaluationError
    from hf_mudsc.evaluate.harness import evaluate_merge

    model = make_model("bert_cls", 1, num_labels=2)
    ids = torch.randint(5, 55, (8, 10), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "position_ids": torch.full_like(ids, 99).tolist(),
                                       "label": [0, 1] * 4})
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge({"merged": model}, None, [data], progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "could not be run through BertForSequenceClassification (columns ['input_ids', 'position_ids'])" \
        in message, message


def _clip_case():
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 57, "<|endoftext|>": 58, "a</w>": 2, "b</w>": 3, "a": 4, "ab</w>": 6, "<unk>": 1,
             "!": 0}
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[("a", "b</w>")], pad_token="!"))
    images = _images(5, 6)
    data = datasets.Dataset.from_dict({"image": [image.convert("RGB") for image in images],
                                       "label": [0, 1, 0, 1, 0, 1]}).cast_column("image", datasets.Image())
    return processor, data


def test_clip_prompts_longer_than_the_text_tower_are_cut_to_fit():
    """A class name longer than the text tower's 24 positions, with a tokenizer that names no limit, crashed inside
    `get_text_features` (`Sequence length must be less than max_position_embeddings`)."""
    from hf_mudsc.evaluate.harness import evaluate_merge

    processor, data = _clip_case()
    a, b = make_model("clip", 1), make_model("clip", 2)
    result = evaluate_merge({"merged": a}, [a, b], {"t": data}, processor=processor,
                            class_names={"t": ["a " * 40, "b"]}, progress=False)
    assert result.tasks["t"]["num_samples"] == 6


def test_clip_class_names_given_as_a_string_are_refused():
    """`class_names={"t": "ab"}` was read as the classes `a` and `b`."""
    from hf_mudsc.errors import EvaluationError
    from hf_mudsc.evaluate.harness import evaluate_merge

    processor, data = _clip_case()
    a = make_model("clip", 1)
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge({"merged": a}, None, {"t": data}, processor=processor, class_names={"t": "ab"},
                       progress=False)
    message = str(caught.value)
    assert "\n" not in message and "class_names['t'] is str 'ab', not a list of class names" in message, message


def test_clip_results_record_the_prompt_templates_that_made_them():
    """Two templates gave two sets of figures whose results files differed in the scores alone: neither named the
    template, so a published CLIP figure could not be reproduced or told from the other."""
    from hf_mudsc.evaluate.harness import evaluate_merge

    processor, data = _clip_case()
    a, b = make_model("clip", 1), make_model("clip", 2)
    recorded = []
    for templates in (["a photo of a {}."], ["{}", "a {}"]):
        result = evaluate_merge({"merged": a}, [a, b], {"t": data}, processor=processor,
                                class_names={"t": ["a", "b"]}, prompt_template=templates, progress=False)
        recorded.append(result.to_dict()["definitions"])
    assert recorded[0]["prompt_templates"] == "a photo of a {}."
    assert recorded[1]["prompt_templates"] == "{} | a {}"
    assert "'{}', 'a {}'" in recorded[1]["clip"]


def test_unpadded_token_ids_in_evaluation_data_are_one_line_naming_the_fix():
    """Invariance bug hunt s29 (the calibration side's twin): evaluation rows of unpadded token ids (no processor)
    ended in `AttributeError: 'list' object has no attribute 'size'` from the model's forward."""
    import hf_mudsc
    from hf_mudsc.errors import EvaluationError

    data = datasets.Dataset.from_dict({"input_ids": [[2, 7, 9, 3], [2, 5, 3]], "label": [0, 1]})
    with pytest.raises(EvaluationError) as error:
        hf_mudsc.evaluate_merge({"merged": make_model("bert_cls", 1)}, None, [data], progress=False)
    said = str(error.value)
    assert "do not stack into one batch; pad them" in said and "\n" not in said, said
