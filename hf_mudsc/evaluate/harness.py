"""Evaluation of a merge: the merged model next to both parents and their ensemble, per task and jointly.

Everything is scored in one **joint label space**: the tasks' classes one after the other, in the order
of the merged model's `config.task_label_ranges` (A's classes, then B's — docs/design.md §6). Every scorer
produces one score per joint class and sample; the views then read those scores:

* **per-task** (view = the task's name): argmax within the task's slice, against the task's own label.
* **joint** (view `joint`): argmax over all classes, on every task's test data together, against the
  label shifted into the joint space.
* **average** (view `average`): the mean of the per-task figures (the papers' "Avg"); only for scorers
  that have a figure for every task.

Scorers:

* **merged** models: their logits (a concatenated head is already in the joint space).
* **parent A / B**: when the parents have different label sets, a parent scores only its own classes
  (its slice holds its logits, every other class ``-inf``). It is scored per task on its own task only;
  its joint figure is that of a single-task model answering the joint test — always one of its own
  classes, so it is right at most on its own task's share of the samples. When the parents share one
  label set, each parent is scored on every task.
* **ensemble**: both parents run; different label sets: each head's softmax, concatenated (argmax over
  the concatenation); one shared label set: the mean of the two softmaxes.
* **CLIP** (no classifier): zero-shot. Each task names its classes; the text tower embeds prompts made
  from the names (`prompt_template`, several templates are averaged), images are classified by cosine
  similarity times `logit_scale`. Every CLIP (merged or parent) can score every task; the ensemble
  averages the parents' softmaxes over all classes.

Metrics are `evaluate.Metric` subclasses shipped here (`accuracy`, `f1`: macro F1), so nothing is
downloaded or run; other names go through `evaluate.load`, which runs the metric's script — only with
`trust_remote_code=True`. `evaluate.evaluator` is not used
(it breaks on transformers 5). Under `accelerate launch`/`torchrun` each process scores its shard of
every task (`datasets.distributed.split_dataset_by_node`, or a stride for tensors); predictions are
gathered on the main process, which alone computes the metrics and gets the result (others get None).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from tqdm.auto import tqdm

from hf_mudsc._version import __version__
from hf_mudsc.errors import EvaluationError

logger = logging.getLogger(__name__)

JOINT = "joint"
AVERAGE = "average"
PARENT_NAMES = ("parent_a", "parent_b")
ENSEMBLE = "ensemble"
MERGED = "merged"
LABEL_COLUMNS = ("label", "labels")
DEFAULT_PROMPT = "a photo of a {}."
RESULTS_FILENAME = "eval_results.json"




# ---------------------------------------------------------------------------------------------- metrics
_CLASS_FEATURES = datasets.Features(
    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
)


class Accuracy(evaluate.Metric):
    """Top-1 accuracy: the fraction of predictions equal to their reference (same as the Hub's `accuracy`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions that equal the reference label.",
            citation="",
            inputs_description="predictions, references: integer class ids; optional sample_weight.",
            features=_CLASS_FEATURES,
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int],
                 sample_weight: Sequence[float] | None = None) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise EvaluationError("accuracy of zero samples is undefined; the evaluation data is empty")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            return {"accuracy": float(correct.mean())}
        weights = np.asarray(sample_weight, dtype=np.float64)
        return {"accuracy": float((correct * weights).sum() / weights.sum())}


