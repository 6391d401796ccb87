"""Classifier heads of the parents -> head of the merged model (docs/design.md §6).

Same label set: the classifier is merged like any layer. The same labels in another `id2label` order: that
parent's head is first reordered to parent A's label order (`aligned_parent`), then merged likewise.
Different label sets: the heads are concatenated (parent A's classes first, then B's, C's ...), labels prefixed by
task, and the task -> label range is stored in the config so evaluation can score each task on its slice.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PretrainedConfig

from hf_mudsc.diagnostics import DEFAULT_LABEL
from hf_mudsc.errors import parent_label
from hf_mudsc.load.checks import is_regression_head
from hf_mudsc.load.lazy import replaced

if TYPE_CHECKING:
    from hf_mudsc.load.parents import LoadedParent
    from hf_mudsc.spec import PermutationSpec


def label_names(config: PretrainedConfig) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def label_ids(config: PretrainedConfig) -> dict[str, int]:
    """`id2label` inverted: the merged config's `label2id`, written from `id2label` rather than copied from parent A
    (a config made from `id2label` alone has none; a stale one would disagree)."""
    id2label = getattr(config, "id2label", None) or {}
    return {str(name): int(index) for index, name in id2label.items()}


def int_keyed_labels(config: PretrainedConfig) -> dict[int, Any]:
    """`id2label` keyed by int ids, in id order, as `from_pretrained` reads it: a config set from a JSON dict
    (`config.id2label = {"0": "neg"}`) holds string keys, and `pipeline(...)` on a model holding it fails (KeyError:
    0); the merged config, copied from parent A's, gets int keys."""
    id2label = getattr(config, "id2label", None) or {}
    return {int(index): id2label[index] for index in sorted(id2label, key=int)}


def repeated_label(config: PretrainedConfig) -> tuple[str, list[int]] | None:
    """The first name `id2label` gives to more than one class, with those ids; None when each name is one class's.

    Such a head cannot be told apart by name: `label2id` (keyed by name) holds one id of the two, head alignment,
    evaluation by name and a `pipeline`'s output see one class where there are two — so a merge refuses it
    (docs/design.md §6)."""
    ids: dict[str, list[int]] = {}
    id2label = getattr(config, "id2label", None) or {}
    for index in sorted(id2label, key=int):
        ids.setdefault(str(id2label[index]), []).append(int(index))
    return next(((name, found) for name, found in ids.items() if len(found) > 1), None)


def repeated_label_message(config: PretrainedConfig, who: str) -> str | None:
    """The one-line refusal of `who`'s (`parent B`) repeated label name (`repeated_label`), None without one."""
    found = repeated_label(config)
    if found is None:
        return None
    name, ids = found
    listed = ", ".join(map(str, ids[:-1])) + f" and {ids[-1]}"
    return (f"{who}'s id2label gives the name {name!r} to {len(ids)} classes (ids {listed}): a merged head could not "
            "tell them apart (label2id maps a name to one id); give each class its own name in that model's "
            "config.json (id2label and label2id, in a copy of its folder) and merge the copy")


def repeated_labels_message(configs: Sequence[PretrainedConfig]) -> str | None:
    """The refusal of the first parent, in merge order, whose `id2label` repeats a name (`repeated_label_message`);
    None when no parent's does. The merge refuses it before weights, and so does its dry run."""
    messages = (repeated_label_message(config, f"parent {parent_label(index)}") for index, config in enumerate(configs))
    return next((message for message in messages if message is not None), None)


def same_label_set(config_a: PretrainedConfig, config_b: PretrainedConfig) -> bool:
    return label_names(config_a) == label_names(config_b)


def same_label_sets(configs: Sequence[PretrainedConfig]) -> bool:
    """Whether every parent has parent 0's label set, in its order or reordered by name (`head_order`): then the
    classifier is merged like any layer, after `aligned_parent` (else the heads are concatenated)."""
    return all(same_label_set(configs[0], other) or head_order(configs[0], other) is not None
               for other in configs[1:])


