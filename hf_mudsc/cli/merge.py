"""`hf-mudsc merge A B --calibration SPEC --output DIR [--push-to-hub ORG/NAME]` and `merge --recipe`.

Order of work, so that bad input fails fast and a failure leaves nothing behind:
recipe + flags checked -> output folder / Hub repo refused if they exist (without --overwrite) ->
parents loaded (revisions resolved) -> calibration -> merge -> (rank 0 only) model, processor, card and
recipe written to a hidden temporary sibling folder (`hf_mudsc.publish`, the writer the API shares) ->
pushed in one commit (if asked) -> the temporary folder renamed into place (`hf_mudsc.output`). Any error
or interrupt before the push deletes the temporary folder; a failed push keeps the written model and says
where; inputs are only read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hf_mudsc.errors import RecipeError
from hf_mudsc.methods.registry import METHODS
from hf_mudsc.publish.folder import check_output
from hf_mudsc.publish.recipe import MATCHERS, RECIPE_FILENAME, Recipe

_DEFAULTS = Recipe()


def _default(key: str) -> str:
    return f"(default: {getattr(_DEFAULTS, key)})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay absent, so a recipe's keys are only overridden by given flags
    parser.add_argument(
        "models", nargs="*", metavar="MODEL", default=S,
        help="the two parents: Hub repos `org/name` or `org/name@revision` (branch, tag or commit sha), or "
        "local folders. Omit them with --recipe.")
    parser.add_argument(
        "--recipe", metavar="YAML", default=S,
        help=f"run a recipe file (e.g. a {RECIPE_FILENAME} written next to a merged model); every other flag "
        "overrides the recipe's key of the same name")
    parser.add_argument(
        "--calibration", metavar="SPEC", default=S,
        help="calibration data for the activation statistics: `repo_or_path[:config]:split` — a Hub "
        "dataset id (pin it like a parent: `org/ds@revision:split`; the recipe records the commit used), an "
        "imagefolder or a data file (streamed), or a folder written by Dataset.save_to_disk; a split may carry "
        "a slice (`train[:512]`). Needed by every method except weight_matching and average.")
    parser.add_argument(
        "--output", "-o", metavar="DIR", default=S,
        help="folder for the merged model (safetensors weights, processor, README.md card, "
        f"{RECIPE_FILENAME}); must not exist unless --overwrite")
    parser.add_argument(
        "--method", choices=list(METHODS), default=S,
        help="merge method: " + "; ".join(f"{m.name} = {m.pretty_name}" for m in METHODS.values())
        + f" {_default('method')}")
    parser.add_argument(
        "--matcher", choices=MATCHERS, default=S,
        help="how matched units are fused for method mudsc: zip (ZipIt greedy, may fuse units within one "
        f"model) or align (one permutation) {_default('matcher')}")
    parser.add_argument(
        "--alpha", type=float, metavar="A", default=S,
        help=f"MuDSC balance factor: weight-space share of the similarity, in [0, 1] {_default('alpha')}")
    parser.add_argument(
        "--num-samples", type=int, metavar="N", default=S,
        help="calibration samples to use (default: the whole split)")
    parser.add_argument(
        "--batch-size", type=int, metavar="N", default=S,
        help=f"calibration batch size {_default('batch_size')}")
    parser.add_argument(
        "--seed", type=int, metavar="N", default=S,
        help=f"seed of the calibration shuffle and the solver's group order {_default('seed')}")
    parser.add_argument(
        "--zip-decay", type=float, metavar="A", default=S,
        help=f"zip matcher: similarity decay after a fusion (ZipIt's alpha) {_default('zip_decay')}")
    parser.add_argument(
        "--zip-budget", type=float, metavar="B", default=S,
        help=f"zip matcher: same-model fusion budget factor (ZipIt's beta) {_default('zip_budget')}")
    parser.add_argument(
        "--independent-heads", action=argparse.BooleanOptionalAction, default=S,
        help="pair q/k heads and v heads separately, as the reference implementation does "
        f"{_default('independent_heads')}")
    parser.add_argument(
        "--reference-compat", action=argparse.BooleanOptionalAction, default=S,
        help="reproduce the reference implementation's merged weights (its +1e-5 normaliser and "
        f"independent heads) {_default('reference_compat')}")
    parser.add_argument(
        "--statistics-dtype", choices=("float32", "float64"), default=S,
        help="precision of the calibration statistics: float32 multiplies each batch in float32 and sums "
        "in float64 (about twice as fast on CPUs); float64 keeps every product in float64 "
        f"{_default('statistics_dtype')}")
    parser.add_argument(
        "--device", metavar="DEVICE", default=S,
        help="where the calibration forward passes run: cpu, cuda or cuda:N (default: cuda when available, "
        "else cpu); the merged model is saved the same either way")
    parser.add_argument(
        "--image-column", metavar="NAME", default=S,
        help="image column of the calibration dataset (default: image or img)")
    parser.add_argument(
        "--text-column", metavar="NAME", default=S,
        help="text column of the calibration dataset (default: text or sentence)")
    parser.add_argument(
        "--allow-pickle", action=argparse.BooleanOptionalAction, default=S,
        help="allow parents with pickle-only weights (pytorch_model.bin can run arbitrary code when loaded; "
        f"only for sources you trust) {_default('allow_pickle')}")
    parser.add_argument(
        "--push-to-hub", metavar="ORG/NAME", default=S,
        help="also push the merged model, card and recipe to this Hub repo in one commit (refused if the "
        "repo exists, unless --overwrite)")
    parser.add_argument(
        "--private", action=argparse.BooleanOptionalAction, default=S,
        help=f"create the --push-to-hub repo private {_default('private')}")
    parser.add_argument(
        "--overwrite", action=argparse.BooleanOptionalAction, default=S,
        help="replace an existing --output folder (only one written by hf-mudsc) and an existing "
        f"--push-to-hub repo's files {_default('overwrite')}")
    parser.add_argument(
        "--token", metavar="TOKEN", default=S,
        help="Hub token for private parents and pushing (default: HF_TOKEN or the stored `hf auth login`; "
        "prefer those: a token on the command line is visible to other users of the machine). Never "
        "logged or written.")


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file (if any) with the given flags applied on top."""
    path = getattr(args, "recipe", None)
    recipe = Recipe.load(path) if path else Recipe()
    overrides = {k: v for k, v in vars(args).items() if k in Recipe.keys() and k != "models"}
    if getattr(args, "models", None):
        overrides["models"] = list(args.models)
    recipe = recipe.override(**overrides).validate()
    if not recipe.output and not recipe.push_to_hub:
        raise RecipeError("say where the merged model goes: --output DIR and/or --push-to-hub ORG/NAME")
    return recipe