class F1(evaluate.Metric):
    """Macro F1: the unweighted mean over classes of 2·precision·recall/(precision+recall).

    Classes that occur in neither predictions nor references are left out (as scikit-learn does); a class
    that occurs in only one of them counts with F1 = 0.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Macro-averaged F1 over the classes present in predictions or references.",
            citation="",
            inputs_description="predictions, references: integer class ids.",
            features=_CLASS_FEATURES,
        )

    def _compute(self, predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise EvaluationError("F1 of zero samples is undefined; the evaluation data is empty")
        scores = []
        for label in np.union1d(predictions, references):
            tp = float(np.sum((predictions == label) & (references == label)))
            fp = float(np.sum((predictions == label) & (references != label)))
            fn = float(np.sum((predictions != label) & (references == label)))
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return {"f1": float(np.mean(scores))}


SHIPPED_METRICS: dict[str, type[evaluate.Metric]] = {"accuracy": Accuracy, "f1": F1}


def load_metric(name: str, *, trust_remote_code: bool = False) -> evaluate.EvaluationModule:
    """A shipped metric by name (offline); any other name, folder or Space only with `trust_remote_code=True`.

    `evaluate.load` imports the metric's Python script, so running code that is not ours is an explicit choice.
    """
    if name in SHIPPED_METRICS:
        return SHIPPED_METRICS[name](keep_in_memory=True)
    if not trust_remote_code:
        raise EvaluationError(
            f"metric {name!r} is not shipped with hf_mudsc (shipped: {', '.join(SHIPPED_METRICS)}); loading it "
            "runs its Python script: pass trust_remote_code=True (CLI: --trust-remote-code) if you trust that code"
        )
    logger.warning("trust_remote_code=True: evaluate.load runs the code of metric %r", name)
    try:
        return evaluate.load(name)
    except Exception as error:  # evaluate raises many types (ConnectionError, FileNotFoundError, ...)
        raise EvaluationError(
            f"metric {name!r} is not shipped with hf_mudsc (shipped: {', '.join(SHIPPED_METRICS)}) and "
            f"evaluate.load({name!r}) failed ({type(error).__name__}: {error}); a Hub metric needs the Hub — "
            "go online or use a shipped metric"
        ) from error


def compute_metric(name: str, predictions: Sequence[int], references: Sequence[int], *,
                   trust_remote_code: bool = False, module: evaluate.EvaluationModule | None = None) -> float:
    """One number: the metric's value (the key named like the metric, else the only key).

    `module`: the metric already loaded (`load_metric`), so a metric script is imported once, not per view.
    """
    if module is None:
        module = load_metric(name, trust_remote_code=trust_remote_code)
    values = module.compute(predictions=list(map(int, predictions)), references=list(map(int, references)))
    if name in values:
        return float(values[name])
    if len(values) == 1:
        return float(next(iter(values.values())))
    raise EvaluationError(f"metric {name!r} returned several values {sorted(values)}; pass a metric with one")


# ------------------------------------------------------------------------------------------------ data
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
        label_range: keep only rows whose integer label lies in `[lo, hi)` (before the offset).
        name, split: shown in the results and the model card.
    """

    data: Any
    label_column: str | None = None
    label_offset: int = 0
    task_column: str | None = None
    task_value: Any = None
    label_range: tuple[int, int] | None = None
    name: str | None = None
    split: str | None = None


def tasks_from_dataset(
    data: Any,
    task_names: Sequence[str],
    task_ranges: Mapping[str, Sequence[int]] | None = None,
    *,
    task_column: str | None = None,
    label_column: str | None = None,
    name: str | None = None,
    split: str | None = None,
) -> dict[str, TaskData]:
    """Split ONE dataset holding several tasks into `TaskData` per task.

    With `task_column`, a row belongs to the task whose name (or index in `task_names`) the column holds,
    and its label is that task's own class id or name. Without it, integer labels are ids of the joint label
    space (the merged model's head, `task_ranges`), so the task is the range the label falls in.
    """
    if task_column is not None:
        return {task: TaskData(data, label_column=label_column, task_column=task_column, task_value=(i, task),
                               name=name, split=split) for i, task in enumerate(task_names)}
    if not task_ranges:
        raise EvaluationError(
            "one dataset for several tasks needs either task_column= (a column naming each row's task) or a "
            "merged model with config.task_label_ranges (labels in the joint label space)"
        )
    return {task: TaskData(data, label_column=label_column, label_offset=int(task_ranges[task][0]),
                           label_range=(int(task_ranges[task][0]), int(task_ranges[task][1])), name=name,
                           split=split) for task in task_names}


def _as_task_data(value: Any) -> TaskData:
    if isinstance(value, TaskData):
        return value
    if isinstance(value, (str, os.PathLike)):
        return TaskData(os.fspath(value), name=os.fspath(value))
    return TaskData(value)


