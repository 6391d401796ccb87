"""A request body -> a validated job, before anything is queued: the same keys and checks as a recipe file.

The body holds recipe keys (`models`, `calibration`, `method`, ... — `hf_mudsc.publish.recipe.Recipe`), the
destination keys a recipe FILE may not set but a job must (`output`, `push_to_hub`, `private`, `overwrite`), and
`dry_run`. Every error names the offending key; the web process answers it with 400.

`output` is a folder under the service's output root (default `<state-dir>/outputs`): a client names a folder
there, never a path elsewhere on the server. `allow_pickle` is refused: the service never unpickles weights.

What a job READS from the server's disk — a parent or `base` folder, `calibration` data — must lie inside a folder
the operator listed with `hf-mudsc serve --local-root DIR` (resolved with symlinks followed); without one, a job
names Hub references only. Otherwise anyone who may POST could make the server merge, and push to the Hub, any
folder it can read. Which references are local is decided exactly as the loader decides it
(`load.references`, `calibrate.dataset_spec`), in the worker's working folder (the server's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_mudsc.calibrate.dataset_spec import DatasetSpec
from hf_mudsc.errors import CalibrationError, LoadError, RecipeError
from hf_mudsc.load.references import looks_like_path, parse_reference
from hf_mudsc.publish.recipe import DESTINATION_KEYS, INFO_KEYS, Recipe

SERVICE_KEYS = ("dry_run",)
NAME_MAX = 255  # bytes in one folder name (Linux, macOS, Windows)


@dataclass(frozen=True)
class JobRequest:
    """A validated job: the recipe (destination included, `output` resolved) and whether it is a dry run."""

    recipe: Recipe
    dry_run: bool

    @property
    def output(self) -> str | None:
        return self.recipe.output

    @property
    def repo_id(self) -> str | None:
        return self.recipe.push_to_hub

    def to_dict(self) -> dict[str, Any]:
        """What the store keeps and the worker receives (JSON): every recipe field, plus `dry_run`."""
        return {**self.recipe.to_dict(), "dry_run": self.dry_run}

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> JobRequest:
        values = {k: v for k, v in data.items() if k in Recipe.keys()}
        return cls(Recipe(**values), bool(data.get("dry_run", False)))


def accepted_keys() -> list[str]:
    return [k for k in Recipe.keys() if k != "allow_pickle"] + list(SERVICE_KEYS)


def parse_job(body: Any, output_root: Path, *, dry_run: bool = False,
              local_roots: Sequence[Path] = ()) -> JobRequest:
    """Validate a POST /api/jobs body; raises `RecipeError` naming the key (before anything is loaded).

    `local_roots`: the folders a job may read local paths from (`--local-root`); none: Hub references only."""
    if not isinstance(body, Mapping):
        raise RecipeError(f"the body must be a mapping of recipe keys to values (JSON or YAML), "
                          f"got {type(body).__name__}")
    try:  # a lone surrogate (JSON's "\ud800") cannot be stored or answered as UTF-8: refused here
        json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as problem:
        raise RecipeError(f"the body is not valid Unicode text: it holds a lone surrogate "
                          f"{problem.object[problem.start:problem.end]!r}") from None
    body = {k: v for k, v in body.items() if k not in INFO_KEYS}
    unknown = sorted(str(k) for k in set(body) - set(accepted_keys()) - {"allow_pickle"})
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown}; valid keys are: {', '.join(accepted_keys())}")
    if body.get("allow_pickle") not in (None, False):
        raise RecipeError("`allow_pickle` is refused: the service never loads pickle weights; "
                          "convert the parents to safetensors")
    body.pop("allow_pickle", None)
    flag = body.pop("dry_run", False)
    if not isinstance(flag, bool):
        raise RecipeError(f"`dry_run` must be true or false, got {flag!r}")
    destination = {k: body.pop(k) for k in DESTINATION_KEYS if k in body}
    recipe = Recipe.from_dict(body, source="job")
    recipe = recipe.override(**{k: v for k, v in destination.items() if v is not None})
    recipe = recipe.validate()
    check_local_paths(recipe, local_roots)
    if recipe.output is not None:
        recipe.output = str(resolve_output(recipe.output, output_root))
    dry_run = dry_run or flag
    if not dry_run and not recipe.output and not recipe.push_to_hub:
        raise RecipeError("say where the merged model goes: `output` (a folder name under the service's output "
                          "root) and/or `push_to_hub` (`org/name`)")
    return JobRequest(recipe, dry_run)


def resolve_output(output: str, output_root: Path) -> Path:
    """`output` as a folder inside `output_root` (relative names; `..` or another absolute path is refused)."""
    if "\x00" in output:
        raise RecipeError(f"`output` must not contain a NUL byte, got {output!r}")
    if any(len(part.encode()) > NAME_MAX for part in Path(output).parts):
        raise RecipeError(f"`output` has a folder name longer than {NAME_MAX} bytes (the file system's limit): "
                          f"{output[:80]!r}...")
    root = output_root.expanduser().resolve()
    path = Path(output).expanduser()
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise RecipeError(f"`output` must name a folder inside the service's output root {str(root)!r} "
                          f"(e.g. `merged-model`), got {output!r}")
    return resolved


def check_local_paths(recipe: Recipe, local_roots: Sequence[Path]) -> None:
    """Refuse (one line naming the key, the path as given and the flag) a path the job would read from the server's
    disk outside every local root. The roots and the paths are resolved with symlinks followed, so `DIR/../x` and a
    link out of DIR are outside; the resolved target is never named (it may tell where a link leads)."""
    roots = [Path(root).expanduser().resolve() for root in local_roots]
    for key, given, path, builder in local_paths(recipe):
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: never inside
            resolved = None
        if resolved is not None and any(resolved == root or resolved.is_relative_to(root) for root in roots):
            continue
        if roots:
            where = (f"outside the folders this service may read (--local-root: {', '.join(map(str, roots))}): "
                     "name a path inside one of them or a Hub reference `org/name[@revision]`, or add --local-root "
                     "DIR for a folder holding it")
        else:
            where = ("but this service reads no local paths (it was started without --local-root): name a Hub "
                     "reference `org/name[@revision]`, or start the service with --local-root DIR for a folder "
                     "holding it")
        if builder:
            raise RecipeError(f"`{key}` {given!r} is no `org/name` Hub dataset: a bare name is a datasets builder "
                              f"(json, csv, imagefolder, ...) that reads the service's working folder, {where}")
        raise RecipeError(f"`{key}` names the local path {given!r}, {where}")


def local_paths(recipe: Recipe) -> Iterator[tuple[str, str, Path, bool]]:
    """(key, as given, path, whether a datasets builder reads it) for every value of the recipe that the merge reads
    from this machine's disk."""
    references = [(f"models[{i}]", ref) for i, ref in enumerate(recipe.models)]
    if isinstance(recipe.base, str):
        references.append(("base", recipe.base))
    for key, reference in references:
        try:  # as `load.parents` locates a parent or the base
            name, revision = parse_reference(reference)
        except LoadError as problem:
            raise RecipeError(f"`{key}`: {problem}") from None
        if revision is None and looks_like_path(name):
            yield key, reference, Path(name).expanduser(), False
    if recipe.calibration:
        try:  # as `calibrate.datasets.load_calibration_dataset` reads it
            spec = DatasetSpec.parse(recipe.calibration)
        except CalibrationError as problem:
            raise RecipeError(f"`calibration`: {problem}") from None
        if looks_like_path(spec.path) or Path(spec.path).expanduser().exists():
            yield "calibration", spec.path, Path(spec.path).expanduser(), False
        elif "/" not in spec.path:  # `json`, `imagefolder`, ...: datasets' packaged builders read the working folder
            yield "calibration", recipe.calibration, Path.cwd(), True
