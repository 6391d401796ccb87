"""Which data scores which task, and the joint label space the tasks share.

The tasks' classes lie one after the other in one **joint label space**, in the order of the merged model's
`config.task_label_ranges` (A's classes, then B's — docs/design.md §6). A CLIP model has no head: its tasks and
their class names come from the data (or `class_names=`). Labels read from the data are mapped to each task's
own class ids here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from hf_mudsc.errors import EvaluationError, parent_label
from hf_mudsc.evaluate.names import AVERAGE, JOINT, LABEL_COLUMNS


@dataclass
class TaskData:
    """One task's evaluation data and how to read its labels.

    Attributes:
        data: a `datasets.Dataset`/`IterableDataset` (model-input columns such as `pixel_values` or
            `input_ids`, or raw `image`/`img`/`text`/`sentence` columns preprocessed with the processor),
            a dataset spec `"repo_or_path[:config]:split"`, or a tuple `(inputs, labels)` of tensors
            (inputs: a tensor for the model's main input, or a dict of tensors).
        label_column: the label column (default: `label` or `labels`). Integer labels are the task's own
            class ids `0..k-1`; string labels are class names of the task.
        label_offset: subtracted from integer labels first (a dataset labelled in the joint label space).
        task_column, task_value: keep only the rows whose `task_column` equals `task_value`.
        task_order: the task names the column's indices count in (`tasks_from_dataset`'s `task_names`): indices
            are read only when that order is the merge's (for the tasks it names); None: not checked.
        label_range: keep only rows whose integer label lies in `[lo, hi)` (before the offset).
        joint_size: with `label_range`, the size of the joint label space: a label outside it lies in no task's
            range, and is refused rather than left out of every task.
        name, split: shown in the results and the model card (a Hub dataset's id names it there; data given in
            memory without a name is `in-memory data`, without a split none is shown).
        config: the dataset's config (`sst2` of `glue`), shown with them (the card's `model-index`).
        revision: the Hub revision the data was read at, when the spec pinned one (`org/data@REV:test`).
        local: the data is a local folder, not a Hub dataset: the card keeps it out of its `datasets` (Hub ids).
    """

    data: Any
    label_column: str | None = None
    label_offset: int = 0
    task_column: str | None = None
    task_value: Any = None
    task_order: tuple[str, ...] | None = None
    label_range: tuple[int, int] | None = None
    joint_size: int | None = None
    name: str | None = None
    split: str | None = None
    local: bool = False
    config: str | None = None
    revision: str | None = None


def tasks_from_dataset(
    data: Any,
    task_names: Sequence[str],
    task_ranges: Mapping[str, Sequence[int]] | None = None,
    *,
    task_column: str | None = None,
    label_column: str | None = None,
    name: str | None = None,
    split: str | None = None,
    local: bool = False,
    config: str | None = None,
) -> dict[str, TaskData]:
    """Split ONE dataset holding several tasks into `TaskData` per task.

    With `task_column`, a row belongs to the task whose name (or index in `task_names`) the column holds,
    and its label is that task's own class id or name. Indices need `task_names` in merge order (A's task first; a
    loaded config lists `task_label_ranges` alphabetically), a subset of the tasks too: another order is refused
    when the rows are read.
    Without it, integer labels are ids of the joint label space (the merged model's head, `task_ranges`), so the
    task is the range the label falls in.
    """
    if task_column is not None:
        return {task: TaskData(data, label_column=label_column, task_column=task_column, task_value=(i, task),
                               task_order=tuple(task_names), name=name, split=split, local=local, config=config)
                for i, task in enumerate(task_names)}
    if not task_ranges:
        raise EvaluationError(
            "one dataset for several tasks needs either task_column= (a column naming each row's task) or a "
            "merged model with config.task_label_ranges (labels in the joint label space)"
        )
    size = max(int(bounds[1]) for bounds in task_ranges.values())
    return {task: TaskData(data, label_column=label_column, label_offset=int(task_ranges[task][0]),
                           label_range=(int(task_ranges[task][0]), int(task_ranges[task][1])), joint_size=size,
                           name=name, split=split, local=local, config=config) for task in task_names}


def tasks_without_rows(tasks: Mapping[str, TaskData]) -> list[str] | None:
    """The tasks of which ONE dataset given for every task (`tasks_from_dataset`) holds no row, read from its task or
    label column alone (no model, no preprocessing), so that a dataset of one task passed for several is refused
    before any weights; None when that cannot be known without reading the data (a stream, labels that are class
    names, a column that is not there: the checks while scoring say those)."""
    sources = list(tasks.values())
    data = sources[0].data if sources else None
    if not isinstance(data, datasets.Dataset):
        return None
    first = sources[0]
    if first.task_column is not None:
        if first.task_column not in data.column_names:
            return None
        named = data.unique(first.task_column)
        feature = data.features.get(first.task_column)
        if isinstance(feature, datasets.ClassLabel) and set(feature.names) & set(tasks):  # read by its names
            named = [feature.int2str(int(value)) if 0 <= int(value) < feature.num_classes else value
                     for value in named]
        return [task for task, source in tasks.items()
                if not any(value == source.task_value[1] or (isinstance(value, (int, np.integer))
                                                            and int(value) == source.task_value[0])
                           for value in named)]
    if any(source.label_range is None for source in sources):
        return None
    column = first.label_column or next((c for c in LABEL_COLUMNS if c in data.column_names), None)
    if column is None or column not in data.column_names:
        return None
    feature = data.features.get(column)
    if isinstance(feature, datasets.ClassLabel) and not unnamed_classes(feature.names):
        return None  # its ids are read by their names, against the merged head's classes (`batches.joint_relabel`)
    labels = data.unique(column)
    if not all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in labels):
        return None
    return [task for task, source in tasks.items()
            if not any(source.label_range[0] <= int(label) < source.label_range[1] for label in labels)]


def one_dataset_per_task_fix(task_names: Sequence[str], *, cli: bool = False) -> str:
    """How to give each task its own dataset, in the API's words (and the CLI's) or, `cli`, the CLI's alone."""
    flags = " ".join(f"--dataset {task}=SPEC" for task in task_names)
    if cli:
        return f"pass one --dataset per task: {flags}"
    return f"pass one dataset per task ({{task: data, ...}}; CLI: {flags}), or one dataset holding every task's rows"


