"""The merge recipe: every `hf-mudsc merge` flag as a YAML key, so one file reproduces a merge.

A recipe is written as `mudsc_recipe.yaml` next to every merged model, with the parents pinned to the
commit shas that were actually used (`org/name@<sha>`), so `hf-mudsc merge --recipe mudsc_recipe.yaml
--output DIR` rebuilds the same weights later, elsewhere. Flags given on the command line override the
recipe's keys. The written recipe leaves out the destination keys (`output`, `push_to_hub`, `private`,
`overwrite`): re-running a downloaded recipe must never write over someone's folder or repo by surprise.
A token is never a recipe key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import __version__

RECIPE_FILENAME = "mudsc_recipe.yaml"
# Keys that say where the result goes, not what it is; not written next to a merged model.
DESTINATION_KEYS = ("output", "push_to_hub", "private", "overwrite")
# Keys a recipe may carry for information only.
INFO_KEYS = ("hf_mudsc_version",)
MATCHERS = ("align", "zip")

_HEADER = (
    "# hf-mudsc merge recipe. Reproduce the merge with:\n"
    "#   hf-mudsc merge --recipe {name} --output merged-model\n"
    "# Parents are pinned to the commits that were used; flags on the command line override keys.\n"
)


class RecipeError(ValueError):
    """A recipe (file or flags) is invalid; the message names the key and the fix."""


@dataclass
class Recipe:
    """What to merge and how. Field names are the `hf-mudsc merge` flags with `_` for `-`."""

    models: list[str] = field(default_factory=list)
    calibration: str | None = None
    method: str = "mudsc"
    matcher: str = "zip"
    alpha: float = 0.5
    num_samples: int | None = None
    batch_size: int = 32
    seed: int = 0
    zip_decay: float = 0.5
    zip_budget: float = 1.0
    independent_heads: bool = False
    reference_compat: bool = False
    statistics_dtype: str = "float32"
    device: str | None = None
    image_column: str | None = None
    text_column: str | None = None
    allow_pickle: bool = False
    output: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    overwrite: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
        """A recipe from a mapping; unknown keys are refused (a typo must not be silently ignored)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a YAML mapping of keys to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()) - set(INFO_KEYS))
        if unknown:
            raise RecipeError(
                f"{source} has unknown key(s) {unknown}; valid keys are: {', '.join(cls.keys())}"
            )
        values = {k: _coerce(k, v, source) for k, v in data.items() if k not in INFO_KEYS}
        recipe = cls(**values)
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"no recipe file at {str(path)!r}; pass the path of a mudsc_recipe.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise RecipeError(f"{str(path)!r} is not valid YAML: {error}") from None
        return cls.from_dict(data or {}, source=f"recipe {str(path)!r}")

    def override(self, **changes: Any) -> Recipe:
        """A copy with `changes` applied (the command-line flags that were given)."""
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}")
        coerced = {k: _coerce(k, v, "command line") for k, v in changes.items()}
        return dataclasses.replace(self, **coerced)

    # ------------------------------------------------------------------ checks
    def validate(self) -> Recipe:
        """Refuse a recipe that cannot run, before anything is downloaded or computed."""
        from .calibration import STATISTICS_DTYPES, resolve_device
        from .methods import METHODS, get_method

        if len(self.models) != 2:
            raise RecipeError(
                f"a merge takes exactly two parent models (Hub ids `org/name[@revision]` or folders), "
                f"got {len(self.models)}: {self.models}"
            )
        if self.method not in METHODS:
            raise RecipeError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.matcher not in MATCHERS:
            raise RecipeError(f"unknown matcher {self.matcher!r}; choose one of: {', '.join(MATCHERS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.num_samples is not None and self.num_samples < 1:
            raise RecipeError(f"num_samples must be >= 1 (or omitted for all), got {self.num_samples}")
        if self.batch_size < 1:
            raise RecipeError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.zip_decay <= 1.0:
            raise RecipeError(f"zip_decay must lie in (0, 1], got {self.zip_decay}")
        if self.zip_budget < 0.0:
            raise RecipeError(f"zip_budget must be >= 0, got {self.zip_budget}")
        if self.statistics_dtype not in STATISTICS_DTYPES:
            raise RecipeError(
                f"statistics_dtype must be one of {', '.join(STATISTICS_DTYPES)}, got {self.statistics_dtype!r}"
            )
        try:
            resolve_device(self.device, cli=True)
        except ValueError as error:
            raise RecipeError(str(error)) from None
        if get_method(self.method).uses_activations and not self.calibration:
            raise RecipeError(
                f"method {self.method!r} needs calibration data: pass --calibration "
                "(a dataset spec `repo_or_path[:config]:split` or a saved dataset folder), "
                "or use --method weight_matching / average to merge without data"
            )
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise RecipeError(
                f"push_to_hub must be a repo id `org/name`, got {self.push_to_hub!r}"
            )
        return self

    # ------------------------------------------------------------------ output
    def merge_options(self) -> dict[str, Any]:
        """Keyword arguments of `hf_mudsc.merge` taken from this recipe."""
        return {
            "method": self.method,
            "matcher": self.matcher,
            "alpha": self.alpha,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "zip_decay": self.zip_decay,
            "zip_budget": self.zip_budget,
            "independent_heads": self.independent_heads,
            "reference_compat": self.reference_compat,
            "statistics_dtype": self.statistics_dtype,
            "device": self.device,
        }

    def to_dict(self, *, reproducible: bool = False) -> dict[str, Any]:
        """All keys; `reproducible=True` leaves out the destination keys (see module docstring)."""
        data = dataclasses.asdict(self)
        if reproducible:
            for key in DESTINATION_KEYS:
                data.pop(key)
            data = {"hf_mudsc_version": __version__, **data}
        return data

    def to_yaml(self, *, reproducible: bool = True, name: str = RECIPE_FILENAME) -> str:
        body = yaml.safe_dump(self.to_dict(reproducible=reproducible), sort_keys=False, allow_unicode=True)
        return _HEADER.format(name=name) + body

    def save(self, path: str | os.PathLike, *, reproducible: bool = True) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml(reproducible=reproducible, name=path.name), encoding="utf-8")
        return path


