"""Session 37, evaluation figures (helper "evaluate"): tiny classifiers whose logits are set by hand, every figure
checked against a hand computation, and problems with the data said before any model runs."""

from __future__ import annotations

import datasets
import pytest
import torch
from test_eval_s34 import controlled as controlled_logits

from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.harness import evaluate_merge


def controlled(labels: list[str], table: list[list[float]], ranges: dict | None = None):
    """`test_eval_s34.controlled`'s classifier (row i's logits are table[i]), whose `model.forwards` counts its
    forward passes."""
    model = controlled_logits(labels, table, ranges)
    model.forwards = 0
    answer = model.forward

    def forward(*args, **kwargs):
        model.forwards += 1
        return answer(*args, **kwargs)

    model.forward = forward
    return model


def rows(ids) -> dict[str, torch.Tensor]:
    ids = list(ids)
    return {"input_ids": torch.tensor([[1, i, 1, 1] for i in ids], dtype=torch.long).reshape(len(ids), 4),
            "attention_mask": torch.ones(len(ids), 4, dtype=torch.long)}


def dataset(ids, labels, label_feature=None) -> datasets.Dataset:
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "attention_mask": datasets.Sequence(datasets.Value("int64")),
                                  "label": label_feature or datasets.Value("int64")})
    return datasets.Dataset.from_dict({**{k: v.tolist() for k, v in rows(ids).items()}, "label": labels},
                                      features=features)


# Three tasks of 2, 3 and 4 classes (joint 9). Row i's logits: table[i]; ties (rows 1, 5, 8) go to the first class.
LABELS = ["a: x", "a: y", "b: p", "b: q", "b: r", "c: 1", "c: 2", "c: 3", "c: 4"]
RANGES = {"a": [0, 2], "b": [2, 5], "c": [5, 9]}
TABLE = [
    [3, 1, 0, 0, 0, 0, 0, 0, 0],  # a: x (joint 0)
    [2, 2, 5, 0, 0, 0, 0, 0, 0],  # a: tie -> x; joint raw -> 2 (b: p)
    [0, 0, 0, 4, 1, 0, 0, 0, 0],  # b: q (joint 3)
    [9, 0, 1, 1, 2, 0, 0, 0, 0],  # b: r; joint raw -> 0
    [0, 0, 3, 0, 0, 0, 0, 0, 0],  # b: p (joint 2)
    [0, 0, 0, 0, 0, 1, 1, 1, 1],  # c: tie -> 1 (joint 5)
    [0, 0, 0, 0, 0, 0, 0, 7, 0],  # c: 3 (joint 7)
    [0, 0, 0, 0, 0, 0, 0, 0, 2],  # c: 4 (joint 8)
    [0, 0, 0, 0, 0, 3, 3, 0, 0],  # c: tie -> 1 (joint 5)
]
DATA = {"a": ([0, 1], [0, 1]), "b": ([2, 3, 4], [1, 2, 0]), "c": ([5, 6, 7, 8], [0, 2, 3, 1])}


@pytest.mark.parametrize("batch_size", [1, 2, 3, 64])
def test_three_tasks_of_different_sizes_score_as_worked_out_by_hand_at_any_batch_size(batch_size):
    """evaluate_merge(m, None, {a: 2 rows, b: 3, c: 4}, metrics=[accuracy, f1], joint_rule=raw, batch_size=1|2|3|64)."""
    model = controlled(LABELS, TABLE, RANGES)
    data = {task: dataset(ids, labels) for task, (ids, labels) in DATA.items()}
    result = evaluate_merge(model, None, data, metrics=["accuracy", "f1"], batch_size=batch_size,
                            joint_rule="raw", progress=False)
    # a: predictions x, x vs x, y -> 1/2; F1: x 2/3, y 0 -> 1/3
    # b: q, r, p vs q, r, p -> 1; F1 1
    # c: 1, 3, 4, 1 vs 1, 3, 4, 2 -> 3/4; F1: class 1 (tp 1, fp 1) 2/3, 2: 0, 3: 1, 4: 1 -> (2/3 + 2)/4 = 2/3
    # joint (raw): predicted 0, 2, 3, 0, 2, 5, 7, 8, 5 vs 0, 1, 3, 4, 2, 5, 7, 8, 6 -> 6/9
    # joint F1 over classes 0..8 present: 0 (tp 1, fp 1) 2/3, 1: 0, 2 (tp 1, fp 1) 2/3, 3: 1, 4: 0, 5 (tp1, fp1) 2/3,
    # 6: 0, 7: 1, 8: 1 -> (2/3 * 3 + 3) / 9 = 5/9
    expected = {"a": (1 / 2, 1 / 3), "b": (1.0, 1.0), "c": (3 / 4, 2 / 3), "joint": (6 / 9, 5 / 9)}
    for view, (accuracy, f1) in expected.items():
        assert result.score("merged", view, "accuracy") == pytest.approx(accuracy, abs=1e-12), view
        assert result.score("merged", view, "f1") == pytest.approx(f1, abs=1e-12), view
    assert result.score("merged", "average") == pytest.approx((1 / 2 + 1 + 3 / 4) / 3, abs=1e-12)
    assert [result.tasks[t]["num_samples"] for t in "abc"] == [2, 3, 4]