def spec_task_data(spec: str | os.PathLike, data: Any = None, **fields: Any) -> TaskData:
    """The `TaskData` of a dataset spec (`data`: the dataset it opens, default the spec itself), named as results and
    cards show it: a local folder by its own name (never the absolute path, which would reach the results and a
    card), a Hub dataset by its id; the config and split from the spec."""
    from hf_mudsc.calibrate.dataset_spec import DatasetSpec

    parsed = DatasetSpec.parse(os.fspath(spec))
    path = Path(parsed.path).expanduser()
    local = path.exists()
    return TaskData(os.fspath(spec) if data is None else data, name=path.name if local else parsed.path,
                    split=parsed.split, local=local, config=parsed.config, revision=parsed.revision, **fields)


def as_task_data(value: Any) -> TaskData:
    if isinstance(value, TaskData):
        return value
    if isinstance(value, (str, os.PathLike)):
        return spec_task_data(value)
    return TaskData(value)


@dataclass
class LabelLayout:
    """The joint label space: task -> (lo, hi), in order; `shared` when all tasks use one label set."""

    ranges: dict[str, tuple[int, int]]
    shared: bool
    class_names: dict[str, list[str]]
    parent_columns: tuple[list[int] | None, ...] = ()
    """One shared label set: per parent (merge order), its logit column for each of the merged model's labels when
    it lists them in another order (the merge reordered its head by name, docs/design.md §6), else None."""
    parent_tasks: tuple[tuple[str, ...], ...] = ()
    """Different label sets, with parents: per parent (merge order), the merged model's tasks its head holds, in order
    — one each, or a merged parent's several (`apply.classifier.parent_tasks`); empty otherwise."""
    joint_alias: tuple[int, ...] = ()
    """A CLIP whose tasks share a class name: each joint id's first id of the same name (their prompts are identical,
    so the later one is never picked); the joint view reads both through it. Empty when no name repeats."""

    @property
    def size(self) -> int:
        return max(hi for _, hi in self.ranges.values())

    @property
    def repeated_classes(self) -> list[str]:
        """The class names that several tasks have (`joint_alias`), for the results' definitions; none without."""
        joint = [name for task in self.ranges for name in self.class_names[task]]
        return sorted({joint[index] for index, first in enumerate(self.joint_alias) if first != index})


