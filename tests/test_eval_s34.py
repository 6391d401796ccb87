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
