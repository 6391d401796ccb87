"""`hf-mudsc merge A B --calibration SPEC --output DIR [--push-to-hub ORG/NAME]` and `merge --recipe`.

Order of work, so that bad input fails fast and a failure leaves nothing behind:
recipe + flags checked -> output folder / Hub repo refused if they exist (without --overwrite) ->
parents located and their configs checked (revisions resolved) -> calibration opened -> parents' weights
loaded -> merge -> (rank 0 only) model, processor, card and
recipe written to a hidden temporary sibling folder (`hf_mudsc.publish`, the writer the API shares) ->
pushed in one commit (if asked) -> the temporary folder renamed into place (`hf_mudsc.output`). Any error
or interrupt before the push deletes the temporary folder; a failed push keeps the written model and says
where; inputs are only read. This module reads the command line into a recipe; the run is `hf_mudsc.runner`'s,
which the service's worker shares.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import Field
from pathlib import Path
from typing import Any

from hf_mudsc.cli.push import add_commit_arguments, commit_options, pushed_line
from hf_mudsc.errors import RecipeError, escaped
from hf_mudsc.load.hub_calls import hub_error_line
from hf_mudsc.load.references import hide_tokens
from hf_mudsc.options import MergeOptions, flag, int_auto_or_all, int_or_all, int_or_auto, number_or_auto
from hf_mudsc.publish.recipe import (
    RECIPE_FILENAME,
    CalibrationMissing,
    Recipe,
    check_local_folders_given,
    refuse_unrecorded_data,
    warn_given_processor,
    yaml_value,
)
from hf_mudsc.runner import check_before_dry_run, check_found_base, execute

logger = logging.getLogger(__name__)


def option_argument(option: Field, command: str = "merge") -> tuple[list[str], dict[str, Any]]:
    """The `add_argument` flags and keywords of one declared option (`hf_mudsc.options.MergeOptions`) for `command`:
    another command that takes the flag shows its own help text (`command_help`), the option still declared once.

    Unset flags stay absent (`default=SUPPRESS`), so a recipe's keys are only overridden by given flags."""
    meta = option.metadata
    help_text = meta["help"]() if callable(meta["help"]) else meta["help"]
    help_text = meta["command_help"].get(command, help_text)
    if meta["show_default"]:
        help_text += f" (default: {option.default})"
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
    if meta["kind"] == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif meta["kind"] == "int":  # a nullable one takes 'all' for None (`--num-samples all`)
        kwargs["type"] = int_or_all if meta["nullable"] else int
    elif meta["kind"] == "number":
        kwargs["type"] = float
    elif meta["kind"] in ("numbers", "number_or_numbers", "gradient"):  # `--weights 1 2 1`, `--density 0.5` ...
        kwargs["type"], kwargs["nargs"] = float, "+"
    elif meta["kind"] == "number_or_auto":
        kwargs["type"] = number_or_auto
    elif meta["kind"] == "int_or_auto":  # a nullable one takes 'all' for None (`--refit-samples all`)
        kwargs["type"] = int_auto_or_all if meta["nullable"] else int_or_auto
    if meta["choices"] is not None:
        choices = meta["choices"]
        kwargs["choices"] = list(choices() if callable(choices) else choices)
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    return [flag(option.name), *([meta["short"]] if meta["short"] else [])], kwargs


def add_arguments(parser: argparse.ArgumentParser, options: type[MergeOptions] = Recipe) -> None:
    """The `hf-mudsc merge` arguments: the parents, --recipe, one flag per declared option, --token."""
    S = argparse.SUPPRESS  # unset flags stay absent, so a recipe's keys are only overridden by given flags
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", default=S,
        help="the parents (two or more): Hub repos `org/name` or `org/name@revision` (branch, tag or commit sha), "
        "or local folders. Omit them with --recipe.")
    parser.add_argument(
        "--recipe", metavar="YAML", default=S, type=os.path.expanduser,  # `--recipe=~/x.yaml`: no shell expands it
        help=f"run a recipe file, YAML or JSON (e.g. a {RECIPE_FILENAME} written next to a merged model); every "
        "other flag overrides the recipe's key of the same name, and the run says which it overrode")
    for option in options.option_fields():
        flags, kwargs = option_argument(option)
        parser.add_argument(*flags, **kwargs)
    # How --push-to-hub commits: not recipe keys (they say where, not what, to merge).
    add_commit_arguments(parser, of="--push-to-hub: ")
    parser.add_argument(
        "--token", metavar="TOKEN", default=S,
        help="Hub token for private parents and pushing (default: HF_TOKEN or the stored `hf auth login`; "
        "prefer those: a token on the command line is visible to other users of the machine). Never "
        "logged or written.")


