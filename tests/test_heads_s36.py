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