def _task_ranges_of(model: Any) -> dict[str, tuple[int, int]] | None:
    """The task ranges in parent order (a loaded config lists them sorted by name), None without tasks."""
    from hf_mudsc.apply.classifier import task_ranges

    try:
        return task_ranges(model.config) or None
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def _label_names(model: Any) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def unnamed_classes(names: Sequence[str]) -> bool:
    """Whether `names` are placeholders that say nothing about the classes: transformers' defaults (`LABEL_0`, ...,
    a model saved without `id2label`) or each class's own id (`0`, `1`, ...); such labels are read by id."""
    from hf_mudsc.diagnostics import DEFAULT_LABEL

    return all(DEFAULT_LABEL.fullmatch(str(name)) or str(name) == str(index) for index, name in enumerate(names))


def _strip_task(label: str, task: str) -> str:
    prefix = f"{task}: "
    return label[len(prefix):] if label.startswith(prefix) else label


def classifier_layout(merged: Mapping[str, Any], parents: Sequence[Any], requested: Sequence[str] | None,
                       count: int) -> LabelLayout:
    reference_name, reference = next(iter(merged.items()))
    ranges = _task_ranges_of(reference)
    names = _label_names(reference)
    for name, model in merged.items():
        if _task_ranges_of(model) != ranges or len(_label_names(model)) != len(names):
            raise EvaluationError(
                f"merged models {reference_name!r} and {name!r} have different label layouts "
                "(config.task_label_ranges); evaluate them separately"
            )
        labels = _label_names(model)
        if labels != names and not unnamed_classes(labels) and not unnamed_classes(names):
            # every model is read against the first one's classes, by position: another order scores wrong rows
            raise EvaluationError(
                f"merged models {reference_name!r} and {name!r} list their labels differently ({names[:6]} and "
                f"{labels[:6]}: config.id2label), so {name!r} cannot be read against the classes of "
                f"{reference_name!r}; evaluate them separately"
            )
    if ranges is None:
        if requested:
            tasks = list(requested)
        else:
            # one task or several, named alike: a lone task called `test` read as its split (shown beside it)
            tasks = [f"task_{i}" for i in range(count)]
        from hf_mudsc.apply.classifier import head_order

        columns = tuple(head_order(reference.config, parent.config) for parent in parents)
        layout = LabelLayout({t: (0, len(names)) for t in tasks}, shared=True,
                         class_names={t: names for t in tasks}, parent_columns=columns)
        for i, (parent, order) in enumerate(zip(parents, columns)):
            if order is None and _label_names(parent) != names:
                raise EvaluationError(
                    f"parent {parent_label(i)} has labels {_label_names(parent)[:6]}…, the merged model "
                    f"{names[:6]}…; the merged model has one shared label set (no config.task_label_ranges), "
                    "so the parents must too"
                )
        return layout
    for task in ranges:
        if task in (JOINT, AVERAGE):
            raise EvaluationError(
                f"a task may not be named {task!r} (a reserved view name); rename it in the config"
            )
    class_names = {t: [_strip_task(names[i], t) for i in range(lo, hi)] for t, (lo, hi) in ranges.items()}
    held: tuple[tuple[str, ...], ...] = ()
    if parents:
        held = _parents_tasks(parents, ranges)
        _check_parent_classes(parents, class_names, held)
    return LabelLayout(dict(ranges), shared=False, class_names=class_names, parent_tasks=held)


def held_tasks(config: Any, index: int) -> list[tuple[str, list[str]]]:
    """The tasks parent `index`'s head holds, each (its own name, its labels): one, or a merged parent's several
    (`apply.classifier.parent_tasks`, imported here: that module imports torch, this one does not)."""
    from hf_mudsc.apply.classifier import parent_tasks

    return parent_tasks(config, index)


def parents_tasks_mismatch(counts: Sequence[int], ranges: Mapping[str, Any]) -> str | None:
    """The one-line refusal of parents holding `counts` tasks each (merge order) for the merged model's `ranges`,
    None when they hold as many."""
    total = sum(counts)
    if total == len(ranges):
        return None
    if all(count == 1 for count in counts):
        return f"{len(counts)} parents for {len(ranges)} tasks {list(ranges)}; pass one per task"
    if len(counts) >= 2 and all(count == len(ranges) for count in counts):
        return (f"each of the {len(counts)} parents holds all {len(ranges)} of the merged model's tasks "
                f"{list(ranges)}: merged models with the same labels, whose heads were merged, not concatenated — "
                "scoring them beside such a merge is not supported; score the merged model alone (parents=None, "
                "CLI: --no-parents)")
    return (f"{len(counts)} parents holding {total} tasks (a merged parent holds each of its tasks) for the merged "
            f"model's {len(ranges)} tasks {list(ranges)}; pass the parents in merge order, which together hold one "
            "per task")


