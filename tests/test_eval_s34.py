"""Session 34, evaluation figures: tiny classifiers whose logits are set by hand (a table indexed by the row's second
token id), scored by `evaluate_merge`, every figure checked against a hand computation."""

from __future__ import annotations

import types

import pytest
import torch
from factories import make_model
from transformers.modeling_outputs import SequenceClassifierOutput

import hf_mudsc.load.parents
from hf_mudsc.errors import EvaluationError
from hf_mudsc.evaluate.harness import evaluate_merge


def controlled(labels: list[str], table: list[list[float]], ranges: dict | None = None,
               problem_type: str | None = None):
    """A BERT classifier whose logits for a row whose input_ids[1] is i are table[i] (its weights are not used)."""
    model = make_model("bert_cls", num_labels=len(labels))
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.config._name_or_path = ""
    if ranges:
        model.config.task_label_ranges = ranges
    if problem_type:
        model.config.problem_type = problem_type
    logits = torch.tensor(table, dtype=torch.float32)

    def forward(self, input_ids=None, **_):
        return SequenceClassifierOutput(logits=logits[input_ids[:, 1]])

    model.forward = types.MethodType(forward, model)
    return model


def rows(ids) -> dict[str, torch.Tensor]:
    ids = list(ids)
    return {"input_ids": torch.tensor([[1, i, 1, 1] for i in ids]), "attention_mask": torch.ones(len(ids), 4,
                                                                                                  dtype=torch.long)}


def test_a_hub_merge_with_a_regression_head_of_several_outputs_is_refused_not_scored_by_argmax(monkeypatch):
    """evaluate_merge("org/reg-merge") of a problem_type 'regression' head with 2 outputs: refused, not argmax'd."""
    model = controlled(["score_x", "score_y"], [[0.9, 0.1], [0.2, 0.7]], problem_type="regression")

    def load_parent(ref, **_):
        return hf_mudsc.load.parents.LoadedParent(model=model, processor=None, reference=ref)

    monkeypatch.setattr(hf_mudsc.load.parents, "load_parent", load_parent)
    with pytest.raises(EvaluationError, match="regression head"):
        evaluate_merge("org/reg-merge", None, {"t": (rows([0, 1]), torch.tensor([0, 1]))}, progress=False)


@pytest.mark.parametrize("as_dataset", [True, False])
def test_num_samples_as_large_as_the_data_scores_it_whole_and_says_so_not_first_rows(as_dataset):
    """evaluate_merge(m, None, {"t": 4 rows}, num_samples=4): 4 rows scored, not `first 4` (card: "not all of it")."""
    import datasets

    model = controlled(["neg", "pos", "mid"], [[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]])
    labels = [0, 1, 2, 1]  # rows 0-2 right, row 3 wrong: 3/4
    data = (datasets.Dataset.from_dict({**{k: v.tolist() for k, v in rows(range(4)).items()}, "label": labels})
            if as_dataset else (rows(range(4)), torch.tensor(labels)))
    whole = evaluate_merge(model, None, {"t": data}, num_samples=4, progress=False)
    assert whole.score("merged", "t") == 0.75 and whole.tasks["t"]["num_samples"] == 4
    assert "first_rows" not in whole.tasks["t"]
    assert [row.rows for row in whole.card_rows()] == ["4", "4"]
    cut = evaluate_merge(model, None, {"t": data}, num_samples=3, progress=False)
    assert cut.score("merged", "t") == 1.0 and cut.tasks["t"]["first_rows"] is True
    assert [row.rows for row in cut.card_rows()] == ["first 3", "first 3"]


def test_a_task_column_of_indices_with_task_names_in_another_order_than_the_merge_is_refused():
    """tasks_from_dataset(d, list(loaded_config.task_label_ranges), task_column=int ids): refused, not swapped."""
    import datasets

    from hf_mudsc.evaluate.tasks import tasks_from_dataset

    merged = controlled(["zeta: x", "zeta: y", "alpha: p", "alpha: q"],
                        [[5, 0, 0, 0], [0, 5, 0, 0], [0, 0, 0, 5], [0, 0, 5, 0]], {"alpha": [2, 4], "zeta": [0, 2]})
    parents = [controlled(["x", "y"], [[1, 0], [0, 1], [1, 0], [0, 1]]),
               controlled(["p", "q"], [[1, 0], [0, 1], [0, 1], [1, 0]])]
    data = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in rows(range(4)).items()},
                                       "task": [0, 0, 1, 1], "label": [0, 1, 1, 0]})  # 0: zeta (parent A), 1: alpha
    in_order = evaluate_merge(merged, parents, tasks_from_dataset(data, ["zeta", "alpha"], task_column="task"),
                              progress=False)
    assert in_order.score("merged", "zeta") == in_order.score("merged", "alpha") == 1.0
    assert in_order.score("merged", "joint") == 1.0
    assert in_order.score("parent_a", "zeta") == in_order.score("parent_b", "alpha") == 1.0
    assert list(merged.config.task_label_ranges) == ["alpha", "zeta"]  # as a loaded config.json lists them
    with pytest.raises(EvaluationError, match=r"task column 'task' holds task indices.*merge order") as error:
        evaluate_merge(merged, parents, tasks_from_dataset(data, list(merged.config.task_label_ranges),
                                                           task_column="task"), progress=False)
    assert "\n" not in str(error.value)
    named = data.cast_column("task", datasets.Value("string")).map(
        lambda row: {"task": ["zeta", "alpha"][int(row["task"])]})
    by_name = evaluate_merge(merged, parents, tasks_from_dataset(named, ["alpha", "zeta"], task_column="task"),
                             progress=False)
    assert by_name.scores == in_order.scores