# ---------------------------------------------------------------------------------------------- result
@dataclass
class EvaluationResult:
    """Scores by scorer (`merged`…, `parent_a`, `parent_b`, `ensemble`), view (task, joint, average), metric.

    `tasks` maps each task to its data description: `dataset`, `split`, `num_samples` and `label_range`
    (its slice of the joint label space). Scores are fractions in [0, 1]. A missing entry means the view
    is not defined for that scorer (e.g. parent A on task B).
    """

    metrics: list[str]
    tasks: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, dict[str, float]]]
    merged: list[str] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=dict)

    def score(self, scorer: str, view: str, metric: str | None = None) -> float | None:
        return self.scores.get(scorer, {}).get(view, {}).get(metric or self.metrics[0])

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "hf_mudsc_version": __version__,
            "metrics": list(self.metrics),
            "tasks": self.tasks,
            "merged": list(self.merged),
            "scores": self.scores,
            "definitions": dict(self.definitions),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        return cls(metrics=list(data["metrics"]), tasks=dict(data["tasks"]), scores=dict(data["scores"]),
                   merged=list(data.get("merged", [])), definitions=dict(data.get("definitions", {})))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temp file + rename: never a half-written file)."""
        from hf_mudsc.publish.folder import write_file_atomically

        text = json.dumps(self.to_dict(), indent=2) + "\n"
        return write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def card_rows(self, merged: str | None = None) -> list[Any]:
        """`hf_mudsc.publish.card.EvalRow`s for `render_card(..., eval_results=...)`: per task and metric, plus joint.

        `merged` picks which merged scorer fills the card's `model-index` (default: the first one).
        """
        from hf_mudsc.publish.card import EvalRow

        merged = merged or (self.merged[0] if self.merged else MERGED)
        if merged not in self.scores:
            raise EvaluationError(f"no scores for {merged!r}; scored: {sorted(self.scores)}")
        rows = []
        for metric in self.metrics:
            for view in [*self.tasks, JOINT]:
                value = self.score(merged, view, metric)
                if value is None:
                    continue
                info = self.tasks.get(view) or _joint_info(self.tasks)
                task = view if view != JOINT else "joint (all tasks)"
                rows.append(EvalRow(
                    task=task,
                    dataset=str(info.get("dataset") or "dataset"),
                    split=str(info.get("split") or "test"),
                    metric=metric,
                    merged=value,
                    parent_a=self.score(PARENT_NAMES[0], view, metric),
                    parent_b=self.score(PARENT_NAMES[1], view, metric),
                    ensemble=self.score(ENSEMBLE, view, metric),
                ))
        return rows

    def table(self, metric: str | None = None, *, scorers: Sequence[str] | None = None,
              labels: Mapping[str, str] | None = None) -> str:
        """A markdown table: one row per scorer, columns = tasks, joint, average (`-`: not defined)."""
        metric = metric or self.metrics[0]
        views = [*self.tasks, JOINT, AVERAGE]
        labels = dict(labels or {})
        names = list(scorers or self.scores)
        header = ["model", *views]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(views)]
        for name in names:
            cells = []
            for view in views:
                value = self.score(name, view, metric)
                cells.append("-" if value is None else f"{value:.4f}")
            lines.append("| " + " | ".join([labels.get(name, name), *cells]) + " |")
        return "\n".join(lines)


def _joint_info(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    names = sorted({str(info.get("dataset")) for info in tasks.values() if info.get("dataset")})
    splits = sorted({str(info.get("split")) for info in tasks.values() if info.get("split")})
    return {"dataset": " + ".join(names) if names else "dataset",
            "split": "+".join(splits) if splits else "test"}


DEFINITIONS = {
    "per_task": "argmax within the task's slice of the joint label space, on that task's data",
    JOINT: "argmax over all classes of all tasks, on every task's data together",
    AVERAGE: "mean of the per-task figures (only when a scorer has one for every task)",
    "parent": "with different label sets a parent scores only its own classes: per task on its own task; "
              "joint = a single-task model answering the joint test (right at most on its own task's share)",
    ENSEMBLE: "both parents; different label sets: per-head softmax concatenated, argmax over the "
              "concatenation; same label set: mean of the softmaxes",
    "clip": "zero-shot: cosine similarity of image and class-prompt embeddings times logit_scale",
}


# ------------------------------------------------------------------------------------------- scorers
def _is_clip(model: Any) -> bool:
    return hasattr(model, "get_text_features") and hasattr(model, "get_image_features")


def _features(output: Any) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4 and an output object (`.pooler_output`) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _forward_kwargs(model: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    from hf_mudsc.calibrate.statistics import forward_inputs

    return forward_inputs(model, batch)


@dataclass
class _Layout:
    """The joint label space: task -> (lo, hi), in order; `shared` when all tasks use one label set."""

    ranges: dict[str, tuple[int, int]]
    shared: bool
    class_names: dict[str, list[str]]

    @property
    def size(self) -> int:
        return max(hi for _, hi in self.ranges.values())


class _Scorer:
    """Turns a batch into joint-space scores `(N, layout.size)`; `tasks`: where it has per-task figures."""

    def __init__(self, name: str, tasks: Sequence[str]) -> None:
        self.name = name
        self.tasks = list(tasks)

    def scores(self, batch: Mapping[str, Any], cache: dict[int, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def _logits(model: Any, batch: Mapping[str, Any], cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """A classifier's logits for the batch, cached per model so the ensemble reuses the parents' pass."""
    key = id(model)
    if key not in cache:
        cache[key] = model(**_forward_kwargs(model, batch)).logits.to(torch.float32)
    return cache[key]


class _ClassifierScorer(_Scorer):
    def __init__(self, name: str, model: Any, layout: _Layout, own: str | None) -> None:
        super().__init__(name, list(layout.ranges) if own is None else [own])
        self.model, self.layout, self.own = model, layout, own

    def scores(self, batch: Mapping[str, Any], cache: dict[int, torch.Tensor]) -> torch.Tensor:
        logits = _logits(self.model, batch, cache)
        if self.own is None or self.layout.shared:
            return logits
        lo, hi = self.layout.ranges[self.own]
        full = torch.full((logits.shape[0], self.layout.size), -math.inf)
        full[:, lo:hi] = logits
        return full


class _ClassifierEnsemble(_Scorer):
    def __init__(self, parents: Sequence[Any], layout: _Layout) -> None:
        super().__init__(ENSEMBLE, list(layout.ranges))
        self.parents, self.layout = list(parents), layout

    def scores(self, batch: Mapping[str, Any], cache: dict[int, torch.Tensor]) -> torch.Tensor:
        probs = [_logits(p, batch, cache).softmax(-1) for p in self.parents]
        if self.layout.shared:
            return torch.stack(probs).mean(0)
        full = torch.zeros((probs[0].shape[0], self.layout.size))
        for (lo, hi), p in zip(self.layout.ranges.values(), probs):
            full[:, lo:hi] = p
        return full


class _ClipScorer(_Scorer):
    """Zero-shot CLIP over all classes of all tasks; text embeddings computed once."""

    def __init__(
        self, name: str, model: Any, layout: _Layout, tokenizer: Any, templates: Sequence[str]
    ) -> None:
        super().__init__(name, list(layout.ranges))
        self.model = model
        classes = [c for names in layout.class_names.values() for c in names]
        prompts_per_class = [[t.format(c) for t in templates] for c in classes]
        flat = [p for prompts in prompts_per_class for p in prompts]
        encoded = tokenizer(flat, padding=True, truncation=True, return_tensors="pt")
        inputs = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            embeds = _features(model.get_text_features(**inputs)).float()
        embeds = torch.nn.functional.normalize(embeds, dim=-1)
        embeds = embeds.view(len(prompts_per_class), len(templates), -1).mean(1)
        self.text = torch.nn.functional.normalize(embeds, dim=-1)
        self.scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 1.0

    def scores(self, batch: Mapping[str, Any], cache: dict[int, torch.Tensor]) -> torch.Tensor:
        key = id(self.model)
        if key not in cache:
            image = _features(self.model.get_image_features(pixel_values=batch["pixel_values"])).float()
            cache[key] = self.scale * torch.nn.functional.normalize(image, dim=-1) @ self.text.T
        return cache[key]


class _ClipEnsemble(_Scorer):
    def __init__(self, parents: Sequence[_ClipScorer], tasks: Sequence[str]) -> None:
        super().__init__(ENSEMBLE, tasks)
        self.parents = list(parents)

    def scores(self, batch: Mapping[str, Any], cache: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.stack([p.scores(batch, cache).softmax(-1) for p in self.parents]).mean(0)


# ------------------------------------------------------------------------------------------ models in
def _load(model: Any, what: str) -> tuple[Any, Any]:
    """(model, processor) from a PreTrainedModel, a LoadedParent, or a folder / Hub reference."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model, None
    if hasattr(model, "model") and isinstance(model.model, PreTrainedModel):
        return model.model, getattr(model, "processor", None)
    if isinstance(model, (str, os.PathLike)):
        from hf_mudsc.load.parents import load_parent

        loaded = load_parent(os.fspath(model))
        return loaded.model, loaded.processor
    raise EvaluationError(f"{what} is a {type(model).__name__}; pass a PreTrainedModel, a folder or a Hub id")


