"""`evaluate_merge` with N > 2 parents (docs/design.md §4.13): one scorer per parent (`parent_a`, `parent_b`,
`parent_c`), the ensemble of all of them (per-head softmax concatenated in parent order) and the merged model with
its N concatenated heads — figures checked against the same argmaxes computed by hand."""

from __future__ import annotations

import pytest
import torch
from factories import make_model, permuted_copy, with_new_head

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.evaluate.names import parent_names

LABELS = (3, 4, 5)


@pytest.fixture(scope="module")
def three():
    """Three parents in one basis (a model and two permuted copies with their own heads), merged: the matched
    heads are kept, so each task's slice of the merged logits is its parent's."""
    torch.set_num_threads(1)
    model = make_model("vit_cls", seed=0, num_labels=LABELS[0])
    heads = [with_new_head(model, labels, seed=seed) for labels, seed in zip(LABELS[1:], (1, 2))]
    parents = [model, *(permuted_copy(head, spec_for(head), seed=seed) for head, seed in zip(heads, (1, 2)))]
    for index, parent in enumerate(parents):
        parent.config._name_or_path = f"org/task-{index}"
    generator = torch.Generator().manual_seed(0)
    calibration = [{"pixel_values": torch.randn(16, 1, 16, 16, generator=generator)} for _ in range(2)]
    merged = hf_mudsc.merge(parents, calibration, method="mudsc", matcher="zip", progress=False)
    assert merged.merge_report.refit.head_kept
    tests = {f"task-{i}": (torch.randn(24, 1, 16, 16, generator=generator),
                           torch.randint(0, labels, (24,), generator=generator)) for i, labels in enumerate(LABELS)}
    return merged, parents, tests


def test_evaluate_merge_scores_three_parents_their_ensemble_and_the_merged_model(three):
    merged, parents, tests = three
    result = evaluate_merge(merged, parents, tests, progress=False)
    assert parent_names(3) == ["parent_a", "parent_b", "parent_c"]
    assert set(result.scores) == {"parent_a", "parent_b", "parent_c", "ensemble", "merged"}
    assert {task: info["label_range"] for task, info in result.tasks.items()} == {
        "task-0": [0, 3], "task-1": [3, 7], "task-2": [7, 12]}

    images = torch.cat([inputs for inputs, _ in tests.values()])
    offsets = (0, 3, 7)
    joint_labels = torch.cat([labels + offset for (_, labels), offset in zip(tests.values(), offsets)])
    with torch.no_grad():
        logits = [parent(pixel_values=images).logits for parent in parents]
        merged_logits = merged(pixel_values=images).logits
    owner = torch.cat([torch.full((24,), i) for i in range(3)])
    for index, (task, (_, labels)) in enumerate(tests.items()):
        own = (logits[index][owner == index].argmax(1) == labels).float().mean().item()
        assert result.score(parent_names(3)[index], task) == pytest.approx(own)
        assert result.score("ensemble", task) == pytest.approx(own)  # within its slice: that parent's softmax
        assert result.score("merged", task) == pytest.approx(own)  # the kept heads give back each parent
        for other in set(range(3)) - {index}:
            assert result.score(parent_names(3)[other], task) is None  # a parent scores its own task only
    ensemble = torch.cat([z.softmax(1) for z in logits], 1).argmax(1)
    assert result.score("ensemble", "joint") == pytest.approx((ensemble == joint_labels).float().mean().item())
    # The merged head decides jointly by each task's softmax (the ensemble's rule): the kept heads give back
    # the ensemble's joint figure.
    merged_joint = torch.cat([merged_logits[:, lo:hi].softmax(1) for lo, hi in ((0, 3), (3, 7), (7, 12))], 1)
    assert result.score("merged", "joint") == pytest.approx(
        (merged_joint.argmax(1) == joint_labels).float().mean().item())
    assert result.score("merged", "joint") == pytest.approx(result.score("ensemble", "joint"))
    # a parent's joint figure: a single-task model answering the joint test, right at most on its own share
    parent_c = logits[2].argmax(1) + 7
    assert result.score("parent_c", "joint") == pytest.approx((parent_c == joint_labels).float().mean().item())
    assert result.score("merged", "average") == pytest.approx(
        sum(result.score("merged", task) for task in tests) / 3)
    table = result.table(labels={"parent_c": "parent C"})
    assert "| parent C | - | - |" in table and "| ensemble |" in table


def test_evaluate_merge_without_the_ensemble_scores_each_of_three_parents(three):
    merged, parents, tests = three
    result = evaluate_merge(merged, parents, tests, ensemble=False, progress=False)
    assert set(result.scores) == {"parent_a", "parent_b", "parent_c", "merged"}


def test_evaluate_merge_refuses_one_parent_and_a_parent_out_of_order(three):
    merged, parents, tests = three
    with pytest.raises(EvaluationError, match=r"^pass the parents in merge order \(at least two: A, B, \.\.\.\) "
                                              r"or None, got 1$"):
        evaluate_merge(merged, parents[:1], tests, progress=False)
    with pytest.raises(EvaluationError, match=r"^parent B has 5 labels but task 'task-1' has 4 in the merged model"):
        evaluate_merge(merged, [parents[0], parents[2], parents[1]], tests, progress=False)


def test_cli_evaluate_takes_three_parents_and_refuses_one_in_one_line(tmp_path, capsys):
    from hf_mudsc.cli.main import build_parser, main

    args = build_parser().parse_args(["evaluate", str(tmp_path), "-d", "x:test", "--parents", "a", "b", "c"])
    assert args.parents == ["a", "b", "c"]
    assert main(["evaluate", str(tmp_path / "missing"), "-d", "x:test", "--parents", "a"]) == 2  # invalid command line
    error = capsys.readouterr().err.strip()
    assert error.endswith("--parents takes the parents in merge order, at least two (A B [C ...]), got 1; or pass "
                          "--no-parents") and "\n" not in error and "Traceback" not in error