def build_recipe(args: argparse.Namespace, recipe_class: type[Recipe] = Recipe) -> Recipe:
    """The recipe file (if any) with the given flags applied on top."""
    path = getattr(args, "recipe", None)
    if path is not None and not path.strip():  # `--recipe "$UNSET"`: the merge would run without the recipe meant
        raise RecipeError("--recipe is empty; pass the path of a recipe file (e.g. DIR/mudsc_recipe.yaml), or leave "
                          "--recipe out")
    loaded = recipe_class.load(path) if path else recipe_class()
    overrides = {k: v for k, v in vars(args).items() if k in recipe_class.keys() and k != "models"}
    if getattr(args, "models", None):
        overrides["models"] = list(args.models)
    try:
        recipe = loaded.override(**overrides).validate()
    except CalibrationMissing as error:
        if path:
            refuse_unrecorded_data(path, error)  # its data was given in memory: say so
        raise
    if path:  # a recipe pushed to the Hub names local folders by name only: their paths must be given
        check_local_folders_given(path, recipe)
        warn_given_processor(path)
        if replaced := overridden(loaded, recipe, overrides):
            logger.info("recipe %s: the command line overrides its keys: %s", path, "; ".join(replaced))
    if not recipe.output and not recipe.push_to_hub and not recipe.dry_run:
        raise RecipeError("say where the merged model goes: --output DIR and/or --push-to-hub ORG/NAME")
    return recipe


def overridden(loaded: Recipe, recipe: Recipe, given: dict[str, Any]) -> list[str]:
    """`--alpha 0.7 over alpha: 0.3` for each flag `given` that changed a key the recipe file sets: the flag wins (as
    `--recipe`'s help says), and the run says so rather than merge with a value the file does not hold."""
    def text(key: str, value: Any) -> str:
        if isinstance(value, bool):
            return flag(key) if value else f"--no-{flag(key)[2:]}"
        shown_value = " ".join(map(str, value)) if isinstance(value, list) else "all" if value is None else value
        return f"{flag(key)} {shown_value}"

    said = []
    for key in given:
        old, new = getattr(loaded, key), getattr(recipe, key)
        if key not in loaded.file_keys or old == new:
            continue
        if key == "models":
            said.append(f"the {len(new)} parents given over its models")
        else:
            said.append(f"{text(key, new)} over {key}: {yaml_value(old)}")
    return said


def run(args: argparse.Namespace) -> int:
    try:
        recipe = build_recipe(args)
        # Every local input that is not there, at once (as `inspect RECIPE` lists them), before anything is loaded.
        recipe.check_local_inputs(getattr(args, "recipe", None))
        commit = commit_options(args)
        check_commit_flags(recipe, commit)
    except RecipeError as error:
        print(f"hf-mudsc merge: error: {escaped(hide_tokens(str(error)))}", file=sys.stderr)
        return 2
    from huggingface_hub.errors import HfHubHTTPError

    from hf_mudsc.errors import PushError

    if recipe.dry_run:  # the plan only: nothing loaded but small files, nothing written or pushed
        import hf_mudsc

        notes = check_before_dry_run(recipe, getattr(args, "recipe", None))  # refused as the merge would refuse
        try:
            plan = hf_mudsc.merge(recipe.models, recipe.calibration, **recipe.keywords(),
                                  token=getattr(args, "token", None))
        except HfHubHTTPError as error:
            print(f"hf-mudsc merge: error: {escaped(hide_tokens(hub_error_line(error)))}", file=sys.stderr)
            return 1
        if plan.base_source is not None and recipe.base is None:  # the base the cards name: an input too
            check_found_base(recipe, plan.base, Path(recipe.output).expanduser().absolute() if recipe.output else None,
                             getattr(args, "recipe", None))
        plan.warnings += notes
        print(plan)
        return 0

    try:
        result = execute(recipe, token=getattr(args, "token", None), recipe_file=getattr(args, "recipe", None),
                         progress=not getattr(args, "quiet", False), commit=commit)
    except (PushError, HfHubHTTPError) as error:
        print(f"hf-mudsc merge: error: {escaped(hide_tokens(hub_error_line(error)))}", file=sys.stderr)
        return 1
    if result.get("calibration_samples"):  # none read (a method that reads no data): nothing to say
        used, asked = result["calibration_samples"], recipe.num_samples
        short = f" (--num-samples asked for {asked})" if asked is not None and used < asked else ""
        print(f"Calibrated on {used} samples{short}")
    if result.get("output"):
        print(f"Merged model written to {result['output']}")
    if result.get("push"):  # as `hf-mudsc push` says it: the branch or pull request, or that nothing changed
        print(pushed_line(None, result["push"]))
    return 0


def check_commit_flags(recipe: Recipe, commit: Any) -> None:
    """Refuse --commit-message, --commit-description, --revision or --create-pr without --push-to-hub (they would
    be ignored), and values the push would refuse (`hub.check_commit_options`), before anything is loaded."""
    given = [name for name, value in (("--commit-message", commit.message),
                                      ("--commit-description", commit.description),
                                      ("--revision", commit.revision), ("--create-pr", commit.create_pr)) if value]
    if given and not recipe.push_to_hub:
        raise RecipeError(f"{', '.join(given)} {'says' if len(given) == 1 else 'say'} how --push-to-hub commits; "
                          "add --push-to-hub ORG/NAME, or leave "
                          f"{'it' if len(given) == 1 else 'them'} out")
    from hf_mudsc.publish.hub import check_commit_options

    try:
        check_commit_options(commit)
    except ValueError as error:
        raise RecipeError(str(error)) from None