def same_head_labels(config_a: PretrainedConfig, config_base: PretrainedConfig) -> bool:
    """Whether a base's head of the parents' shape is a head for parent A's labels: the same names in A's order (the
    merge reorders one listing them in another first), or default names (`LABEL_0`, ...) on either side, which say
    nothing about a row's class (used by position, as parents of default names are)."""
    names_a, names_base = label_names(config_a), label_names(config_base)
    return names_a == names_base or any(all(DEFAULT_LABEL.fullmatch(n) for n in names)
                                        for names in (names_a, names_base))


def head_order(config_a: PretrainedConfig, config_b: PretrainedConfig) -> list[int] | None:
    """B's label id for each of A's labels, in A's order, when B holds exactly A's labels in ANOTHER order; else None.

    None also for repeated names and for transformers' default names (`LABEL_0`, ...): those say nothing about
    which class a row is, so such heads are left as before (merged by position when equal, else concatenated).
    """
    names_a, names_b = label_names(config_a), label_names(config_b)
    if (names_a == names_b or sorted(names_a) != sorted(names_b) or len(set(names_a)) != len(names_a)
            or all(DEFAULT_LABEL.fullmatch(name) for name in names_a)):
        return None
    position = {name: index for index, name in enumerate(names_b)}
    return [position[name] for name in names_a]


def aligned_to_parent_a(parent: LoadedParent, config_a: PretrainedConfig, spec: PermutationSpec,
                        ) -> LoadedParent | None:
    """`parent` (or a base) as a copy in parent A's label order when its head lists A's labels in another order
    (`head_order`, `aligned_parent` on the spec's classifier tensors); None when it does not."""
    order = head_order(config_a, parent.model.config) if spec.classifier is not None else None
    if order is None:
        return None
    head = [name for name in (spec.classifier.weight, spec.classifier.bias) if name]
    return aligned_parent(parent, config_a, head, order)


def aligned_parent(parent: LoadedParent, config_a: PretrainedConfig, head: Sequence[str],
                   order: Sequence[int]) -> LoadedParent:
    """A copy of `parent` saved as if with parent A's label order: its `head` tensors' rows (weight rows, bias
    entries) taken in `order` (`head_order`) and `id2label`/`label2id` A's. The parent itself is never modified:
    its model is deep-copied (a lazily read parent: the meta model, with the head rows held in memory)."""
    model = copy.deepcopy(parent.model)
    model.config.id2label = dict(config_a.id2label)
    model.config.label2id = dict(config_a.label2id)
    index = torch.tensor(list(order))
    parameters = parent.parameters
    if parameters is None:
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name in head:
                own[name].copy_(own[name].detach()[index])
    else:
        parameters = replaced(parameters, {name: parameters[name].detach()[index] for name in head})
    return dataclasses.replace(parent, model=model, parameters=parameters)


def task_name(config: PretrainedConfig, fallback: str) -> str:
    """A short task name from the parent's name (`org/vit-cars@v2` -> `vit-cars`)."""
    raw = str(getattr(config, "_name_or_path", "") or "").rstrip("/")
    name = re.split(r"[/\\]", raw)[-1].split("@")[0] if raw else ""
    return name or fallback


def parent_tasks(config: PretrainedConfig, index: int = 0) -> list[tuple[str, list[str]]]:
    """The tasks the head of parent `index` (merge order) holds, each as (task name, its label names): one, named
    after the parent (`task_name`; unnamed: `task_a`, `task_b`, ...); or, for a parent that is itself a merge of
    different label sets (`config.task_label_ranges`), each of its tasks with its own labels (the `task: ` prefix
    taken off) — a merge of merges (what "merge them 2 at a time" gives) keeps every task's slice, rather than one
    task whose softmax spans several tasks' classes."""
    labels = label_names(config)
    try:
        ranges = task_ranges(config)
    except ValueError:  # ranges that do not tile the head say nothing reliable: the parent is one task, as before
        ranges = {}
    if not ranges:
        return [(task_name(config, f"task_{parent_label(index).lower()}"), labels)]
    return [(task, [label.removeprefix(f"{task}: ") for label in labels[lo:hi]]) for task, (lo, hi) in ranges.items()]


