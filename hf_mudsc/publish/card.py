"""Model card of a merged model, rendered from the Jinja template in `model_cards/` (docs/design.md §8).

The YAML front matter is built as `huggingface_hub.ModelCardData` (so the Hub's metadata rules are the
library's, not ours) and dropped into the template as `{{ card_data }}`; the body reads
`merged.config.mudsc`, `merged.merge_report`, the recipe and optional evaluation results.

Evaluation results (`eval_results=`): a list of `EvalRow`s or dicts with the same keys, one row per
task (and one for the joint task), e.g.::

    {"task": "digits 0-4", "dataset": "sklearn/digits", "split": "test", "metric": "accuracy",
     "merged": 0.93, "parent_a": 0.97, "parent_b": 0.11, "ensemble": 0.95}

`merged` goes into the card's `model-index`; the parents and ensemble appear in the body's table.
In the `model-index` each result's dataset `config` carries the row's task name (`model_index_config`):
the Hub groups results by (task type, dataset, config, split) and keeps one task name per group, so
without it two tasks evaluated on one dataset and split would collapse into one result under the first
task's name. Callers never have to do this themselves. Its dataset is `EvalRow.dataset_label`: a Hub id, a local
folder as `NAME (local folder)`, unnamed in-memory data as `in-memory data` — nothing that reads as a Hub id it is not;
a row with `model_index=False` (a joint figure over several datasets) is in the table only. Scores must be finite.
"""

from __future__ import annotations

import importlib.resources
import inspect
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from transformers.models.auto import modeling_auto

from hf_mudsc._version import __version__
from hf_mudsc.apply.classifier import task_ranges
from hf_mudsc.errors import parent_label, parent_names
from hf_mudsc.load.checks import is_multi_label_head, is_regression_head
from hf_mudsc.load.references import COMMIT_SHA, LICENSE_NOT_READ, OBJECT_REFERENCE, without_userinfo
from hf_mudsc.markdown import (
    LINE_BREAKS,
    longest_backtick_run,
    markdown_cell,
    markdown_code,
    markdown_code_cell,
    markdown_item,
    markdown_text,
)
from hf_mudsc.methods import plugin_module
from hf_mudsc.methods.registry import METHODS
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe, represent_text
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME

DEFAULT_TEMPLATE = "merged_model.md.jinja"
EVALUATION_TEMPLATE = "evaluation.md.jinja"  # the section `update_card_evaluation` replaces
BASE_TAGS = ("merge", "mudsc", "model-merging")
# Pipeline tag -> (model class, processor class) for the card's usage snippet.
_AUTO_CLASSES = {
    "image-classification": ("AutoModelForImageClassification", "AutoImageProcessor"),
    "text-classification": ("AutoModelForSequenceClassification", "AutoTokenizer"),
    "zero-shot-image-classification": ("AutoModel", "AutoProcessor"),
    "feature-extraction": ("AutoModel", "AutoProcessor"),
}
# Auto class -> transformers' table of the class it builds per `model_type` (`modeling_auto`).
_AUTO_MAPPINGS = {
    "AutoModelForImageClassification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Evaluation-result keys of parents after A and B (N-parent merges): parent_c, ..., parent_z, parent_27, ...
_LATER_PARENT = re.compile(r"parent_(?:[c-z]|[1-9][0-9]+)")
_FIRST_ROWS = re.compile(r"first (\d+)")  # `EvalRow.rows_text` of a cut row


@dataclass(frozen=True)
class ParentInfo:
    """One parent as the card shows it: the reference given, and the Hub repo + commit actually used."""

    reference: str
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None

    @classmethod
    def from_any(cls, parent: Any) -> ParentInfo:
        """From a `LoadedParent`-like object (attributes) or a reference string `org/name[@rev]`/folder."""
        if isinstance(parent, ParentInfo):
            return parent
        if isinstance(parent, (str, os.PathLike)):
            reference = os.fspath(parent)
            name, _, revision = reference.partition("@")
            if not Path(reference).exists() and _HUB_ID.match(name):
                sha = revision if COMMIT_SHA.fullmatch(revision or "") else None
                return cls(reference, name, revision or None, sha)
            return cls(reference)
        return cls(
            reference=str(getattr(parent, "reference", None) or getattr(parent, "repo_id", None) or "model"),
            repo_id=getattr(parent, "repo_id", None),
            revision=getattr(parent, "revision", None),
            commit_sha=getattr(parent, "commit_sha", None),
        )

    @property
    def in_memory(self) -> bool:
        """A model given to `merge` as an object that no folder or Hub repo holds (`load.references.object_reference`;
        a local folder's recipe reference is its absolute path): the recipe names it by class and cannot re-load it."""
        path = os.path.expanduser(self.reference)
        return not self.repo_id and not (os.path.isabs(path) or Path(path).exists())

    @property
    def display_name(self) -> str:
        """A Hub parent by its id, a folder by its name, a model object by its class (the recipe's `<X object>`)."""
        found = OBJECT_REFERENCE.match(self.reference)
        if found:
            return found.group(1)
        return self.repo_id or Path(self.reference.rstrip("/\\")).name or self.reference


class FrontMatterDumper(yaml.Dumper):
    """The Dumper `huggingface_hub` writes a card's front matter with (`ModelCardData.to_yaml`), but a name holding a
    Unicode line break written as a YAML escape (`represent_text`): raw, PyYAML reads U+0085 back as a space and the
    Hub's YAML 1.2 reader keeps the indentation written after U+2028/U+2029, so the `model-index` no longer named
    what was evaluated."""


FrontMatterDumper.add_representer(str, represent_text)


def front_matter(data: ModelCardData, line_break: str = "\n") -> str:
    """The card's YAML front matter (without its `---` lines): `data.to_yaml()` written by `FrontMatterDumper`."""
    return yaml.dump(data.to_dict(), Dumper=FrontMatterDumper, sort_keys=False, allow_unicode=True,
                     line_break=line_break).strip()


class MergeCard(ModelCard):
    """A `ModelCard` whose front matter is written by `front_matter`. `ModelCard` writes it anew from `data` each time
    the card is printed or saved, so the card itself must write it, not just the text it is made from."""

    @property
    def content(self) -> str:
        shown = ModelCard.content.fget(self)  # orders `data`'s keys as the text read had them
        line_break = "\r\n" if shown.startswith("---\r\n") else "\n"
        return f"---{line_break}{front_matter(self.data, line_break)}{line_break}---{line_break}{self.text}"

    @content.setter
    def content(self, content: str) -> None:
        ModelCard.content.fset(self, content)


#: How the card names evaluation data given in memory without a name (`dataset=None`): no Hub dataset id.
IN_MEMORY_DATA = "in-memory data"


@dataclass
class EvalRow:
    """One evaluation result (see module docstring); scores are fractions in [0, 1] for accuracy."""

    task: str
    dataset: str | None
    """A Hub dataset's id; a local folder's name (with `local=True`); None: data given in memory, unnamed."""
    merged: float
    metric: str = "accuracy"
    metric_args: Mapping[str, Any] | None = None
    """How the metric was computed (`{"average": "macro"}` for hf-mudsc's f1): the table names it `f1 (macro)`, the
    `model-index` keeps `type: f1` (the Hub's metric id) with that name and these `args`."""
    split: str | None = "test"
    """None: not known (the table shows `—`, the `model-index` names no split)."""
    dataset_config: str | None = None  # the dataset's own config (e.g. `sst2` of `glue`), if it has one
    dataset_revision: str | None = None
    """The Hub revision the figures are of, when the evaluation pinned one (`org/data@REV:test`): the `model-index`'s
    `dataset.revision`, and `@REV` after the dataset in the table."""
    parent_a: float | None = None
    parent_b: float | None = None
    ensemble: float | None = None
    later_parents: tuple[float | None, ...] = ()
    """Scores of parents C, D, ... in merge order (an N-parent merge); as dict keys `parent_c`, `parent_d`, ..."""
    processors: str | None = None
    """When the models' processors differ: whose processor made each column's inputs (`Parent B: own; ...`), shown
    once under the table."""
    local: bool = False
    """The dataset is a local folder: named `NAME (local folder)` in the table and the `model-index`."""
    rows: str | None = None
    """The rows scored (`30`; `first 7` when the data was cut to its first rows, `--num-samples`), shown in the
    table's Rows column; None: not known (no such column when no row knows)."""
    model_index: bool = True
    """False: in the table only. A figure over several datasets (the joint row of tasks evaluated on different
    datasets) has no one dataset to name, and each `model-index` result names one."""
    picked: bool = False
    """The rows are picked out of the split rather than read from its start: a task's rows in one dataset holding
    every task (its task column or joint label ids), or the joint row of several tasks' first rows. Cut to their
    first rows, no `datasets` split string names them, so the `model-index` names no split and says which rows in
    the dataset's name."""

    def __post_init__(self) -> None:
        """Every score a finite number (None: not defined): NaN or inf in the `model-index` or the table would be
        published as a figure of the model."""
        named = [("merged", self.merged), ("parent_a", self.parent_a), ("parent_b", self.parent_b),
                 ("ensemble", self.ensemble),
                 *zip(parent_names(2 + len(self.later_parents))[2:], self.later_parents)]
        for column, value in named:
            if value is None and column != "merged":
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"evaluation result {self.task!r} ({self.metric}): {column} is {value!r}, not a "
                                 "finite number; a card publishes only finite scores (None: not scored)")

    @classmethod
    def from_any(cls, row: EvalRow | Mapping[str, Any]) -> EvalRow:
        if isinstance(row, EvalRow):
            return row
        row = dict(row)
        given = {key for key in row if _LATER_PARENT.fullmatch(key)}
        expected = parent_names(2 + len(given))[2:]
        later = [key for key in expected if key in given]
        if len(later) != len(given):
            missing = next(key for key in expected if key not in given)
            later = sorted(given, key=lambda key: (len(key), key))
            raise ValueError(f"evaluation result has {', '.join(later)} but no {missing}: parents are lettered "
                             f"in merge order without gaps")
        known = {f.name for f in fields(cls)} - {"later_parents"}
        unknown = sorted(set(row) - known - set(later))
        if unknown:
            raise ValueError(f"evaluation result has unknown key(s) {unknown}; valid keys: {sorted(known)} "
                             f"and parent_c, parent_d, ... for more parents")
        scores = tuple(row.pop(key) for key in later)
        return cls(**row, later_parents=scores)

    @staticmethod
    def label_of(dataset: str | None, local: bool) -> str:
        """How the card names data: a Hub dataset by its id, a local folder as `NAME (local folder)`, unnamed data in
        memory as `in-memory data` — neither of the last two reads as (or links to) a Hub dataset."""
        if dataset is None:
            return IN_MEMORY_DATA
        return f"{dataset} (local folder)" if local else dataset

    @staticmethod
    def rows_text(count: int, first: bool) -> str:
        """The Rows cell of `count` rows scored: `30`, or `first 7` when the data was cut to its first rows (a figure
        of part of the data must say so wherever it is published)."""
        return f"first {count}" if first else str(count)

    @property
    def metric_label(self) -> str:
        """The metric as the table and the `model-index` name it: `f1 (macro)` with its args' values, else `f1`."""
        if not self.metric_args:
            return self.metric
        return f"{self.metric} ({', '.join(str(value) for value in self.metric_args.values())})"

    @property
    def dataset_label(self) -> str:
        """The row's data as the table and the `model-index` name it (`label_of`)."""
        return self.label_of(self.dataset, self.local)

    @property
    def dataset_shown(self) -> str:
        """The table's dataset cell: `dataset_label`, `@REV` after it when a revision was pinned."""
        return self.dataset_label + (f"@{self.dataset_revision}" if self.dataset_revision else "")

    @property
    def parent_scores(self) -> tuple[float | None, ...]:
        """Every parent's score in merge order (A, B, C, ...)."""
        return (self.parent_a, self.parent_b, *self.later_parents)

    @property
    def cut(self) -> bool:
        """The figure is of the data's first rows only (`--num-samples`): its Rows cell says `first N`."""
        return (self.rows or "").startswith("first ")

    @property
    def model_index_split(self) -> str | None:
        """The `model-index` split: a figure of the first N rows names the `datasets` split string that reads exactly
        them (`test[:N]`, `test[5:15]` cut to 5 -> `test[5:10]`); None when none can (rows picked by task, a percent
        slice, no split known): the index has no field for a row count, and a leaderboard reads the split as the
        whole, so no split is named rather than a false one (`model_index_dataset_name` then says which rows)."""
        if not self.cut:
            return self.split
        first = _FIRST_ROWS.fullmatch(self.rows or "")
        if self.picked or first is None or self.split is None:
            return None
        return first_rows_split(self.split, int(first.group(1)))

    @property
    def model_index_dataset_name(self) -> str:
        """The `model-index` dataset name (its free-text pretty name): `dataset_label`, and for a figure of part of
        the data that no split string names, which rows (`pets (local folder), rows: first 10`)."""
        if self.cut and self.model_index_split is None:
            return f"{self.dataset_label}, rows: {self.rows}"
        return self.dataset_label

    @property
    def model_index_config(self) -> str:
        """The `model-index` dataset config: the task name, after the dataset's own config when there is
        one (`sst2 (topic)`); a config equal to the task name is not repeated."""
        if not self.dataset_config or self.dataset_config == self.task:
            return self.task
        return f"{self.dataset_config} ({self.task})"


