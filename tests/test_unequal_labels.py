"""Parents with different numbers of labels (the README's "different label sets" case), for every method.

B is A's body in a permuted basis with a fresh head of another size, so the true function of each task is
known: a merge that finds the right units reproduces A's logits on A's slice and B's on B's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from factories import (
    CLASSIFIERS,
    LABEL_COUNTS,
    classifier_names,
    classifier_params,
    make_batches,
    make_model,
    model_output,
    permuted_copy,
    relative_error,
    with_new_head,
)

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.methods import get_method, method_runs

# Every registered method with each of its matchers (the demo's list).
RUNS = {label: options for label, options in method_runs()}


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(kind, labels_a, labels_b):
        key = (kind, labels_a, labels_b)
        if key not in cache:
            a = make_model(kind, seed=0, num_labels=labels_a)
            a.config._name_or_path = "org/task-a"
            b = with_new_head(permuted_copy(a, spec_for(a), seed=1), labels_b, seed=7)
            b.config._name_or_path = "org/task-b@v1"
            cache[key] = (a, b, make_batches(kind, num_batches=3))
        return cache[key]

    return get


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("kind,labels_a,labels_b", LABEL_COUNTS)
def test_unequal_label_counts_merge_with_a_concatenated_head(pairs, kind, labels_a, labels_b, run):
    a, b, batches = pairs(kind, labels_a, labels_b)
    method = RUNS[run]["method"]
    calibration = batches if get_method(method).needs_calibration or get_method(method).needs_data else None
    # Without matching, the method's own head (refit="auto" would refit after a data method: tests/test_refit.py).
    refit = {} if get_method(method).matches_units else {"refit": "none"}
    merged = hf_mudsc.merge([a, b], calibration, progress=False, **RUNS[run], **refit)

    total = labels_a + labels_b
    (merged_weight, merged_bias), (a_weight, a_bias), (b_weight, b_bias) = map(classifier_params, (merged, a, b))
    assert merged_weight.shape == (total, a.config.hidden_size)
    assert merged_bias.shape == (total,)
    assert merged.config.num_labels == total
    assert [merged.config.id2label[i] for i in range(total)] == (
        [f"task-a: LABEL_{i}" for i in range(labels_a)] + [f"task-b: class_{i}" for i in range(labels_b)]
    )
    assert merged.config.task_label_ranges == {"task-a": [0, labels_a], "task-b": [labels_a, total]}
    # A's bias rows, then B's: biases carry no unit axis, so they are copied exactly.
    assert torch.equal(merged_bias, torch.cat([a_bias, b_bias]))
    if not get_method(method).matches_units:
        # No matching: the rows are the parents' own rows, A's first.
        assert torch.equal(merged_weight, torch.cat([a_weight, b_weight]))
        return
    # Matching methods find the permutation: each task's slice computes that parent's logits.
    for batch in batches[:2]:
        logits = model_output(merged, batch)
        assert relative_error(logits[:, :labels_a], model_output(a, batch)) < 1e-5
        assert relative_error(logits[:, labels_a:], model_output(b, batch)) < 1e-5


@pytest.mark.parametrize("kind,labels_a,labels_b", LABEL_COUNTS)
def test_unequal_label_counts_round_trip_through_save_pretrained(tmp_path, pairs, kind, labels_a, labels_b):
    a, b, batches = pairs(kind, labels_a, labels_b)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", progress=False)
    merged.save_pretrained(tmp_path)
    loaded = type(merged).from_pretrained(tmp_path).eval()
    assert loaded.config.task_label_ranges == {"task-a": [0, labels_a], "task-b": [labels_a, labels_a + labels_b]}
    assert torch.equal(model_output(loaded, batches[0]), model_output(merged, batches[0]))


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_concatenated_classifiers_take_no_part_in_the_weight_similarity(kind):
    """Different label sets (here of equal size): A's and B's classifier rows are different classes, so their
    columns must not be correlated with each other — the merged body may not depend on B's classifier."""
    a = make_model(kind, seed=0)
    batches = make_batches(kind, num_batches=2)
    heads = [with_new_head(make_model(kind, seed=1), 3, seed=s) for s in (5, 6)]
    with torch.no_grad():
        classifier_params(heads[1])[0].mul_(100.0)  # a loud head would dominate the similarity if it counted
    # refit="ridge": the body's refit targets do not read the heads either (the default gate's keep-or-drop
    # decision does: it scores the heads' outputs, so it may legitimately differ between the two merges)
    merges = [hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", refit="ridge", progress=False)
              for b in heads]
    head = set(classifier_names(a))
    body = [{k: v for k, v in m.state_dict().items() if k not in head} for m in merges]
    assert body[0].keys() == body[1].keys()
    assert all(torch.equal(body[0][k], body[1][k]) for k in body[0]), "B's classifier rows steered the match"
    assert not torch.equal(classifier_params(merges[0])[0][3:], classifier_params(merges[1])[0][3:])