def _tasks_of(configs: Sequence[PretrainedConfig]) -> list[tuple[int, str, list[str]]]:
    """(parent index, task name, label names) of every task of every parent, in head order (`parent_tasks`)."""
    return [(index, name, labels) for index, config in enumerate(configs)
            for name, labels in parent_tasks(config, index)]


def head_tasks(configs: Sequence[PretrainedConfig], rows: Sequence[int]) -> tuple[list[int], list[int]]:
    """(each task's size, its parent's index) for every task of the concatenated head, in head order: a parent of
    `rows[i]` head rows is one task of them, a merged parent (`parent_tasks`) each of its tasks — so the held-out
    scores compare each task's slice, not one softmax over a merged parent's several tasks."""
    sizes: list[int] = []
    owners: list[int] = []
    for index, (config, count) in enumerate(zip(configs, rows, strict=True)):
        own = [len(labels) for _, labels in parent_tasks(config, index)]
        parts = own if len(own) > 1 and sum(own) == count else [count]
        sizes += parts
        owners += [index] * len(parts)
    return sizes, owners


def concatenated_classifier_config(configs: Sequence[PretrainedConfig], tasks: Sequence[str]) -> dict[str, Any]:
    """Config fields of a merged model whose classifier is parent 0's rows, then parent 1's, ...: one task each, or
    a merged parent's own tasks (`parent_tasks`); `tasks`: their names (`distinct_task_names`)."""
    id2label: dict[int, str] = {}
    ranges: dict[str, list[int]] = {}
    for (_, _, labels), task in zip(_tasks_of(configs), tasks, strict=True):
        start = len(id2label)
        for label in labels:
            id2label[len(id2label)] = f"{task}: {label}"
        ranges[task] = [start, len(id2label)]
    label2id = {label: i for i, label in id2label.items()}
    # a parent's repeated label is refused before loading (`repeated_label`), and `distinct_task_names` numbers a task
    # whose prefixed labels would repeat another's; never write such a config
    if len(label2id) != len(id2label):
        raise ValueError(f"the concatenated labels repeat a name ({len(id2label)} ids, {len(label2id)} names); "
                         "give each class of every parent its own name")
    fields: dict[str, Any] = {"id2label": id2label, "label2id": label2id, "task_label_ranges": ranges}
    if all(is_regression_head(config) for config in configs):
        # transformers reads `num_labels=1` as regression, but 2+ outputs without a problem_type as classes.
        fields["problem_type"] = "regression"
    return fields


#: Names of the evaluation's views beside the tasks (`evaluate.names.JOINT`, `AVERAGE`): no task may take one.
RESERVED_TASK_NAMES = ("joint", "average")


def distinct_task_names(configs: Sequence[PretrainedConfig]) -> tuple[str, ...]:
    """One task name per task of the concatenated head, in head order: per parent from its name, or a merged
    parent's own task names (`parent_tasks`); names shared by several tasks, or taken by an evaluation view
    (`RESERVED_TASK_NAMES`: a parent saved in `./joint`), get the letter of their parent (`vit_a`, `vit_b`,
    `joint_a`), and a name that is still taken (a parent named `vit_b` beside two named `vit`) a number too
    (`vit_b_2`): every task keeps its own name, so no parent's range is written over another's, and evaluate accepts
    every one. A name whose merged labels (`task: label`) would repeat an earlier task's is numbered too (a parent
    `run` with a label `x: cat` and a parent `run: x` with a label `cat`: `run: x_2`), so every merged label is
    distinct."""
    tasks = _tasks_of(configs)
    names = [name for _, name, _ in tasks]
    lettered = [f"{name}_{parent_label(i).lower()}" if names.count(name) > 1 or name in RESERVED_TASK_NAMES else name
                for i, name, _ in tasks]
    distinct: list[str] = []
    merged_labels: set[str] = set()
    for name, (_, _, labels) in zip(lettered, tasks):
        candidate, number = name, 2
        while candidate in distinct or (candidate != name and candidate in lettered) \
                or any(f"{candidate}: {label}" in merged_labels for label in labels):
            candidate, number = f"{name}_{number}", number + 1
        distinct.append(candidate)
        merged_labels.update(f"{candidate}: {label}" for label in labels)
    return tuple(distinct)