def _parents_tasks(parents: Sequence[Any], ranges: Mapping[str, tuple[int, int]]) -> tuple[tuple[str, ...], ...]:
    """Per parent (merge order), the merged tasks its head holds: consecutive tasks, as many as it brings (a merged
    parent its own tasks), each as wide as that task's slice of its head."""
    held = [held_tasks(parent.config, index) for index, parent in enumerate(parents)]
    refusal = parents_tasks_mismatch([len(own) for own in held], ranges)
    if refusal is not None:
        raise EvaluationError(refusal)
    tasks = list(ranges)
    assigned: list[tuple[str, ...]] = []
    for index, own in enumerate(held):
        start = sum(len(earlier) for earlier in held[:index])
        mine = tuple(tasks[start:start + len(own)])
        for task, (own_name, labels) in zip(mine, own):
            lo, hi = ranges[task]
            if len(labels) != hi - lo:
                whose = f"parent {parent_label(index)}" if len(own) == 1 else \
                    f"parent {parent_label(index)}'s task {own_name!r}"
                raise EvaluationError(
                    f"{whose} has {len(labels)} labels but task {task!r} has {hi - lo} in the merged model; "
                    "pass the parents in the order they were merged (A first)"
                )
        assigned.append(mine)
    return tuple(assigned)


def _check_parent_classes(parents: Sequence[Any], class_names: Mapping[str, Sequence[str]],
                          held: Sequence[Sequence[str]]) -> None:
    """Each parent (in the order given) must have its tasks' classes (`held`: the merged tasks it holds): a parent
    whose labels are another task's (`--parents cars pets` for a merge of pets then cars) would be scored on that
    task's data and fill the Parent and ensemble figures with it. Refused rather than reordered: the order given is
    also the ensemble's and the one the user believes; placeholder labels (`LABEL_0`, ...) cannot tell and are left
    as given."""
    for index, (parent, tasks) in enumerate(zip(parents, held)):
        for task, (_, own) in zip(tasks, held_tasks(parent.config, index)):
            names = class_names[task]
            labels = [_strip_task(label, task) for label in own]
            if labels == list(names) or unnamed_classes(labels) or unnamed_classes(names):
                continue
            other = next((t for t, n in class_names.items() if t != task and list(n) == labels), None)
            whose = f"the classes of task {other!r}" if other else "no task's classes"
            raise EvaluationError(
                f"parent {parent_label(index)} has the labels {labels[:6]} ({whose}), not those of task {task!r} "
                f"{list(names)[:6]} it would be scored on; pass the parents in merge order, one per task: "
                f"{', '.join(class_names)} (the merged model's tasks; CLI: --parents A B ...)"
            )


def clip_layout(tasks: Sequence[str], sources: Mapping[str, TaskData],
                 class_names: Mapping[str, Sequence[str]] | None) -> LabelLayout:
    names: dict[str, list[str]] = {}
    for task in tasks:
        given = (class_names or {}).get(task)
        if given is None:
            given = _class_label_names(sources[task])
        if not given:
            raise EvaluationError(
                f"zero-shot CLIP evaluation needs the class names of task {task!r}: pass "
                f"class_names={{{task!r}: [...]}} (CLI: --class-names) or use a dataset whose label column "
                "is a ClassLabel"
            )
        names[task] = [str(n) for n in given]
        twice = next((n for i, n in enumerate(names[task]) if n in names[task][:i]), None)
        if twice is not None:  # two identical prompts: the later class could never be predicted
            raise EvaluationError(
                f"the class names of task {task!r} name {twice!r} twice; zero-shot CLIP needs one name per class"
            )
    ranges, start = {}, 0
    for task in tasks:
        ranges[task] = (start, start + len(names[task]))
        start += len(names[task])
    joint = [name for task in tasks for name in names[task]]
    alias = tuple(joint.index(name) for name in joint)
    return LabelLayout(ranges, shared=False, class_names=names,
                       joint_alias=alias if alias != tuple(range(len(joint))) else ())


