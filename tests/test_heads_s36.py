"""Session 36, classification heads across parents: head kinds, label sets, the joint decision (helper "heads")."""

from __future__ import annotations

import pytest
from factories import CLASSIFIERS, make_model

import hf_mudsc


def _labelled(kind: str, seed: int, names: list[str], problem_type: str | None = None):
    """A tiny `kind` classifier whose labels are `names` and whose config says `problem_type`."""
    model = make_model(kind, seed, num_labels=len(names))
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    model.config.problem_type = problem_type
    model.config._name_or_path = f"org/task{seed}"
    return model


def _no_weights(monkeypatch) -> None:
    """Make any parent's weights being read fail the test: a refusal must come before them."""
    from hf_mudsc.load import parents as loading

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "_prepare", refuse)


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_a_one_class_single_label_head_is_refused_in_one_line(kind, tmp_path):
    """merge([A: 1 label with problem_type single_label_classification set on the object, B: 2 labels, C: 5 labels])
    made a head whose joint decision always chose A's one label (a softmax over one logit is 1 on every input), and
    two such parents of one label made a folder transformers refuses to load (num_labels > 1 required)."""
    tasks = [_labelled(kind, seed, names, "single_label_classification" if len(names) == 1 else None)
             for seed, names in ((1, ["only"]), (2, ["a", "b"]), (3, list("pqrst")))]
    twice = [_labelled(kind, seed, ["only"], "single_label_classification") for seed in (4, 5)]
    for parents, who in ((tasks, "A"), (tasks[::-1], "C"), (twice, "A")):
        for dry_run in (False, True):
            with pytest.raises(hf_mudsc.MergeInputError) as caught:
                hf_mudsc.merge(parents, method="linear", progress=False, dry_run=dry_run)
            message = str(caught.value)
            assert f"parent {who}" in message and "single_label_classification" in message, message
            assert "num_labels=1" in message and "\n" not in message, message
    twice[0].save_pretrained(tmp_path / "one")  # what transformers says of such a folder: the merge's reason
    with pytest.raises(ValueError, match="requires `num_labels > 1`"):
        type(twice[0]).from_pretrained(tmp_path / "one")


def test_a_regression_head_of_several_outputs_is_not_called_one_output(tmp_path):
    """merge([A: problem_type regression with 2 outputs, B: a 2-class classifier]) said A had 'a regression head
    (one output)'."""
    scores = _labelled("bert_cls", 1, ["valence", "arousal"], "regression")
    classes = _labelled("bert_cls", 2, ["neg", "pos"])
    with pytest.raises(hf_mudsc.MergeInputError) as caught:
        hf_mudsc.merge([scores, classes], method="average", progress=False)
    message = str(caught.value)
    assert "regression head" in message and "one output" not in message and "2 outputs" in message, message


def test_a_merge_of_a_merged_model_keeps_each_of_its_tasks(tmp_path):
    """merge([merge([A, B]) saved, C]) — what `method='average'` with 3 parents says to do ('merge them 2 at a time')
    — made one task 'ab' of A's and B's classes ('ab: task1: t1c0'): the joint decision took one softmax over both
    tasks' labels, and evaluate could score neither A's task nor B's (3 parents for 2 tasks)."""
    import torch
    from factories import fine_tune, with_new_head

    from hf_mudsc.evaluate.decision import joint_probabilities

    base = make_model("vit_cls", 0, num_labels=2)
    parents = []
    for seed, size in ((1, 2), (2, 3), (3, 5)):
        parent = with_new_head(fine_tune(base, seed, 0.01), size, seed)
        parent.config.id2label = {i: f"t{seed}c{i}" for i in range(size)}
        parent.config.label2id = {name: i for i, name in parent.config.id2label.items()}
        parent.config._name_or_path = f"org/task{seed}"
        parents.append(parent)
    first = hf_mudsc.merge(parents[:2], method="average", progress=False)
    hf_mudsc.save_merged(first, tmp_path / "ab")
    merged = hf_mudsc.merge([str(tmp_path / "ab"), parents[2]], method="average", progress=False)
    ranges = {"task1": [0, 2], "task2": [2, 5], "task3": [5, 10]}
    assert merged.config.task_label_ranges == ranges
    assert merged.config.id2label[0] == "task1: t1c0" and merged.config.id2label[9] == "task3: t3c4"
    assert merged.config.label2id == {name: i for i, name in merged.config.id2label.items()}
    logits = torch.randn(4, 10)
    expected = torch.cat([logits[:, lo:hi].softmax(-1) for lo, hi in ranges.values()], dim=-1)
    assert torch.allclose(joint_probabilities(logits, merged.config), expected)
    pixels = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    data = {}
    for parent, task in zip(parents, ranges):
        with torch.no_grad():
            data[task] = (pixels, parent(pixel_values=pixels).logits.argmax(-1))
    result = hf_mudsc.evaluate_merge(merged, parents, data, progress=False)
    assert {task: result.score(f"parent_{letter}", task) for task, letter in zip(ranges, "abc")} == dict.fromkeys(
        ranges, 1.0)
    # A merged model and a parent holding one of its tasks' names: every task keeps a name of its own.
    again = hf_mudsc.merge([str(tmp_path / "ab"), parents[0]], method="average", progress=False)
    assert again.config.task_label_ranges == {"task1_a": [0, 2], "task2": [2, 5], "task1_b": [5, 7]}
    assert again.config.id2label[5] == "task1_b: t1c0"


