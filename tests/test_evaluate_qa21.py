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