_SPLIT_NAME = re.compile(r"[\w.-]+")
_ROW_SLICE = re.compile(r"([\w.-]+)\[(-?\d*):(-?\d*)\]")


def first_rows_split(split: str, count: int) -> str | None:
    """The `datasets` split string reading the first `count` rows of `split`: `test` -> `test[:5]`, `test[5:15]` ->
    `test[5:10]`, `test[-10:]` -> `test[-10:-5]`; None when no string names exactly them without knowing the split's
    size (a percent slice, `train+test`, a rounding option): `test[5:15][:5]` is no split `datasets` reads."""
    if _SPLIT_NAME.fullmatch(split):
        return f"{split}[:{count}]"
    sliced = _ROW_SLICE.fullmatch(split)
    if sliced is None:
        return None
    name, start_text, stop_text = sliced.groups()
    start = int(start_text) if start_text else 0
    stop = int(stop_text) if stop_text else None
    end = start + count  # `count` rows were read from the slice: they are there, whatever the split's size
    if stop is not None and (start < 0) == (stop < 0) and end > stop:
        return None  # more rows than the slice holds: not its first rows
    if start < 0 and end == 0:
        return f"{name}[{start}:]"
    return f"{name}[{start or ''}:{end}]" if start else f"{name}[:{end}]"


