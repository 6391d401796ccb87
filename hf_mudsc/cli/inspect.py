"""`hf-mudsc inspect DIR|RECIPE`: look at a merge without loading a model (docs/design.md §8c).

For a merged folder: prints its parents, their relation, the method and each group's match quality (from
`config.json` and `merge_diagnostics.json`), and redraws the plots into `DIR/plots` (or `--output`); neither torch
nor the weights are loaded. For a recipe file: says what it would merge and with which options, after the merge's
own checks and dry run (configs and safetensors headers, no weights), so it refuses what `merge --recipe` refuses.
"""

from __future__ import annotations

import argparse
import errno
import math
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_mudsc.cli.arguments import path_text
from hf_mudsc.errors import escaped, parent_label
from hf_mudsc.evaluate.names import RESULTS_FILENAME
from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES, parse_json
from hf_mudsc.option_values import AVERAGE_CHECK_METHOD, check_solved_by, start_margin_note
from hf_mudsc.options import (
    gate_lowered_tasks_text,
    gate_scores,
    gate_tasks_text,
    gate_tie_note,
    refit_read_options,
)
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME, PLOTS_FOLDER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="DIR|RECIPE", type=path_text,
                        help="a merged-model folder (written by `hf-mudsc merge --output DIR`) or a recipe file "
                             "(mudsc_recipe.yaml)")
    parser.add_argument("-o", "--output", metavar="DIR", default=None, type=path_text,
                        help=f"folder for the redrawn plots (default: DIR/{PLOTS_FOLDER})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only, draw nothing")


def run(args: argparse.Namespace) -> int:
    from hf_mudsc.errors import UsageError

    if args.overwrite and args.output is None:  # it replaces an earlier --output folder, never DIR/plots
        raise UsageError("--overwrite needs --output DIR (it replaces an earlier --output folder of plots; DIR/"
                         f"{PLOTS_FOLDER} is redrawn without it); drop --overwrite or pass --output DIR")
    if args.output is not None and args.no_plots:
        raise UsageError("--output with --no-plots: --output is where the plots go, and --no-plots draws none; "
                         "drop one of them")
    target = Path(args.target).expanduser()
    if target.is_dir():
        try:
            return inspect_folder(target, output=args.output, overwrite=args.overwrite, plots=not args.no_plots)
        except (AttributeError, TypeError, KeyError, IndexError) as error:  # config.json's `mudsc` of another shape
            raise ValueError(malformed(target, "config.json", f"{type(error).__name__}: {error}")) from None
    if target.is_file() and (target.suffix.lower() in (".yaml", ".yml") or target.suffix.lower() == ".json"
                             and is_json_recipe(target)):  # what `merge --recipe` reads
        if args.output is not None:  # a recipe has no plots: ignored, the run ended 0 with none and no word
            raise UsageError(f"--output is where the plots of a merged-model folder go, and the recipe "
                             f"{args.target!r} has none; drop --output, or inspect the folder the merge wrote")
        return inspect_recipe(target)
    if not target.exists() and HUB_ID.fullmatch(args.target):  # inspect reads a folder, never the Hub
        raise FileNotFoundError(
            f"{args.target!r} is not a folder here; if it is a Hub repo, download it first (`huggingface-cli "
            f"download {args.target} --local-dir DIR`), then run `hf-mudsc inspect DIR`"
        )
    beside = target.is_file() and (target.parent / "config.json").is_file()  # a file of a merged folder
    here = f" (here `hf-mudsc inspect {target.parent}`)" if beside else ""
    raise FileNotFoundError(
        f"{args.target!r} is neither a merged-model folder nor a recipe file (*.yaml, *.json); pass the folder "
        f"`hf-mudsc merge --output DIR` wrote{here}, or its mudsc_recipe.yaml"
    )


#: The keys that make a JSON file a recipe: every recipe names its parents, and the ones a merge wrote its version.
RECIPE_MARKS = ("models", "hf_mudsc_version")