def test_joint_figures_under_both_rules_match_a_hand_computation():
    """evaluate_merge(m, [A, B], {a: 2 rows, b: 2 rows}, joint_rule=per_task|raw): each figure as worked out by hand."""
    # merged rows: 0 a=[10, 9, 0] b=[3, 0] -> raw a:0, per-task b:0 (0.953 > 0.731); 1 a=[0, 0, 4] b=[1, 0]: a:2 both
    # rows 2-3 (task b): 2 a=[2, 0, 0] b=[0, 5] -> b:1 both; 3 a=[5, 0, 0] b=[0, 5.5] -> b:1 both (5.5 > 5; .996 > .987)
    merged = controlled(["a: x", "a: y", "a: z", "b: p", "b: q"],
                        [[10, 9, 0, 3, 0], [0, 0, 4, 1, 0], [2, 0, 0, 0, 5], [5, 0, 0, 0, 5.5]],
                        {"a": [0, 3], "b": [3, 5]})
    # parents: A right on row 0 only, B right on both its rows; ensemble (A | B) decided by the same rule
    parent_a = controlled(["x", "y", "z"], [[5, 0, 0], [5, 0, 0], [1, 0, 0], [0, 0, 1]])
    parent_b = controlled(["p", "q"], [[0, 2], [2, 0], [0, 3], [0, 0.5]])
    data = {"a": (rows([0, 1]), torch.tensor([0, 2])), "b": (rows([2, 3]), torch.tensor([1, 1]))}
    # joint references: 0, 2, 4, 4
    expected = {
        # raw: merged 0,2,4,4 -> 4/4; ensemble [A|B] raw: row0 [5,0,0,0,2]->0 ok, row1 [5,0,0,2,0]->0 no,
        # row2 [1,0,0,0,3]->4 ok, row3 [0,0,1,0,.5]->2 no -> 2/4
        "raw": {"merged": 1.0, "ensemble": 0.5},
        # per task: merged row0 -> 3 no, row1 a max .96 vs b .73 -> 2 ok, row2 -> 4 ok, row3 -> 4 ok
        # ensemble: row0 A .987 vs B .88 -> 0 ok, row1 -> 0 no, row2 A .58 vs B .95 -> 4 ok, row3 A .58 vs .62 -> 4 ok
        "per_task": {"merged": 0.75, "ensemble": 0.75},
    }
    for rule, figures in expected.items():
        result = evaluate_merge(merged, [parent_a, parent_b], data, joint_rule=rule, progress=False)
        assert result.score("merged", "joint") == figures["merged"], rule
        assert result.score("ensemble", "joint") == figures["ensemble"], rule
        assert result.score("merged", "a") == 1.0 and result.score("merged", "b") == 1.0
        assert result.score("parent_a", "a") == 0.5 and result.score("parent_b", "b") == 1.0
        assert result.score("ensemble", "average") == 0.75 and result.score("merged", "average") == 1.0
        assert result.score("parent_a", "joint") == 0.25 and result.score("parent_b", "joint") == 0.5
        assert result.definitions["joint_rule"] == rule


def test_a_task_column_of_indices_for_a_subset_of_tasks_in_merge_order_is_scored():
    """(review) merge order [zeta, beta, alpha], one dataset of zeta and alpha rows, task column 0 = zeta, 1 = alpha,
    tasks_from_dataset(d, ["zeta", "alpha"]): names in merge order, yet refused ("alpha is task 1 given, task 2 of the
    merge") with advice that could not be followed. The indices count in the names given: scored, 1.0 each."""
    import datasets

    from hf_mudsc.evaluate.tasks import tasks_from_dataset

    merged = controlled(["zeta: x", "zeta: y", "beta: m", "beta: n", "alpha: p", "alpha: q"],
                        [[5, 0, 0, 0, 0, 0], [0, 5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 5], [0, 0, 0, 0, 5, 0]],
                        {"zeta": [0, 2], "beta": [2, 4], "alpha": [4, 6]})
    data = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in rows(range(4)).items()},
                                       "task": [0, 0, 1, 1], "label": [0, 1, 1, 0]})
    result = evaluate_merge(merged, None, tasks_from_dataset(data, ["zeta", "alpha"], task_column="task"),
                            progress=False)
    assert result.score("merged", "zeta") == result.score("merged", "alpha") == 1.0
    with pytest.raises(EvaluationError, match=r"task column 'task' holds task indices.*merge order"):
        evaluate_merge(merged, None, tasks_from_dataset(data, ["alpha", "zeta"], task_column="task"), progress=False)


@pytest.mark.parametrize("formatted", ["torch_columns", "arrow"])
def test_a_formatted_evaluation_dataset_is_scored_as_the_plain_one(formatted):
    """(review) evaluate_merge(m, None, {"t": ds.with_format("torch", columns=[inputs])}): a bare KeyError 'label'
    traceback; with_format("arrow"): "label <pyarrow.Int64Scalar: 0> is not a class id". Read as plain values now."""
    import datasets

    model = controlled(["neg", "pos", "mid"], [[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]])
    data = datasets.Dataset.from_dict({**{k: v.tolist() for k, v in rows(range(4)).items()}, "label": [0, 1, 2, 1]})
    plain = evaluate_merge(model, None, {"t": data}, progress=False)
    shaped = (data.with_format("torch", columns=["input_ids", "attention_mask"]) if formatted == "torch_columns"
              else data.with_format("arrow"))
    assert plain.score("merged", "t") == 0.75
    assert evaluate_merge(model, None, {"t": shaped}, progress=False).scores == plain.scores