def pipeline_tag_for(model_or_class: Any) -> str:
    """The Hub pipeline tag of a transformers model class (from its name)."""
    name = model_or_class if isinstance(model_or_class, str) else (
        model_or_class.__name__ if isinstance(model_or_class, type) else type(model_or_class).__name__
    )
    if name.endswith("ForImageClassification"):
        return "image-classification"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    if name == "CLIPModel":
        return "zero-shot-image-classification"
    return "feature-extraction"


def usage_model_class(model: Any) -> str:
    """The class the card's usage snippet loads the merged model with: its pipeline tag's Auto class when that
    builds the merged model's own class (what `save_pretrained` writes to `config.architectures`) for its
    `model_type`, else that class itself, imported from transformers — `AutoModel` loads a
    `CLIPVisionModelWithProjection` folder as a `CLIPVisionModel`, dropping the projection."""
    name = type(model).__name__
    auto = _AUTO_CLASSES[pipeline_tag_for(model)][0]
    built = getattr(modeling_auto, _AUTO_MAPPINGS[auto], {}).get(getattr(model.config, "model_type", None))
    return auto if name in (built if isinstance(built, (tuple, list)) else (built,)) else name


def usage_model_arguments(model: Any) -> dict[str, bool]:
    """Constructor arguments `from_pretrained` must be given to rebuild the merged model, which `config.json`
    cannot record: `add_pooling_layer=False` for an encoder merged without a pooler (else transformers adds a
    randomly initialised one), `use_mask_token=True` for a ViT holding its mask token (else it is dropped)."""
    accepted = inspect.signature(type(model).__init__).parameters
    arguments = {}
    if "add_pooling_layer" in accepted and getattr(model, "pooler", True) is None:
        arguments["add_pooling_layer"] = False
    if "use_mask_token" in accepted and getattr(getattr(model, "embeddings", None), "mask_token", None) is not None:
        arguments["use_mask_token"] = True
    return arguments


def head_kind(config: Any) -> str:
    """How the classifier's outputs are read, for the card's text and snippet: `regression` (each output a score),
    `multi_label` (a sigmoid per label) or `softmax` (one softmax over a task's classes). The parents share one kind
    (`load.parents` refuses mixed heads), and the merged config keeps it."""
    if is_regression_head(config):
        return "regression"
    return "multi_label" if is_multi_label_head(config) else "softmax"


def calibration_dataset_id(calibration_spec: str | None) -> str | None:
    """The Hub dataset id in a calibration spec `repo[:config]:split`, or None for local data."""
    if not calibration_spec:
        return None
    if Path(calibration_spec).exists():
        return None
    repo = calibration_spec.split(":", 1)[0].partition("@")[0]  # `org/ds@revision:split` pins a revision of `org/ds`
    if not repo or Path(repo).exists() or repo.startswith((".", "/", "~")) or "\\" in repo:
        return None
    return repo if _HUB_DATASET_ID.match(repo) else None


