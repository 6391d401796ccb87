"""A request body -> a validated job, before anything is queued: the same keys and checks as a recipe file.

The body holds recipe keys (`models`, `calibration`, `method`, ... — `hf_mudsc.publish.recipe.Recipe`), the
destination keys a recipe FILE may not set but a job must (`output`, `push_to_hub`, `private`, `overwrite`), and
`dry_run`. Every error names the offending key; the web process answers it with 400.

`output` is a folder under the service's output root (default `<state-dir>/outputs`): a client names a folder
there, never a path elsewhere on the server. `allow_pickle` is refused: the service never unpickles weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_mudsc.errors import RecipeError
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


def parse_job(body: Any, output_root: Path, *, dry_run: bool = False) -> JobRequest:
    """Validate a POST /api/jobs body; raises `RecipeError` naming the key (before anything is loaded)."""
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
