"""The joint decision over a concatenated head: each task's softmax, then the most probable label of all tasks.

A merged model whose parents had different label sets carries their heads one after the other
(`config.task_label_ranges`). Each task's slice holds that parent's logits up to a per-task shift (the refit's
head target is each parent's logits centred per task, docs/design.md §4.9), so within a task it decides like
its parent, but nothing ties the scale of one task's logits to another's: an argmax over the raw
concatenation favours whichever task's logits run larger. Normalising each slice first — per-task softmax,
concatenated — gives every task a probability distribution and decides jointly by comparing those; it is the
rule of the parents' ensemble (each head's softmax, concatenated), so the merge and the ensemble it is compared
with decide by the same rule. One shared label set is one slice: a plain softmax, whose argmax is the logits'.
The rule itself (`apply.classifier.per_task_softmax`) lives with the head layout it reads.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from hf_mudsc.apply.classifier import per_task_log_probabilities, per_task_softmax, task_ranges
from hf_mudsc.errors import EvaluationError, shown
from hf_mudsc.load.checks import is_multi_label_head, is_regression_head

#: Label-set sizes this many times apart make the per-task rule lean to the smaller task (measured: 2 + 8 classes).
UNEVEN_TASKS = 3


def uneven_tasks_warning(ranges: Mapping[str, tuple[int, int]], joint_rule: str) -> str | None:
    """What the evaluation says when the per-task joint rule scores tasks whose label sets differ `UNEVEN_TASKS`-fold
    or more: each task's softmax has a maximum of at least 1/classes, so a task with few classes wins the joint argmax
    on images of the others (2 + 8 digit classes: every image went to the 2-class task, joint 20 % where the raw
    argmax gave 75-88 %; the ensemble is scored by the same rule, so the comparison stays fair). None otherwise."""
    sizes = {task: hi - lo for task, (lo, hi) in ranges.items()}
    if joint_rule != "per_task" or len(sizes) < 2 or max(sizes.values()) < UNEVEN_TASKS * min(sizes.values()):
        return None
    small = min(sizes, key=sizes.get)
    large = max(sizes, key=sizes.get)
    return (f"the joint view's per-task rule favours tasks with few classes: task {small!r} ({sizes[small]} classes) "
            f"beside {large!r} ({sizes[large]}) can draw the other tasks' rows, for the merged model and the ensemble "
            "alike; compare with joint_rule='raw' (CLI: --joint-rule raw), the argmax over the raw logits")


def joint_probabilities(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """Per-task probabilities of a merged model's `logits`, concatenated in label order (module docstring).

    `config`: the merged model's config, its `config.json` read as a dict, or a mapping task -> [first id, end id)
    (its `task_label_ranges`). For the label each row gets, use `joint_predictions`: the argmax of these
    probabilities is the same but where two tasks' maxima both round to 1.0 (logit margins past about 17 in
    float32), where it takes the first task. A model without task ranges gets a plain softmax. A config of a
    multi-label head (a sigmoid per label) or a regression head (a score per output) is refused: neither has a
    softmax or argmax rule, and a softmax of their outputs is no probability of theirs (a regression task's slice
    would be 1.0 on every row). A bare ranges mapping says nothing of the head: it is softmaxed as given.

    Returns:
        A tensor of `logits`' shape: each task's slice softmaxed on its own (each slice sums to 1).
    """
    return per_task_softmax(logits, head_ranges(config, "joint_probabilities"))


def joint_predictions(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """The label id each row of a merged model's `logits` gets by the joint rule the evaluation scores (each task's
    softmax over its own slice, then the most probable label of all tasks; `id2label` names it, `"task: label"`),
    decided on log-probabilities (`per_task_log_probabilities`) so that two confident tasks do not tie.

    `config`: as `joint_probabilities` takes it (the merged model's config, its `config.json` as a dict, or its
    `task_label_ranges`); multi-label and regression heads are refused the same way.

    Returns:
        A long tensor of `logits`' shape without its last axis.
    """
    return per_task_log_probabilities(logits, head_ranges(config, "joint_predictions")).argmax(-1)


def head_ranges(config: Any, caller: str) -> list[tuple[int, int]]:
    """The `[first id, end id)` slice of every task of the head `config` describes (`joint_probabilities`' forms;
    empty: one softmax over all labels), a multi-label or regression head refused in one line naming `caller`."""
    if not isinstance(config, Mapping):
        refuse_non_softmax_head(config, caller)
        return list(task_ranges(config).values())
    if any(key in config for key in CONFIG_KEYS):  # config.json as a dict (json.load): read as the config it is
        id2label = config.get("id2label")
        view = SimpleNamespace(task_label_ranges=config.get("task_label_ranges"), id2label=id2label,
                               problem_type=config.get("problem_type"),
                               num_labels=len(id2label) if isinstance(id2label, Mapping) else config.get("num_labels"))
        refuse_non_softmax_head(view, caller)
        return list(task_ranges(view).values())
    for task, bounds in config.items():
        if not _is_range(bounds):
            raise EvaluationError(
                f"{caller} takes the merged model's config (model.config, or its config.json as a dict) "
                "or its task_label_ranges (task -> [first id, end id)); got a mapping with "
                f"{shown(task)}: {shown(bounds)}")
    return [tuple(bounds) for bounds in config.values()]


def refuse_non_softmax_head(config: Any, caller: str) -> None:
    """Refuse a head whose outputs are read without a softmax (`load.checks`' rules, as `evaluate` refuses them):
    `caller` (`joint_probabilities`, `joint_predictions`) would return numbers that are not the model's."""
    if is_multi_label_head(config):
        raise EvaluationError(
            f"{caller} has no rule for a multi-label head (problem_type 'multi_label_classification': a "
            "sigmoid per label, no softmax over a task's labels); read each label on its own: logits.sigmoid() "
            "against a threshold (0.5, as the model card's snippet does)")
    if is_regression_head(config):
        raise EvaluationError(
            f"{caller} has no rule for a regression head (problem_type 'regression', or one output without "
            "a problem_type: each output is a task's score, not a class logit); read the outputs "
            "(model(**inputs).logits) as the scores they are")


# Keys every config.json the merge writes holds (a task-ranges mapping has task names as keys).
CONFIG_KEYS = ("task_label_ranges", "model_type", "id2label")


def _is_range(bounds: Any) -> bool:
    """`[first id, end id)` as two whole numbers (a list from JSON, or a tuple)."""
    return (isinstance(bounds, Sequence) and not isinstance(bounds, (str, bytes)) and len(bounds) == 2
            and all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in bounds))