def template_path(name: str = DEFAULT_TEMPLATE) -> Path:
    """The template file: shipped inside the wheel (`hf_mudsc/model_cards/`) or the source tree's
    top-level `model_cards/` (editable installs and checkouts)."""
    shipped = importlib.resources.files("hf_mudsc") / "model_cards" / name
    if shipped.is_file():
        return Path(str(shipped))
    source = Path(__file__).resolve().parents[2] / "model_cards" / name
    if source.is_file():
        return source
    raise FileNotFoundError(
        f"model card template {name!r} not found in the package or in {str(source.parent)!r}; "
        "reinstall hf-mudsc (the template ships as package data)"
    )


def card_data(
    model: Any,
    recipe: Recipe,
    parents: Sequence[ParentInfo],
    *,
    model_name: str,
    eval_results: Sequence[EvalRow] = (),
) -> ModelCardData:
    """The YAML front matter (docs/design.md §8)."""
    mudsc = dict(getattr(model.config, "mudsc", None) or {})
    pipeline_tag = pipeline_tag_for(model)
    tags = list(BASE_TAGS)
    method = mudsc.get("method") or recipe.method
    for extra in (method, pipeline_tag, getattr(model.config, "model_type", None)):
        if extra and extra not in tags:
            tags.append(extra)
    base_models = [p.repo_id for p in parents if p.repo_id]
    base = ParentInfo.from_any(recipe.base) if recipe.base else None
    if base is not None and base.repo_id and base.repo_id not in base_models:
        base_models.append(base.repo_id)  # the common base too: the merge is built from it (task vectors)
    # Listed only if the merge read it: `datasets` names what the model was built from (a method reading no data,
    # no refit: the data was given, not read; the body says so).
    dataset = calibration_dataset_id(recipe.calibration) if mudsc.get("num_calibration_samples") != 0 else None
    data: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": pipeline_tag,
        "tags": tags,
    }
    license = common_license(mudsc)
    if license is not None:
        data["license"] = license
    if base_models:
        data["base_model"] = base_models
        data["base_model_relation"] = "merge"
    if dataset:
        data["datasets"] = [dataset]
    card = ModelCardData(**data)
    if eval_results:
        set_eval_results(card, eval_results, model_name=model_name)
    return card


def set_eval_results(data: ModelCardData, eval_results: Sequence[EvalRow], *, model_name: str) -> ModelCardData:
    """Put the results into the front matter (in place): `model-index` and `metrics`.

    Replaces any earlier results; every other key (tags, base models, the calibration dataset...) is kept. The
    evaluation datasets are named by the model-index alone: the front matter's `datasets` lists what the model was
    built from (the Hub documents it as the datasets used to train the model), here the calibration data.
    """
    rows = [EvalRow.from_any(r) for r in eval_results]
    data.metrics = sorted({row.metric for row in rows}) or None
    data.model_name = model_name
    data.eval_results = [
        EvalResult(
            task_type=data.pipeline_tag or "other",
            task_name=row.task,
            dataset_type=row.dataset_label,
            dataset_name=row.model_index_dataset_name,
            dataset_config=row.model_index_config,
            dataset_split=row.model_index_split,
            dataset_revision=row.dataset_revision,
            metric_type=row.metric,
            metric_name=row.metric_label,
            metric_args=dict(row.metric_args) if row.metric_args else None,
            metric_value=float(row.merged),
        )
        for row in rows if row.model_index
    ] or None
    return data


def common_license(mudsc: Mapping[str, Any]) -> str | None:
    """The licence the card declares: the one every parent's (and the base's) model card declares, all of them Hub
    repos (the Hub checked those values; a local card's `license` may be one the Hub refuses, which would fail the
    push), else none — the merged weights derive from each parent, and a licence hf-mudsc picked could grant more
    than one of them does. `other (NAME)` and a card not read declare none either."""
    with_base = bool(mudsc.get("base"))
    declared = [*(mudsc.get("parent_licenses") or [None]), *([mudsc.get("base_license")] if with_base else [])]
    pinned = [*(mudsc.get("parent_revisions") or [None]), *([mudsc.get("base_revision")] if with_base else [])]
    if (len(set(declared)) != 1 or declared[0] is None or declared[0] == LICENSE_NOT_READ
            or declared[0].startswith("other") or not all(pinned)):
        return None
    return declared[0]