def test_evaluate_figures_of_a_three_task_merge_are_the_per_task_and_joint_rules_by_hand():
    """Label sets of sizes 2, 3 and 5 (one of size 1 is a regression head, or a one-class softmax: refused above):
    each task's figure is the argmax within its slice on its data, the joint one the per-task softmax argmax over
    all rows, the ensemble's the same rule on the parents' concatenated logits."""
    import torch
    from factories import fine_tune, with_new_head

    from hf_mudsc.evaluate.decision import joint_probabilities

    base = make_model("vit_cls", 0, num_labels=2)
    parents = []
    for seed, size in ((1, 2), (2, 3), (3, 5)):
        parent = with_new_head(fine_tune(base, seed, 0.01), size, seed)
        parent.config._name_or_path = f"org/task{seed}"
        parents.append(parent)
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    generator = torch.Generator().manual_seed(0)
    data = []
    for parent in parents:
        pixels = torch.randn(30, 1, 16, 16, generator=generator)
        with torch.no_grad():
            labels = parent(pixel_values=pixels).logits.argmax(-1)
        labels[:10] = torch.randint(0, parent.config.num_labels, (10,), generator=generator)  # not all right
        data.append((pixels, labels))
    result = hf_mudsc.evaluate_merge(merged, parents, data, progress=False, batch_size=7)
    ranges = merged.config.task_label_ranges
    joint = ensemble = 0
    with torch.no_grad():
        for (task, (lo, hi)), (pixels, labels) in zip(ranges.items(), data):
            logits = merged(pixel_values=pixels).logits
            assert result.score("merged", task) == pytest.approx((logits[:, lo:hi].argmax(-1) == labels).float().mean())
            joint += int((joint_probabilities(logits, merged.config).argmax(-1) == labels + lo).sum())
            together = torch.cat([p(pixel_values=pixels).logits.softmax(-1) for p in parents], dim=-1)
            ensemble += int((together.argmax(-1) == labels + lo).sum())
    assert result.score("merged", "joint") == pytest.approx(joint / 90)
    assert result.score("ensemble", "joint") == pytest.approx(ensemble / 90)
    assert 0 < joint < 90


def test_the_merged_id2label_is_keyed_by_int_as_from_pretrained_gives_it():
    """merge([A, B]) with A's labels set from a JSON dict (`a.config.id2label = {"0": "neg", "1": "pos"}`) gave a
    merged config keyed by strings beside a label2id of ints: `pipeline("text-classification", model=merged)`
    failed with KeyError: 0 (its saved copy, read back by from_pretrained, had int keys)."""
    a, b = _labelled("bert_cls", 1, ["neg", "pos"]), _labelled("bert_cls", 2, ["neg", "pos"])
    a.config.id2label = {"0": "neg", "1": "pos"}
    merged = hf_mudsc.merge([a, b], method="linear", progress=False)
    assert merged.config.id2label == {0: "neg", 1: "pos"} and merged.config.label2id == {"neg": 0, "pos": 1}
    assert a.config.id2label == {"0": "neg", "1": "pos"}  # the parent is left as given
