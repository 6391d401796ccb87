"""One writer for a merged model: model, processor, card, recipe and ownership marker — for the CLI and the API.

`hf-mudsc merge`, `hf-mudsc demo`, `hf_mudsc.save_merged` and `hf_mudsc.push_merged` all write through
`write_merged_folder` inside `output.staged_output`, so a Python user gets the same folder as a CLI user
(not just the config and weights `save_pretrained` writes), atomically, and a push uploads exactly it.

    merged = hf_mudsc.merge(["org/a", "org/b"], calibration="org/data:train")
    hf_mudsc.save_merged(merged, "merged-model")         # folder: model, processor, README.md, recipe
    hf_mudsc.push_merged(merged, "me/merged-model")      # one commit with the same files
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_mudsc.load.checks import REMOTE_CODE_CONFIG_KEYS
from hf_mudsc.load.processors import refuse_unsavable_chat_templates
from hf_mudsc.publish.folder import record_files, staged_output
from hf_mudsc.publish.hub import CARD_FILENAME, CommitOptions
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe, auto_chosen_of, check_push_target
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME, PLOTS_FOLDER, MergeDiagnostics

logger = logging.getLogger(__name__)

UNPUSHED_PREFIX = "hf-mudsc-unpushed-"  # a push-only run's folder kept after a failed push


def recipe_of(merged: Any) -> Recipe:
    """The recipe of a model returned by `hf_mudsc.merge` (its parents pinned), from `merged.merge_report`."""
    report = getattr(merged, "merge_report", None)
    keys = getattr(report, "recipe", None)
    if not keys:
        raise ValueError(
            f"{type(merged).__name__} carries no merge recipe: save_merged/push_merged write models returned by "
            "hf_mudsc.merge or hf_mudsc.from_pretrained (a model loaded from a merged folder already has its files "
            "there; use save_pretrained for it)"
        )
    return Recipe(**{k: v for k, v in keys.items() if k in Recipe.keys()},
                  auto_chosen=auto_chosen_of(getattr(getattr(merged, "config", None), "mudsc", None) or {}))


def refuse_non_finite_weights(merged: Any) -> None:
    """Never write NaN/inf weights, nor tensors without values (the meta device). `hf_mudsc.merge` refuses those it
    produces (`pipeline.refuse_non_finite`), but a model changed since (cast to float16 past its range 65504, edited,
    moved to 'meta') reaches the writer as it stands."""
    import torch

    from hf_mudsc.errors import MergeInputError

    state = merged.state_dict()
    empty = [name for name, tensor in state.items() if tensor.is_meta]
    if empty:
        names = ", ".join(repr(name) for name in empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise MergeInputError(f"refusing to write the merged model: {len(empty)} tensors are on the meta device "
                              f"({names}), which holds no values; write the model merge() returned, before moving it "
                              "to 'meta'")
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if not bad:
        return

    dtype = getattr(merged, "dtype", None)
    half = dtype in (torch.float16, torch.bfloat16)
    cause = (f"it is {str(dtype).removeprefix('torch.')}, whose range ends at {torch.finfo(dtype).max:g}: values past "
             "it became inf — write it in float32 (merge with out_dtype='float32', CLI: --out-dtype float32)" if half
             else "merge() returned it finite, so it was changed since — write the model merge() returned")
    names = ", ".join(repr(name) for name in bad[:3]) + (f", ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
    raise MergeInputError(f"refusing to write the merged model: NaN or infinite values in {len(bad)} "
                          f"tensor{'s' if len(bad) > 1 else ''} ({names}); {cause}")


def dtype_since_merge(merged: Any) -> tuple[str, str] | None:
    """(dtype, reason) of a merged model cast after `merge` returned it (`merged.half()` before saving), whose
    `config.mudsc` still names the dtype the merge made; None when the weights are in that dtype. The recipe
    then pins the dtype written: `out_dtype` is one cast at the end of the merge, so its re-run makes these weights.

    Raises:
        MergeInputError: the floating-point weights are in several dtypes (no one `out_dtype` makes them)."""
    mudsc = getattr(getattr(merged, "config", None), "mudsc", None) or {}
    made = mudsc.get("out_dtype")
    names = sorted({str(t.dtype).removeprefix("torch.") for t in merged.state_dict().values()
                    if t.is_floating_point()})
    if len(names) > 1:
        from hf_mudsc.errors import MergeInputError

        raise MergeInputError(
            f"the merged model's weights are in several dtypes ({', '.join(names)}) since the merge; cast it to one "
            f"(e.g. merged.to(torch.{names[0]})) or write the model merge() returned")
    if not names or made is None or names[0] == made:
        return None
    return names[0], f"converted to {names[0]} after the merge, which made {made} ({mudsc.get('out_dtype_reason')})"


def changed_since_merge(merged: Any) -> bool:
    """Whether the weights of a model in the dtype its merge made (`recorded_dtype` asks only then: one cast since is
    `dtype_since_merge`'s) differ from those `merge()` returned — trained or edited since; one with no digest recorded
    (not from this version's merge) is not judged."""
    made = getattr(getattr(merged, "merge_report", None), "weights_digest", None)
    if made is None:
        return False
    from hf_mudsc.apply.fidelity import parameters_digest

    return parameters_digest(merged.state_dict()) != made


@contextmanager
def recorded_dtype(merged: Any, recipe: Recipe) -> Iterator[Recipe]:
    """While a merged model is written: its `config.mudsc` and the recipe name the dtype its weights are in now
    (`dtype_since_merge`), and weights changed since the merge are marked (`changed_since_merge`: the card says the
    recipe re-makes the merge, not these weights); the model's own record is restored afterwards (writing it
    changes nothing in memory)."""
    converted = dtype_since_merge(merged)
    changed = converted is None and changed_since_merge(merged)
    if converted is None and not changed:
        yield recipe
        return
    mudsc = merged.config.mudsc
    kept = {key: mudsc.get(key) for key in ("out_dtype", "out_dtype_reason")}
    written = recipe
    if converted is not None:
        written = recipe.override(out_dtype=converted[0])
        chosen = {key: value for key, value in (recipe.auto_chosen or {}).items() if key != "out_dtype"}
        written.auto_chosen = chosen or None  # auto chose the merge's dtype, not this one
        mudsc.update(out_dtype=converted[0], out_dtype_reason=converted[1])
    had_mark = "changed_after_merge" in mudsc
    if changed:
        logger.warning("the merged model's weights changed since merge() returned them (trained or edited): they "
                       "are written as they are now, and the card says its recipe re-makes the merge, not these "
                       "weights")
        mudsc["changed_after_merge"] = True
    try:
        yield written
    finally:
        mudsc.update(kept)
        if changed and not had_mark:
            mudsc.pop("changed_after_merge", None)


def write_merged_folder(
    folder: str | os.PathLike,
    merged: Any,
    *,
    recipe: Recipe | None = None,
    parents: Iterable[Any] | None = None,
    processor: Any = None,
    eval_results: Iterable[Mapping[str, Any] | Any] | None = None,
    model_name: str | None = None,
    evaluation: Any = None,
    revision: str | None = None,
) -> Path:
    """Write the merged model's folder: safetensors weights + config, processor, README.md card, recipe, and the
    merge's diagnostics (`merge_diagnostics.json`, `plots/*.png`, linked from the card).

    Args:
        folder: an empty folder (a `staged_output` staging folder: it gets the marker when the block ends).
        merged: a model returned by `hf_mudsc.merge`.
        recipe: the recipe to record (default: `recipe_of(merged)`); its push target names the card.
        parents: `LoadedParent`s for the card (default: the recipe's references).
        processor: saved with the model (default: parent A's, which `merge` keeps on `merge_report`).
        eval_results: evaluation rows for the card's model-index.
        model_name: the card's title (default: the push target, else the output folder's name).
        evaluation: an `EvaluationResult` (or its dict) to draw as the accuracy chart next to the other plots.
        revision: the branch of the push target the folder is pushed to: the card's snippet loads it from there.
    """
    from hf_mudsc.publish.card import render_card

    refuse_non_finite_weights(merged)
    folder = Path(folder)
    recipe = recipe if recipe is not None else recipe_of(merged)
    owner = "the processor given"
    if processor is None:
        processor = getattr(getattr(merged, "merge_report", None), "processor", None)
        owner = f"parent A ({recipe.models[0]!r})" if recipe.models else "parent A"
    if processor is not None:  # before any file is written (the merge refused parent A's before its weights)
        refuse_unsavable_chat_templates(owner, processor)
    with recorded_dtype(merged, recipe) as recipe:
        merged.save_pretrained(folder)
        if processor is not None:
            model_files = set(os.listdir(folder))
            processor.save_pretrained(folder)
            dropped = drop_remote_code_pointers(folder, sorted(set(os.listdir(folder)) - model_files))
            if dropped:
                logger.warning(
                    "the merged model's processor is written without its remote-code pointers (%s): they name code "
                    "in a model repo, which hf-mudsc never runs nor ships, so loading it gives transformers' own "
                    "class; check that it preprocesses as the parent's did",
                    ", ".join(f"{key} in {name}" for name, keys in dropped.items() for key in keys))
        report = getattr(merged, "merge_report", None)  # data read but no spec recorded: it was given in memory
        recipe.save(folder / RECIPE_FILENAME, calibration_in_memory=bool(getattr(report, "num_samples", 0)),
                    processor_given=bool(getattr(report, "processor_given", False)))
        plots = write_diagnostics(folder, getattr(report, "diagnostics", None), evaluation)
        name = model_name or recipe.push_to_hub or (Path(recipe.output).name if recipe.output else None)
        render_card(merged, recipe, parents=list(parents) if parents is not None else None,
                    eval_results=eval_results, model_name=name, plots=plots,
                    processor_saved=processor is not None, revision=revision).save(folder / CARD_FILENAME)
    return folder


def drop_remote_code_pointers(folder: Path, names: Iterable[str]) -> dict[str, list[str]]:
    """Remove `auto_map` / `custom_pipelines` (`REMOTE_CODE_CONFIG_KEYS`) from the JSON files `names` the processor
    wrote into `folder`, as from the config: they point at code in a parent's repo (or another repo) the merged
    model was never built with, and a `trust_remote_code` user of the merge would run it. Returns the keys dropped
    by file name (the writer says so: a user of that remote processor gets transformers' own)."""
    dropped: dict[str, list[str]] = {}

    def without_pointers(value: Any, name: str) -> Any:
        if isinstance(value, dict):
            for key in value:
                if key in REMOTE_CODE_CONFIG_KEYS and key not in dropped.setdefault(name, []):
                    dropped[name].append(key)
            return {key: without_pointers(item, name) for key, item in value.items()
                    if key not in REMOTE_CODE_CONFIG_KEYS}
        if isinstance(value, list):
            return [without_pointers(item, name) for item in value]
        return value

    for name in names:
        path = folder / name
        if path.suffix != ".json" or path.is_symlink() or not path.is_file():
            continue
        settings = json.loads(path.read_text(encoding="utf-8"))
        cleaned = without_pointers(settings, name)
        if cleaned != settings:
            path.write_text(json.dumps(cleaned, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return {name: keys for name, keys in dropped.items() if keys}


def write_diagnostics(folder: Path, diagnostics: MergeDiagnostics | None, evaluation: Any = None
                      ) -> list[dict[str, str]]:
    """`merge_diagnostics.json` and the plots (`plots/*.png`) into a folder being written; returns the card's links.

    A plot that fails to draw costs the plots, never the merged model: the failure is logged as a warning, the
    half-drawn plots folder is removed and the card simply has no Diagnostics section.
    """
    if diagnostics is not None:
        diagnostics = diagnostics.rounded()  # as stored: `inspect` redraws the same bytes from the file
        diagnostics.save(folder / DIAGNOSTICS_FILENAME)
    if diagnostics is None and evaluation is None:
        return []
    try:
        from hf_mudsc.publish.plots import draw_plots

        drawn = draw_plots(folder / PLOTS_FOLDER, diagnostics, evaluation)
    except Exception as error:  # noqa: BLE001 - plots are a by-product: keep the model, say what failed
        logger.warning("the merge's plots could not be drawn (%s: %s); the model is written without them",
                       type(error).__name__, error)
        logger.debug("plotting failed", exc_info=True)
        shutil.rmtree(folder / PLOTS_FOLDER, ignore_errors=True)
        return []
    return [{"title": plot.title, "caption": plot.caption, "link": plot.path.relative_to(folder).as_posix()}
            for plot in drawn]


def publish(
    merged: Any,
    *,
    output: str | os.PathLike | None = None,
    push_to_hub: str | None = None,
    overwrite: bool = False,
    private: bool = False,
    token: str | None = None,
    recipe: Recipe | None = None,
    parents: Iterable[Any] | None = None,
    processor: Any = None,
    eval_results: Iterable[Mapping[str, Any] | Any] | None = None,
    model_name: str | None = None,
    output_flag: str = "--output",
    push_flag: str = "--push-to-hub name",
    commit: CommitOptions | None = None,
) -> dict[str, Any]:
    """Write the folder (to `output`, else a scratch folder) and push it in one commit (to `push_to_hub`; `commit`:
    its message, description, branch or pull request, as huggingface_hub names them).

    On any push failure the written model is kept — in `output`, or (push only) in a kept folder next to the
    scratch one — and the raised `PushError` says where, and how to push it again.

    Returns:
        `{"output": Path}` and/or `{"push": PushResult}`.
    """
    from hf_mudsc.errors import PushError, PushInterrupted
    from hf_mudsc.publish.hub import push_folder

    if output is None and not push_to_hub:
        raise ValueError("say where the merged model goes: an output folder and/or a Hub repo id")
    refuse_non_finite_weights(merged)  # before any folder is staged (write_merged_folder checks again for its callers)
    if processor is not None:  # likewise: a given processor transformers could not save, before anything is staged
        refuse_unsavable_chat_templates("the processor given", processor)
    produced: dict[str, Any] = {}
    failure: Exception | None = None
    interrupted: PushInterrupted | None = None
    kept: Path | None = None
    # The output may not overlap what the merge read (its parents, data), as `hf-mudsc merge` checks before merging.
    inputs = [] if output is None else [
        *(recipe if recipe is not None else recipe_of(merged)).inputs(),
        *(("calibration data", folder) for folder in getattr(getattr(merged, "merge_report", None),
                                                              "calibration_folders", None) or ())]
    with staged_output(output, overwrite=overwrite, inputs=inputs, flag=output_flag) as staging:
        write_merged_folder(staging, merged, recipe=recipe, parents=parents, processor=processor,
                            eval_results=eval_results, model_name=model_name,
                            revision=commit.revision if commit else None)  # a PR lands on it when merged
        if push_to_hub:
            record_files(staging, staging=True)  # the marker says what the push may upload
            try:
                # Named by the output's name, or the repo's: never by the hidden folder it is staged in.
                name = Path(output).name if output is not None else push_to_hub.split("/")[-1]
                produced["push"] = push_folder(staging, push_to_hub, private=private, overwrite=overwrite,
                                               token=token, flag=push_flag, shown_as=name,
                                               just_written=True,  # its weights were checked in memory above
                                               commit_message=commit.message if commit else None,
                                               commit_description=commit.description if commit else None,
                                               revision=commit.revision if commit else None,
                                               create_pr=bool(commit and commit.create_pr))
            except (Exception, PushInterrupted) as error:  # any push failure, or Ctrl-C: keep the model, then say
                failure, interrupted = (None, error) if isinstance(error, PushInterrupted) else (error, None)
                pushed = interrupted is not None and interrupted.pushed
                if output is None and not pushed:
                    kept = staging.with_name(f"{UNPUSHED_PREFIX}{uuid.uuid4().hex[:8]}")
                    os.rename(staging, kept)
    if output is not None:
        produced["output"] = Path(output).expanduser().absolute()
    if interrupted is not None:  # the output is in place (or the model kept): now the Ctrl-C takes effect
        where = kept or produced.get("output")
        said = f"{interrupted}; the merged model is in {where}" if where else str(interrupted)
        if not interrupted.pushed:
            said += (f"; push it with `hf-mudsc push {shlex.quote(str(where))} {push_to_hub}"
                     f"{push_flags(commit, private=private, overwrite=overwrite)}`")
        raise PushInterrupted(said, pushed=interrupted.pushed) from interrupted.__cause__
    if failure is not None:
        where = kept or produced["output"]
        logger.debug("push failed", exc_info=failure)
        raise PushError(f"{failure} — the merged model is kept in {where}; push it with "
                        f"`hf-mudsc push {shlex.quote(str(where))} {push_to_hub}"
                        f"{push_flags(commit, private=private, overwrite=overwrite)}`") from failure
    return produced


def push_flags(commit: CommitOptions | None, *, private: bool = False, overwrite: bool = False) -> str:
    """The `hf-mudsc push` flags that push a kept folder as the failed push asked (`private` and `overwrite`: else
    the retry would create a public repo, or be refused by the repo it was to replace; then `commit`'s branch, pull
    request, message and description), each quoted for a shell."""
    given = (" --private" if private else "") + (" --overwrite" if overwrite else "")
    if commit is None:
        return given
    return given + "".join([f" --revision {shlex.quote(commit.revision)}" if commit.revision else "",
                    " --create-pr" if commit.create_pr else "",
                    f" --commit-message {shlex.quote(commit.message)}" if commit.message is not None else "",
                    f" --commit-description {shlex.quote(commit.description)}" if commit.description is not None
                    else ""])


def save_merged(merged: Any, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a model returned by `hf_mudsc.merge` as the CLI does: weights, config, processor (when the parents
    had one), README.md model card, `mudsc_recipe.yaml`, `merge_diagnostics.json` and `plots/*.png` — written to a
    hidden sibling and renamed into place.

    Args:
        merged: the merged model.
        directory: the folder to create.
        overwrite: replace an existing `directory`, only if hf-mudsc wrote every file in it.

    Returns:
        The folder written, as an absolute `Path`.

    Raises:
        FileExistsError: `directory` exists (without `overwrite`), or holds files hf-mudsc did not write.
        ValueError: `directory` overlaps an input of the merge (a parent's or the base's folder, the calibration
            data, the Hugging Face cache: inputs are never modified), or `merged` was not returned by
            `hf_mudsc.merge` (it carries no recipe).
    """
    recipe_of(merged)  # refuse a model merge() did not return before touching the disk
    return publish(merged, output=directory, overwrite=overwrite, model_name=Path(directory).name,
                   output_flag="directory")["output"]


def push_merged(
    merged: Any, repo_id: str, *, private: bool = False, overwrite: bool = False, token: str | None = None,
    commit_message: str | None = None, commit_description: str | None = None, revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Push a model returned by `hf_mudsc.merge` to the Hub with the same files `save_merged` writes, in one
    commit (staged in a temporary folder, removed afterwards; kept and named if the push fails).

    Args:
        merged: the merged model.
        repo_id: `org/name` (refused if it exists, unless `overwrite`; an empty repo is pushed into).
        private: create the repo private.
        overwrite: replace an existing repo's files (of `revision`'s branch) in the same commit.
        token: a Hub token (default: `HF_TOKEN` or the stored login; never logged or written).
        commit_message: the commit's title (default "Upload merged model (NAME) with hf-mudsc").
        commit_description: the commit's (or pull request's) description.
        revision: the branch to commit to (default main). One the repo lacks is created from main, as
            `push_to_hub` does, and needs no `overwrite` (main keeps its files); the card's "how to load" snippet
            names it (`from_pretrained(repo, revision=...)`).
        create_pr: open a pull request against `revision` (an existing branch) instead of committing; it needs no
            `overwrite` (nothing changes until it is merged) and its URL is the result's `pr_url`. It adds and
            replaces files; with `overwrite` it also deletes the branch's files the model lacks (`result.deleted`).

    Returns:
        A `hf_mudsc.publish.hub.PushResult` (`commit_sha`, `commit_url`, `url`, `revision`, `pr_url`).
    """
    from hf_mudsc.load.references import clean_token
    from hf_mudsc.publish.hub import check_commit_options, check_repo_id, check_target

    token = clean_token(token)  # a token read from a file, its line break with it
    check_repo_id(repo_id, flag="repo_id")  # a token pasted here: refused before any message could show it
    commit = CommitOptions(commit_message, commit_description, revision, bool(create_pr))
    check_commit_options(commit, api_names=True)
    recipe = recipe_of(merged).override(push_to_hub=repo_id)
    check_push_target(recipe, given_as="repo_id")  # a parent's (or the base's) repo: never replaced
    refuse_non_finite_weights(merged)  # before the Hub is asked anything
    check_target(repo_id, overwrite=overwrite, token=token, flag="repo_id", options=commit,  # before writing anything
                 private=private)
    return publish(merged, push_to_hub=repo_id, overwrite=overwrite, private=private, token=token,
                   recipe=recipe, push_flag="repo_id", commit=commit)["push"]