def _task_names_of(model: Any) -> dict[str, tuple[int, int]] | None:
    """The task ranges in parent order (a loaded config lists them sorted by name), None without tasks."""
    from hf_mudsc.apply.classifier import task_ranges

    try:
        return task_ranges(model.config) or None
    except ValueError as error:
        raise EvaluationError(str(error)) from None


def _label_names(model: Any) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _strip_task(label: str, task: str) -> str:
    prefix = f"{task}: "
    return label[len(prefix):] if label.startswith(prefix) else label


def _classifier_layout(merged: Mapping[str, Any], parents: Sequence[Any], requested: Sequence[str] | None,
                       count: int) -> _Layout:
    reference_name, reference = next(iter(merged.items()))
    ranges = _task_names_of(reference)
    names = _label_names(reference)
    for name, model in merged.items():
        if _task_names_of(model) != ranges or len(_label_names(model)) != len(names):
            raise EvaluationError(
                f"merged models {reference_name!r} and {name!r} have different label layouts "
                "(config.task_label_ranges); evaluate them separately"
            )
    if ranges is None:
        if requested:
            tasks = list(requested)
        else:
            tasks = ["test"] if count == 1 else [f"task_{i}" for i in range(count)]
        layout = _Layout({t: (0, len(names)) for t in tasks}, shared=True,
                         class_names={t: names for t in tasks})
        for i, parent in enumerate(parents):
            if _label_names(parent) != names:
                raise EvaluationError(
                    f"parent {'AB'[i]} has labels {_label_names(parent)[:6]}…, the merged model "
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
    if parents:
        if len(parents) != len(ranges):
            raise EvaluationError(
                f"{len(parents)} parents for {len(ranges)} tasks {list(ranges)}; pass one per task"
            )
        for (task, (lo, hi)), parent, side in zip(ranges.items(), parents, "AB"):
            width = len(_label_names(parent))
            if width != hi - lo:
                raise EvaluationError(
                    f"parent {side} has {width} labels but task {task!r} has {hi - lo} in the merged model; "
                    "pass the parents in the order they were merged (A first)"
                )
    return _Layout(dict(ranges), shared=False, class_names=class_names)


def _clip_layout(tasks: Sequence[str], sources: Mapping[str, TaskData],
                 class_names: Mapping[str, Sequence[str]] | None) -> _Layout:
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
    ranges, start = {}, 0
    for task in tasks:
        ranges[task] = (start, start + len(names[task]))
        start += len(names[task])
    return _Layout(ranges, shared=False, class_names=names)


def _class_label_names(source: TaskData) -> list[str] | None:
    data = source.data
    features = getattr(data, "features", None)
    if not features:
        return None
    column = source.label_column or next((c for c in LABEL_COLUMNS if c in features), None)
    feature = features.get(column) if column else None
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


# -------------------------------------------------------------------------------------------- batches
def _dataset_of(source: TaskData) -> Any:
    data = source.data
    if isinstance(data, (str, os.PathLike)):
        from hf_mudsc.calibrate.datasets import load_calibration_dataset

        return load_calibration_dataset(os.fspath(data))
    return data


def _select_rows(dataset: Any, source: TaskData, label_column: str, task_names: Sequence[str]) -> Any:
    """Rows of this task only (task column or joint label range); nothing is written next to the data."""
    def keep(row: Mapping[str, Any]) -> bool:
        if source.task_column is not None:
            index, name = source.task_value
            value = row[source.task_column]
            return value == name or (isinstance(value, (int, np.integer)) and int(value) == index)
        lo, hi = source.label_range
        label = row[label_column]
        return isinstance(label, (int, np.integer)) and lo <= int(label) < hi

    if source.task_column is None and source.label_range is None:
        return dataset
    columns = [c for c in (source.task_column, label_column) if c]
    if isinstance(dataset, datasets.Dataset):
        table = dataset.select_columns(columns)
        mask = [keep(row) for row in table]
        indices = np.flatnonzero(mask)
        if source.task_column is not None and not len(indices):
            values = sorted({str(v) for v in table[source.task_column][:1000]})
            raise EvaluationError(
                f"no row of task column {source.task_column!r} names task {source.task_value[1]!r} (or its "
                f"index {source.task_value[0]}); values found: {values[:10]}; tasks: {list(task_names)}"
            )
        return dataset.select(indices, keep_in_memory=True)
    return dataset.filter(keep)


def _batches(source: TaskData, *, task: str, main_input: str, batch_size: int, num_samples: int | None,
             processor: Any, image_column: str | None, text_column: str | None, model_config: Any,
             rank: int, world: int, task_names: Sequence[str],
             ) -> tuple[Iterator[tuple[dict, list]], int | None]:
    """(model inputs, raw labels) batches of this process's shard of one task, and the row count if known."""
    data = source.data
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, str):
        inputs, labels = data
        inputs = dict(inputs) if isinstance(inputs, Mapping) else {main_input: inputs}
        labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        count = len(labels)
        for name, value in inputs.items():
            if len(value) != count:
                raise EvaluationError(f"task {task!r}: {len(value)} rows of {name!r} for {count} labels")
        if num_samples is not None:
            count = min(count, num_samples)
        rows = list(range(rank, count, world))

        def tensor_batches() -> Iterator[tuple[dict, list]]:
            for start in range(0, len(rows), batch_size):
                index = rows[start:start + batch_size]
                yield ({k: torch.as_tensor(v)[index] for k, v in inputs.items()}, [labels[i] for i in index])

        return tensor_batches(), len(rows)

    dataset = _dataset_of(source)
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise EvaluationError(
            f"task {task!r}: evaluation data is a {type(dataset).__name__}; pass a datasets.Dataset or "
            "IterableDataset, a dataset spec 'repo_or_path[:config]:split' or a tuple (inputs, labels)"
        )
    from hf_mudsc.calibrate.datasets import _column_names, resolve_calibration

    columns = _column_names(dataset)
    label_column = source.label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_column is None or label_column not in columns:
        raise EvaluationError(
            f"task {task!r}: no label column {source.label_column or ' or '.join(LABEL_COLUMNS)!r}; found "
            f"columns {columns}. Name it with label_column= (CLI: --label-column)"
        )
    if source.task_column is not None and source.task_column not in columns:
        raise EvaluationError(f"task column {source.task_column!r} is not a column; found columns {columns}")
    stream = resolve_calibration(dataset, processor, image_column=image_column, text_column=text_column,
                                 shuffle=False, inputs=(main_input,), model_config=model_config)
    preprocess = stream.preprocess
    kept = list(_column_names(stream.dataset))
    dataset = _select_rows(dataset, source, label_column, task_names)
    if num_samples is not None:
        dataset = (dataset.select(range(min(num_samples, len(dataset))), keep_in_memory=True)
                   if isinstance(dataset, datasets.Dataset) else dataset.take(num_samples))
    if world > 1:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
    count = len(dataset) if isinstance(dataset, datasets.Dataset) else None

    def dataset_batches() -> Iterator[tuple[dict, list]]:
        from hf_mudsc.calibrate.statistics import _as_tensor

        if isinstance(dataset, datasets.Dataset):
            chunks = (dataset[s:s + batch_size] for s in range(0, len(dataset), batch_size))
        else:
            chunks = dataset.iter(batch_size=batch_size)
        for rows in chunks:
            inputs = preprocess(rows) if preprocess is not None else {c: _as_tensor(rows[c]) for c in kept}
            labels = rows[label_column]
            yield inputs, labels.tolist() if hasattr(labels, "tolist") else list(labels)

    return dataset_batches(), count


