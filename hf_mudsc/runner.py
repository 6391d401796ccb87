"""A merge recipe run end to end: checked -> output and Hub repo refused if they exist -> parents located, their
configs checked -> calibration opened -> weights loaded -> merged -> written (and pushed) by rank 0.

The one path `hf-mudsc merge` and the service's worker share, so a job and the command refuse and write alike (the
service sits below the CLI and imports this, not the CLI). Heavy modules are imported when a run starts: the CLI
and the service import this module before torch is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_mudsc.errors import RecipeError
from hf_mudsc.options import REFITTING
from hf_mudsc.publish.folder import check_output
from hf_mudsc.publish.recipe import Recipe, check_push_target

logger = logging.getLogger(__name__)


def execute(recipe: Recipe, *, token: str | None = None, recipe_file: str | None = None,
            progress: bool = True, base_origin: str | None = None, commit: Any = None) -> dict[str, Any]:
    """Run a validated recipe: merge, save (and push) on the main process. Returns what was produced (`output`,
    `push`, `calibration_samples`, and `mudsc`: the merged config's record of what ran, its warnings included).

    `recipe_file`: the recipe's path, when it came from one (an input the output must not overlap).
    `progress`: progress bars on a terminal, periodic log lines otherwise (`hf_mudsc.progress`); False: neither.
    `base_origin`: how the recipe's `base` was found when the caller found it (the service resolves the base the
    parents' cards name before a job starts, `load.parents.BASE_FROM_CARDS`): the config and card say so.
    `commit`: how the push commits (`publish.hub.CommitOptions`: message, description, branch, pull request)."""
    if not recipe.output and not recipe.push_to_hub:
        raise RecipeError("say where the merged model goes: --output DIR and/or --push-to-hub ORG/NAME")
    from hf_mudsc.calibrate.device import resolve_device

    try:  # CUDA asked for on a machine without it: one line naming the flag, before anything is loaded
        resolve_device(recipe.device, cli=True)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    main = _is_main_process()
    output = Path(recipe.output).expanduser().absolute() if recipe.output else None
    if output is not None:
        check_merge_output(output, recipe, recipe_file)
    check_push_target(recipe)
    if recipe.push_to_hub and main:
        from hf_mudsc.publish.hub import check_target

        check_target(recipe.push_to_hub, overwrite=recipe.overwrite, token=token, options=commit,
                     private=bool(recipe.private))

    from hf_mudsc.calibrate.datasets import load_calibration_dataset, pin_calibration_revision
    from hf_mudsc.load.parents import load_parents_and_base
    from hf_mudsc.methods.auto import check_choices, is_auto
    from hf_mudsc.methods.registry import check_size, get_method

    chosen = None if is_auto(recipe.method) else get_method(recipe.method)
    if chosen is not None:  # a size budget the method cannot spend, or options it refuses: before any data is read
        check_size(chosen, recipe.size)
        chosen.check_options(recipe, len(recipe.models))
    else:  # `auto`: options every method it may choose refuses (`Recipe.validate` refuses them first)
        check_choices(recipe, len(recipe.models), has_data=recipe.calibration is not None,
                      has_base=recipe.base is not None)
    # `auto` opens the calibration it is given: the method it chooses may read it.
    reads_data = recipe.calibration is not None if chosen is None else (
        chosen.needs_calibration or chosen.needs_data)
    opened: dict[str, Any] = {}

    from hf_mudsc.pipeline import (
        auto_before_loading,
        check_before_weights,
        check_calibration_before_weights,
        reads_calibration,
        streams_parents,
    )
    from hf_mudsc.plan import base_copied, base_loaded_whole, head_copies

    first: dict[str, Any] = {}  # the first parent's config, for the calibration check

    def check_config(config: Any, every: list[Any], found_base: Any) -> None:
        first["config"] = config
        check_before_weights(config, recipe, len(recipe.models), chosen,
                             loading=1 if lazy else len(recipe.models), copied=head_copies(every, streaming=lazy),
                             base=base_loaded_whole(recipe.base, chosen, streaming=lazy),
                             base_copy=base_copied(found_base, every[0], streaming=lazy), parents=every)

    def open_calibration(processors: list[Any], problems: Sequence[str | None] = ()) -> None:
        # A Hub dataset is pinned to its commit (recorded in the recipe) and loaded at that commit; opened (not
        # read) once the parents' configurations passed their checks and before their weights are read: a
        # refusal from a config comes first, a spec that does not exist or columns the parents' processors cannot
        # read fail before any weights are downloaded (the columns for a method known to read them, and for `auto`
        # given data: every method it may choose that reads data reads the same columns).
        opened["spec"] = pin_calibration_revision(recipe.calibration, token=token)
        opened["data"] = load_calibration_dataset(opened["spec"], token=token)
        if "config" in first and (chosen is None or reads_calibration(chosen, recipe, recipe.calibration,
                                                                      len(recipe.models))):
            check_calibration_before_weights(opened["data"], processors, first["config"], recipe,
                                             unreadable=problems)

    # As merge() would: a tensor-wise method's parents after the first (and the base) are read one tensor at a time.
    lazy = streams_parents(chosen, recipe, recipe.calibration, len(recipe.models))

    def choose_loading(views: list[Any], found_base: Any, base_view: Any) -> bool:
        # `auto`: chosen on the parents read one tensor at a time and checked before any is loaded whole; merge()
        # is handed that choice (it does not judge the loaded parents again)
        opened["choice"] = auto_before_loading(views, recipe, opened.get("data", recipe.calibration),
                                               has_base=found_base is not None, references=len(recipe.models),
                                               base=recipe.base, found_base=found_base, base_view=base_view)
        return opened["choice"].streams

    parents, base, _ = load_parents_and_base(
        recipe.models, recipe.base, token=token, allow_pickle=recipe.allow_pickle,
        base_needed_for=recipe.method if chosen is not None and chosen.needs_base_model else None, lazy=lazy,
        check_config=check_config, choose_loading=choose_loading if chosen is None else None,
        found_base=lambda reference: check_found_base(recipe, reference, output, recipe_file),
        before_weights=open_calibration if reads_data or recipe.refit in REFITTING or (
            recipe.refit == "auto" and recipe.calibration is not None) else None)
    if base is not None and base_origin is not None:
        base.origin = base_origin
        logger.info("base model %s: %s", recipe.base, base_origin)
    calibration, calibration_spec = opened.get("data"), opened.get("spec", recipe.calibration)
    import hf_mudsc

    merged = hf_mudsc.merge(parents, calibration, **{**recipe.keywords(), "base": base}, token=token,
                            progress=progress, auto_choice=opened.get("choice"))
    if merged is None or not main:  # a non-main process of a distributed run: rank 0 saves and publishes
        return {}
    if calibration is not None:  # merge() saw an opened dataset; the config names what the user passed
        from hf_mudsc.load.references import display_name

        merged.config.mudsc["calibration"] = display_name(str(calibration_spec))
    from hf_mudsc.load.references import pinned_calibration, pinned_reference
    from hf_mudsc.publish.recipe import pinned_choices, restate_auto_choices

    # A recipe pins what `auto` chose: its re-run says why, as the original did (and its recipe records it again).
    restate_auto_choices(merged.config.mudsc, recipe, merged.merge_report.auto_out_dtype)

    # Parents, base and data pinned; `auto` recorded as the method, refit and out_dtype it chose, and `alpha: auto`
    # as the α handed to a method that ignores it (as `merge_report.recipe`).
    pinned = pinned_choices(recipe.override(models=[pinned_reference(p) for p in parents],
                                            calibration=pinned_calibration(calibration_spec)), merged)
    from hf_mudsc.publish.writer import publish

    # On a failed push the written model is kept (in --output, or a folder the error names).
    produced = publish(merged, output=output, push_to_hub=recipe.push_to_hub, overwrite=recipe.overwrite,
                       private=recipe.private, token=token, recipe=pinned, parents=parents,
                       processor=parents[0].processor, commit=commit)
    if calibration is not None:
        produced["calibration_samples"] = merged.merge_report.num_samples
    produced["mudsc"] = merged.config.mudsc  # what ran (the method and α `auto` chose) and its warnings: the service's
    return produced


def check_merge_output(output: Path, recipe: Recipe, recipe_file: str | None = None, *, flag: str = "--output") -> None:
    """Refuse an existing output (without --overwrite), or one equal to, inside or around any input
    (`Recipe.inputs`: parent folders, calibration data, the recipe file, the hub cache Hub inputs are read from;
    paths resolved: `..` and symlinks). `flag`: how messages name the output (`--output` on the command line; the
    service's jobs say `output`)."""
    check_output(output, overwrite=recipe.overwrite, inputs=recipe.inputs(recipe_file), flag=flag)


def check_output_around_base(output: Path, recipe: Recipe, base: str, recipe_file: str | None = None, *,
                             flag: str = "--output") -> None:
    """`check_merge_output` once the base the parents' model cards name is found (`recipe.base` unset): that base's
    folder (or the Hub cache it is read from) is an input the output may not be equal to, inside or around, exactly as
    for a base given with --base. The merge refuses so before any weights are read, its dry run after its plan."""
    check_output(output, overwrite=recipe.overwrite, inputs=recipe.override(base=base).inputs(recipe_file), flag=flag)


def check_found_base(recipe: Recipe, base: str, output: Path | None, recipe_file: str | None = None) -> None:
    """A base the parents' model cards name (`recipe.base` unset) is an input too, as one given: the `output` (None:
    none is written) may not be equal to, inside or around it (`check_output_around_base`) and the push may not
    replace its repo (`check_push_target`) — for the merge, its dry run and the service's alike."""
    if output is not None:
        check_output_around_base(output, recipe, base, recipe_file)
    check_push_target(recipe.override(base=base))


def check_before_dry_run(recipe: Recipe, recipe_file: str | None = None) -> list[str]:
    """What the merge refuses at once about where its result goes, refused by its dry run in the same words (the CLI
    exits 1 for both): an existing --output without --overwrite, one overlapping an input (`check_merge_output`).
    A dry run answers "would this merge start?", so it must not pass what the merge refuses before loading; the
    service's dry-run jobs are refused alike at POST (`serve.jobs.parse_job`). The --push-to-hub repo is not looked
    up: a dry run contacts the Hub only for the parents' configs and headers. Returns the plan's note saying so.
    A --device the machine lacks is refused first, in the run's words (merge() would name its `device=` keyword)."""
    from hf_mudsc.calibrate.device import resolve_device

    try:
        resolve_device(recipe.device, cli=True)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    if recipe.output:
        check_merge_output(Path(recipe.output).expanduser().absolute(), recipe, recipe_file)
    check_push_target(recipe)
    return [push_not_checked(recipe.push_to_hub)] if recipe.push_to_hub else []


def push_not_checked(repo_id: str) -> str:
    """The dry run's line for a --push-to-hub repo it did not look up (`check_before_dry_run`)."""
    return (f"the Hub repo {repo_id!r} (push_to_hub) was not checked: a dry run does not ask the Hub whether it "
            "exists or can be reached; the merge does, before loading (it refuses an existing repo without overwrite)")


def _is_main_process() -> bool:
    from hf_mudsc.calibrate.distributed import is_main_process

    return bool(is_main_process())