def concatenated_head(params: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The classifier tensors `names` (weight, bias) of the merged model: every parent's rows, in parent order."""
    return {name: torch.cat([p[name].detach() for p in params], dim=0) for name in names}


def task_ranges(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """`config.task_label_ranges` in parent order (A's task first), validated; {} for one shared label set.

    The order is taken from the ranges' start ids, not from the mapping: `config.json` is written with
    sorted keys, so a loaded config lists the tasks alphabetically. The ranges must tile the head.
    """
    raw = getattr(config, "task_label_ranges", None) or {}
    try:
        ranges = {str(task): (int(bounds[0]), int(bounds[1])) for task, bounds in raw.items()}
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        raise ValueError(
            f"config.task_label_ranges must map each task to [first id, end id), got {raw!r}; "
            "re-create the merged model with hf-mudsc merge"
        ) from None
    ordered = dict(sorted(ranges.items(), key=lambda item: item[1]))
    end = 0
    for lo, hi in ordered.values():
        if lo != end or hi <= lo:
            raise ValueError(
                f"config.task_label_ranges {raw!r} overlap or leave gaps; each task needs its own contiguous "
                "slice of the classifier, A's first — re-create the merged model with hf-mudsc merge"
            )
        end = hi
    num_labels = len(getattr(config, "id2label", None) or {})
    if ordered and num_labels and end != num_labels:
        raise ValueError(
            f"config.task_label_ranges {raw!r} cover {end} labels but the classifier has {num_labels}; "
            "re-create the merged model with hf-mudsc merge"
        )
    return ordered


def tiled_bounds(ranges: Sequence[tuple[int, int]], labels: int) -> list[tuple[int, int]]:
    """The `[lo, hi)` task slices in label order, refused in one line unless they tile the `labels` (an empty list:
    no task ranges, one slice of every label)."""
    bounds = sorted((int(lo), int(hi)) for lo, hi in ranges)
    end = 0
    for lo, hi in bounds:
        if lo != end or hi <= lo:
            raise ValueError(f"task ranges {list(ranges)} overlap or leave gaps; each task needs its own "
                             "contiguous slice of the labels")
        end = hi
    if bounds and end != labels:
        raise ValueError(f"task ranges cover {end} labels but the logits have {labels}; pass the "
                         "logits of the model whose config the ranges come from")
    return bounds


def per_task_softmax(logits: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """`logits` (..., labels) with each `[lo, hi)` slice replaced by its softmax; the slices must tile the labels."""
    bounds = tiled_bounds(ranges, logits.shape[-1])
    if not bounds:
        return logits.softmax(-1)
    return torch.cat([logits[..., lo:hi].softmax(-1) for lo, hi in bounds], dim=-1)


def per_task_log_probabilities(logits: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Each task's log-softmax over its `[lo, hi)` slice (the slices tile the labels), concatenated: the per-task
    rule's decision. Its argmax is `per_task_softmax`'s in exact arithmetic, but a confident head's maximum is not
    rounded away: past a logit margin of about 17 a float32 softmax's maximum is exactly 1.0, so two confident tasks
    tied and the row went to the first task (`log_probabilities`, in float64, keeps them apart to a margin of ~700)."""
    bounds = tiled_bounds(ranges, logits.shape[-1])
    if not bounds:
        return log_probabilities(logits)
    return torch.cat([log_probabilities(logits[..., lo:hi]) for lo, hi in bounds], dim=-1)


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The log-softmax over the last axis, its maximum as `-log1p(sum of the others' exp(z - max))`: torch's
    `log_softmax` takes `log(1 + tiny)`, which is 0 in float32 past a margin of about 17, as the softmax is 1.0.
    In float64 (the exp of a margin underflows only past ~700; in float32 already past ~87-103, where two confident
    tasks would tie again)."""
    logits = logits.to(torch.float64)
    shifted = logits - logits.max(-1, keepdim=True).values
    others = shifted.exp().scatter(-1, shifted.argmax(-1, keepdim=True), 0.0).sum(-1, keepdim=True)
    return shifted - torch.log1p(others)