def _local_labels(raw: Sequence[Any], source: TaskData, task: str, names: Sequence[str]) -> np.ndarray:
    """Raw labels -> the task's own class ids (names looked up; joint ids shifted); range checked."""
    out = np.empty(len(raw), dtype=np.int64)
    lookup = None
    for i, value in enumerate(raw):
        if isinstance(value, str):
            if lookup is None:
                lookup = {n: j for j, n in enumerate(names)}
            if value not in lookup:
                raise EvaluationError(
                    f"task {task!r}: label {value!r} is not one of its classes {list(names)}"
                )
            out[i] = lookup[value]
        else:
            out[i] = int(value) - source.label_offset
    bad = out[(out < 0) | (out >= len(names))]
    if len(bad):
        raise EvaluationError(
            f"task {task!r}: label {int(bad[0]) + source.label_offset} is outside its classes "
            f"0..{len(names) - 1}; labels must be the task's own class ids (or names). For a dataset "
            "labelled with the merged model's joint ids, pass it once without a task (tasks_from_dataset; "
            "CLI: --dataset SPEC alone)"
        )
    return out


# ------------------------------------------------------------------------------------------- evaluate
def evaluate_merge(
    merged: Any,
    parents: Sequence[Any] | None = None,
    datasets_per_task: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    metrics: Sequence[str] = ("accuracy",),
    ensemble: bool = True,
    batch_size: int = 64,
    num_samples: int | None = None,
    processor: Any = None,
    image_column: str | None = None,
    text_column: str | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    prompt_template: str | Sequence[str] = DEFAULT_PROMPT,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> EvaluationResult | None:
    """Score merged model(s), both parents and their ensemble per task, jointly and on average.

    Args:
        merged: the merged model (a `PreTrainedModel`, folder or Hub id), or a mapping name -> model to score
            several merges of the same parents in one pass (e.g. every method).
        parents: the two parents in merge order (A, B), or None to score the merged model(s) alone.
        datasets_per_task: the test data of each task: a mapping task -> data (task names as in the merged
            model's `config.task_label_ranges`; a subset is allowed) or a sequence in task order. Data: a
            `TaskData`, a `datasets.Dataset`/`IterableDataset`, a spec `"repo_or_path[:config]:split"` or a
            tuple `(inputs, labels)`; labels are the task's own class ids (or names). See `tasks_from_dataset`
            for one dataset holding every task.
        metrics: shipped `accuracy`/`f1`; any other `evaluate.load` name, folder or Space runs its script, so it
            needs `trust_remote_code=True` (logged as a warning; a Hub metric also needs the Hub).
        ensemble: also score the two-parent ensemble (needs both parents).
        batch_size, num_samples: rows per forward pass; the first `num_samples` rows of each task only.
        processor: preprocesses raw `image`/`text` columns (default: the merged folder's, else parent A's).
        class_names, prompt_template: CLIP zero-shot — class names per task (default: the label column's
            `ClassLabel` names) and the prompt template(s) with `{}` for the name.

    Returns:
        An `EvaluationResult` on the main process (None on the others under a distributed launch).
    """
    from hf_mudsc.calibrate.distributed import is_main_process, process_info

    modules = {name: load_metric(name, trust_remote_code=trust_remote_code) for name in metrics}  # before any model
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples is not None and num_samples < 1:
        raise EvaluationError(f"num_samples must be >= 1 or None, got {num_samples}")
    if datasets_per_task is None or len(datasets_per_task) == 0:
        raise EvaluationError("no evaluation data: pass datasets_per_task={task: dataset, ...}")
    merged_in = dict(merged) if isinstance(merged, Mapping) else {MERGED: merged}
    if not merged_in:
        raise EvaluationError("no merged model to evaluate")
    merged_models, merged_processor = {}, None
    for name, model in merged_in.items():
        merged_models[name], loaded_processor = _load(model, f"merged model {name!r}")
        merged_processor = merged_processor or loaded_processor
    parent_models, parent_processor = [], None
    if parents is not None:
        if len(parents) != 2:
            raise EvaluationError(f"pass the two parents (A, B) or None, got {len(parents)}")
        for side, parent in zip("AB", parents):
            model, loaded_processor = _load(parent, f"parent {side}")
            parent_models.append(model)
            parent_processor = parent_processor or loaded_processor
    processor = processor or merged_processor or parent_processor
    reference = next(iter(merged_models.values()))
    clip = _is_clip(reference)

    requested = list(datasets_per_task) if isinstance(datasets_per_task, Mapping) else None
    if clip:
        if requested is None:
            raise EvaluationError(
                "CLIP has no task names of its own: pass datasets_per_task as {task: data} "
                "(CLI: --dataset TASK=SPEC)"
            )
        layout = None
    else:
        layout = _classifier_layout(merged_models, parent_models, requested, len(datasets_per_task))
    task_order = requested if requested is not None else list(layout.ranges)
    if isinstance(datasets_per_task, Mapping):
        sources = {str(k): _as_task_data(v) for k, v in datasets_per_task.items()}
    else:
        if len(datasets_per_task) != len(task_order):
            raise EvaluationError(
                f"{len(datasets_per_task)} datasets for {len(task_order)} tasks {task_order}; pass one per "
                "task in order, or a mapping {task: data}"
            )
        sources = {task: _as_task_data(v) for task, v in zip(task_order, datasets_per_task)}
    if clip:
        layout = _clip_layout(list(sources), sources, class_names)
    unknown = [t for t in sources if t not in layout.ranges]
    if unknown:
        raise EvaluationError(
            f"unknown task(s) {unknown}; the merged model's tasks are {list(layout.ranges)}"
        )
    sources = {task: sources[task] for task in layout.ranges if task in sources}  # parent order everywhere

    scorers = _scorers(merged_models, parent_models, layout, clip, ensemble, processor, prompt_template)
    rank, world = process_info()
    main_input = "pixel_values" if clip else getattr(reference, "main_input_name", "input_ids")
    collected: dict[str, dict[str, tuple[list[int], list[int]]]] = {s.name: {} for s in scorers}
    counts: dict[str, int] = {}
    models = [*merged_models.values(), *parent_models]
    modes = [m.training for m in models]
    for model in models:
        model.eval()
    failure: Exception | None = None
    try:
        with torch.no_grad():
            for task, source in sources.items():
                lo, _ = layout.ranges[task]
                batches, total = _batches(
                    source, task=task, main_input=main_input, batch_size=batch_size, num_samples=num_samples,
                    processor=processor, image_column=image_column, text_column=text_column,
                    model_config=reference.config, rank=rank, world=world, task_names=list(layout.ranges))
                per_task = {s.name: ([], []) for s in scorers}
                joint = {s.name: ([], []) for s in scorers}
                seen = 0
                for inputs, raw in tqdm(batches, desc=f"evaluate {task}", unit="batch", disable=not progress,
                                        total=None if total is None else math.ceil(total / batch_size)):
                    labels = _local_labels(raw, source, task, layout.class_names[task])
                    seen += len(labels)
                    cache: dict[int, torch.Tensor] = {}
                    for scorer in scorers:
                        scores = scorer.scores(inputs, cache)
                        if task in scorer.tasks:
                            lo_t, hi_t = layout.ranges[task]
                            per_task[scorer.name][0].extend(scores[:, lo_t:hi_t].argmax(-1).tolist())
                            per_task[scorer.name][1].extend(labels.tolist())
                        joint[scorer.name][0].extend(scores.argmax(-1).tolist())
                        joint[scorer.name][1].extend((labels + (0 if layout.shared else lo)).tolist())
                counts[task] = seen
                for scorer in scorers:
                    if task in scorer.tasks:
                        collected[scorer.name][task] = per_task[scorer.name]
                    previous = collected[scorer.name].get(JOINT, ([], []))
                    collected[scorer.name][JOINT] = (previous[0] + joint[scorer.name][0],
                                                     previous[1] + joint[scorer.name][1])
    except Exception as error:
        if world == 1:
            raise
        failure = error  # raised below on EVERY process: the others must not wait for this one forever
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)

    if world > 1:
        collected, counts, failures = _gather(collected, counts, failure)
        if failure is not None:
            raise failure
        if failures:
            raise EvaluationError(f"evaluation failed on another process: {failures[0]}")
    if not is_main_process():
        return None
    empty = [t for t, n in counts.items() if n == 0]
    if empty:
        raise EvaluationError(
            f"task(s) {empty} have no evaluation rows; check the dataset, split and task mapping"
        )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for scorer in scorers:
        views: dict[str, dict[str, float]] = {}
        for view, (predictions, references) in collected[scorer.name].items():
            views[view] = {m: compute_metric(m, predictions, references, module=modules[m]) for m in metrics}
        if all(t in views for t in sources):
            views[AVERAGE] = {m: float(np.mean([views[t][m] for t in sources])) for m in metrics}
        ordered = {v: views[v] for v in [*sources, JOINT, AVERAGE] if v in views}
        scores[scorer.name] = ordered
    tasks = {
        task: {"dataset": _source_name(source), "split": source.split or _spec_split(source) or "test",
               "num_samples": counts[task], "label_range": list(layout.ranges[task]),
               "classes": list(layout.class_names[task])}
        for task, source in sources.items()
    }
    result = EvaluationResult(metrics=list(metrics), tasks=tasks, scores=scores, merged=list(merged_models),
                              definitions=dict(DEFINITIONS))
    logger.info("evaluated %s on %s", ", ".join(scores), ", ".join(f"{t} ({n})" for t, n in counts.items()))
    return result


