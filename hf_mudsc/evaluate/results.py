"""The result of an evaluation: scores by scorer, view and metric; its JSON file, markdown table and card rows."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_mudsc._version import __version__
from hf_mudsc.errors import EvaluationError, escaped
from hf_mudsc.evaluate.names import (
    AVERAGE,
    ENSEMBLE,
    JOINT,
    MERGED,
    PARENT_NAMES,
    SHIPPED_METRIC_ARGS,
    parent_names,
)


@dataclass
class EvaluationResult:
    """Scores by scorer (`merged`…, `parent_a`, `parent_b`, `parent_c` …, `ensemble`), view (task, joint,
    average), metric: `scores` holds `scores[scorer][view][metric]` (`score(scorer, view, metric)` reads one).
    `metrics`: the metrics computed, in the order asked; `merged`: the merged scorers' names (several when a
    mapping of merges was scored); `definitions`: what each figure means (the views, the ensemble, the joint rule;
    `joint_rule` records the rule that decided the joint view).

    `tasks` maps each task to its data description: `dataset`, `split`, `num_samples` (the rows scored),
    `first_rows` (true when `num_samples=` cut the data to its first rows), `revision` (the Hub revision a spec
    `org/data@REV:split` pinned; absent without one), `picked` (true when its rows were picked
    out of one dataset holding every task, by task column or joint label id: its first rows are then not the split's)
    and `label_range` (its slice of the joint label space). Scores are fractions in [0, 1]. A missing entry means the
    view is not defined for that scorer (e.g. parent A on task B). `processors`: when the models' processors differ,
    whose processor made each scorer's inputs (`own`, `parent_a's`, `given (processor=)`); empty when one
    processor made every input. `models`: the scorers loaded from the Hub, as `org/name@commit` (an id alone moves on
    with the repository, so the commit says which weights made the figures); local folders are not named (their
    paths are this machine's).
    """

    metrics: list[str]
    tasks: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, dict[str, float]]]
    merged: list[str] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=dict)
    processors: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)

    def score(self, scorer: str, view: str, metric: str | None = None) -> float | None:
        """One figure: `scorer`'s `view` (a task, `joint` or `average`) by `metric` (default: the first metric); None
        where it is not defined (parent A on task B)."""
        return self.scores.get(scorer, {}).get(view, {}).get(metric or self.metrics[0])

    @property
    def parent_scorers(self) -> list[str]:
        """The parents' scorer names present, in merge order (`parent_a`, `parent_b`, `parent_c`, ...)."""
        return [name for name in parent_names(len(self.scores)) if name in self.scores]

    @property
    def task_names(self) -> list[str]:
        """The tasks scored, in parent order (A's task first)."""
        return list(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """The results as `eval_results.json` holds them (JSON types; the shipped metrics' arguments included)."""
        return {
            "hf_mudsc_version": __version__,
            "metrics": list(self.metrics),
            # how a shipped metric was computed (`f1`: macro), so a chart or card drawn from this file alone says so
            **({"metric_args": args} if (args := {m: dict(SHIPPED_METRIC_ARGS[m]) for m in self.metrics
                                                 if m in SHIPPED_METRIC_ARGS}) else {}),
            "tasks": self.tasks,
            "merged": list(self.merged),
            "scores": self.scores,
            "definitions": dict(self.definitions),
            **({"processors": dict(self.processors)} if self.processors else {}),
            **({"models": dict(self.models)} if self.models else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """The result a `to_dict` dict (or a read `eval_results.json`) describes."""
        return cls(metrics=list(data["metrics"]), tasks=dict(data["tasks"]), scores=dict(data["scores"]),
                   merged=list(data.get("merged", [])), definitions=dict(data.get("definitions", {})),
                   processors=dict(data.get("processors", {})), models=dict(data.get("models", {})))

    def json_text(self) -> str:
        """The text of a results file (`eval_results.json`)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (temp file + rename: never a half-written file)."""
        from hf_mudsc.publish.folder import write_file_atomically

        text = self.json_text()
        return write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvaluationResult:
        """Read a results file written by `save` (refused, before reading, over `SIDE_FILE_MAX_BYTES`)."""
        from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES, parse_json

        size = Path(path).stat().st_size
        if size > SIDE_FILE_MAX_BYTES:
            raise EvaluationError(f"{os.fspath(path)} is {size:,} bytes, more than the {SIDE_FILE_MAX_BYTES:,} a "
                                  "results file may be (hf-mudsc writes a few kB): it is not one of its results")
        return cls.from_dict(parse_json(Path(path).read_text(encoding="utf-8")))

    def card_rows(self, merged: str | None = None) -> list[Any]:
        """`hf_mudsc.publish.card.EvalRow`s for `render_card(..., eval_results=...)`: per task and metric, plus joint.

        `merged` picks which merged scorer fills the card's `model-index` (default: the first one).
        """
        from hf_mudsc.publish.card import EvalRow

        merged = merged or (self.merged[0] if self.merged else MERGED)
        if merged not in self.scores:
            raise EvaluationError(f"no scores for {merged!r}; scored: {sorted(self.scores)}")
        rows = []
        later = self.parent_scorers[2:]
        raw = self.definitions.get("joint_rule") == "raw"  # the default rule keeps the plain name
        processors = self.processor_note(merged)
        for metric in self.metrics:
            for view in [*self.tasks, JOINT]:
                value = self.score(merged, view, metric)
                if value is None:
                    continue
                task = view if view != JOINT else _joint_row_name(raw, self.definitions.get("joint_data"))
                rows.append(EvalRow(
                    task=task,
                    **(_task_data(self.tasks[view]) if view in self.tasks else _joint_data(self.tasks)),
                    metric=metric,
                    metric_args=SHIPPED_METRIC_ARGS.get(metric),
                    merged=value,
                    parent_a=self.score(PARENT_NAMES[0], view, metric),
                    parent_b=self.score(PARENT_NAMES[1], view, metric),
                    ensemble=self.score(ENSEMBLE, view, metric),
                    later_parents=tuple(self.score(name, view, metric) for name in later),
                    processors=processors,
                ))
        return rows

    def processor_note(self, merged: str | None = None) -> str | None:
        """`processors` as the card's columns name them (`Parent A: own; ...; Merged: parent A's`), None when one
        processor made every input; `merged`: the merged scorer the card shows."""
        if not self.processors:
            return None
        merged = merged or (self.merged[0] if self.merged else MERGED)

        def column(name: str) -> str:
            if name == merged:
                return "Merged"
            return f"Parent {name.removeprefix('parent_').upper()}" if name.startswith("parent_") else name.capitalize()

        def source(text: str) -> str:
            return re.sub(r"parent_([a-z])'s", lambda m: f"parent {m.group(1).upper()}'s", text)

        shown = [name for name in [*self.parent_scorers, ENSEMBLE, merged] if name in self.processors]
        return "; ".join(f"{column(name)}: {source(self.processors[name])}" for name in shown)

    def table(self, metric: str | None = None, *, scorers: Sequence[str] | None = None,
              labels: Mapping[str, str] | None = None) -> str:
        """A markdown table for the terminal: one row per scorer, columns = tasks, joint, average (`-`: not defined).
        Names are `escaped`: a task or folder name from a downloaded config cannot clear the screen or add a row."""
        metric = metric or self.metrics[0]
        views = [*self.tasks, JOINT, AVERAGE]
        labels = dict(labels or {})
        names = list(scorers or self.scores)
        header = ["model", *(escaped(view) for view in views)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(views)]
        for name in names:
            cells = []
            for view in views:
                value = self.score(name, view, metric)
                cells.append("-" if value is None else f"{value:.4f}")
            lines.append("| " + " | ".join([escaped(labels.get(name, name)), *cells]) + " |")
        return "\n".join(lines)


def _joint_row_name(raw: bool, only: str | None) -> str:
    """The card's joint row: `joint (all tasks)`, the rule when raw, and whose data when not every task was scored."""
    rule = ", raw logits" if raw else ""
    return f"joint (all classes{rule}, data of {only} only)" if only else f"joint (all tasks{rule})"


def _task_data(info: Mapping[str, Any]) -> dict[str, Any]:
    """A task's data as an `EvalRow` names it: `dataset` (None: in memory, unnamed), `dataset_config`, `split` (None:
    unknown), `local`, `rows` (the rows scored: `30`, `first 7`; None: not recorded)."""
    from hf_mudsc.publish.card import EvalRow

    dataset, config, split = info.get("dataset"), info.get("config"), info.get("split")
    count, revision = info.get("num_samples"), info.get("revision")
    return {"dataset": None if dataset is None else str(dataset), "dataset_config": None if config is None else
            str(config), "split": None if split is None else str(split), "local": bool(info.get("local")),
            "dataset_revision": None if revision is None else str(revision),
            "rows": None if count is None else EvalRow.rows_text(int(count), bool(info.get("first_rows"))),
            "picked": bool(info.get("picked"))}


def _joint_data(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The joint row's data: every task's data together (its rows: their sum, or each task's when any was cut to its
    first rows: `first 7 + first 7`). One dataset (the tasks' data named alike): that dataset, its
    config and split when they share one. Several: the table names them all (`a + b`), and the row stays out of the
    `model-index`, whose results each name one dataset."""
    from hf_mudsc.publish.card import EvalRow

    each = [_task_data(info) for info in tasks.values()]
    counts = [info.get("num_samples") for info in tasks.values()]
    rows = None if None in counts else (" + ".join(data["rows"] for data in each)
                                        if any(info.get("first_rows") for info in tasks.values())
                                        else str(sum(int(count) for count in counts)))
    shown = [EvalRow.label_of(data["dataset"], data["local"]) + (f"@{data['dataset_revision']}"
                                                                  if data["dataset_revision"] else "")
             for data in each]
    labels = list(dict.fromkeys(shown))
    splits, configs = {data["split"] for data in each}, {data["dataset_config"] for data in each}
    cut = any(info.get("first_rows") for info in tasks.values())
    keys = {info.get("data_key") for info in tasks.values() if info.get("data_key") is not None}
    if len(labels) == 1 and len(keys) > 1:  # data shown alike that is not one dataset (`a/test`, `b/test`)
        labels = shown
    elif len(labels) == 1:  # several tasks' first rows together are no one slice of the split (`first 7 + first 7`)
        return {**each[0], "split": splits.pop() if len(splits) == 1 else None,
                "dataset_config": configs.pop() if len(configs) == 1 else None, "rows": rows,
                "picked": each[0]["picked"] or (cut and len(each) > 1)}
    return {"dataset": " + ".join(labels), "split": None, "local": False, "model_index": False, "rows": rows}


#: How a concatenated head decides the joint view, per `names.JOINT_RULES` entry.
JOINT_RULE_DEFINITIONS = {
    "per_task": "a concatenated head (merged model and ensemble alike) decides by each task's softmax over its own "
                "slice, concatenated, then the argmax",
    "raw": "a concatenated head (merged model and ensemble alike) decides by the argmax over its raw concatenated "
           "logits",
}

DEFINITIONS = {
    "per_task": "argmax within the task's slice of the joint label space, on that task's data",
    JOINT: "argmax over all classes of all tasks, on every task's data together",
    AVERAGE: "mean of the per-task figures (only when a scorer has one for every task)",
    "parent": "with different label sets a parent scores only its own classes: per task on its own task; "
              "joint = a single-task model answering the joint test (right at most on its own task's share); "
              "a merged parent (several tasks): each of its tasks on its own slice, its joint figure decided by the "
              "joint rule over its slices (right at most on its tasks' share)",
    ENSEMBLE: "every parent; different label sets: the heads concatenated in parent order, decided by the joint "
              "rule; same label set: mean of the softmaxes",
    "clip": "zero-shot: cosine similarity of image and class-prompt embeddings times logit_scale",
}


#: What `processors` records, when the models' processors differ.
PROCESSORS_DEFINITION = ("each model is scored on the inputs its own processor makes of the same rows (raw image/text "
                         "columns preprocessed once per distinct processor); `processors` names whose processor "
                         "made each row's inputs: own, another model's (it has none of its own), or given "
                         "(processor=)")


def definitions(joint_rule: str | None, *, processors: bool = False,
                joint_data: Sequence[str] | None = None,
                prompt_templates: Sequence[str] | None = None,
                shared_classes: Sequence[str] | None = None) -> dict[str, str]:
    """What each figure means; `joint_rule` (None: no concatenated head, e.g. CLIP or one shared label set) is
    recorded with the joint view's definition; `processors`: the models' processors differed; `joint_data`: the
    tasks scored when they are not all the model's (the joint view then holds only their rows); `prompt_templates`:
    a CLIP's zero-shot prompts (its figures depend on them: two templates give two sets of figures);
    `shared_classes`: a CLIP's class names of several tasks, whose prompts are one and the same."""
    out = dict(DEFINITIONS)
    if prompt_templates:
        out["prompt_templates"] = " | ".join(prompt_templates)
        out["clip"] = f"{out['clip']}; prompts averaged over the templates {list(prompt_templates)!r}"
    if processors:
        out["processors"] = PROCESSORS_DEFINITION
    if joint_rule is not None:
        out[JOINT] = f"{out[JOINT]}; joint rule {joint_rule!r}: {JOINT_RULE_DEFINITIONS[joint_rule]}"
        out["joint_rule"] = joint_rule
    if shared_classes:  # identical prompts score alike: the joint view cannot tell whose class it picked
        out[JOINT] = (f"{out[JOINT]}; a class named alike in several tasks ({', '.join(shared_classes)}) has one "
                      "prompt for all of them, so predicting it in either task counts as right")
    if joint_data:
        out["joint_data"] = ", ".join(joint_data)
        out[JOINT] = f"{out[JOINT]}; only the data of {out['joint_data']} was scored, not every task's"
    return out