def license_note(mudsc: Mapping[str, Any], letters: Sequence[str]) -> str | None:
    """The card's line on the parents' licences when any declares one and the card declares none (they differ, a
    card was not read, or a parent is no Hub repo); None otherwise."""
    declared = [*zip(letters, mudsc.get("parent_licenses") or []),
                *([("base", mudsc.get("base_license"))] if mudsc.get("base") else [])]
    if not any(license not in (None, LICENSE_NOT_READ) for _, license in declared) or common_license(mudsc):
        return None

    def said(license: str | None) -> str:
        return "its card not read" if license == LICENSE_NOT_READ else markdown_code(license) if license \
            else "none declared"

    listed = ", ".join(f"{who}: {said(license)}" for who, license in declared)
    return (f"**Licences**: the parents' model cards declare {listed}. The merged weights derive from each of them, "
            "so this card declares no licence: check every parent's terms before using or publishing the merge.")


def hub_url() -> str:
    """The Hub the card links to (`HF_ENDPOINT`), without the credentials a mirror's URL may carry."""
    return without_userinfo(constants.ENDPOINT).rstrip("/")


def render_card(
    model: Any,
    recipe: Recipe,
    *,
    parents: Iterable[Any] | None = None,
    eval_results: Iterable[EvalRow | Mapping[str, Any]] | None = None,
    model_name: str | None = None,
    template: str | os.PathLike | None = None,
    plots: Iterable[Mapping[str, str]] = (),
    processor_saved: bool = True,
    revision: str | None = None,
) -> MergeCard:
    """Render the card of a merged model.

    Args:
        model: the merged `PreTrainedModel` (reads `config.mudsc` and `merge_report` when present).
        recipe: the recipe that made it (shown verbatim; parents pinned).
        parents: `LoadedParent`s / `ParentInfo`s / reference strings; default: `recipe.models`.
        eval_results: optional evaluation rows (module docstring); they fill the `model-index`.
        model_name: the title (default: the push target, else a name from the parents).
        template: another template file (default: `model_cards/merged_model.md.jinja`).
        plots: the diagnostic PNGs written next to the card, as `{"title", "caption", "link"}` with `link` relative
            to the card (`plots/match_quality.png`); they fill its "Diagnostics" section.
        processor_saved: a processor is saved with the model; without one the usage snippet loads none (it
            must run as written on the folder).
        revision: the branch of the push target the model is pushed to, or whose pull request it is in (not
            main): the usage snippet loads it from there (`from_pretrained(repo, revision=...)`), else it would load
            main's model.

    Returns:
        A `huggingface_hub.ModelCard` (a `MergeCard`: `str(card)` is the README; `card.save(path)`, `card.data`).
    """
    infos = [ParentInfo.from_any(p) for p in (parents if parents is not None else recipe.models)]
    rows = [EvalRow.from_any(r) for r in (eval_results or [])]
    name = model_name or recipe.push_to_hub or "-".join(["merged"] + [p.display_name.split("/")[-1]
                                                                       for p in infos])
    data = card_data(model, recipe, infos, model_name=name, eval_results=rows)
    mudsc = dict(getattr(model.config, "mudsc", None) or {})
    report = getattr(model, "merge_report", None)
    method = METHODS.get(mudsc.get("method") or recipe.method)
    group_values = mudsc.get("group_match_values") or (
        dict(zip(report.group_names, report.group_values)) if report is not None else {}
    )
    # Share of each group's merged units that fuse a unit of A with one of B (what `hf-mudsc inspect` shows next to
    # the match value): zip's value also counts fusions within one parent, so it alone does not say the parents agree.
    diagnostics = getattr(report, "diagnostics", None)
    cross_fractions = {g.name: g.cross_fraction for g in diagnostics.groups} if diagnostics is not None else {}
    if not any(value is not None for value in cross_fractions.values()):
        cross_fractions = {}
    path = Path(template) if template is not None else template_path()
    letters = [parent_label(i) for i in range(len(infos))]
    shown_recipe, local = recipe.shown()  # local folders by name, as the recipe pushed to the Hub names them
    local_names = [entry.shown for entry in local]
    num_samples = mudsc.get("num_calibration_samples", getattr(report, "num_samples", None))
    base = ParentInfo.from_any(recipe.base) if recipe.base else None
    settings = settings_rows(mudsc, shown_recipe, {
        "method": method, "mudsc": mudsc, "hub_url": hub_url(),
        "base_source": mudsc.get("base_source"), "base_name": base.display_name if base is not None else None,
        "calibration_dataset": calibration_dataset_id(recipe.calibration), "num_samples": num_samples})
    recipe_yaml = shown_recipe.to_yaml(reproducible=True).rstrip("\n")
    content = _environment(path.parent).get_template(path.name).render(
        card_data=front_matter(data),
        model_name=name,
        model_class=type(model).__name__,
        pipeline_tag=data.pipeline_tag,
        auto_model=usage_model_class(model),  # the name custom templates know; not always an Auto class
        model_arguments=usage_model_arguments(model),
        head_kind=head_kind(model.config),
        auto_processor=_AUTO_CLASSES[data.pipeline_tag][1] if processor_saved else None,
        repo_id=recipe.push_to_hub,
        # A Python string literal (json's quoting is Python's for a branch name): `, revision="dev"` after the repo.
        revision_argument=(f", revision={json.dumps(revision)}" if recipe.push_to_hub and revision
                           and revision != "main" else ""),
        parents=infos,
        parent_letters=letters,
        license_note=license_note(mudsc, letters),
        base=base,
        method_choice_reason=mudsc.get("method_choice_reason"),
        hub_url=hub_url(),
        method=method,
        method_name=mudsc.get("method") or recipe.method,
        plugin_module=plugin_module(mudsc.get("method") or recipe.method),
        matcher=mudsc.get("matcher", recipe.matcher),
        alpha=mudsc.get("alpha", recipe.alpha),
        zip_decay=mudsc.get("zip_decay"),
        zip_budget=mudsc.get("zip_budget"),
        independent_heads=mudsc.get("independent_heads", recipe.independent_heads),
        reference_compat=mudsc.get("reference_compat", recipe.reference_compat),
        seed=mudsc.get("seed", recipe.seed),
        calibration=shown_recipe.calibration,
        calibration_dataset=calibration_dataset_id(recipe.calibration),
        num_samples=num_samples,
        settings=settings,
        sweeps=getattr(report, "sweeps", None),
        start_objectives=mudsc.get("start_objectives") or getattr(report, "starts", None) or {},
        solve_start=mudsc.get("solve_start", getattr(report, "solve_start", None)),
        parent_relation=relation_text(mudsc.get("parent_relation")),
        group_values=group_values,
        cross_fractions=cross_fractions,
        merge_warnings=mudsc.get("warnings", getattr(report, "warnings", None)) or [],
        changed_after_merge=bool(mudsc.get("changed_after_merge")),
        processor_note=mudsc.get("processor_note"),
        task_label_ranges=task_ranges(model.config),
        num_labels=len(getattr(model.config, "id2label", None) or {}),
        head_reordered=[parent_label(i) for i, moved in enumerate(mudsc.get("head_reordered") or []) if moved],
        eval_rows=rows,
        **rows_columns(rows),
        recipe_yaml=recipe_yaml,
        recipe_fence="`" * max(3, longest_backtick_run(recipe_yaml) + 1),  # no line of the recipe can close it
        local_names=[markdown_code(name) for name in local_names],
        recipe_filename=RECIPE_FILENAME,
        version=mudsc.get("version", __version__),
        plots=[dict(plot) for plot in plots],
        diagnostics_filename=DIAGNOSTICS_FILENAME,
    )
    return MergeCard(content)