@pytest.mark.parametrize("kind", ["vit_cls", "bert_cls"])
def test_reference_compat_keeps_the_references_stacked_classifier_rows(kind):
    """With `reference_compat=True` and two classifiers of equal size, the reference's rule holds: their rows
    are stacked in the weight similarity even when the label sets differ (the paper's 0-4 / 5-9 setting), so the
    merged body equals the body of the merge whose B carries A's label names (same solve, merged head)."""
    a = make_model(kind, seed=0)
    batches = make_batches(kind, num_batches=2)
    b = with_new_head(make_model(kind, seed=1), 3, seed=5)
    with torch.no_grad():
        classifier_params(b)[0].mul_(100.0)  # loud enough to steer the match when it counts
    same_names = copy.deepcopy(b)
    same_names.config.id2label = dict(a.config.id2label)
    same_names.config.label2id = dict(a.config.label2id)
    options = dict(method="mudsc", matcher="align", reference_compat=True, progress=False)
    concatenated = hf_mudsc.merge([a, b], batches, **options)
    merged_head = hf_mudsc.merge([a, same_names], batches, **options)
    assert classifier_params(concatenated)[0].shape[0] == 6 and classifier_params(merged_head)[0].shape[0] == 3
    head = set(classifier_names(a))
    body = [{k: v for k, v in m.state_dict().items() if k not in head} for m in (concatenated, merged_head)]
    assert all(torch.equal(body[0][k], body[1][k]) for k in body[0])
    default = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", progress=False)
    assert not all(torch.equal(default.state_dict()[k], body[0][k]) for k in body[0]), \
        "the default should leave B's rows out and match differently here"


def test_the_cards_joint_decision_snippet_runs_on_the_saved_model(tmp_path, pairs):
    """The card's Usage code for all labels at once runs as written and names a label of one task."""
    import re

    kind, labels_a, labels_b = LABEL_COUNTS[0]
    a, b, batches = pairs(kind, labels_a, labels_b)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "merged")
    card = (folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    snippet = next(block for block in blocks if "joint_predictions" in block)
    model = type(merged).from_pretrained(folder).eval()
    inputs = {key: value for key, value in batches[0].items() if key != "labels"}
    scope = {"model": model, "inputs": inputs}
    with torch.no_grad():
        exec(snippet, scope)
    logits = model(**inputs).logits
    expected = torch.cat([logits[:, :labels_a].softmax(-1), logits[:, labels_a:].softmax(-1)], dim=-1).argmax(-1)
    assert scope["labels"] == [model.config.id2label[int(i)] for i in expected]
    assert all(label.startswith(("task-a: ", "task-b: ")) for label in scope["labels"])


@pytest.mark.parametrize("kind", CLASSIFIERS)
def test_a_regression_parent_and_a_classifier_are_refused_in_one_line_before_any_weights_are_read(kind, tmp_path):
    """A one-output head (transformers' `num_labels=1`: regression) concatenated with class logits has no
    coherent meaning: each task's softmax over one logit is 1, so the joint decision always picked the regression
    "label", and the merged config's problem_type came from whichever parent was first."""
    folders = []
    for name, seed, labels in (("classifier", 1, 3), ("regression", 2, 1)):
        make_model(kind, seed, num_labels=labels).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    weights = tmp_path / "regression" / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    data = weights.read_bytes()
    weights.write_bytes(data[:header] + b"\xff" * (len(data) - header))  # NaN weights: refused if ever read
    with pytest.raises(hf_mudsc.MergeInputError, match=r"regression head.*classifier") as error:
        hf_mudsc.merge(folders, method="weight_matching", progress=False)
    assert "\n" not in str(error.value)
    both_regression = [make_model(kind, seed, num_labels=1) for seed in (1, 2)]
    merged = hf_mudsc.merge(both_regression, method="weight_matching", progress=False)
    assert merged.config.num_labels == 1


def test_a_multi_label_parent_and_a_single_label_one_are_refused_in_one_line(tmp_path):
    """QA s21: a multi-label head (a sigmoid per label) merged with a single-label one silently became
    `single_label_classification` (parent A's problem_type): B's task was then read by softmax and argmax."""
    single, multi = make_model("vit_cls", 1), make_model("vit_cls", 2)
    multi.config.problem_type = "multi_label_classification"
    for parents in ([single, multi], [multi, single]):
        with pytest.raises(hf_mudsc.MergeInputError, match=r"multi-label head.*single-label") as error:
            hf_mudsc.merge(parents, method="linear", progress=False)
        assert "\n" not in str(error.value)
    both = make_model("vit_cls", 3)
    both.config.problem_type = "multi_label_classification"
    merged = hf_mudsc.merge([multi, both], method="linear", progress=False)
    assert merged.config.problem_type == "multi_label_classification"


def test_one_label_multi_label_heads_stay_multi_label_and_are_not_read_as_regression():
    """transformers reads `num_labels=1` as regression only when no problem_type says otherwise; a one-label head
    whose config says multi_label_classification is a sigmoid (trained with BCE). Two such parents of different
    labels were merged into a config saying "regression" (MSE when trained) and a card calling each output a score;
    the regression rule is now transformers' own."""
    from hf_mudsc.load.checks import is_multi_label_head, is_regression_head
    from hf_mudsc.publish.card import head_kind

    parents = []
    for seed, label in ((1, "cat"), (2, "dog")):
        model = make_model("vit_cls", seed, num_labels=1)
        model.config.problem_type = "multi_label_classification"
        model.config.id2label, model.config.label2id = {0: label}, {label: 0}
        parents.append(model)
    assert not is_regression_head(parents[0].config) and is_multi_label_head(parents[0].config)
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    assert merged.config.problem_type == "multi_label_classification" and merged.config.num_labels == 2
    assert head_kind(merged.config) == "multi_label"
    plain = make_model("vit_cls", 3, num_labels=1)  # no problem_type: transformers' regression
    assert plain.config.problem_type is None and is_regression_head(plain.config)