_TYPES: dict[str, tuple[type, ...]] = {
    "calibration": (str,),
    "method": (str,),
    "matcher": (str,),
    "alpha": (float, int),
    "num_samples": (int,),
    "batch_size": (int,),
    "seed": (int,),
    "zip_decay": (float, int),
    "zip_budget": (float, int),
    "independent_heads": (bool,),
    "reference_compat": (bool,),
    "statistics_dtype": (str,),
    "device": (str,),
    "image_column": (str,),
    "text_column": (str,),
    "allow_pickle": (bool,),
    "output": (str,),
    "push_to_hub": (str,),
    "private": (bool,),
    "overwrite": (bool,),
}
_NULLABLE = {"calibration", "num_samples", "device", "image_column", "text_column", "output", "push_to_hub"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check one value's type (YAML `0.5` is a float, `yes` a bool); paths become strings."""
    if key == "models":
        if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: `models` must be a list of two model references, got {value!r}")
        return [os.fspath(v) if isinstance(v, os.PathLike) else _expect_str(key, v, source) for v in value]
    if value is None:
        if key in _NULLABLE:
            return None
        raise RecipeError(f"{source}: `{key}` cannot be null")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    expected = _TYPES[key]
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
    if not ok:
        names = " or ".join(t.__name__ for t in expected)
        raise RecipeError(f"{source}: `{key}` must be {names}, got {value!r} ({type(value).__name__})")
    return float(value) if float in expected else value


def _expect_str(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{source}: every entry of `{key}` must be a non-empty string, got {value!r}")
    return value