def relation_text(relation: Mapping[str, Any] | None) -> str | None:
    """The card's "Parent relation" cell from `config.mudsc["parent_relation"]` (None: merged before it existed)."""
    if not relation:
        return None
    return f"{relation['relation']} (relative weight distance {relation['weight_distance']:.3g})"


def settings_rows(mudsc: Mapping[str, Any], recipe: Recipe, context: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The card's settings table, (label, cell) per row: every option declared with a `card` row
    (`hf_mudsc.options.CardRow`), in row order; options sharing a label share a row, a None cell hides it.

    `mudsc`: the merged model's `config.mudsc` (what the merge used); `recipe`: the recipe as the card shows it."""
    rows = sorted(((f.metadata["card"], f.name) for f in recipe.option_fields() if f.metadata["card"] is not None),
                  key=lambda row: row[0].position)
    values = {}
    for row, name in rows:
        if row.source == "recipe":
            values[name] = getattr(recipe, name)
        elif row.source == "config":
            values[name] = mudsc.get(name)
        else:
            values[name] = mudsc.get(name, getattr(recipe, name))
    # A folder's or model's name (calibration data, base) is put in a code span or link by its row's text; every
    # other value is put in the cell as it is
    names = {f.name for f in recipe.option_fields() if f.metadata["card"] is not None and
             f.metadata["card"].source != "recipe" and f.metadata["kind"] != "model"}
    values = {name: as_text(value) if name in names else value for name, value in values.items()}
    context = {**context, **{key: as_text(context.get(key)) for key in ("mudsc", "num_samples", "base_source")},
               "settings": values}
    cells: dict[str, list[str | None]] = {}
    for row, name in rows:
        cells.setdefault(row.label, []).append(row.text(values[name], context))
    return [(label, table_safe(" / ".join(texts))) for label, texts in cells.items() if texts[0] is not None]


def as_text(value: Any) -> Any:
    """`value` (a setting, or `config.mudsc`, nested) with every string that Markdown would read as more than its text
    replaced by its `markdown_cell`: a settings cell puts the values into its Markdown as they are, and a folder's
    `config.json` (`hf-mudsc evaluate` renders the card of a folder without one) can hold any text there. The values a
    merge records (numbers, `auto`, method and dtype names) are left as they are."""
    if isinstance(value, str):
        return value if markdown_cell(value) == value else markdown_cell(value)
    if isinstance(value, Mapping):
        return {key: as_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_text(item) for item in value)
    return value


def table_safe(cell: str) -> str:
    """A cell that keeps its Markdown (links, code spans) but stays in its row: line breaks as spaces and every `|`
    escaped (GFM reads `\\|` as a pipe inside code spans and links too) — a local folder's name can hold either."""
    return re.sub(r"(?<!\\)\|", r"\\|", LINE_BREAKS.sub(" ", cell))


def _environment(folder: Path) -> jinja2.Environment:
    """Templates from `folder`, then the shipped ones (a custom template may include the shipped sections); the
    filters `cell` and `code_cell` put a name into a table cell safely (`markdown_cell`, `markdown_code_cell`), `item`
    into a list item (`markdown_item`)."""
    environment = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(folder)),
                                    jinja2.FileSystemLoader(str(template_path().parent))]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    environment.filters["cell"] = markdown_cell
    environment.filters["code_cell"] = markdown_code_cell
    environment.filters["item"] = markdown_item
    return environment