def _scorers(merged: Mapping[str, Any], parents: Sequence[Any], layout: _Layout, clip: bool, ensemble: bool,
             processor: Any, prompt_template: str | Sequence[str]) -> list[_Scorer]:
    tasks = list(layout.ranges)
    if clip:
        from hf_mudsc.load.processors import tokenizer_of

        tokenizer = tokenizer_of(processor)
        if tokenizer is None:
            raise EvaluationError(
                "zero-shot CLIP evaluation needs a tokenizer for the class prompts: pass processor= (a "
                "CLIPProcessor or tokenizer) or evaluate a folder that holds one"
            )
        templates = [prompt_template] if isinstance(prompt_template, str) else list(prompt_template)
        if not templates or any("{}" not in t for t in templates):
            raise EvaluationError(f"prompt templates need a '{{}}' for the class name, got {templates}")
        merged_scorers: list[_Scorer] = [
            _ClipScorer(n, m, layout, tokenizer, templates) for n, m in merged.items()
        ]
        parent_scorers = [
            _ClipScorer(n, m, layout, tokenizer, templates) for n, m in zip(PARENT_NAMES, parents)
        ]
        extra = [_ClipEnsemble(parent_scorers, tasks)] if ensemble and len(parent_scorers) == 2 else []
        return [*parent_scorers, *extra, *merged_scorers]
    for name, model in [*merged.items(), *zip(PARENT_NAMES, parents)]:
        if not hasattr(model, "classifier") and "ForSequenceClassification" not in type(model).__name__ \
                and "ForImageClassification" not in type(model).__name__:
            raise EvaluationError(
                f"{name} is a {type(model).__name__}, which has no classifier head; evaluate "
                "*ForImageClassification / *ForSequenceClassification or CLIP models"
            )
    merged_scorers = [_ClassifierScorer(n, m, layout, None) for n, m in merged.items()]
    parent_scorers = [_ClassifierScorer(n, m, layout, None if layout.shared else task)
                      for n, m, task in zip(PARENT_NAMES, parents, tasks)]
    extra = [_ClassifierEnsemble(parents, layout)] if ensemble and len(parents) == 2 else []
    return [*parent_scorers, *extra, *merged_scorers]


