"""`hf-mudsc inspect DIR|RECIPE`: look at a merge without loading a model (docs/design.md §8c).

For a merged folder: prints its parents, their relation, the method and each group's match quality (from
`config.json` and `merge_diagnostics.json`), and redraws the plots into `DIR/plots` (or `--output`). For a recipe
file: says what it would merge and with which options. Neither torch nor the weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hf_mudsc.evaluate.names import RESULTS_FILENAME
from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME, PLOTS_FOLDER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="DIR|RECIPE",
                        help="a merged-model folder (written by `hf-mudsc merge --output DIR`) or a recipe file "
                             "(mudsc_recipe.yaml)")
    parser.add_argument("--output", metavar="DIR", default=None,
                        help=f"folder for the redrawn plots (default: DIR/{PLOTS_FOLDER})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only, draw nothing")


def run(args: argparse.Namespace) -> int:
    target = Path(args.target).expanduser()
    if target.is_dir():
        try:
            return inspect_folder(target, output=args.output, overwrite=args.overwrite, plots=not args.no_plots)
        except (AttributeError, TypeError, KeyError, IndexError) as error:  # a value of the wrong shape in a file
            raise ValueError(f"{str(target)!r} holds a malformed hf-mudsc file ({type(error).__name__}: {error}); "
                             "write the folder again with `hf-mudsc merge --output DIR`") from None
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        return inspect_recipe(target)
    raise FileNotFoundError(
        f"{args.target!r} is neither a merged-model folder nor a recipe file (*.yaml); pass the folder "
        "`hf-mudsc merge --output DIR` wrote, or its mudsc_recipe.yaml"
    )


# ---------------------------------------------------------------------------------------------- a merged folder


def read_merge(folder: Path) -> tuple[dict[str, Any], Any, dict[str, Any] | None]:
    """`(config.mudsc, MergeDiagnostics, evaluation dict or None)` of a merged folder; a one-line `ValueError`
    for a folder that is not a merge made by hf-mudsc."""
    from hf_mudsc.solve.diagnostics import MergeDiagnostics

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
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {str(config_path)!r} ({error}); {how}") from None
    mudsc = config.get("mudsc") if isinstance(config, dict) else None
    if not isinstance(mudsc, dict):
        raise ValueError(f"{str(folder)!r} is not a merge made by hf-mudsc: its config.json has no `mudsc` section; "
                         f"{how}")
    diagnostics_path = folder / DIAGNOSTICS_FILENAME
    if diagnostics_path.is_file():
        try:
            diagnostics = MergeDiagnostics.load(diagnostics_path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot read {str(diagnostics_path)!r}: {error}") from None
    else:
        diagnostics = MergeDiagnostics.from_config(mudsc)
    evaluation = None
    results_path = folder / RESULTS_FILENAME
    if results_path.is_file():
        try:
            evaluation = json.loads(results_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {str(results_path)!r} ({error}); run `hf-mudsc evaluate` again") from None
    return mudsc, diagnostics, evaluation


def summary(folder: Path, mudsc: Mapping[str, Any], diagnostics: Any, evaluation: Mapping[str, Any] | None,
            has_file: bool) -> str:
    """The text `inspect` prints for a merged folder."""
    lines = [f"Merged model {folder}"]
    parents = mudsc.get("parents") or []
    revisions = mudsc.get("parent_revisions") or [None] * len(parents)
    shown = [f"{name} @ {str(rev)[:10]}" if rev else str(name) for name, rev in zip(parents, revisions)]
    lines.append(f"  parents:   {', '.join(shown) or 'unknown'}")
    relation = mudsc.get("parent_relation")
    if isinstance(relation, Mapping) and relation.get("relation"):
        lines.append(f"  relation:  {relation['relation']} (relative weight distance "
                     f"{float(relation.get('weight_distance', math.nan)):.3g})")
    check = mudsc.get("correspondence_check")  # `auto`'s same-base choice confirmed on the activations
    if isinstance(check, Mapping) and check.get("method"):
        found = ("they correspond, so method auto kept the same-base method" if check.get("holds") else
                 "they do not correspond, so method auto kept that solve's merge")
        lines.append(f"  units:     {float(check.get('units_in_place', math.nan)):.1%} left in place by "
                     f"{check['method']}'s solve on the calibration data: {found}")
    settings = [f"matcher {mudsc['matcher']}" if mudsc.get("matcher") else None,
                f"alpha {mudsc['alpha']:g}" if isinstance(mudsc.get("alpha"), (int, float)) else None,
                f"refit {mudsc['refit']}" if mudsc.get("refit") not in (None, "none") else None]
    detail = ", ".join(s for s in settings if s)
    lines.append(f"  method:    {mudsc.get('method')}{f' ({detail})' if detail else ''}")
    if mudsc.get("num_calibration_samples"):
        lines.append(f"  calibration: {mudsc.get('calibration') or 'data'}, {mudsc['num_calibration_samples']} samples")
    if mudsc.get("out_dtype"):
        reason = mudsc.get("out_dtype_reason")
        lines.append(f"  weights:   {mudsc['out_dtype']}{f' ({reason})' if reason else ''}")
    reordered = [chr(ord("A") + i) for i, flag in enumerate(mudsc.get("head_reordered") or []) if flag]
    if reordered:
        lines.append(f"  heads:     parent{'s' if len(reordered) > 1 else ''} {', '.join(reordered)} reordered to "
                     "parent A's label order (same labels, another id order)")
    if diagnostics.starts:
        starts = ", ".join(f"{name} {value:.4f}" for name, value in diagnostics.starts.items())
        sweeps = f"{diagnostics.sweeps} sweeps, " if diagnostics.sweeps else ""
        lines.append(f"  solve:     {sweeps}{diagnostics.solve_start or '?'} start kept (final objective: {starts})")
    if diagnostics.groups:
        scored = [g for g in diagnostics.groups if g.blended is not None]
        if scored:
            lines.append("  groups (match value | mean correlation of fused A-B pairs: activation, weight, blended | "
                         "merged units fusing A with B):")
        elif len(mudsc.get("parents") or ()) > 2:  # the diagnostics are two-parent only (docs/design.md §4.13)
            lines.append(f"  groups (match value; merges of more than two parents have no {DIAGNOSTICS_FILENAME}):")
        else:
            lines.append(f"  groups (match value; no {DIAGNOSTICS_FILENAME}: merged before it existed):")
        width = max(len(g.name) for g in diagnostics.groups)
        for g in diagnostics.groups:
            row = f"    {g.name:<{width}}  {_number(g.value)}"
            if scored:
                row += (f" | {_number(g.activation)} {_number(g.weight)} {_number(g.blended)} | "
                        f"{'  -' if g.cross_fraction is None else f'{100 * g.cross_fraction:3.0f}'}%")
            lines.append(row)
        if scored:
            worst = min(scored, key=lambda g: g.blended)
            lines.append(f"  weakest group: {worst.name} (blended {worst.blended:.3f})")
    elif not has_file:
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


def inspect_folder(folder: Path, *, output: str | None = None, overwrite: bool = False, plots: bool = True) -> int:
    mudsc, diagnostics, evaluation = read_merge(folder)
    inputs = [("merged-model folder", folder)]
    if plots and output is not None:
        from hf_mudsc.publish.folder import check_output

        check_output(output, overwrite=overwrite, inputs=inputs)  # a refused --output is the whole answer
    has_file = (folder / DIAGNOSTICS_FILENAME).is_file()
    print(summary(folder, mudsc, diagnostics, evaluation, has_file))
    if not plots:
        return 0
    drawable = diagnostics if diagnostics.groups else None
    if output is not None:
        from hf_mudsc.publish.folder import staged_output
        from hf_mudsc.publish.plots import draw_plots

        with staged_output(output, overwrite=overwrite, inputs=inputs) as staging:
            drawn = [plot.path.name for plot in draw_plots(staging, drawable, evaluation)]
        where = Path(output).expanduser()
    else:
        drawn = redraw_in_place(folder, drawable, evaluation)
        where = folder / PLOTS_FOLDER
    if drawn:
        print(f"Plots written to {where}: {', '.join(drawn)}")
    else:
        print("Nothing to plot: the merge matched no units and the folder holds no evaluation results")
    return 0


def redraw_in_place(folder: Path, diagnostics: Any, evaluation: Mapping[str, Any] | None) -> list[str]:
    """Draw into `folder/plots`: only over PNGs hf-mudsc wrote there unchanged (its marker lists them), each file
    replaced atomically and recorded in the folder's marker, so `push` and `--overwrite` still accept the folder.
    Anything else under that name is refused before a file is written. Returns the file names written."""
    import shutil

    from hf_mudsc.publish.folder import unlisted_files, write_file_atomically
    from hf_mudsc.publish.plots import draw_plots

    destination = folder / PLOTS_FOLDER
    if destination.exists() and (destination.is_symlink() or not destination.is_dir()):
        raise FileExistsError(f"{str(destination)!r} exists and is not a folder; pass --output DIR for the plots")
    with tempfile.TemporaryDirectory(prefix="hf-mudsc-plots-") as scratch:
        drawn = draw_plots(scratch, diagnostics, evaluation)
        names = [plot.path.name for plot in drawn]
        existing = [name for name in names if (destination / name).exists() or (destination / name).is_symlink()]
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
    return names


# ---------------------------------------------------------------------------------------------- a recipe


#: What `inspect RECIPE` shows for calibration data a merge was given in memory (the run command's placeholder).
IN_MEMORY_STAND_IN = "DATA"


def inspect_recipe(path: Path) -> int:
    """Print what the recipe would merge: parents, method and the options it sets (nothing is loaded)."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.load.references import hide_tokens
    from hf_mudsc.methods.auto import is_auto
    from hf_mudsc.methods.registry import get_method
    from hf_mudsc.publish.recipe import IN_MEMORY_NOTE, Recipe, unresolved_published_entries

    text = path.read_text(encoding="utf-8")
    try:
        recipe = Recipe.load(path)
        # A merge given its data in memory recorded none (the file says so): a run must pass it, like a local folder
        # named by name only; every other check still runs, on a stand-in spec.
        in_memory = IN_MEMORY_NOTE in text and not recipe.calibration
        if in_memory:
            recipe.calibration = IN_MEMORY_STAND_IN
        recipe = recipe.validate()  # what the merge would refuse is refused here too (exit 2, as `merge --recipe`)
        unresolved = unresolved_published_entries(text, recipe)
        skip = frozenset(entry.label for entry in unresolved) | ({"calibration"} if in_memory else set())
        recipe.check_local_inputs(path, skip)
    except RecipeError as error:
        print(f"hf-mudsc inspect: error: {hide_tokens(str(error))}", file=sys.stderr)
        return 2
    defaults = Recipe()
    lines = [f"Recipe {path}", f"  would merge: {', '.join(recipe.models) or '(no parents)'}"]
    if is_auto(recipe.method):
        settings = "chosen from how the parents relate"
    else:
        method = get_method(recipe.method)  # the options the method reads, as the merge records them
        matcher, alpha = method.used_matcher(recipe.matcher), method.recorded_alpha(recipe.alpha)
        settings = ", ".join(s for s in (f"matcher {matcher}" if matcher else "",
                                         f"alpha {alpha:g}" if isinstance(alpha, float) else
                                         f"alpha {alpha}" if alpha is not None else "") if s)
    lines.append(f"  method:      {recipe.method}{f' ({settings})' if settings else ''}")
    if recipe.calibration:
        samples = f", {recipe.num_samples} samples" if recipe.num_samples else ", every sample"
        where = "given in memory to hf_mudsc.merge, not recorded" if in_memory else recipe.calibration
        lines.append(f"  calibration: {where}{samples}")
    shown = {"models", "method", "matcher", "alpha", "calibration", "num_samples"}
    others = [f"{key} = {getattr(recipe, key)!r}" for key in Recipe.keys()
              if key not in shown and getattr(recipe, key) != getattr(defaults, key)]
    lines.append(f"  other options: {', '.join(others) if others else 'all at their defaults'}")
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
        parents = [f"PATH_{chr(ord('A') + i)}" if i in missing else model for i, model in enumerate(recipe.models)]
        command[1:1] = parents if missing else []
        command[-1:-1] = [f"--{entry.key} PATH" for entry in unresolved if entry.key != "models"]
    lines.append(f"Run it with `{' '.join(command)}`.")
    print("\n".join(lines))
    return 0