def _class_label_names(source: TaskData) -> list[str] | None:
    data = source.data
    features = getattr(data, "features", None)
    if not features:
        return None
    column = source.label_column or next((c for c in LABEL_COLUMNS if c in features), None)
    feature = features.get(column) if column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def local_labels(raw: Sequence[Any], source: TaskData, task: str, names: Sequence[str]) -> np.ndarray:
    """Raw labels -> the task's own class ids (names looked up; joint ids shifted); range checked."""
    out = np.empty(len(raw), dtype=np.int64)
    lookup: dict[str, list[int]] | None = None
    for i, value in enumerate(raw):
        if isinstance(value, str):
            if lookup is None:
                lookup = {}
                for j, n in enumerate(names):
                    lookup.setdefault(n, []).append(j)
            if value not in lookup:
                raise EvaluationError(
                    f"task {task!r}: label {value!r} is not one of its classes {list(names)}"
                )
            ids = lookup[value]
            if len(ids) > 1:  # one name, several classes: no row labelled by it can be scored right
                raise EvaluationError(
                    f"task {task!r}: label {value!r} names classes {' and '.join(map(str, ids))} of the model "
                    "(its id2label repeats the name); label the rows with class ids instead of names"
                )
            out[i] = ids[0]
        elif isinstance(value, (list, tuple, np.ndarray)):
            raise EvaluationError(
                f"task {task!r}: label {list(value)!r} is a list (multi-hot labels of a multi-label task); "
                "evaluation scores one class per row: pass each row's class id or name"
            )
        else:
            out[i] = _class_id(value, task) - source.label_offset
    bad = out[(out < 0) | (out >= len(names))]
    if len(bad):
        raise EvaluationError(
            f"task {task!r}: label {int(bad[0]) + source.label_offset} is outside its classes "
            f"0..{len(names) - 1}; labels must be the task's own class ids (or names). For a dataset "
            "labelled with the merged model's joint ids, pass it once without a task (tasks_from_dataset; "
            "CLI: --dataset SPEC alone)"
        )
    return out


def _class_id(value: Any, task: str) -> int:
    """An integer label as a class id; a float only when whole (`2.0`): cutting `2.6` to 2 would score rows
    against classes nobody labelled them with."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise EvaluationError(
            f"task {task!r}: label {float(value)!r} is not a whole class id; labels must be the task's own class "
            "ids (0, 1, ...) or names — a float label column holds regression targets or scores, not classes"
        )
    raise EvaluationError(
        f"task {task!r}: label {value!r} is not a class id or name; every row needs its class id (0, 1, ...) or "
        "name — drop or fill the rows without one"
    )


def source_key(source: TaskData) -> str | None:
    """For local data, a short digest of which data `source` reads (never the path itself, which would reach the
    results file and a card): two local folders of one name (`a/test`, `b/test`) are shown alike but are two
    datasets, and the joint row is on one dataset only when every task's data is the same (`results._joint_data`).
    None for a Hub dataset or data named by the caller: its name says which dataset it is."""
    if not source.local:
        return None
    import hashlib

    from hf_mudsc.calibrate.dataset_spec import DatasetSpec

    data = source.data
    if isinstance(data, (str, os.PathLike)):
        try:
            parsed = DatasetSpec.parse(os.fspath(data))
            path = Path(parsed.path).expanduser()
            where = str(path.resolve()) if path.exists() else parsed.path
            identity = f"{where}|{parsed.config}|{parsed.split}"
        except ValueError:
            identity = os.fspath(data)
    else:
        identity = f"{type(data).__name__}|{getattr(data, '_fingerprint', None) or id(data)}"
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def source_name(source: TaskData) -> str | None:
    """How the results and the card name the data: `name`, else the spec's dataset; None for data given in memory
    without a name. Its `info` names no Hub dataset (a builder such as `csv`/`parquet`, or a Hub dataset's name
    without its owner), so nothing is guessed from it that would read as a Hub dataset id."""
    if source.name:
        return source.name
    data = source.data
    if isinstance(data, (str, os.PathLike)):
        from hf_mudsc.calibrate.dataset_spec import DatasetSpec

        return DatasetSpec.parse(os.fspath(data)).path
    return None


def spec_revision(source: TaskData) -> str | None:
    """The revision a Hub dataset spec pins (`org/data@REV:test`), None without one: the figures are of that
    revision, and the results and the card say so."""
    if source.revision is not None:
        return source.revision
    if isinstance(source.data, (str, os.PathLike)):
        from hf_mudsc.calibrate.dataset_spec import DatasetSpec

        return DatasetSpec.parse(os.fspath(source.data)).revision
    return None


def spec_split(source: TaskData) -> str | None:
    if isinstance(source.data, (str, os.PathLike)):
        from hf_mudsc.calibrate.dataset_spec import DatasetSpec

        return DatasetSpec.parse(os.fspath(source.data)).split
    split = getattr(source.data, "split", None)
    return str(split) if split else None