def is_json_recipe(path: Path) -> bool:
    """Whether a .json file given to `inspect` is a recipe: a JSON object with `RECIPE_MARKS`. A merged folder's
    config.json, eval_results.json or tokenizer.json (past a recipe's size) is not, and gets the line naming the
    folder to pass instead of a recipe's "unknown keys" refusal; a file that is not JSON at all is left to the recipe
    reader, whose refusal says what is wrong with it."""
    from hf_mudsc.publish.recipe import MAX_RECIPE_BYTES

    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            return False
        data = parse_json(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: the recipe reader says what is wrong
        return True
    return isinstance(data, Mapping) and any(key in data for key in RECIPE_MARKS)


#: What a Hub repo id looks like (`org/name`): named to `inspect`, it gets the download hint.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------------------------------------- a merged folder


def malformed(folder: Path, name: str, problem: str) -> str:
    """The one line for a folder whose hf-mudsc file holds a value of the wrong type or shape."""
    return (f"{str(folder)!r} holds a malformed hf-mudsc file ({name}: {problem}); write the folder again with "
            "`hf-mudsc merge --output DIR`" + (" (or `hf-mudsc evaluate` for its results)"
                                               if name == RESULTS_FILENAME else ""))


def check_results_dict(data: Any) -> None:
    """Refuse (a `ValueError` naming the key) an `eval_results.json` whose values `inspect` cannot read: the
    summary and the accuracy chart read `metrics`, `tasks` and `scores[scorer][view][metric]` numbers."""
    if not isinstance(data, Mapping):
        raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
    metrics = data.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise ValueError(f"metrics is {str(metrics)[:40]!r}, not a list of texts")
    if not isinstance(data.get("tasks", {}), Mapping):
        raise ValueError("tasks is not an object")
    scores = data.get("scores", {})
    if not isinstance(scores, Mapping):
        raise ValueError("scores is not an object")
    for scorer, views in scores.items():
        if not isinstance(views, Mapping) or not all(isinstance(v, Mapping) for v in views.values()):
            raise ValueError(f"scores.{scorer} is not an object of objects")
        for view, values in views.items():
            for metric, value in values.items():
                if not (value is None or isinstance(value, (int, float)) and not isinstance(value, bool)):
                    raise ValueError(f"scores.{scorer}.{view}.{metric} is {str(value)[:40]!r}, not a number")


def read_merge(folder: Path) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """`(config.mudsc, MergeDiagnostics, evaluation dict or None)` of a merged folder; a one-line `ValueError`
    for a folder that is not a merge made by hf-mudsc."""
    from hf_mudsc.solve.diagnostics import MergeDiagnostics, NewerFormatError, check_diagnostics_dict

    config_path = folder / "config.json"
    how = "pass a folder written by `hf-mudsc merge --output DIR` (or hf_mudsc.save_merged)"
    if not config_path.is_file():
        raise ValueError(f"{str(folder)!r} is not a merged model: it has no config.json; {how}")
    for name in ("config.json", DIAGNOSTICS_FILENAME, RESULTS_FILENAME):  # each is read whole: a folder is data
        size = (folder / name).stat().st_size if (folder / name).is_file() else 0
        if size > SIDE_FILE_MAX_BYTES:
            raise ValueError(f"{str(folder)!r}: {name} is {size:,} bytes, more than the {SIDE_FILE_MAX_BYTES:,} "
                             f"hf-mudsc ever writes; {how}")
    try:
        config = parse_json(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {str(config_path)!r} ({error}); {how}") from None
    mudsc = config.get("mudsc") if isinstance(config, dict) else None
    if not isinstance(mudsc, dict):
        raise ValueError(f"{str(folder)!r} is not a merge made by hf-mudsc: its config.json has no `mudsc` section; "
                         f"{how}")
    diagnostics_path = folder / DIAGNOSTICS_FILENAME
    if diagnostics_path.is_file():
        try:
            diagnostics = MergeDiagnostics.load(diagnostics_path)  # every value's type checked (`from_dict`)
        except OSError as error:
            raise ValueError(f"cannot read {str(diagnostics_path)!r}: {error}") from None
        except NewerFormatError as error:  # the file is fine: this hf-mudsc is too old for it
            raise ValueError(f"{str(folder)!r}: {DIAGNOSTICS_FILENAME}: {error}") from None
        except ValueError as error:
            raise ValueError(malformed(folder, DIAGNOSTICS_FILENAME, str(error))) from None
    else:
        diagnostics = MergeDiagnostics.from_config(mudsc)
        try:  # its match values, start objectives and alpha curve, checked as the file's would be
            check_diagnostics_dict({key: value for key, value in diagnostics.to_dict().items()
                                    if key in ("method", "groups", "starts", "alpha_curve")})
        except ValueError as error:
            raise ValueError(malformed(folder, "config.json",
                                       f"mudsc.group_match_values, start_objectives or alpha_auto: {error}")) from None
    evaluation = None
    results_path = folder / RESULTS_FILENAME
    if results_path.is_file():
        try:
            evaluation = parse_json(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {str(results_path)!r} ({error}); run `hf-mudsc evaluate` again") from None
        try:
            check_results_dict(evaluation)
        except ValueError as error:
            raise ValueError(malformed(folder, RESULTS_FILENAME, str(error))) from None
    return mudsc, diagnostics, evaluation


def summary(folder: Path, mudsc: Mapping[str, Any], diagnostics: Any, evaluation: Mapping[str, Any] | None,
            has_file: bool) -> str:
    """The text `inspect` prints for a merged folder."""
    lines = [f"Merged model {folder}"]
    parents = mudsc.get("parents") or []
    revisions = mudsc.get("parent_revisions") or [None] * len(parents)
    shown = [f"{name} @ {str(rev)[:10]}" if rev else str(name) for name, rev in zip(parents, revisions)]
    lines.append(f"  parents:   {', '.join(shown) or 'unknown'}")
    if isinstance(mudsc.get("base"), str):  # a same-base merge's base (given, or named by the parents' cards)
        revision = mudsc.get("base_revision")
        source = mudsc.get("base_source")
        lines.append(f"  base:      {mudsc['base']}{f' @ {str(revision)[:10]}' if revision else ''}"
                     f"{f' ({source})' if isinstance(source, str) else ''}")
    relation = mudsc.get("parent_relation")
    if isinstance(relation, Mapping) and relation.get("relation"):
        lines.append(f"  relation:  {relation['relation']} (relative weight distance "
                     f"{float(relation.get('weight_distance', math.nan)):.3g})")
    check = mudsc.get("correspondence_check")  # `auto`'s same-base choice confirmed on the activations
    if isinstance(check, Mapping) and check.get("method"):
        found = ("they correspond, so method auto kept the same-base method" if check.get("holds") else
                 "they do not correspond, so method auto kept that solve's merge")
        # The merge kept may then have been replaced by plain averaging: the gate's record says so, and a recipe's
        # re-run (no gate, the reason restated) records `linear`, which no correspondence check leads to.
        gate = mudsc.get("refit_gate")
        average = gate.get("average") if isinstance(gate, Mapping) else None
        if isinstance(average, Mapping) and average.get("kept") is True:
            found += ", then plain averaging replaced it (refit, below)"
        elif mudsc.get("method") == AVERAGE_CHECK_METHOD:
            found += ", then plain averaging replaced it"
        lines.append(f"  units:     {float(check.get('units_in_place', math.nan)):.1%} left in place by "
                     f"{check_solved_by(str(check['method']), check)} on the calibration data: {found}")
    settings = [f"matcher {mudsc['matcher']}" if mudsc.get("matcher") else None,
                f"alpha {mudsc['alpha']:g}" if isinstance(mudsc.get("alpha"), (int, float)) else None,
                f"refit {mudsc['refit']}" if mudsc.get("refit") not in (None, "none") else None]
    detail = ", ".join(s for s in settings if s)
    lines.append(f"  method:    {mudsc.get('method')}{f' ({detail})' if detail else ''}")
    curve = diagnostics.alpha_curve  # alpha="auto": the α above was chosen, as the card's α row says
    if curve:
        if curve.get("returned_fidelity") is None:
            lines.append(f"  alpha:     auto, not scored (no held-out example): {float(curve['chosen']):g} used")
        else:
            points = ", ".join(f"{alpha:g}: {'–' if score is None else f'{score:.3f}'}"  # None: not scored
                               for alpha, score in zip(curve["grid"], curve["fidelity"]))
            returned = ("" if curve.get("returned_is_candidate", True) is not False else
                        f"; solved again with every start, the merge returned: {float(curve['returned_fidelity']):.3f}")
            lines.append(f"  alpha:     {float(curve['chosen']):g} chosen by alpha auto (held-out fidelity {points}"
                         f"{returned}; {curve.get('held_out_examples', '?')} examples)")
    gate = mudsc.get("refit_gate")  # refit="gate": whether the held-out scores kept the refit
    if isinstance(gate, Mapping) and isinstance(gate.get("kept"), bool):
        shown = gate_scores(gate["refit"], gate["none"]) if all(
            isinstance(gate.get(k), (int, float)) for k in ("refit", "none")) else None
        scores = (f" (held-out {gate.get('measure') or 'score'} {shown[0]} with it, {shown[1]} without"
                  f"{gate_tie_note(gate)}; {gate.get('held_out_examples', '?')} examples"
                  f"{gate_lowered_tasks_text(gate)})" if shown else "")
        average = gate.get("average")  # method auto held the merge against plain averaging (apply.refit_gate)
        swapped = (f"; then plain averaging was returned: the merge scored "
                   f"{gate_tasks_text(gate, average.get('lowered_tasks') or [])} below it"
                   if isinstance(average, Mapping) and average.get("kept") is True else "")
        lines.append(f"  refit:     the gate {'kept' if gate['kept'] else 'dropped'} the refit{scores}{swapped}")
    if mudsc.get("num_calibration_samples"):
        lines.append(f"  calibration: {mudsc.get('calibration') or 'data'}, {mudsc['num_calibration_samples']} samples")
    if mudsc.get("out_dtype"):
        reason = mudsc.get("out_dtype_reason")
        lines.append(f"  weights:   {mudsc['out_dtype']}{f' ({reason})' if reason else ''}")
    reordered = [parent_label(i) for i, flag in enumerate(mudsc.get("head_reordered") or []) if flag]
    if reordered:
        lines.append(f"  heads:     parent{'s' if len(reordered) > 1 else ''} {', '.join(reordered)} reordered to "
                     "parent A's label order (same labels, another id order)")
    if diagnostics.starts:
        starts = ", ".join(f"{name} {value:.4f}" for name, value in diagnostics.starts.items())
        sweeps = f"{diagnostics.sweeps} sweeps, " if diagnostics.sweeps else ""
        margin = start_margin_note(diagnostics.starts, diagnostics.solve_start)
        lines.append(f"  solve:     {sweeps}{diagnostics.solve_start or '?'} start kept (final objective: {starts}"
                     f"{f'; {margin}' if margin else ''})")
    if diagnostics.groups:
        scored = [g for g in diagnostics.groups if g.blended is not None]
        chance = any(g.baseline_blended is not None for g in scored)
        if scored:
            lines.append("  groups (match value | mean correlation of fused A-B pairs: activation, weight, blended"
                         + (" (chance: blended's mean over random A-B pairs)" if chance else "")
                         + " | merged units fusing A with B):")
        elif len(mudsc.get("parents") or ()) > 2:  # the diagnostics are two-parent only (docs/design.md §4.13)
            lines.append(f"  groups (match value; merges of more than two parents have no {DIAGNOSTICS_FILENAME}):")
        else:
            lines.append(f"  groups (match value; no {DIAGNOSTICS_FILENAME} in the folder):")
        width = max(len(g.name) for g in diagnostics.groups)
        for g in diagnostics.groups:
            row = f"    {g.name:<{width}}  {_number(g.value)}"
            if scored:
                base = (f" (chance {g.baseline_blended:6.3f})" if g.baseline_blended is not None
                        else " " * len(" (chance  0.000)") if chance else "")
                row += (f" | {_number(g.activation)} {_number(g.weight)} {_number(g.blended)}{base} | "
                        f"{'  -' if g.cross_fraction is None else f'{100 * g.cross_fraction:3.0f}'}%")
            lines.append(row)
        if scored:
            worst = min(scored, key=lambda g: g.blended)
            lines.append(f"  weakest group: {worst.name} (blended {worst.blended:.3f})")
    elif has_file:
        lines.append(f"  groups:    none ({DIAGNOSTICS_FILENAME} lists no groups)")
    else:
        lines.append("  no unit matching (the method matched no units)")
    if evaluation:
        metric = (evaluation.get("metrics") or ["accuracy"])[0]
        joint = {scorer: views.get("joint", {}).get(metric) for scorer, views in evaluation.get("scores", {}).items()}
        cells = ", ".join(f"{scorer} {value:.3f}" for scorer, value in joint.items() if value is not None)
        if cells:
            lines.append(f"  joint {metric} ({RESULTS_FILENAME}): {cells}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.3f}"


#: What shows an `--output` folder holds a model (not plots): `inspect --output` never replaces one, even with
#: `--overwrite` (QA s24: a merged model was replaced by four PNGs).
MODEL_FILES = ("config.json", "mudsc_recipe.yaml", "*.safetensors", "*.bin", "*.safetensors.index.json",
               "*.bin.index.json", "*.pt", "*.pth")
#: The plots drawn from `merge_diagnostics.json` that a redraw from `config.json` alone would draw with less.
POORER_WITHOUT_DIAGNOSTICS = ("match_quality.png",)


def printable(value: Any) -> Any:
    """`value` (a config's `mudsc` record) with every string in it `escaped`, newlines too."""
    if isinstance(value, str):
        return escaped(value)
    if isinstance(value, dict):
        return {printable(key): printable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [printable(item) for item in value]
    return value


def holds_model(folder: Path) -> bool:
    """Whether `folder` holds a model's config, weights or recipe (at its top level). A path the system cannot look
    up (a name too long) holds none: `check_output` then refuses it in one line, where this raised a traceback. Any
    other error (a disk's I/O error, no permission) is not hidden as "holds none"."""
    try:
        return folder.is_dir() and not folder.is_symlink() and any(
            next(folder.glob(pattern), None) is not None for pattern in MODEL_FILES)
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise
        return False


def inspect_folder(folder: Path, *, output: str | None = None, overwrite: bool = False, plots: bool = True) -> int:
    """Print the summary of a merged folder and (unless `plots` is False) redraw its plots: into `DIR/plots`
    only when hf-mudsc wrote the folder (its marker), else into `output`, which never replaces a model."""
    from hf_mudsc.publish.folder import MARKER_FILENAME, read_marker, weights_fingerprint

    # Which merge is read, for a redraw into the folder: one replaced meanwhile gets none of its plots.
    read_from = weights_fingerprint(folder) if plots and output is None else None
    mudsc, diagnostics, evaluation = read_merge(folder)
    inputs = [("merged-model folder", folder)]
    if plots and output is not None:
        from hf_mudsc.publish.folder import check_output

        if holds_model(Path(output).expanduser()):
            raise FileExistsError(f"refusing --output {output!r}: it holds a merged model, which inspect's --output "
                                  "would replace with plots; choose another --output")
        check_output(output, overwrite=overwrite, inputs=inputs)  # a refused --output is the whole answer
    elif plots and not (read_marker(folder) or {}).get("complete"):
        raise FileExistsError(
            f"refusing to draw plots into {str(folder)!r}: hf-mudsc did not write that folder (it has no "
            f"{MARKER_FILENAME}), so inspect writes nothing into it; pass --output DIR for the plots, or --no-plots"
        )
    has_file = (folder / DIAGNOSTICS_FILENAME).is_file()
    # A downloaded folder's strings are data: a newline in a parent's name would print a line of its own, an escape
    # sequence would drive the terminal. Escaped in the config's values, and in whatever else the summary shows.
    try:
        text = summary(folder, printable(mudsc), diagnostics, evaluation, has_file)
    except ValueError as error:  # a number field holding text (`weight_distance: n/a`)
        raise ValueError(malformed(folder, "config.json", f"{type(error).__name__}: {error}")) from None
    print(escaped(text, keep="\n"))
    if not plots:
        return 0
    drawable = diagnostics if diagnostics.groups else None
    kept: list[str] = []
    if output is not None:
        from hf_mudsc.publish.folder import staged_output
        from hf_mudsc.publish.plots import draw_plots

        with staged_output(output, overwrite=overwrite, inputs=inputs) as staging:
            drawn = [plot.path.name for plot in draw_plots(staging, drawable, evaluation)]
        where = Path(output).expanduser()
    else:
        # Without the diagnostics file the match-quality plot is redrawn from config.json alone (the match values,
        # no correlations): the merge's own one, drawn from the file, is kept.
        keep = () if has_file else POORER_WITHOUT_DIAGNOSTICS
        drawn, kept = redraw_in_place(folder, drawable, evaluation, keep=keep, read_from=read_from)
        where = folder / PLOTS_FOLDER
    if drawn:
        print(f"Plots written to {where}: {', '.join(drawn)}")
    if kept:
        print(f"Kept {', '.join(f'{PLOTS_FOLDER}/{name}' for name in kept)} as it is: without "
              f"{DIAGNOSTICS_FILENAME} a redraw would show only config.json's match values; pass --output DIR to "
              "draw that version elsewhere")
    if not drawn and not kept:
        why = (f"{DIAGNOSTICS_FILENAME} lists no groups" if has_file and not diagnostics.groups
               else "the merge matched no units")
        print(f"Nothing to plot: {why} and the folder holds no evaluation results")
    return 0


_NOW = object()


def redraw_in_place(folder: Path, diagnostics: Any, evaluation: Mapping[str, Any] | None, *,
                    keep: tuple[str, ...] = (), read_from: str | None | object = _NOW) -> tuple[list[str], list[str]]:
    """Draw into `folder/plots`: only over PNGs hf-mudsc wrote there unchanged (its marker lists them), each file
    replaced atomically and recorded in the folder's marker, so `push` and `--overwrite` still accept the folder.
    Anything else under that name is refused before a file is written. `keep`: file names left as they are when
    they exist (a redraw from less data). `read_from`: the folder's `weights_fingerprint` when `diagnostics` and
    `evaluation` were read (default: now): a folder replaced since (`merge --overwrite`) is refused, nothing written.
    Returns the file names written, and those kept."""
    import shutil

    from hf_mudsc.publish.folder import check_not_replaced, unlisted_files, weights_fingerprint, write_file_atomically
    from hf_mudsc.publish.plots import draw_plots

    if read_from is _NOW:
        read_from = weights_fingerprint(folder)

    destination = folder / PLOTS_FOLDER
    if destination.exists() and (destination.is_symlink() or not destination.is_dir()):
        raise FileExistsError(f"{str(destination)!r} exists and is not a folder; pass --output DIR for the plots")
    with tempfile.TemporaryDirectory(prefix="hf-mudsc-plots-") as scratch:
        drawn = draw_plots(scratch, diagnostics, evaluation)
        present = {plot.path.name for plot in drawn
                   if (destination / plot.path.name).exists() or (destination / plot.path.name).is_symlink()}
        kept = [plot.path.name for plot in drawn if plot.path.name in keep and plot.path.name in present
                and (destination / plot.path.name).read_bytes() != plot.path.read_bytes()]  # not this very drawing
        drawn = [plot for plot in drawn if plot.path.name not in kept]
        names = [plot.path.name for plot in drawn]
        if names:
            check_not_replaced(folder, read_from, "inspected", "run inspect again")
        existing = [name for name in names if name in present]
        if existing:
            foreign, changed = unlisted_files(folder, check_content=True)
            theirs = [name for name in existing if f"{PLOTS_FOLDER}/{name}" in set(foreign) | set(changed)]
            if theirs:
                raise FileExistsError(
                    f"refusing to replace {', '.join(f'{PLOTS_FOLDER}/{n}' for n in theirs)} in {str(folder)!r}: "
                    "hf-mudsc did not write them (or they changed since); move them away or pass --output DIR"
                )
        for plot in drawn:
            write_file_atomically(destination / plot.path.name,
                                  lambda temporary, source=plot.path: shutil.copyfile(source, temporary), owner=folder)
    return names, kept


# ---------------------------------------------------------------------------------------------- a recipe


def dry_run(recipe: Any) -> tuple[Any, list[str]] | None:
    """The merge's dry run of `recipe`: `(plan, [])`; `(None, [why])` when the Hub cannot be reached (offline: the
    parents' configs cannot be read here, the merge will check them); None after printing a Hub error as `merge`
    does. The dry run's own refusals (a `ValueError`: a base needed and none found, no such device, ...) reach the
    caller."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    import hf_mudsc
    from hf_mudsc.errors import LoadError
    from hf_mudsc.load.hub_calls import hub_error_line
    from hf_mudsc.load.references import hide_tokens

    try:
        return hf_mudsc.merge(recipe.models, recipe.calibration, **{**recipe.keywords(), "dry_run": True,
                                                                    "progress": False}), []
    except HfHubHTTPError as error:
        print(f"hf-mudsc inspect: error: {escaped(hide_tokens(hub_error_line(error)))}", file=sys.stderr)
        return None
    except LoadError as error:
        cause = error.__cause__
        unreachable = isinstance(cause, LocalEntryNotFoundError) or (
            isinstance(cause, (OSError, ConnectionError)) and not isinstance(cause, HfHubHTTPError))
        if not unreachable:
            raise
        return None, [f"not checked against the parents ({error}); `merge --recipe` checks them before loading"]


#: What `inspect RECIPE` shows for calibration data a merge was given in memory (the run command's placeholder).
IN_MEMORY_STAND_IN = "DATA"


def inspect_recipe(path: Path) -> int:
    """Print what the recipe would merge: parents, method and the options it sets, each marked when the method
    does not read it. Refused as `merge --recipe` refuses it: the recipe's own checks (exit 2), then the merge's dry
    run (configs and safetensors headers only, no weights), whose refusals and warnings are the merge's — one set
    of rules, not a copy (QA s24: ties without a base and device cuda without CUDA were shown as runnable)."""
    from hf_mudsc.diagnostics import unread_options
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.load.references import hide_tokens
    from hf_mudsc.methods.auto import handed_options, is_auto
    from hf_mudsc.methods.registry import get_method
    from hf_mudsc.publish.recipe import IN_MEMORY_NOTE, Recipe, given_processor_warning, unresolved_published_entries

    try:
        recipe = Recipe.load(path)  # first: its size and encoding are checked before the file is read whole
        text = path.read_text(encoding="utf-8")
        # A merge given its data in memory recorded none (the file says so): a run must pass it, like a local folder
        # named by name only; every other check still runs, on a stand-in spec.
        in_memory = IN_MEMORY_NOTE in text and not recipe.calibration
        if in_memory:
            recipe.calibration = IN_MEMORY_STAND_IN
        # what the merge would refuse is refused here too (exit 2, as `merge --recipe`)
        recipe = recipe.validate(calibration_stand_in=in_memory)
        unresolved = unresolved_published_entries(text, recipe)
        skip = frozenset(entry.label for entry in unresolved) | ({"calibration"} if in_memory else set())
        recipe.check_local_inputs(path, skip)
    except RecipeError as error:
        print(f"hf-mudsc inspect: error: {escaped(hide_tokens(str(error)))}", file=sys.stderr)
        return 2
    warnings: list[str] = []
    if not unresolved and not in_memory:  # the dry run finds every parent: what it refuses, the merge refuses
        checked = dry_run(recipe)
        if checked is None:
            return 1
        plan, warnings = checked
        warnings += list(plan.warnings) if plan is not None else []
    defaults = Recipe()
    unread: set[str] = set()
    lines = [f"Recipe {path}", f"  would merge: {', '.join(recipe.models) or '(no parents)'}"]
    if is_auto(recipe.method):
        settings = "chosen from how the parents relate"
    else:
        method = get_method(recipe.method)  # the options the method reads, as the merge records them
        matcher, alpha = method.used_matcher(recipe.matcher), method.recorded_alpha(recipe.alpha)
        used = refit_read_options(method.used_options(handed_options(recipe, len(recipe.models))), recipe,
                                  recipe.refit)  # the weights a refit reads after a method that does not
        unread = set(unread_options(recipe, used,
                                    read=method.read_as_default(recipe)))
        settings = ", ".join(s for s in (f"matcher {matcher}" if matcher else "",
                                         f"alpha {alpha:g}" if isinstance(alpha, float) else
                                         f"alpha {alpha}" if alpha is not None else "") if s)
    lines.append(f"  method:      {recipe.method}{f' ({settings})' if settings else ''}")
    if recipe.calibration:
        samples = f", {recipe.num_samples} samples" if recipe.num_samples else ", every sample"
        where = "given in memory to hf_mudsc.merge, not recorded" if in_memory else recipe.calibration
        lines.append(f"  calibration: {where}{samples}")
    # matcher and alpha are on the method's line, except under auto, which names no settings there
    shown = {"models", "method", "calibration", "num_samples",
             *(() if is_auto(recipe.method) else ("matcher", "alpha"))} - unread
    others = [f"{key} = {getattr(recipe, key)!r}{' (no effect)' if key in unread else ''}" for key in Recipe.keys()
              if key not in shown and getattr(recipe, key) != getattr(defaults, key)]
    lines.append(f"  other options: {', '.join(others) if others else 'all at their defaults'}")
    if (said := given_processor_warning(text)) is not None:  # a processor the file cannot name made its data
        warnings.append(said)
    lines += [f"  warning:     {text}" for text in warnings]
    # A recipe pushed from local folders names them by folder name only: a run needs their paths (`unresolved`).
    command = ["hf-mudsc merge", "--recipe", str(path), "--output DIR"]
    if in_memory:
        lines.append("  to give:     the calibration data (the merge was given it in memory, as a Dataset object "
                     "or batches)")
        command[-1:-1] = [f"--calibration {IN_MEMORY_STAND_IN}"]
    if unresolved:
        lines.append("  to give:     " + ", ".join(f"{entry.label} `{entry.given}`" for entry in unresolved)
                     + " (local folders on the machine that merged, named by folder name only)")
        missing = {entry.index for entry in unresolved if entry.key == "models"}
        parents = [f"PATH_{parent_label(i)}" if i in missing else model for i, model in enumerate(recipe.models)]
        command[1:1] = parents if missing else []
        command[-1:-1] = [f"--{entry.key} PATH" for entry in unresolved if entry.key != "models"]
    lines.append(f"Run it with `{' '.join(command)}`.")
    print("\n".join(lines))
    return 0
