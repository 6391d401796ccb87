"""Classifier heads of the parents -> head of the merged model (docs/design.md §6).

Same label set: the classifier is merged like any layer. Different label sets: the heads are
concatenated (A's classes first), labels prefixed by task, and the task -> label range is stored in
the config so evaluation can score each task on its slice.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PretrainedConfig


def label_names(config: PretrainedConfig) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def same_label_set(config_a: PretrainedConfig, config_b: PretrainedConfig) -> bool:
    return label_names(config_a) == label_names(config_b)


def task_name(config: PretrainedConfig, fallback: str) -> str:
    """A short task name from the parent's name (`org/vit-cars@v2` -> `vit-cars`)."""
    raw = str(getattr(config, "_name_or_path", "") or "").rstrip("/")
    name = re.split(r"[/\\]", raw)[-1].split("@")[0] if raw else ""
    return name or fallback


def concatenated_classifier_config(
    config_a: PretrainedConfig, config_b: PretrainedConfig, tasks: tuple[str, str]
) -> dict[str, Any]:
    """Config fields of a merged model whose classifier is A's rows then B's rows."""
    labels_a, labels_b = label_names(config_a), label_names(config_b)
    id2label = {i: f"{tasks[0]}: {label}" for i, label in enumerate(labels_a)}
    id2label.update({len(labels_a) + i: f"{tasks[1]}: {label}" for i, label in enumerate(labels_b)})
    return {
        "id2label": id2label,
        "label2id": {label: i for i, label in id2label.items()},
        "task_label_ranges": {
            tasks[0]: [0, len(labels_a)],
            tasks[1]: [len(labels_a), len(labels_a) + len(labels_b)],
        },
    }


def distinct_task_names(config_a: PretrainedConfig, config_b: PretrainedConfig) -> tuple[str, str]:
    a, b = task_name(config_a, "task_a"), task_name(config_b, "task_b")
    if a == b:
        a, b = f"{a}_a", f"{b}_b"
    return a, b


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
