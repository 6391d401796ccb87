"""Evaluation of a merge: the merged model next to its N >= 2 parents and their ensemble, per task and jointly.

`evaluate_merge` is a short pipeline: load the models -> lay out the joint label space and assign the data
to tasks (`tasks`) -> build the scorers (`scorers`) -> run every task's test batches (`batches`) through every
scorer, collecting predictions -> compute the metrics (`metrics`) -> an `EvaluationResult` (`results`).

Every scorer produces one score per joint class and sample (the tasks' classes one after the other, in
the order of the merged model's `config.task_label_ranges`: A's classes, then B's, C's ... — docs/design.md §6);
the views then read those scores:

* **per-task** (view = the task's name): argmax within the task's slice, against the task's own label.
* **joint** (view `joint`): argmax over all classes, on every task's test data together, against the
  label shifted into the joint space. A concatenated head (the merged model's or the ensemble's) decides by
  `joint_rule` — each task's softmax, concatenated (default), or the raw logits — one rule for both.
* **average** (view `average`): the mean of the per-task figures (the papers' "Avg"); only for scorers
  that have a figure for every task.

Under `accelerate launch`/`torchrun` each process scores its shard of every task
(`calibrate.datasets.process_share`: a stream example by example, or a stride for tensors); predictions are
gathered on the main process, which alone computes the metrics and gets the result (others get None).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_mudsc.calibrate.statistics import ModelInputCheck
from hf_mudsc.errors import EvaluationError, escaped, parent_label
from hf_mudsc.evaluate.batches import evaluation_source, task_batches
from hf_mudsc.evaluate.decision import uneven_tasks_warning
from hf_mudsc.evaluate.metrics import compute_metric, load_metric
from hf_mudsc.evaluate.names import (
    AVERAGE,
    DEFAULT_PROMPT,
    ENSEMBLE,
    JOINT,
    JOINT_RULES,
    MERGED,
    check_metric_names,
    check_prompt_templates,
    metric_shown_name,
    parent_names,
    refuse_token_names,
)
from hf_mudsc.evaluate.results import EvaluationResult, definitions
from hf_mudsc.evaluate.scorers import ModelInputs, NonFiniteScores, Scorer, build_scorers, is_clip, is_clip_config
from hf_mudsc.evaluate.tasks import (
    LabelLayout,
    TaskData,
    as_task_data,
    classifier_layout,
    clip_layout,
    held_tasks,
    local_labels,
    one_dataset_per_task_fix,
    parents_tasks_mismatch,
    source_key,
    source_name,
    spec_revision,
    spec_split,
)
from hf_mudsc.load.objects import held_as_given, object_source
from hf_mudsc.progress import Progress

logger = logging.getLogger(__name__)

#: One task's data opened (`batches.task_batches`): its batches, row count, whether raw columns are preprocessed, and
#: every raw label (None: a stream).
OpenedTask = tuple[Iterator[tuple[list[dict], list]], int | None, bool, list | None]


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
    joint_rule: str = "per_task",
    progress: bool = True,
    trust_remote_code: bool = False,
    own_processors: bool = True,
    allow_pickle: bool = False,
) -> EvaluationResult | None:
    """Score merged model(s), the parents and their ensemble per task, jointly and on average.

    Args:
        merged: the merged model (a `PreTrainedModel`, folder or Hub id), or a mapping name -> model to score
            several merges of the same parents in one pass (e.g. every method).
        parents: the N >= 2 parents in merge order (A, B, C, ...: one per task of a concatenated head), or None
            to score the merged model(s) alone. Scorers `parent_a`, `parent_b`, `parent_c`, ...
        datasets_per_task: the test data of each task: a mapping task -> data (task names as in the merged
            model's `config.task_label_ranges`; a subset is allowed) or a sequence in task order. Data: a
            `TaskData`, a `datasets.Dataset`/`IterableDataset`, a spec `"repo_or_path[:config]:split"` or a
            tuple `(inputs, labels)`; labels are the task's own class ids (or names). See `tasks_from_dataset`
            for one dataset holding every task. The results and the card name a spec by its dataset (a local folder
            by its name), data given in memory by `TaskData(data, name=..., split=...)` (unnamed: `in-memory data`).
        metrics: shipped `accuracy`/`f1`; any other `evaluate.load` name, folder or Space runs its script, so it
            needs `trust_remote_code=True` (logged as a warning; a Hub metric also needs the Hub).
        ensemble: also score the parents' ensemble (needs the parents).
        batch_size, num_samples: rows per forward pass; the first `num_samples` rows of each task only.
        processor: preprocesses raw `image`/`text` columns for the merged model(s) and for every parent that has no
            processor of its own (a model object whose `name_or_path` folder or cached Hub snapshot holds none, as
            `merge` looks for it); default: the merged model's, else parent A's.
        own_processors: each model with a processor (a folder, Hub id, `LoadedParent`, or a model object whose
            `name_or_path` holds one) is scored on ITS
            processor's inputs, and the ensemble combines each parent's logits on its own inputs of the same rows —
            parents whose processors differ (another image size, normalisation, tokenizer) are otherwise scored on
            inputs they were never trained on. False: every model is scored with `processor` (its default as
            above). Raw columns are preprocessed once per distinct processor; the result's `processors` says which
            scored which row when they differ.
        class_names, prompt_template: CLIP zero-shot — class names per task (default: the label column's
            `ClassLabel` names) and the prompt template(s) with `{}` for the name.
        image_column, text_column: the raw columns to preprocess (default `image`/`img`, `text`/`sentence`; a text
            column may be two names separated by a comma, read as text pairs).
        joint_rule: how a concatenated head decides the joint view, for the merged model(s) and the ensemble
            alike: `"per_task"` (each task's softmax, then the argmax, on log-probabilities so that two confident
            tasks do not tie; `hf_mudsc.joint_predictions`) or `"raw"`
            (the argmax over the raw concatenated logits, what a `transformers` pipeline does). Neither wins
            everywhere (docs/benchmarks/joint_rules.md); the result records the rule.
        allow_pickle: load models given as a folder or Hub id that have pickle-only weights (pytorch_model.bin:
            a pickle can run arbitrary code when loaded; only for sources you trust), as `merge(allow_pickle=True)`.
        progress: a progress bar per task (INFO lines when stderr is no terminal or Hugging Face's bars are switched
            off: `HF_HUB_DISABLE_PROGRESS_BARS=1`, `huggingface_hub.utils.disable_progress_bars()`; False: neither).
        trust_remote_code: allow a metric that is not shipped (its script is downloaded or read and run).

    Returns:
        An `EvaluationResult` on the main process (None on the others under a distributed launch).
    """
    from hf_mudsc.calibrate.distributed import is_main_process, process_info

    metrics = list(metrics)
    refuse_token_names([  # before any message could name one (a metric's: before the Hub is asked for it)
        ("a metric name (CLI: --metric)", metrics),
        ("a task name of datasets_per_task (CLI: --dataset TASK=SPEC)",
         list(datasets_per_task) if isinstance(datasets_per_task, Mapping) else []),
        ("a name of the merged models", list(merged) if isinstance(merged, Mapping) else []),
        ("image_column (CLI: --image-column)", image_column), ("text_column (CLI: --text-column)", text_column),
        ("class_names (CLI: --class-names)", class_names),
        ("prompt_template (CLI: --prompt-template)", prompt_template)])
    check_metric_names(metrics)
    modules = {name: load_metric(name, trust_remote_code=trust_remote_code) for name in metrics}  # before any model
    shown = {name: metric_shown_name(name) for name in metrics}  # a local metric by its name, never its path
    check_prompt_templates(prompt_template)  # read by CLIP only, but a wrong one is refused before any model loads
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    if joint_rule not in JOINT_RULES:
        raise EvaluationError(f"joint_rule must be one of {', '.join(JOINT_RULES)}, got {joint_rule!r}")
    if num_samples is not None and num_samples < 1:
        raise EvaluationError(f"num_samples must be >= 1 or None, got {num_samples}")
    if datasets_per_task is None or len(datasets_per_task) == 0:
        raise EvaluationError("no evaluation data: pass datasets_per_task={task: dataset, ...}")
    check_merged_names(merged)
    scored = list(datasets_per_task) if isinstance(datasets_per_task, Mapping) else len(datasets_per_task)
    for name, reference in (dict(merged) if isinstance(merged, Mapping) else {MERGED: merged}).items():
        config = _config_before_loading(reference)  # a folder's config.json: refused before any weights
        if config is not None:
            check_scorable(config, scored, f"merged model {name!r}")
            check_tasks_of(config, datasets_per_task, parents)
    merged_models, parent_models, owned, hub_sources = _load_models(merged, parents, allow_pickle)
    assigned, processor_sources = _assign_processors(merged_models, owned, processor, own_processors)
    models = [*merged_models.values(), *parent_models]
    # each processor configured by the config of a model it scores (channels, text length), errors naming them
    distinct, group_of = _distinct(assigned, [model.config for model in models])
    labels = [*(f"merged model {name!r}" for name in merged_models),
              *(f"parent {parent_label(index)}" for index in range(len(parent_models)))]
    group_configs = [models[group_of.index(group)].config for group in range(len(distinct))]
    # each processor's text cut to the positions every model it scores reaches, as calibration cuts it
    group_tokens = [_fewest_tokens([model for model, of in zip(models, group_of) if of == group])
                    for group in range(len(distinct))]
    group_owners = [[label for label, of in zip(labels, group_of) if of == group] for group in range(len(distinct))]
    # every model as loaded: a Hub id's config is known only now, and a regression head (its outputs numbers, not
    # class logits) or a multi-label one would otherwise be scored by an argmax and published as accuracy
    for name, model in merged_models.items():
        check_scorable(model.config, scored, f"merged model {name!r}")
    for index, model in enumerate(parent_models):
        check_scorable(model.config, 2, f"parent {parent_label(index)}")
    reference = next(iter(merged_models.values()))
    clip = is_clip(reference)
    layout, sources = _layout_and_sources(datasets_per_task, merged_models, parent_models, clip, class_names)
    if not clip and not layout.shared and (uneven := uneven_tasks_warning(layout.ranges, joint_rule)):
        logger.warning("%s", uneven)
    scorers = build_scorers(merged_models, parent_models, layout, clip, ensemble, assigned, prompt_template,
                            joint_rule)
    groups = {id(model): group for model, group in zip(models, group_of)}
    rank, world = process_info()
    main_input = "pixel_values" if clip else getattr(reference, "main_input_name", "input_ids")

    left_out: dict[str, bool | None] = {}  # per task: num_samples left rows out (None: a stream, not known)

    def batches_of(task: str, source: TaskData) -> OpenedTask:
        batches, total, raw_columns, left_out[task], every_label = task_batches(
            source, task=task, main_input=main_input, batch_size=batch_size, num_samples=num_samples,
            processors=distinct, model_configs=group_configs, max_tokens=group_tokens, owners=group_owners,
            image_column=image_column,
            text_column=text_column, rank=rank, world=world, task_names=list(layout.ranges),
            class_names=layout.class_names[task],  # CLIP too: names given in another order than the data's
            joint_classes=joint_classes)
        return batches, total, raw_columns, every_label

    joint_classes = [(name, label) for name, (lo, _) in sorted(layout.ranges.items(), key=lambda item: item[1][0])
                     for label in layout.class_names[name]] if not layout.shared else None

    collected, counts, preprocessed, failure = _predict(models, groups, scorers, layout, sources, batches_of,
                                                        batch_size=batch_size, progress=progress, world=world)
    if world > 1:
        collected, counts, failures = _gather(collected, counts, failure)
        if failure is not None:
            raise failure
        if failures:
            raise EvaluationError(f"evaluation failed on another process: {failures[0]}")
    if not is_main_process():
        return None
    refuse_empty_tasks([t for t, n in counts.items() if n == 0], sources)
    scores = {scorer.name: _views(collected[scorer.name], list(sources), shown, modules) for scorer in scorers}

    def truncated(task: str) -> bool:
        """`num_samples` left rows of the task out (a stream: it may have): its figures are of the first rows only."""
        known = left_out.get(task)
        return known if known is not None else num_samples is not None and counts[task] >= num_samples

    tasks = {
        task: {"dataset": source_name(source), "split": source.split or spec_split(source),
               "num_samples": counts[task], **({"first_rows": True} if truncated(task) else {}),
               # its rows picked out of one dataset holding every task: no split string names its first rows
               **({"picked": True} if source.label_range is not None or source.task_column is not None else {}),
               "label_range": list(layout.ranges[task]),
               "classes": list(layout.class_names[task]),
               **({"local": True, "data_key": source_key(source)} if source.local else {}),
               **({"config": source.config} if source.config else {}),
               **({"revision": revision} if (revision := spec_revision(source)) else {})}
        for task, source in sources.items()
    }
    # which processor scored which row: only when raw columns were preprocessed by processors that differ
    names = [*merged_models, *parent_names(len(parent_models))]
    processors = _processor_record(names, processor_sources, ensemble and len(parent_models) >= 2) \
        if len(distinct) > 1 and preprocessed else {}
    result = EvaluationResult(metrics=[shown[name] for name in metrics], tasks=tasks, scores=scores,
                              merged=list(merged_models),
                              definitions=definitions(joint_rule if not clip and not layout.shared else None,
                                                      processors=bool(processors),
                                                      joint_data=list(sources) if len(sources) < len(layout.ranges)
                                                      else None,
                                                      prompt_templates=([prompt_template] if isinstance(
                                                          prompt_template, str) else list(prompt_template))
                                                      if clip else None,
                                                      shared_classes=layout.repeated_classes),
                              processors=processors, models=hub_sources)
    logger.info("evaluated %s on %s", escaped(", ".join(scores)),
                escaped(", ".join(f"{t} ({n})" for t, n in counts.items())))
    return result


def _load_models(merged: Any, parents: Sequence[Any] | None,
                 allow_pickle: bool = False) -> tuple[dict, list, list, dict[str, str]]:
    """The merged model(s) by name, the parents (A, B, ...), each one's own processor (None: it has none), merged
    models first, and the scorers loaded from the Hub as `org/name@commit` (`allow_pickle`: `evaluate_merge`'s)."""
    merged_in = dict(merged) if isinstance(merged, Mapping) else {MERGED: merged}
    if not merged_in:
        raise EvaluationError("no merged model to evaluate")
    merged_models, owned, sources = {}, [], {}
    for name, model in merged_in.items():
        merged_models[name], loaded_processor, sources[name] = _load(model, f"merged model {name!r}", allow_pickle)
        owned.append(loaded_processor)
    parent_models = []
    if parents is not None:
        if len(parents) < 2:
            raise EvaluationError(f"pass the parents in merge order (at least two: A, B, ...) or None, got "
                                  f"{len(parents)}")
        for index, parent in enumerate(parents):
            model, loaded_processor, sources[parent_names(len(parents))[index]] = _load(
                parent, f"parent {parent_label(index)}", allow_pickle)
            parent_models.append(model)
            owned.append(loaded_processor)
    return merged_models, parent_models, owned, {name: source for name, source in sources.items() if source}


def _assign_processors(merged: Mapping[str, Any], owned: Sequence[Any], given: Any,
                       own_processors: bool) -> tuple[list[Any], list[str]]:
    """Each model's processor (merged models first, then the parents) and where it came from, for the record.

    The shared one is `given`, else the first merged model's, else the first parent's (as before). A merged model
    takes `given`, else its own; a parent its own; anything without one the shared one; with `own_processors=False`
    every model takes the shared one."""
    names = [*merged, *parent_names(len(owned) - len(merged))]
    if given is not None:
        shared, source = given, "given (processor=)"
    else:
        index = next((i for i, p in enumerate(owned) if p is not None), None)
        shared, source = (None, "none") if index is None else (owned[index], f"{names[index]}'s")
    assigned, labels = [], []
    for index, own in enumerate(owned):
        if not own_processors or own is None or (index < len(merged) and given is not None):
            assigned.append(shared)
            labels.append("own" if own is shared and own is not None else source)
        else:
            assigned.append(own)
            labels.append("own")
    return assigned, labels


def _distinct(processors: Sequence[Any], configs: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """The distinct preprocessings — a processor (by its serialised settings) with what its model's config adds
    (`config_preprocessing`: channels, text length) — first seen first, and each model's index into them."""
    from hf_mudsc.calibrate.datasets import config_preprocessing
    from hf_mudsc.load.processors import processor_fingerprint

    fingerprints: dict[int, str] = {}  # one fingerprint per object: most models share the same one
    position: dict[tuple[str, tuple[int | None, int | None]], int] = {}
    distinct, group_of = [], []
    for processor, config in zip(processors, configs, strict=True):
        if id(processor) not in fingerprints:
            fingerprints[id(processor)] = processor_fingerprint(processor)
        key = (fingerprints[id(processor)], config_preprocessing(config))
        if key not in position:
            position[key] = len(distinct)
            distinct.append(processor)
        group_of.append(position[key])
    return distinct, group_of


def _processor_record(names: Sequence[str], labels: Sequence[str], ensemble: bool) -> dict[str, str]:
    """Scorer name -> whose processor made its inputs (`own`, `parent_a's`, `given (processor=)`)."""
    record = dict(zip(names, labels))
    if ensemble:
        record[ENSEMBLE] = "each parent's as in its row"
    return record


def _layout_and_sources(datasets_per_task: Mapping[str, Any] | Sequence[Any], merged_models: Mapping[str, Any],
                        parent_models: Sequence[Any], clip: bool,
                        class_names: Mapping[str, Sequence[str]] | None) -> tuple[LabelLayout, dict[str, TaskData]]:
    """The joint label space and each task's data, in parent order."""
    requested = list(datasets_per_task) if isinstance(datasets_per_task, Mapping) else None
    if clip:
        if requested is None:
            raise EvaluationError(
                "CLIP has no task names of its own: pass datasets_per_task as {task: data} "
                "(CLI: --dataset TASK=SPEC)"
            )
        layout = None
    else:
        layout = classifier_layout(merged_models, parent_models, requested, len(datasets_per_task))
    task_order = requested if requested is not None else list(layout.ranges)
    if isinstance(datasets_per_task, Mapping):
        sources = {str(k): as_task_data(v) for k, v in datasets_per_task.items()}
    else:
        if len(datasets_per_task) != len(task_order):
            raise EvaluationError(
                f"{len(datasets_per_task)} datasets for {len(task_order)} tasks {task_order}; pass one per "
                "task in order, or a mapping {task: data}"
            )
        sources = {task: as_task_data(v) for task, v in zip(task_order, datasets_per_task)}
    check_class_names_tasks(class_names, list(sources), clip)
    if clip:
        # a spec is opened here, as the CLI opens it: a CLIP's class names are its label column's ClassLabel names
        sources = {task: source if task in (class_names or {}) else opened_spec(source, task)
                   for task, source in sources.items()}
        layout = clip_layout(list(sources), sources, class_names)
    reserved = next((task for task in layout.ranges if task in (JOINT, AVERAGE)), None)
    if reserved is not None:  # one shared label set or a CLIP names its tasks after the data: its keys
        raise EvaluationError(
            f"a task may not be named {reserved!r} (a reserved view name of the results); name it otherwise in "
            "{task: data} (CLI: --dataset TASK=SPEC)")
    unknown = [t for t in sources if t not in layout.ranges]
    if unknown:
        raise EvaluationError(
            f"unknown task(s) {unknown}; the merged model's tasks are {list(layout.ranges)}"
        )
    for task, source in sources.items():  # ranges given with one dataset for every task (tasks_from_dataset)
        lo, hi = layout.ranges[task]
        if source.label_range is not None and (tuple(source.label_range) != (lo, hi) or source.label_offset != lo):
            raise EvaluationError(
                f"task {task!r}: its rows are picked by the label range {list(source.label_range)} given "
                f"(tasks_from_dataset's task_ranges), but the merged model's is {[lo, hi]}; pass the merged model's "
                "config.task_label_ranges as task_ranges")
    one_output = [task for task in sources if not clip and layout.ranges[task][1] - layout.ranges[task][0] == 1]
    if one_output:
        raise EvaluationError(
            f"task(s) {one_output} have a regression head (one output, transformers' num_labels=1), which has no "
            "classes to score by accuracy or f1; score its outputs (model(**inputs).logits) with a regression "
            "metric yourself, and pass only classification tasks here"
        )
    return layout, {task: sources[task] for task in layout.ranges if task in sources}


def opened_spec(source: TaskData, task: str) -> TaskData:
    """`source` with its dataset spec opened (still named and split as the spec), so what is read from its features
    before scoring (a CLIP's class names) is there; other data as given."""
    if not isinstance(source.data, (str, os.PathLike)):
        return source
    from dataclasses import replace

    from hf_mudsc.calibrate.datasets import load_calibration_dataset

    return replace(source, data=load_calibration_dataset(os.fspath(source.data), role=evaluation_source(task)))


def check_merged_names(merged: Any) -> None:
    """The names of several merged models ({name: model}) key the results beside the parents' and the ensemble's: a
    merged model named `parent_a` or `ensemble` (or two named alike once written) would share that entry, and one
    model's figures would be published as the other's. Refused before any model loads."""
    if not isinstance(merged, Mapping):
        return
    seen: set[str] = set()
    for name in merged:
        shown = str(name)
        if shown == ENSEMBLE or shown.startswith("parent_"):
            raise EvaluationError(
                f"a merged model may not be named {shown!r}: the results name the parents' and the ensemble's figures "
                "so (parent_a, parent_b, ..., ensemble); rename it in {name: model}")
        if shown in seen:
            raise EvaluationError(f"two merged models are named {shown!r}; rename one in {{name: model}}")
        seen.add(shown)


def check_class_names_tasks(class_names: Mapping[str, Any] | None, tasks: Sequence[str], clip: bool) -> None:
    """`class_names` names only tasks scored, and only for a CLIP (zero-shot prompts): a task name not scored (a
    typo: `petz`) was dropped without a word, and on a classifier, whose head names its classes, they were ignored."""
    if not class_names:
        return
    odd = next((task for task, names in class_names.items()
                if isinstance(names, (str, bytes)) or not isinstance(names, Sequence)), None)
    if odd is not None:  # a string is a sequence of characters: `"ab"` was read as the classes a and b
        raise EvaluationError(f"class_names[{odd!r}] is {type(class_names[odd]).__name__} {class_names[odd]!r}, not a "
                              "list of class names; pass {task: [name, name, ...]}")
    if not clip:
        raise EvaluationError(
            "class_names (CLI: --class-names) names the classes of a CLIP model's zero-shot prompts; this model has "
            "a classifier head, whose labels (config.id2label) name its classes: leave class_names out")
    unknown = [task for task in class_names if task not in tasks]
    if unknown:
        raise EvaluationError(
            f"class_names (CLI: --class-names) names task(s) {unknown} that no data scores; the tasks scored: "
            f"{', '.join(tasks)} (CLI: each --dataset TASK=SPEC names one)")


def _config_task_ranges(config: Any) -> dict[str, tuple[int, int]] | None:
    """The task ranges a classifier's config names (empty: one task); None for a CLIP, or ranges that do not tile
    its head (refused with the layout, by name)."""
    from hf_mudsc.apply.classifier import task_ranges

    if is_clip_config(config):
        return None
    try:
        return task_ranges(config)
    except ValueError:
        return None


def check_tasks_of(config: Any, datasets_per_task: Mapping[str, Any] | Sequence[Any],
                   parents: Sequence[Any] | None) -> None:
    """The task names, the dataset count and the parent count against the tasks a merged model's config names
    (`config.task_label_ranges`), so that a typo or one model too many is refused before any weights load; the same
    checks follow the loading for a model whose config is only known then (a Hub id)."""
    ranges = _config_task_ranges(config)
    if not ranges:
        return
    if isinstance(datasets_per_task, Mapping):
        unknown = [str(task) for task in datasets_per_task if str(task) not in ranges]
        if unknown:
            raise EvaluationError(f"unknown task(s) {unknown}; the merged model's tasks are {list(ranges)}")
    elif len(datasets_per_task) != len(ranges):
        raise EvaluationError(
            f"{len(datasets_per_task)} datasets for {len(ranges)} tasks {list(ranges)}; pass one per task in order, "
            "or a mapping {task: data}")
    if parents is not None and len(parents) >= 2:
        # A merged parent holds each of its tasks. A parent whose config only loading reads (a Hub id) holds at least
        # one: too many parents are refused here, before any download; too few may be merged parents on the Hub,
        # checked exactly once they are loaded (`tasks.classifier_layout`), as the command line checks them.
        configs = [_config_before_loading(parent) for parent in parents]
        counts = [len(held_tasks(config, index)) if config is not None else 1 for index, config in enumerate(configs)]
        unread = any(config is None for config in configs)
        refusal = parents_tasks_mismatch(counts, ranges)
        if refusal is not None and not (unread and sum(counts) < len(ranges)):
            raise EvaluationError(refusal)


def check_scorable(config: Any, scored: Sequence[str] | int, what: str) -> None:
    """Whether the model of `config` has one class per row to score on the tasks `scored` (their names, or how many
    datasets are given in task order): a multi-label head or a regression head (one output: a task range one wide,
    or one label and no task ranges) has none. Read from the config alone, so that such a merge is refused before its
    weights and every parent's are loaded."""
    if getattr(config, "problem_type", None) == "regression" and not is_clip_config(config):
        raise EvaluationError(
            f"{what} has a regression head (problem_type 'regression': its outputs are numbers, not class scores), "
            "which has no classes to score by accuracy or f1; score its outputs (model(**inputs).logits) with a "
            "regression metric yourself")
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise EvaluationError(
            f"{what} has a multi-label head (problem_type 'multi_label_classification': one sigmoid per label), which "
            "has no single class per row to score by accuracy or f1; score its sigmoid outputs "
            "(model(**inputs).logits) with a multi-label metric yourself")
    if is_clip_config(config):
        return
    ranges = _config_task_ranges(config)
    if ranges is None:
        return
    if ranges:
        tasks = [t for t in scored if t in ranges] if not isinstance(scored, int) else list(ranges)[:scored]
        one_output = [task for task in tasks if ranges[task][1] - ranges[task][0] == 1]
    else:
        labels = len(getattr(config, "id2label", None) or {}) or getattr(config, "num_labels", 2)
        one_output = ["its one task"] if labels == 1 else []
    if one_output:
        raise EvaluationError(
            f"{what}: task(s) {one_output} have a regression head (one output, transformers' num_labels=1), which has "
            "no classes to score by accuracy or f1; score its outputs (model(**inputs).logits) with a regression "
            "metric yourself, and pass only classification tasks here")


def _config_before_loading(reference: Any) -> Any:
    """The config of a model to load, without its weights: a model object's own, a local folder's config.json read as
    the loader reads it (`folder_config`: its refusal, a `LoadError`, is the one loading would give, before
    transformers is handed a link out of the folder or a billion labels); None for a Hub id (only loading tells)."""
    from transformers import PreTrainedModel

    if isinstance(reference, PreTrainedModel):
        return reference.config
    if hasattr(reference, "model") and isinstance(reference.model, PreTrainedModel):
        return reference.model.config
    if isinstance(reference, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(os.fspath(reference))):
        from hf_mudsc.load.parents import folder_config

        return folder_config(Path(os.path.expanduser(os.fspath(reference))), os.fspath(reference))
    return None


def _predict(models: Sequence[Any], groups: Mapping[int, int], scorers: Sequence[Scorer], layout: LabelLayout,
             sources: Mapping[str, TaskData],
             batches_of: Callable[[str, TaskData], OpenedTask], *,
             batch_size: int, progress: bool, world: int) -> tuple[dict, dict[str, int], bool, Exception | None]:
    """Every scorer's (predictions, references) per view on this process's rows, the row count per task, whether
    raw columns were preprocessed, and the error of a distributed run (raised by the caller once every process has
    reported). `groups`: id(model) -> the index of its processor's inputs in each batch."""
    collected: dict[str, dict[str, tuple[list[int], list[int]]]] = {s.name: {} for s in scorers}
    counts: dict[str, int] = {}
    preprocessed = False
    failure: Exception | None = None
    # Each processor's inputs checked against the config of the first model reading them, before any forward, as
    # calibration data is: ids past the vocabulary failed inside the embedding ("index out of range in self").
    checks: dict[int, ModelInputCheck] = {}
    for model in models:
        group = [other for other in models if groups[id(other)] == groups[id(model)]]
        checks.setdefault(groups[id(model)], ModelInputCheck.of(model.config, data="evaluation", models="the model",
                                                                error=EvaluationError,
                                                                max_tokens=_fewest_tokens(group)))
    try:
        # Every task's data opened, and its labels read where the label column alone gives them, before the first
        # forward pass: a missing dataset, label column or rows, or a wrong label, of the last task was said only
        # after every model had scored the others.
        opened = {task: batches_of(task, source) for task, source in sources.items()}
        for task, (_, _, _, every_label) in opened.items():
            if every_label is not None:
                local_labels(every_label, sources[task], task, layout.class_names[task])
        if world == 1:  # a process's shard may be empty while the others' are not: then checked once gathered
            refuse_empty_tasks([task for task, (_, total, _, _) in opened.items() if total == 0], sources)
        # Each module in eval mode and none of the caller's hooks run: the scores are the models' as their weights
        # define them; every module's mode and hooks come back afterwards (`load.objects.held_as_given`).
        with torch.no_grad(), held_as_given(models):
            for task, source in sources.items():
                lo, _ = layout.ranges[task]
                batches, total, raw_columns, _ = opened[task]
                preprocessed = preprocessed or raw_columns
                per_task = {s.name: ([], []) for s in scorers}
                joint = {s.name: ([], []) for s in scorers}
                seen = 0
                with Progress(desc=f"evaluate {task}", unit="batches", enabled=progress,
                              total=None if total is None else math.ceil(total / batch_size)) as bar:
                    for per_processor, raw in batches:
                        labels = local_labels(raw, source, task, layout.class_names[task])
                        seen += len(labels)
                        for index, check in checks.items():
                            check(per_processor[index])
                        cache: dict[int, torch.Tensor] = {}
                        inputs = ModelInputs(per_processor, groups)
                        for scorer in scorers:
                            try:
                                scores = scorer.scores(inputs, cache)
                            except NonFiniteScores as error:
                                raise EvaluationError(
                                    f"{scorer.name} gives logits that are not finite (NaN or inf) on {error.rows} of "
                                    f"{error.total} rows of task {task!r}: no class can be read from them (argmax "
                                    "would take NaN as the largest); check its weights (a float16 overflow, a broken "
                                    "merge) and the inputs") from None
                            if task in scorer.tasks:
                                lo_t, hi_t = layout.ranges[task]
                                per_task[scorer.name][0].extend(scores[:, lo_t:hi_t].argmax(-1).tolist())
                                per_task[scorer.name][1].extend(labels.tolist())
                            predicted = scores.argmax(-1).tolist()
                            reference = (labels + (0 if layout.shared else lo)).tolist()
                            if layout.joint_alias:  # a CLIP class name of several tasks: one prompt, either right
                                predicted = [layout.joint_alias[i] for i in predicted]
                                reference = [layout.joint_alias[i] for i in reference]
                            joint[scorer.name][0].extend(predicted)
                            joint[scorer.name][1].extend(reference)
                        bar.update(1)
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
        failure = error  # raised by the caller on EVERY process: the others must not wait for this one forever
    return collected, counts, preprocessed, failure


def _views(collected: Mapping[str, tuple[list[int], list[int]]], tasks: Sequence[str], metrics: Mapping[str, str],
           modules: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """One scorer's metric values per view (tasks, joint, average), in that order; `metrics`: each metric as given
    -> as the results name it (`metric_shown_name`)."""
    views: dict[str, dict[str, float]] = {}
    for view, (predictions, references) in collected.items():
        views[view] = {shown: compute_metric(m, predictions, references, module=modules[m], view=view)
                       for m, shown in metrics.items()}
    if all(t in views for t in tasks):
        views[AVERAGE] = {m: float(np.mean([views[t][m] for t in tasks])) for m in metrics.values()}
    return {v: views[v] for v in [*tasks, JOINT, AVERAGE] if v in views}


def refuse_empty_tasks(empty: Sequence[str], sources: Mapping[str, TaskData]) -> None:
    """Refuse the tasks `empty` of which no row is scored, in one line (none: nothing to say)."""
    if not empty:
        return
    if all(sources[t].label_range is not None or sources[t].task_column is not None for t in empty):
        raise EvaluationError(  # one dataset given for every task (`tasks_from_dataset`) lacks these tasks' rows
            f"task(s) {list(empty)} have no evaluation rows in the one dataset given for every task (read by "
            f"{'its task column' if sources[empty[0]].task_column else 'joint label ids'}); "
            + one_dataset_per_task_fix(list(sources))
        )
    raise EvaluationError(f"task(s) {list(empty)} have no evaluation rows; check the dataset, split and task mapping")


def _hub_source(loaded: Any) -> str | None:
    """`org/name@commit` of a model loaded from the Hub (a `LoadedParent`), else None (`EvaluationResult.models`)."""
    repo_id, commit = getattr(loaded, "repo_id", None), getattr(loaded, "commit_sha", None)
    return f"{repo_id}@{commit}" if repo_id and commit else None


def _load(model: Any, what: str, allow_pickle: bool = False) -> tuple[Any, Any, str | None]:
    """(model, processor, `org/name@commit` when it came from the Hub) from a PreTrainedModel, a LoadedParent, or a
    folder / Hub reference.

    A bare model object gets the processor saved in its `name_or_path` folder (or cached Hub snapshot), found as
    `merge` finds it (`load.processors.processor_from_name`; a Hub object: the snapshot holding its weights, whose
    commit is returned), so the same objects merge and evaluate alike; None when it has none (e.g. the merged object
    `merge` returns: it is then scored with parent A's)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from hf_mudsc.load.parents import own_name_or_path
        from hf_mudsc.load.processors import processor_from_name

        name_or_path = own_name_or_path(model)
        commit = getattr(model.config, "_commit_hash", None)
        source = None
        if not commit and name_or_path and not Path(name_or_path).expanduser().is_dir():
            # transformers >= 5.18 records no commit: the cached snapshot holding exactly its weights names it, so
            # it is scored with that commit's processor, not the default revision's
            source = object_source(model, name_or_path)
        if source is not None and source.repo_id and source.commit_sha:
            return (model, processor_from_name(source.repo_id, source.commit_sha),
                    f"{source.repo_id}@{source.commit_sha}")
        return model, processor_from_name(name_or_path, commit), None
    if hasattr(model, "model") and isinstance(model.model, PreTrainedModel):
        return model.model, getattr(model, "processor", None), _hub_source(model)
    if isinstance(model, (str, os.PathLike)):
        from hf_mudsc.load.parents import load_parent

        loaded = load_parent(os.fspath(model), allow_pickle=allow_pickle)
        return loaded.model, loaded.processor, _hub_source(loaded)
    raise EvaluationError(f"{what} is a {type(model).__name__}; pass a PreTrainedModel, a folder or a Hub id")


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


def _fewest_tokens(models: Sequence[Any]) -> int | None:
    """The fewest tokens any of `models` reads (their adapters' `PermutationSpec.max_tokens`: RoBERTa's positions
    start after its padding id); None when none says (an architecture without an adapter keeps its processor's)."""
    from hf_mudsc.architectures import spec_for
    from hf_mudsc.errors import UnsupportedArchitectureError

    limits = []
    for model in models:
        try:
            limit = spec_for(model).max_tokens
        except UnsupportedArchitectureError:  # no adapter for this model: its processor's own limit applies
            limit = None
        if limit is not None:
            limits.append(limit)
    return min(limits, default=None)