def _broken_last_task() -> dict[str, dict]:
    """Task b's data broken five ways, task a's fine."""
    return {
        "an empty split": {"b": dataset([], [])},
        "an empty tensor pair": {"b": ({"input_ids": torch.zeros(0, 4, dtype=torch.long)},
                                       torch.zeros(0, dtype=torch.long))},
        "a label out of range": {"b": dataset([2, 3, 4], [0, 1, 7])},
        "a label of -100": {"b": ({"input_ids": rows([2, 3])["input_ids"]}, torch.tensor([0, -100]))},
        "no label column": {"b": dataset([2, 3], [0, 1]).remove_columns("label")},
        "a dataset that is not there": {"b": "/nonexistent/hf-mudsc-s37/data:test"},
    }


@pytest.mark.parametrize("case", list(_broken_last_task()))
def test_a_problem_with_a_later_tasks_data_is_said_before_any_model_runs(case):
    """evaluate_merge(m, [A, B], {a: fine, b: empty / label 7 / -100 / no label column / missing}): every model scored
    all of task a's rows (a forward per batch, an hour on real data) before b's data was even opened."""
    model = controlled(LABELS, TABLE, RANGES)
    parent_a = controlled(["x", "y"], [[1, 0]] * 9)
    parent_b = controlled(["p", "q", "r"], [[1, 0, 0]] * 9)
    parent_c = controlled(["1", "2", "3", "4"], [[1, 0, 0, 0]] * 9)
    data = {"a": dataset([0, 1], [0, 1]), **_broken_last_task()[case], "c": dataset([5, 6], [0, 2])}
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge(model, [parent_a, parent_b, parent_c], data, batch_size=1, progress=False)
    assert "\n" not in str(caught.value) and "'b'" in str(caught.value), str(caught.value)
    assert [m.forwards for m in (model, parent_a, parent_b, parent_c)] == [0, 0, 0, 0]


def test_the_per_task_rule_tells_confident_heads_apart_instead_of_giving_the_row_to_the_first_task():
    """evaluate_merge(m, [A, B], joint_rule=per_task) with logit margins of 20 and 30: both tasks' softmax maxima
    round to 1.0 in float32, so every such row went to task A (joint 0.5, not 1.0) for the merge and the ensemble."""
    # row 0 (task b, label q): a = [20, 0] -> max p = 1 - 2.1e-9; b = [0, 30] -> max p = 1 - 9.4e-14: b wins -> q
    # row 1 (task a, label x): a = [30, 0]; b = [20, 0] -> a wins -> x
    merged = controlled(["a: x", "a: y", "b: p", "b: q"], [[20, 0, 0, 30], [30, 0, 20, 0]], {"a": [0, 2], "b": [2, 4]})
    parent_a = controlled(["x", "y"], [[20, 0], [30, 0]])
    parent_b = controlled(["p", "q"], [[0, 30], [20, 0]])
    data = {"a": (rows([1]), torch.tensor([0])), "b": (rows([0]), torch.tensor([1]))}
    for rule in ("per_task", "raw"):
        result = evaluate_merge(merged, [parent_a, parent_b], data, joint_rule=rule, progress=False)
        assert result.score("merged", "joint") == 1.0, rule
        assert result.score("ensemble", "joint") == 1.0, rule
        assert result.score("parent_a", "joint") == result.score("parent_b", "joint") == 0.5, rule
