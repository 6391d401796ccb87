"""Classifier heads of the parents -> head of the merged model (design §6).

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


def concatenated_head_config(
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
