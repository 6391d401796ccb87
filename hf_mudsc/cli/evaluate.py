"""`hf-mudsc evaluate DIR --dataset [TASK=]SPEC ...`: a merged model next to its parents and their ensemble.

Which data scores which task (the task names are the keys of the merged model's `config.task_label_ranges`,
printed by `--help`'s error when a name is wrong):

* `--dataset TASK=SPEC`, once per task: each dataset holds one task, labels are that task's own class ids
  (0..k-1, as the parent was trained) or class names.
* `--dataset SPEC` once per task, without names: assigned to the tasks in order (A's task first).
* `--dataset SPEC` once, for a model with several tasks: the dataset holds every task. With
  `--task-column COL` the column names each row's task (task name or index) and labels are task-local;
  without it, labels are ids of the merged model's joint head (task = the range the id falls in).
* A merged model with ONE shared label set (no task ranges): every `--dataset` is scored on that label set.

SPEC is `repo_or_path[:config]:split` (a Hub dataset, an imagefolder, a data file or a `save_to_disk` folder).
DIR may also be a Hub id `org/name[@revision]` (downloaded like a parent: pinned commit, safetensors only, no
remote code; its parents come from the recipe in the repo, which may name Hub ids or bare folder names found here,
never another path of this machine). Results are printed, written to `DIR/eval_results.json` and put into
DIR/README.md, always together (so a push never sends a card and a results file of different runs; `--output-json
PATH` gets a copy besides): only the card's Evaluation section and its `model-index` are replaced, the rest of the
card stays as the merge wrote it; the accuracy chart the card links (DIR/plots/accuracy.png, when hf-mudsc drew one)
is redrawn from the new results. `--no-card` leaves the folder alone: the results go only to `--output-json PATH`
(never a file in DIR nor in another folder hf-mudsc wrote). A folder hf-mudsc did not write (no
marker: a `save_pretrained` fine-tune) is never written into: refused unless `--no-card`. A Hub id has no folder:
its results are printed and written only to `--output-json PATH`.
Metrics other than the shipped ones run their own script: they need `--trust-remote-code`.
Under `accelerate launch`/`torchrun` every process scores a shard; the main process writes.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hf_mudsc.calibrate.dataset_spec import DatasetSpec, missing_local_data
from hf_mudsc.cli.arguments import path_text
from hf_mudsc.cli.merge import option_argument
from hf_mudsc.errors import EvaluationError, UsageError, escaped, parent_label
from hf_mudsc.evaluate.names import (
    AVERAGE,
    DEFAULT_PROMPT,
    JOINT,
    JOINT_RULES,
    RESULTS_FILENAME,
    SHIPPED_METRIC_ARGS,
    SHIPPED_METRIC_NAMES,
    check_metric_names,
    check_prompt_templates,
    refuse_token_names,
)
from hf_mudsc.load.hub_calls import hub_error_line
from hf_mudsc.load.references import hide_tokens, looks_like_path, parse_reference
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.folder import check_not_replaced, weights_fingerprint, write_file_atomically
from hf_mudsc.publish.hub import CARD_FILENAME

EPILOG = """\
which dataset scores which task (task names: the keys of the model's config.task_label_ranges —
for a merge of org/vit-cars and org/vit-pets, vit-cars and vit-pets):
  --dataset TASK=SPEC (repeat)   one dataset per task; labels = the task's own class ids (0..k-1) or names
  --dataset SPEC (one per task)  the same, assigned to the tasks in order (A's task first)
  --dataset SPEC (once)          one dataset holding every task: labels = ids of the merged model's joint
                                 head, or, with --task-column COL, COL names each row's task (name or index)
                                 and labels are task-local
examples:
  hf-mudsc evaluate merged --dataset vit-cars=org/cars:test --dataset vit-pets=org/pets:test
  hf-mudsc evaluate merged --dataset ./joint_test --task-column task --label-column label
  hf-mudsc evaluate org/merged@v1 --dataset vit-cars=org/cars:test --dataset vit-pets=org/pets:test --output-json r.json
results: printed, written to DIR/eval_results.json and put into DIR/README.md together (the Evaluation section and
the model-index; every other part of the card is kept), and to --output-json PATH besides; --no-card leaves the
folder alone (results only to --output-json PATH). For a Hub id the results are printed and written only to
--output-json PATH; the Hub repo and its card are never changed (push a local folder to publish them).
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Real defaults shown in the flag help (not None/False, not twice); the epilog's layout kept."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _Formatter
    parser.epilog = EPILOG
    parser.add_argument("model", metavar="DIR", type=path_text,
                        help="the merged model: a folder a merge wrote, or a Hub id org/name[@revision] "
                        "(safetensors only, no remote code; the parents come from its recipe)")
    parser.add_argument(
        "--dataset", "-d", action="append", metavar="[TASK=]SPEC", required=True,
        help="evaluation data `repo_or_path[:config]:split`, optionally prefixed by the task it scores; "
        "repeat per task (see below for how datasets map to tasks)")
    parser.add_argument("--task-column", metavar="COL",
                        help="with one dataset for several tasks: the column naming each row's task "
                        "(name or index)")
    parser.add_argument("--label-column", metavar="COL", help="label column (default: label or labels)")
    parser.add_argument("--image-column", metavar="COL", help="raw image column (default: image or img)")
    parser.add_argument("--text-column", metavar="COL",
                        help="raw text column (default: text or sentence), or two separated by a comma read as text "
                        "pairs, e.g. sentence1,sentence2")
    parents = parser.add_mutually_exclusive_group()
    parents.add_argument("--parents", nargs="+", metavar="PARENT",
                         help="the parents in merge order, two or more: A B [C ...] (default: the models of "
                         "DIR/mudsc_recipe.yaml)")
    parents.add_argument("--no-parents", action="store_true", help="score the merged model alone")
    parser.add_argument("--no-ensemble", action="store_true", help="do not score the parents' ensemble")
    parser.add_argument("--shared-processor", action="store_true",
                        help="score every model on the inputs of the merged model's processor (default: each model "
                        "on its own processor's, so a parent whose processor differs is scored on the inputs it "
                        "was trained on)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help=f"metric (repeatable; shipped, offline: {', '.join(SHIPPED_METRIC_NAMES)}; any other "
                        "name, folder or Space goes through evaluate.load, which runs its script: needs "
                        "--trust-remote-code) (default: accuracy)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow --metric names that are not shipped: their Python script is downloaded "
                        "or read and RUN (only for code you trust)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="rows per forward pass")
    parser.add_argument("--num-samples", type=int, metavar="N",
                        help="score only the first N rows of each task (the card's table says `first N`)")
    parser.add_argument("--class-names", action="append", metavar="TASK=NAME,NAME,...",
                        help="CLIP zero-shot: the class names of a task (default: the label column's "
                        "ClassLabel names)")
    parser.add_argument("--prompt-template", action="append", metavar="TEXT",
                        help=f"CLIP zero-shot prompt with {{}} for the class name; repeat to average several "
                        f"(default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--joint-rule", choices=JOINT_RULES, default="per_task",
                        help="how a concatenated head (merged model and ensemble alike) decides the joint view: "
                        "per_task = each task's softmax, then the argmax (default); raw = the argmax over the "
                        "raw concatenated logits, what a transformers pipeline does")
    # type: `--output-json=~/r.json` gets no shell expansion of `~` (after `=`)
    parser.add_argument("--output-json", metavar="PATH", type=os.path.expanduser,
                        help=f"also write the results here (DIR/{RESULTS_FILENAME} is always written with the "
                        "card; for a Hub id, or with --no-card, the results are only printed unless this names a "
                        "file)")
    # merge's flag, as merge declares it (with evaluate's help): the refusal of pickle-only weights names it
    flags, keywords = option_argument(MergeOptions.option_field("allow_pickle"), "evaluate")
    parser.add_argument(*flags, **keywords)
    parser.add_argument(
        "--token", metavar="TOKEN", default=argparse.SUPPRESS,
        help="Hub token for a private or gated model, parents or datasets (default: HF_TOKEN or the stored `hf auth "
        "login`; prefer those: a token on the command line is visible to other users of the machine); never logged "
        "or written")
    parser.add_argument("--no-card", action="store_true",
                        help=f"leave the folder alone: neither DIR/README.md (the model card's model-index) nor "
                        f"DIR/{RESULTS_FILENAME} is changed; the results go to --output-json PATH")


def _split_task(value: str) -> tuple[str | None, str]:
    """`TASK=SPEC` -> (TASK, SPEC); a prefix holding a path separator or ':' is part of the spec instead."""
    head, sep, rest = value.partition("=")
    if sep and rest and _is_task_name(head):
        return head, rest
    return None, value


def _is_task_name(head: str) -> bool:
    """Whether the text before a `--dataset` value's '=' names a task (no path separator or ':', which a spec has)."""
    return bool(head) and not re.search(r"[/\\:]", head)


def _empty_task_spec(value: str) -> bool:
    """Whether `value` is `TASK=` with nothing after '=' (`-d "task_0=$UNSET"`), which `_split_task` reads as a whole
    spec, refused only once the model was loaded; a file or folder of that very name is a spec."""
    head, sep, rest = value.partition("=")
    return bool(sep) and not rest.strip() and _is_task_name(head) and not os.path.exists(value)


def _class_names(values: list[str] | None) -> dict[str, list[str]] | None:
    if not values:
        return None
    out = {}
    for value in values:
        task, sep, names = value.partition("=")
        if not sep or not task or not names:
            raise ValueError(f"--class-names {value!r}: use TASK=NAME,NAME,... (e.g. pets=cat,dog)")
        if task in out:
            raise ValueError(f"--class-names names task {task!r} twice; give each task's class names once")
        out[task] = [n.strip() for n in names.split(",") if n.strip()]
    return out


def _parents(args: argparse.Namespace, folder: Path | None) -> list[str] | None:
    if args.no_parents:
        return None
    if args.parents:
        return list(args.parents)
    from hf_mudsc.publish.recipe import RECIPE_FILENAME

    recipe = folder / RECIPE_FILENAME if folder is not None else None
    if recipe is None or not recipe.is_file():
        print("No --parents and no merge recipe next to the model: scoring the merged model alone.")
        return None
    return recipe_parents(recipe, args.model)


def recipe_parents(path: Path, model: str, *, from_hub: bool = False) -> list[str]:
    """The parents the merge recipe at `path` names, in merge order.

    A recipe pushed from local parents names them by folder name only (`publish.recipe.published_text`): no load can
    find them elsewhere, so unless a folder of that name is here, the user is asked for `--parents` in one line
    instead of getting a load failure of a folder name. `from_hub`: the recipe came from a Hub repo, which may not
    point hf-mudsc at a folder of this machine (`check_hub_recipe_parents`)."""
    from hf_mudsc.publish.recipe import Recipe, unresolved_published_entries

    recipe = Recipe.load(path)
    listed = unresolved_published_entries(path.read_text(encoding="utf-8"), recipe)
    local = [(entry.index, entry.given) for entry in listed if entry.key == "models" and entry.index is not None]
    if local:
        named = ", ".join(f"{parent_label(index)} `{' '.join(name.split())}`" for index, name in local)
        several = len(local) > 1
        raise ValueError(
            f"the merge recipe of {model!r} names parent{'s' if several else ''} {named} by folder name only "
            f"({'local folders' if several else 'a local folder'} on the machine that merged; no such folder here): "
            "pass --parents with every parent's path or Hub id in merge order (A B ...), or --no-parents"
        )
    if from_hub:
        check_hub_recipe_parents(list(recipe.models), model)
    return list(recipe.models)


def missing_parents(references: Sequence[str], allow_pickle: bool) -> list[tuple[bool, str]]:
    """The parents that name a folder of this machine the loader would not find (`(True, phrase)`), or would refuse
    (`(False, phrase)`: pickle-only weights without --allow-pickle), each said as "parent A `./gone`: no
    folder ...": before the merged model loads — a merged model of gigabytes is read (or downloaded) in minutes, and the
    loader stops at the first."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.weight_files import weights_format

    problems = []
    for index, reference in enumerate(references):
        try:
            name, revision = parse_reference(reference)
        except LoadError:  # not a reference at all: the loader says why
            continue
        if revision is not None or not looks_like_path(name):  # a Hub id, as the loader reads it
            continue
        folder = Path(name).expanduser()
        shown_as = f"parent {parent_label(index)} `{' '.join(reference.split())}`"
        if not folder.is_dir():
            problems.append((True, f"{shown_as}: no folder {str(folder.absolute())!r}"))
            continue
        try:
            weights_format(reference, [p.name for p in folder.iterdir() if p.is_file()], allow_pickle)
        except LoadError as error:
            problems.append((False, f"{shown_as}: {error}"))
        except OSError:  # unreadable: the loader says why
            continue
    return problems


def check_hub_recipe_parents(parents: list[str], model: str) -> None:
    """A recipe downloaded from the Hub names each parent by a Hub id, or by a bare folder name (a merge pushed from
    local folders: the folder of that name in the current directory is loaded, README's documented way). Any other
    path (`/abs`, `../x`, `~/x`, `a/b` found here) would have a repo on the Hub pick a folder of this machine to
    load and score: refused in one line asking for `--parents`."""
    from hf_mudsc.load.parents import hub_id_only

    def safe(entry: str) -> bool:
        return hub_id_only(entry) or (re.fullmatch(r"[\w.-]+", entry) is not None and entry not in (".", ".."))

    paths = [(index, str(entry)) for index, entry in enumerate(parents) if not safe(str(entry))]
    if paths:
        named = ", ".join(f"{parent_label(index)} `{' '.join(entry.split())}`" for index, entry in paths)
        raise ValueError(
            f"the merge recipe of {model!r} names parent{'s' if len(paths) > 1 else ''} {named} by a path of this "
            "machine, and a recipe from the Hub may not point hf-mudsc at a local folder: pass --parents with every "
            "parent's path or Hub id in merge order (A B ...), or --no-parents"
        )


def _datasets(
    args: argparse.Namespace, task_names: list[str], ranges: dict | None, clip: bool = False
) -> dict[str, Any] | list[Any]:
    """The --dataset flags -> evaluate_merge's datasets_per_task (opened lazily: bad specs fail fast). Flags that do
    not map onto the model's tasks raise `UsageError` (exit 2: an invalid command line); `clip`: the model is a CLIP
    (no task names of its own, so every dataset names its task)."""
    from hf_mudsc.calibrate.datasets import column_names, load_calibration_dataset
    from hf_mudsc.evaluate.batches import evaluation_source
    from hf_mudsc.evaluate.tasks import (
        TaskData,
        one_dataset_per_task_fix,
        spec_task_data,
        tasks_from_dataset,
        tasks_without_rows,
    )

    parsed = [_split_task(v) for v in args.dataset]
    named = [task for task, _ in parsed if task]
    if named and len(named) != len(parsed):
        raise UsageError("name the task of every --dataset (TASK=SPEC) or of none")
    if clip and not named:
        raise UsageError("CLIP has no task names of its own: name the task each dataset scores, --dataset TASK=SPEC "
                         "(its class names: the label column's ClassLabel names, or --class-names TASK=NAME,...)")

    def open_spec(spec: str, task: str | None) -> TaskData:
        """The spec opened with the calibration loader, its errors naming evaluation data (of `task`)."""
        return spec_task_data(spec, load_calibration_dataset(spec, role=evaluation_source(task),
                                                             token=getattr(args, "token", None)),
                              label_column=args.label_column)

    if named:
        twice = sorted({task for task in named if named.count(task) > 1})
        if twice:
            raise UsageError(
                f"task {twice[0]!r} is named by two --dataset flags; pass one --dataset TASK=SPEC per task"
            )
        reserved = next((task for task in named if task in (JOINT, AVERAGE)), None)
        if reserved is not None:  # the results' views: a task of that name would share their entry
            raise UsageError(f"a task may not be named {reserved!r} (a reserved view name of the results); name it "
                             "otherwise in --dataset TASK=SPEC")
        unknown = [task for task in named if ranges and task not in ranges]
        if unknown:
            raise UsageError(
                f"unknown task(s) {unknown}; the merged model's tasks are {task_names}: use them in "
                "--dataset TASK=SPEC"
            )
        opened = {task: open_spec(spec, task) for task, spec in parsed}
        if args.task_column:  # a named dataset holding the column: its rows of its own task (it may hold several)
            def holds_column(task: str, source: TaskData) -> bool:
                return args.task_column in column_names(source.data, f"evaluation data of task {task!r}",
                                                        EvaluationError)

            opened = {task: replace(source, task_column=args.task_column,
                                    task_value=(task_names.index(task) if task in task_names else -1, task))
                      if holds_column(task, source) else source for task, source in opened.items()}
        return opened
    if len(parsed) == 1 and ranges and len(task_names) > 1:
        source = open_spec(parsed[0][1], None)
        tasks = tasks_from_dataset(source.data, task_names, ranges, task_column=args.task_column,
                                   label_column=args.label_column, name=source.name, split=source.split,
                                   local=source.local, config=source.config)
        missing = tasks_without_rows(tasks)  # None: a stream, unknown until read (the evaluation's error names the fix)
        if missing:
            how = (f"--task-column {args.task_column!r} naming each row's task" if args.task_column else
                   "labels that are ids of the merged model's joint head ("
                   + ", ".join(f"{task!r} {lo}..{hi - 1}" for task, (lo, hi) in ranges.items()) + ")")
            raise UsageError(
                f"--dataset {parsed[0][1]} holds no row of task(s) {missing}: one --dataset for the model's "
                f"{len(task_names)} tasks must hold every task's rows, with {how}; "
                + one_dataset_per_task_fix(task_names, cli=True)
            )
        return tasks
    if args.task_column:
        raise UsageError("--task-column applies to a single --dataset holding every task")
    if ranges and len(parsed) != len(task_names):
        raise UsageError(
            f"{len(parsed)} datasets for the model's {len(task_names)} tasks {task_names}: pass one per task "
            "(optionally TASK=SPEC) or one holding every task"
        )
    return [open_spec(spec, task_names[index] if index < len(task_names) else None)
            for index, (_, spec) in enumerate(parsed)]


def update_card(folder: Path, model: Any, result: Any, *, chart: Any = None) -> Path | None:
    """Put the results into DIR/README.md (atomically), as `card_with_results` makes it; None if the folder has
    neither a card nor a recipe."""
    card = card_with_results(folder, model, result, chart=chart)
    return write_file_atomically(folder / CARD_FILENAME, card.save) if card is not None else None


def card_with_results(folder: Path, model: Any, result: Any, *, chart: Any = None) -> Any:
    """The folder's card with the results (a `ModelCard`, not written): only its Evaluation section and `model-index`
    change, every other part the merge wrote is kept — but the Diagnostics line of a `chart` redrawn (a `Plot`),
    whose title and caption name the metric drawn (f1 after `--metric f1`, not accuracy). Without a card, one is
    rendered from the recipe; None if the folder has neither."""
    from huggingface_hub import ModelCard

    from hf_mudsc.publish.card import MergeCard, render_card, update_card_evaluation
    from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

    card_path = folder / CARD_FILENAME
    if card_path.is_file():
        card = update_card_evaluation(ModelCard.load(card_path), result.card_rows())
        if chart is not None:
            card = MergeCard(retitled_plot(str(card), chart.path.relative_to(folder).as_posix(), chart.title,
                                           chart.caption))
        return card
    if (folder / RECIPE_FILENAME).is_file():
        return render_card(model, Recipe.load(folder / RECIPE_FILENAME), eval_results=result.card_rows(),
                           model_name=folder.resolve().name)
    return None


def check_card_renders(folder: Path, model: Any) -> None:
    """A folder with a recipe and no card gets one rendered from its merge record (`config.json`'s `mudsc`) after the
    scores: a record that does not read (a hand-edited or hostile `size_budget: "x"`) is refused now, before minutes
    of scoring, not as a traceback after them."""
    if (folder / CARD_FILENAME).is_file():
        return
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

    if not (folder / RECIPE_FILENAME).is_file():
        return
    recipe = Recipe.load(folder / RECIPE_FILENAME)
    try:
        render_card(model, recipe, eval_results=[], model_name=folder.resolve().name)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise UsageError(
            f"cannot write a model card for {str(folder)!r}: its config.json's merge record (`mudsc`) does not read "
            f"({type(error).__name__}: {error}); re-create the folder with hf-mudsc merge, or pass "
            "--no-card (with --output-json PATH to keep the results)") from None


def retitled_plot(card: str, link: str, title: str, caption: str) -> str:
    """The card's text with the Diagnostics lines of the plot at `link` (`**Title** — caption.` and its image's alt
    text) saying `title` and `caption`; a card without that plot is returned as it is."""
    lines = card.split("\n")
    for index, line in enumerate(lines):
        if re.fullmatch(r"!\[[^\]]*\]\(" + re.escape(link) + r"\)\s*", line):
            lines[index] = f"![{title}]({link})"
            above = next((i for i in range(index - 1, -1, -1) if lines[i].strip()), None)
            if above is not None and re.fullmatch(r"\*\*[^*]+\*\* — .*", lines[above]):
                lines[above] = f"**{title}** — {caption}."
    return "\n".join(lines)


def accuracy_chart_to_redraw(folder: Path, result: Any) -> tuple[Any, Any] | None:
    """`plots/accuracy.png`, when the folder has one (the demo draws it and its card links it; `hf-mudsc inspect`
    draws it from eval_results.json, unlinked): it is redrawn from the new results, so the chart and the card's
    Evaluation table show the same figures; no chart is drawn where there was none, and no link added. Only a chart
    hf-mudsc wrote and nobody changed is replaced. `(Plot, write)`: its `Plot` (title and caption named by the metric
    drawn, for the card's Diagnostics line) and what writes its PNG to a given path; None when there is none to
    redraw."""
    from hf_mudsc.publish.folder import written_unchanged
    from hf_mudsc.publish.plots import Plot, accuracy_chart, save_figure
    from hf_mudsc.solve.diagnostics import PLOTS_FOLDER

    path = folder / PLOTS_FOLDER / "accuracy.png"
    chart = accuracy_chart(result) if written_unchanged(path, owner=folder) else None
    if chart is None:
        return None
    title, caption, figure = chart
    return Plot(name="accuracy", title=title, caption=caption, path=path), lambda to: save_figure(figure, to)


def write_results(folder: Path, model: Any, result: Any, json_paths: Sequence[Path]) -> tuple[Any, Path | None]:
    """The results files, the accuracy chart redrawn from them and the card quoting them, all made first and then put
    in place as one change (`replace_files_together`): a failure or a Ctrl-C on the way never leaves the card of one
    run beside the results of another, which `push` would publish together. `(Plot or None, the card's path or
    None)`: what was redrawn and rewritten besides the results."""
    from hf_mudsc.publish.folder import replace_files_together

    text = result.json_text()
    writes: list[tuple[Path, Any]] = [(path, lambda to: to.write_text(text, encoding="utf-8")) for path in json_paths]
    redrawn = accuracy_chart_to_redraw(folder, result)
    chart = redrawn[0] if redrawn is not None else None
    if redrawn is not None:
        writes.append((chart.path, redrawn[1]))
    card = card_with_results(folder, model, result, chart=chart)
    if card is not None:
        writes.append((folder / CARD_FILENAME, card.save))
    replace_files_together(writes, owner=folder)
    return chart, folder / CARD_FILENAME if card is not None else None


def check_replaceable(json_paths: list[Path], card_path: Path | None) -> None:
    """Refuse, before any work, to replace a file hf-mudsc did not write (or that changed since) with the results:
    a results file (`--output-json`, the folder's `eval_results.json`) may be new or a results file (never a model's
    config.json or weights, nor someone's notes); the card is updated only where the merge wrote it (the folder's
    marker lists it unchanged), and only while the model's other files are as the merge wrote them (weights swapped
    in since would be scored under its card)."""
    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES, parse_json
    from hf_mudsc.publish.folder import MARKER_FILENAME, changed_files, read_marker, written_unchanged
    from hf_mudsc.solve.diagnostics import PLOTS_FOLDER

    def results_file(path: Path) -> bool:
        if path.stat().st_size > SIDE_FILE_MAX_BYTES:  # read whole below; results are kilobytes
            return False
        try:
            data = parse_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not JSON, or nested too deeply: not a results file
            return False
        ours = written_unchanged(path) or read_marker(path.parent) is None
        return ours and isinstance(data, dict) and {"hf_mudsc_version", "scores"} <= set(data)

    folder_json = card_path.parent / RESULTS_FILENAME if card_path is not None else None

    def json_fix(path: Path) -> str:
        if folder_json is not None and path.absolute() == folder_json.absolute():  # written with the card
            return "pass --no-card (the folder is then left as it is; the results go to --output-json PATH)"
        return "pass --output-json PATH naming a new file"

    for path, replaceable, fix in (
            *((json_path, results_file, json_fix(json_path)) for json_path in json_paths),
            (card_path, written_unchanged, "pass --no-card (the results still go to --output-json PATH)")):
        if path is None or not (path.exists() or path.is_symlink()):
            continue
        if path.is_symlink() or not path.is_file() or not replaceable(path):
            raise FileExistsError(f"refusing to replace {str(path)!r} with the results: hf-mudsc did not write it "
                                  f"(or it changed since); {fix}")
    if card_path is not None and read_marker(card_path.parent) is None:
        raise FileExistsError(  # a plain fine-tune (save_pretrained): its files are its owner's
            f"refusing to write the results into {str(card_path.parent)!r}: hf-mudsc did not write that folder (no "
            f"{MARKER_FILENAME}), and it changes only folders it wrote; pass --no-card (the results then go only to "
            "--output-json PATH)")
    if card_path is not None and card_path.is_file():
        changed = changed_files(card_path.parent,  # less what evaluate itself checks and rewrites
                                ignore=(CARD_FILENAME, RESULTS_FILENAME, f"{PLOTS_FOLDER}/accuracy.png"))
        if changed:  # the scores would be of other weights than the card and recipe describe
            raise FileExistsError(
                f"refusing to write the results into {str(card_path)!r}: files of the merged model changed since "
                f"hf-mudsc wrote them ({', '.join(changed[:10])}{' ...' if len(changed) > 10 else ''}), so the card "
                "would give their scores to the merge it describes; write the folder again with `hf-mudsc merge ... "
                "--output DIR`, or pass --no-card (the results still go to --output-json PATH)")


def results_paths(folder: Path | None, output_json: str | None) -> list[Path]:
    """Where the results are written: the folder's `eval_results.json` whenever its card is updated (`folder`: the
    local folder unless --no-card), so that the card, the results file and the chart a push publishes always
    describe the same evaluation, and `--output-json PATH` besides (once when it is that file)."""
    paths = [folder / RESULTS_FILENAME] if folder is not None else []
    if output_json and not any(Path(output_json).absolute() == path.absolute() for path in paths):
        paths.insert(0, Path(output_json))  # first: its failure leaves the folder's results and card as they were
    return paths


def _is_hub_id(reference: str) -> bool:
    """`org/name[@rev]` that is not an existing path (a folder that is absent is an error, not a Hub id)."""
    from hf_mudsc.load.references import looks_like_path

    return not looks_like_path(reference) and "/" in reference.split("@", 1)[0]


def _check_metrics(names: list[str], trust_remote_code: bool) -> None:
    """Each metric once; metrics other than the shipped ones run a script: only with --trust-remote-code."""
    try:
        check_metric_names(names or ["accuracy"])
    except EvaluationError as error:
        raise UsageError(str(error)) from None
    foreign = [name for name in names if name not in SHIPPED_METRIC_NAMES]
    if foreign and not trust_remote_code:
        raise UsageError(
            f"metric {foreign[0]!r} is not shipped with hf-mudsc (shipped: {', '.join(SHIPPED_METRIC_NAMES)}); "
            "loading it runs its Python script: pass --trust-remote-code if you trust that code"
        )


def _local_config(folder: Path, reference: str) -> Any:
    """The merged folder's config alone (no weights), so dataset flags are checked before loading; read as the loader
    reads it (`folder_config`: a link out of the folder, a count no model has refused before transformers sees it)."""
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.parents import folder_config

    try:
        return folder_config(folder, reference)
    except LoadError as error:
        raise ValueError(f"cannot load the merged model {reference!r}: {error}") from error


def _hub_recipe_parents(loaded: Any, token: str | None = None) -> list[str] | None:
    """The parents named by the merge recipe of a Hub model, at the commit evaluated (None if it has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from hf_mudsc.publish.recipe import RECIPE_FILENAME

    try:
        path = hf_hub_download(loaded.repo_id, RECIPE_FILENAME, revision=loaded.commit_sha, token=token)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    except (HfHubHTTPError, OSError) as error:
        raise ValueError(
            f"cannot read the merge recipe of {loaded.reference!r} ({hub_error_line(error)}); pass --parents A B or "
            "--no-parents"
        ) from None
    return recipe_parents(Path(path), loaded.reference, from_hub=True)


def check_arguments(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """The flags that need nothing loaded, checked first (as `merge` checks its options): a wrong one is an invalid
    command line, refused with argparse's exit code 2 before torch, the models or the data are loaded. Returns the
    parsed `--class-names`."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_samples is not None and args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1 (or leave it out to score every row), got {args.num_samples}")
    if args.parents is not None and len(args.parents) < 2:
        raise UsageError(f"--parents takes the parents in merge order, at least two (A B [C ...]), got "
                         f"{len(args.parents)}; or pass --no-parents")
    try:  # every name the results, the card, the table or an error would show (`evaluate_merge` checks its own too)
        tasks = [task for task, _ in map(_split_task, args.dataset or []) if task]
        refuse_token_names([("a task name of --dataset TASK=SPEC", tasks), *(
            (flag, getattr(args, flag[2:].replace("-", "_"))) for flag in (
                "--task-column", "--label-column", "--image-column", "--text-column", "--class-names",
                "--prompt-template", "--metric", "--output-json"))])  # the results file's path is printed when written
    except EvaluationError as error:
        raise UsageError(str(error)) from None
    # An empty value (`--output-json "$UNSET"`) was dropped silently (the results not written) or refused only once
    # the model was loaded (a column named '').
    empty = [flag for flag in ("--task-column", "--label-column", "--image-column", "--text-column", "--output-json")
             if (value := getattr(args, flag[2:].replace("-", "_"))) is not None and not value.strip()]
    if empty:
        raise UsageError(f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (an unset shell variable?); "
                         f"pass {'a value' if len(empty) == 1 else 'values'}, or leave "
                         f"{'it' if len(empty) == 1 else 'them'} out")
    if empty_spec := next((value for value in args.dataset or [] if _empty_task_spec(value)), None):
        raise UsageError(f"--dataset {empty_spec!r}: the spec after '=' is empty (an unset shell variable?); pass "
                         f"{empty_spec}SPEC (a dataset folder or `repo[:config]:split`)")
    for _, spec in map(_split_task, args.dataset or []):  # a malformed spec: before the model loads (from the Hub)
        try:
            DatasetSpec.parse(spec, kind="evaluation", error=UsageError)
        except UsageError as error:  # it names the spec (a token: not shown)
            raise UsageError(f"--dataset: {error}") from None
    try:
        class_names = _class_names(args.class_names)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _check_metrics(args.metric or [], args.trust_remote_code)
    if args.prompt_template:
        try:
            check_prompt_templates(args.prompt_template)
        except EvaluationError as error:
            raise UsageError(f"--prompt-template: {error}") from None
    gone = [(task, spec, path) for task, spec in map(_split_task, args.dataset or [])
            if (path := missing_local_data(spec)) is not None]
    if gone:
        raise UsageError("; ".join(f"--dataset {f'{task}=' if task else ''}{spec}: no file or folder {path!r}"
                                   for task, spec, path in gone) + "; pass data that exists from this working "
                         "directory, or a Hub dataset id as 'org/name[:config]:split'")
    if not Path(args.model).expanduser().is_dir() and not _is_hub_id(args.model):
        raise UsageError(
            f"{args.model!r} is not a model folder; pass the folder a merge wrote or a Hub id org/name[@revision]"
        )
    absent = [said for gone, said in missing_parents(args.parents or [], allow_pickle=True) if gone]
    if absent:  # an invalid command line, as a --dataset that is not there
        raise UsageError(f"--parents: {'; '.join(absent)}; pass parent folders that exist from this working "
                         "directory or Hub ids org/name[@revision], or --no-parents")
    if args.output_json:
        check_output_json(Path(args.output_json), Path(args.model).expanduser(), no_card=args.no_card,
                          inputs=local_inputs(args))
    return class_names


def local_inputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The local folders and files the evaluation reads besides the model: `--parents` folders and `--dataset` data
    (a spec's path), as `(description, path)` — what an output may not lie in."""
    from hf_mudsc.calibrate.dataset_spec import DatasetSpec, looks_like_local_path

    found = [("parent folder", Path(p).expanduser()) for p in args.parents or [] if Path(p).expanduser().exists()]
    for _, spec in map(_split_task, args.dataset or []):
        try:
            parsed = DatasetSpec.parse(spec)
        except ValueError:
            continue  # refused with its reason when the data is read
        path = Path(parsed.path).expanduser()
        if parsed.revision is None and looks_like_local_path(parsed.path) and path.exists():
            found.append(("evaluation data", path))
    return found


def check_output_json(path: Path, model: Path, *, no_card: bool, inputs: Sequence[tuple[str, Path]] = ()) -> None:
    """`--output-json PATH` may not write into an input (`inputs`: the parents' folders, the evaluation data — inputs
    are never modified) nor into a merged folder's results: under `--no-card` no file in the evaluated folder (its
    own `eval_results.json` would describe another run than the card next to it, and `push` uploads both), and
    never a file inside another folder hf-mudsc wrote (that model's card and results would disagree, and its marker
    would not list the file). Refused as an invalid command line (`UsageError`), before anything loads."""
    from hf_mudsc.errors import OutputLocationError
    from hf_mudsc.publish.folder import check_location, written_around

    target = path.expanduser().absolute()
    if not os.path.lexists(target):
        try:  # a path under a file, without write access, too long: before the evaluation, not after it
            check_location(target, flag="--output-json")
        except OutputLocationError as error:
            raise UsageError(str(error)) from None
    for description, source in inputs:
        where = source.resolve()
        if target.parent.resolve() / target.name == where or target.parent.resolve().is_relative_to(where):
            raise UsageError(f"--output-json {str(path)!r} is inside the {description} {str(source)!r}; inputs are "
                             "never modified: pass --output-json PATH outside them")
    evaluated = model.resolve() if model.is_dir() else None
    if no_card and evaluated is not None and target.parent.resolve() == evaluated and target.name == RESULTS_FILENAME:
        raise UsageError(
            f"--output-json {str(path)!r} is the folder's own results file, which goes with its card: --no-card leaves "
            "both as they are; pass --output-json PATH outside the folder, or leave out --no-card to update both")
    if no_card and evaluated is not None and target.parent.resolve().is_relative_to(evaluated):
        raise UsageError(
            f"--output-json {str(path)!r} is inside the evaluated folder {str(model)!r}, and --no-card leaves the "
            "folder as it is; pass --output-json PATH outside the folder")
    owner = written_around(target.parent.resolve() / target.name)
    if owner is not None and owner.resolve() != evaluated:
        raise UsageError(
            f"--output-json {str(path)!r} is inside {str(owner)!r}, another model folder hf-mudsc wrote (its card and "
            "results describe that model); pass --output-json PATH outside it")


def check_clip_options(args: argparse.Namespace, class_names: dict[str, list[str]] | None, datasets_per_task: Any, *,
                       clip: bool) -> None:
    """`--class-names` and `--prompt-template` make a CLIP's zero-shot prompts: on a classifier they changed nothing
    without a word, and a `--class-names` task no `--dataset TASK=` scores (a typo) was dropped. Both are an invalid
    command line (exit 2), refused once the model's config is read, before its weights."""
    if not clip:
        given = [flag for flag, value in (("--class-names", args.class_names),
                                          ("--prompt-template", args.prompt_template)) if value]
        if given:
            raise UsageError(f"{' and '.join(given)} make a CLIP model's zero-shot prompts and have no effect on "
                             f"{args.model!r}, a classifier whose head names its classes: leave them out")
        return
    tasks = list(datasets_per_task) if isinstance(datasets_per_task, dict) else []
    unknown = [task for task in class_names or {} if task not in tasks]
    if unknown:
        raise UsageError(f"--class-names names task(s) {', '.join(unknown)}, which no --dataset scores; the tasks "
                         f"scored: {', '.join(tasks)} (--dataset TASK=SPEC)")


def scorer_name(folder: Path | None, *, with_parents: bool) -> str:
    """What the table and the results call the model evaluated: `merged`, except for a local folder scored alone
    that neither hf-mudsc wrote (its marker) nor holds a merge recipe (a plain fine-tune, scored with --no-card):
    `model`. Scored next to `--parents`, it is the merge of those."""
    from hf_mudsc.publish.folder import read_marker
    from hf_mudsc.publish.recipe import RECIPE_FILENAME

    if folder is None or with_parents or read_marker(folder) is not None or (folder / RECIPE_FILENAME).is_file():
        return "merged"
    return "model"


def run(args: argparse.Namespace) -> int:
    class_names = check_arguments(args)  # before the imports below: they take seconds (torch, transformers)
    from hf_mudsc.apply.classifier import task_ranges
    from hf_mudsc.errors import LoadError
    from hf_mudsc.evaluate.harness import check_scorable, evaluate_merge
    from hf_mudsc.evaluate.scorers import is_clip_config
    from hf_mudsc.load.parents import load_parent

    folder = Path(args.model).expanduser()
    local = folder.is_dir()
    token = getattr(args, "token", None)  # passed to the Hub calls only: never printed, logged or written
    allow_pickle = getattr(args, "allow_pickle", False)  # pickle-only weights (still read weights_only)
    json_paths = results_paths(folder if local and not args.no_card else None, args.output_json)
    check_replaceable(json_paths, folder / CARD_FILENAME if local and not args.no_card else None)
    datasets_per_task = None
    if local:  # check the dataset flags against the config, and read the recipe's parents, before loading any weights
        config = _local_config(folder, args.model)
        ranges = {task: list(bounds) for task, bounds in task_ranges(config).items()} or None
        datasets_per_task = _datasets(args, list(ranges or {}), ranges, clip=is_clip_config(config))
        check_clip_options(args, class_names, datasets_per_task, clip=is_clip_config(config))
        try:  # a regression or multi-label merge: its config says so, before any weights
            check_scorable(config, list(datasets_per_task) if isinstance(datasets_per_task, dict)
                           else len(datasets_per_task), f"merged model {args.model!r}")
        except EvaluationError as error:
            print(f"hf-mudsc evaluate: error: {escaped(hide_tokens(str(error)))}", file=sys.stderr)
            return 1
        parent_refs = _parents(args, folder)
        refused = [said for _, said in missing_parents(parent_refs or [], allow_pickle)]
        if refused:  # --parents' absent folders were refused with the command line; what is left: their weights
            raise ValueError(
                f"cannot load the parents {parent_refs}: {'; '.join(refused)}; pass --parents A B or --no-parents"
                if args.parents else f"the merge recipe of {args.model!r} names parents this machine cannot load: "
                f"{'; '.join(refused)}; pass --parents with every parent's path or Hub id in merge order (A B ...), "
                "or --no-parents")
        if args.output_json and parent_refs:  # the recipe's parent folders are inputs as --parents' are
            check_output_json(Path(args.output_json), folder, no_card=args.no_card,
                              inputs=[("parent folder", Path(ref).expanduser()) for ref in parent_refs
                                      if Path(ref).expanduser().exists()])
    # Which model the folder holds as it loads: one replaced meanwhile (`merge --overwrite`) must not get these scores.
    loaded_from = weights_fingerprint(folder) if local and not args.no_card else None
    try:
        merged = load_parent(args.model, token=token, allow_pickle=allow_pickle)
    except LoadError as error:
        raise ValueError(f"cannot load the merged model {args.model!r}: {error}") from error
    if local and not args.no_card:
        check_card_renders(folder, merged.model)
    if datasets_per_task is None:
        ranges = {task: list(bounds) for task, bounds in task_ranges(merged.model.config).items()} or None
        datasets_per_task = _datasets(args, list(ranges or {}), ranges,  # tasks in parent order
                                      clip=is_clip_config(merged.model.config))
        check_clip_options(args, class_names, datasets_per_task, clip=is_clip_config(merged.model.config))
    if not local and (args.no_parents or args.parents):
        parent_refs = _parents(args, None)
    elif not local:  # the repo's recipe, at the commit just loaded
        parent_refs = _hub_recipe_parents(merged, token)
        if parent_refs is None:
            print("No --parents and no merge recipe in the repository: scoring the merged model alone.")
    parents = None
    if parent_refs is not None:
        try:
            parents = [load_parent(ref, token=token, allow_pickle=allow_pickle) for ref in parent_refs]
        except LoadError as error:
            raise ValueError(
                f"cannot load the parents {parent_refs}: {error}; pass --parents A B or --no-parents"
            ) from error
    try:
        result = evaluate_merge(
            {scorer_name(folder if local else None, with_parents=parents is not None): merged}, parents,
            datasets_per_task,
            metrics=args.metric or ["accuracy"],
            ensemble=not args.no_ensemble, batch_size=args.batch_size, num_samples=args.num_samples,
            image_column=args.image_column, text_column=args.text_column, class_names=class_names,
            prompt_template=args.prompt_template or DEFAULT_PROMPT, joint_rule=args.joint_rule,
            progress=sys.stderr.isatty() and not getattr(args, "quiet", False),
            trust_remote_code=args.trust_remote_code, own_processors=not args.shared_processor)
    except EvaluationError as error:
        print(f"hf-mudsc evaluate: error: {escaped(hide_tokens(str(error)))}", file=sys.stderr)
        return 1
    if result is None:  # a non-main process of a distributed run
        return 0
    labels = {name: f"parent {name.removeprefix('parent_').upper()}" for name in result.scores
              if name.startswith("parent_")}
    for metric in result.metrics:
        averaged = SHIPPED_METRIC_ARGS.get(metric, {}).get("average")
        print(f"\n{metric}{f' ({averaged})' if averaged else ''}:\n{result.table(metric, labels=labels)}")
    if result.models:
        print("\nmodels scored from the Hub: " + ", ".join(f"{labels.get(name, name)}: {source}"
                                                       for name, source in result.models.items()))
    if result.processors:
        print("\nprocessors (the models' differ; whose made each row's inputs): "
              + ", ".join(f"{labels.get(name, name)}: {source}" for name, source in result.processors.items()))
    if not json_paths:
        why = (f"{args.model} is a Hub model, not a folder" if not local else
               "--no-card leaves the folder (its card and eval_results.json) as it is")
        print(f"\nResults not written: {why}; pass --output-json PATH to save them"
              + (" (the Hub card is left as it is)" if not local else ""))
        return 0
    if not local or args.no_card:
        for json_path in json_paths:
            result.save(json_path)
            print(f"\nResults written to {json_path}")
        return 0
    # the folder's results file, chart and card: one change, always the same evaluation, of the model it holds
    check_not_replaced(folder, loaded_from, "evaluated", "run evaluate again")
    chart, card = write_results(folder, merged.model, result, json_paths)
    for json_path in json_paths:
        print(f"\nResults written to {json_path}")
    if chart is not None:
        print(f"{chart.title} chart {chart.path} redrawn from the results")
    if card is not None:
        print(f"Model card {card} updated with the results (model-index)")
    return 0