def _gather(collected: dict, counts: dict, failure: Exception | None) -> tuple[dict, dict, list[str]]:
    """All processes' predictions on every process (all_gather_object), concatenated in rank order, and the
    error messages of the processes that failed."""
    import torch.distributed as dist

    parts: list[Any] = [None] * dist.get_world_size()
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    dist.all_gather_object(parts, (collected, counts, message))
    merged: dict[str, dict[str, tuple[list[int], list[int]]]] = {}
    total: dict[str, int] = {}
    failures = [part[2] for part in parts if part[2] is not None]
    for part_collected, part_counts, _ in parts:
        for scorer, views in part_collected.items():
            target = merged.setdefault(scorer, {})
            for view, (predictions, references) in views.items():
                old = target.get(view, ([], []))
                target[view] = (old[0] + list(predictions), old[1] + list(references))
        for task, n in part_counts.items():
            total[task] = total.get(task, 0) + n
    return merged, total, failures


def _source_name(source: TaskData) -> str:
    if source.name:
        return source.name
    data = source.data
    if isinstance(data, (str, os.PathLike)):
        from hf_mudsc.calibrate.datasets import DatasetSpec

        return DatasetSpec.parse(os.fspath(data)).path
    info = getattr(data, "info", None)
    return str(getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset")


def _spec_split(source: TaskData) -> str | None:
    if isinstance(source.data, (str, os.PathLike)):
        from hf_mudsc.calibrate.datasets import DatasetSpec

        return DatasetSpec.parse(os.fspath(source.data)).split
    split = getattr(source.data, "split", None)
    return str(split) if split else None