def run(args: argparse.Namespace) -> int:
    try:
        recipe = build_recipe(args)
    except RecipeError as error:
        print(f"hf-mudsc merge: error: {error}", file=sys.stderr)
        return 2
    from huggingface_hub.errors import HfHubHTTPError

    from hf_mudsc.errors import PushError

    try:
        result = execute(recipe, token=getattr(args, "token", None), recipe_file=getattr(args, "recipe", None))
    except (PushError, HfHubHTTPError) as error:
        print(f"hf-mudsc merge: error: {error}", file=sys.stderr)
        return 1
    if result.get("calibration_samples") is not None:
        used, asked = result["calibration_samples"], recipe.num_samples
        short = f" (--num-samples asked for {asked})" if asked is not None and used < asked else ""
        print(f"Calibrated on {used} samples{short}")
    if result.get("output"):
        print(f"Merged model written to {result['output']}")
    if result.get("push"):
        push = result["push"]
        print(f"Pushed to {push.url} (commit {push.commit_sha})")
    return 0


# ---------------------------------------------------------------------------------------------------- work


def execute(recipe: Recipe, *, token: str | None = None, recipe_file: str | None = None) -> dict[str, Any]:
    """Run a validated recipe: merge, save (and push) on the main process. Returns what was produced.

    `recipe_file`: the recipe's path, when it came from one (an input the output must not overlap)."""
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
        _check_output(output, recipe, recipe_file)
    if recipe.push_to_hub and main:
        from hf_mudsc.publish.hub import check_target

        check_target(recipe.push_to_hub, overwrite=recipe.overwrite, token=token)

    from hf_mudsc.calibrate.datasets import load_calibration_dataset, pin_calibration_revision
    from hf_mudsc.load.parents import load_parents
    from hf_mudsc.methods.registry import get_method

    calibration = None
    calibration_spec = recipe.calibration
    if get_method(recipe.method).uses_activations:
        # A Hub dataset is pinned to its commit (recorded in the recipe) and loaded at that commit; opened (not
        # read) first: a spec that does not exist fails before any weights are downloaded.
        calibration_spec = pin_calibration_revision(recipe.calibration, token=token)
        calibration = load_calibration_dataset(calibration_spec, token=token)
    parents = load_parents(recipe.models, token=token, allow_pickle=recipe.allow_pickle)
    import hf_mudsc

    merged = hf_mudsc.merge(parents, calibration, **recipe.merge_options(), token=token,
                            allow_pickle=recipe.allow_pickle, image_column=recipe.image_column,
                            text_column=recipe.text_column, progress=sys.stderr.isatty())
    if merged is None or not main:  # a non-main process of a distributed run: rank 0 saves and publishes
        return {}
    if calibration is not None:  # merge() saw an opened dataset; the config names what the user passed
        from hf_mudsc.load.references import display_name

        merged.config.mudsc["calibration"] = display_name(str(calibration_spec))
    from hf_mudsc.load.references import pinned_calibration, pinned_reference

    pinned = recipe.override(models=[pinned_reference(p) for p in parents],
                             calibration=pinned_calibration(calibration_spec))
    from hf_mudsc.publish.writer import publish

    # On a failed push the written model is kept (in --output, or a folder the error names).
    produced = publish(merged, output=output, push_to_hub=recipe.push_to_hub, overwrite=recipe.overwrite,
                       private=recipe.private, token=token, recipe=pinned, parents=parents,
                       processor=parents[0].processor)
    if calibration is not None:
        produced["calibration_samples"] = merged.merge_report.num_samples
    return produced


def _check_output(output: Path, recipe: Recipe, recipe_file: str | None = None) -> None:
    """Refuse an existing output (without --overwrite), or one equal to, inside or around any input: the
    parent folders, the calibration data and the recipe file (paths resolved: `..` and symlinks)."""
    inputs: list[tuple[str, str | Path]] = [
        ("parent folder", reference) for reference in recipe.models if Path(reference).expanduser().exists()]
    calibration = _calibration_path(recipe.calibration)
    if calibration is not None:
        inputs.append(("calibration data", calibration))
    if recipe_file:
        inputs.append(("recipe file", recipe_file))
    check_output(output, overwrite=recipe.overwrite, inputs=inputs)


def _calibration_path(spec: str | None) -> Path | None:
    """The local file or folder of a calibration spec (`path[:config]:split`), if it names one."""
    if not spec:
        return None
    for candidate in (spec, spec.partition(":")[0]):
        if candidate and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser()
    return None


def _is_main_process() -> bool:
    from hf_mudsc.calibrate.distributed import is_main_process

    return bool(is_main_process())