def evaluation_section(eval_results: Iterable[EvalRow | Mapping[str, Any]]) -> str:
    """The card's `## Evaluation` section (the shipped `evaluation.md.jinja`), '' without results: one column
    per parent (at least A and B)."""
    rows = [EvalRow.from_any(r) for r in eval_results]
    count = max([2, *(len(row.parent_scores) for row in rows)])
    return _environment(template_path().parent).get_template(EVALUATION_TEMPLATE).render(
        eval_rows=rows, parent_letters=[parent_label(i) for i in range(count)], **rows_columns(rows))


def rows_columns(rows: Sequence[EvalRow]) -> dict[str, bool]:
    """Whether the evaluation table shows a Rows column (some row knows how many rows it scored) and the note that
    `first N` means the data was cut to its first rows (some row was)."""
    return {"show_rows": any(row.rows for row in rows),
            "cut_rows": any((row.rows or "").startswith("first ") for row in rows)}


def update_card_evaluation(
    card: ModelCard | str,
    eval_results: Iterable[EvalRow | Mapping[str, Any]],
    *,
    model_name: str | None = None,
) -> MergeCard:
    """An existing card with new evaluation results: only its `## Evaluation` section and `model-index` change.

    Everything else the merge wrote (parents, settings, sweeps, usage, recipe, datasets, tags) is kept as it
    is. The section replaces an earlier one, or goes before `## Usage` (at the end when there is none).
    """
    card = card if isinstance(card, ModelCard) else ModelCard(card)
    rows = [EvalRow.from_any(r) for r in eval_results]
    title = re.search(r"^# (.+)$", card.text, flags=re.MULTILINE)
    name = model_name or card.data.model_name or (markdown_text(title.group(1).strip()) if title else "merged-model")
    data = set_eval_results(card.data, rows, model_name=name)
    section = evaluation_section(rows)
    body = card.text
    existing = re.search(r"^## Evaluation[ \t]*\n.*?(?=^## |\Z)", body, flags=re.MULTILINE | re.DOTALL)
    if existing:
        body = body[:existing.start()] + section + body[existing.end():]
    else:
        usage = re.search(r"^## Usage[ \t]*$", body, flags=re.MULTILINE)
        if usage:
            body = body[:usage.start()] + section + body[usage.start():]
        else:
            body = body.rstrip("\n") + "\n\n" + section
    return MergeCard(f"---\n{front_matter(data)}\n---\n{body}")
