"""The merge recipe: every `hf-mudsc merge` flag as a YAML key, so one file reproduces a merge.

A recipe is written as `mudsc_recipe.yaml` next to every merged model, with the parents pinned to the
commit shas that were actually used (`org/name@<sha>`), so `hf-mudsc merge --recipe mudsc_recipe.yaml
--output DIR` rebuilds the same weights later, elsewhere. Flags given on the command line override the
recipe's keys.

A recipe says WHAT to merge. Where the result goes (`output`, `push_to_hub`, `private`, `overwrite`) and whether
to trust pickle weights (`allow_pickle`) come only from the command line: a downloaded recipe must never write
over someone's folder or repo, or run a pickle, with nothing on the command line asking for it. A recipe file
that sets one of these keys is refused, naming the flag to use instead; a key stating its default (`false` /
`null`, as hf-mudsc 0.1.0 wrote `allow_pickle: false` into every recipe) asks for nothing and is ignored. Written
recipes never hold these keys. A token is never a recipe key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hf_mudsc._version import __version__
from hf_mudsc.errors import OptionError, RecipeError
from hf_mudsc.options import MATCHERS as MATCHERS  # re-exported: the CLI's --matcher choices
from hf_mudsc.options import OPTION_NAMES, check_options, check_type

logger = logging.getLogger(__name__)

RECIPE_FILENAME = "mudsc_recipe.yaml"
# Keys that say where the result goes, not what it is; not written next to a merged model.
DESTINATION_KEYS = ("output", "push_to_hub", "private", "overwrite")
# Keys only the command line may set (destinations and trust), with the flag to use instead.
COMMAND_LINE_ONLY_KEYS = {"output": "--output DIR", "push_to_hub": "--push-to-hub ORG/NAME",
                          "private": "--private", "overwrite": "--overwrite", "allow_pickle": "--allow-pickle"}
# Keys a recipe may carry for information only.
INFO_KEYS = ("hf_mudsc_version",)

_HEADER = (
    "# hf-mudsc merge recipe. Reproduce the merge with:\n"
    "#   hf-mudsc merge --recipe {name} --output merged-model\n"
    "# Parents are pinned to the commits that were used; flags on the command line override keys.\n"
)




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
        """A recipe from a mapping (a recipe file's contents).

        Unknown keys are refused (a typo must not be silently ignored), and so are the keys only the command
        line may set (`COMMAND_LINE_ONLY_KEYS`) unless they state their default."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a YAML mapping of keys to values, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.keys()) - set(INFO_KEYS))
        if unknown:
            valid = [k for k in cls.keys() if k not in COMMAND_LINE_ONLY_KEYS]
            raise RecipeError(f"{source} has unknown key(s) {unknown}; valid keys are: {', '.join(valid)}")
        for key, how in COMMAND_LINE_ONLY_KEYS.items():
            if key not in data:
                continue
            if data[key] not in (None, False):
                raise RecipeError(
                    f"{source} sets `{key}`, which a recipe may not set; pass {how} on the command line "
                    "instead and delete the key from the file"
                )
            logger.info("%s: ignoring `%s: %s` (only the command line sets it)", source, key, data[key])
        values = {k: _coerce(k, v, source) for k, v in data.items()
                  if k not in INFO_KEYS and k not in COMMAND_LINE_ONLY_KEYS}
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
        """Refuse a recipe that cannot run, before anything is downloaded or computed (normalises options)."""
        from hf_mudsc.methods.registry import get_method

        if len(self.models) != 2:
            raise RecipeError(
                f"a merge takes exactly two parent models (Hub ids `org/name[@revision]` or folders), "
                f"got {len(self.models)}: {self.models}"
            )
        try:
            checked = check_options(**{k: v for k, v in self.merge_options().items() if k in OPTION_NAMES})
        except OptionError as error:
            raise RecipeError(str(error)) from None
        for key, value in checked.items():
            setattr(self, key, value)
        if get_method(self.method).uses_activations and not self.calibration:
            raise RecipeError(
                f"method {self.method!r} needs calibration data: pass --calibration "
                "(a dataset spec `repo_or_path[@revision][:config]:split` or a saved dataset folder), "
                "or use --method weight_matching / average to merge without data"
            )
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise RecipeError(
                f"push_to_hub must be a repo id `org/name` (CLI: --push-to-hub), got {self.push_to_hub!r}"
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
        """All fields; `reproducible=True` (what files hold) leaves out `COMMAND_LINE_ONLY_KEYS` (module docstring)."""
        data = dataclasses.asdict(self)
        if reproducible:
            for key in COMMAND_LINE_ONLY_KEYS:
                data.pop(key)
            data = {"hf_mudsc_version": __version__, **data}
        return data

    def to_yaml(self, *, reproducible: bool = True, name: str = RECIPE_FILENAME) -> str:
        """The recipe as YAML; `reproducible=False` adds the command-line-only fields (for display, not loadable)."""
        body = yaml.safe_dump(self.to_dict(reproducible=reproducible), sort_keys=False, allow_unicode=True)
        return _HEADER.format(name=name) + body

    def save(self, path: str | os.PathLike) -> Path:
        """Write the recipe file; it never holds `COMMAND_LINE_ONLY_KEYS`, so it can be loaded and re-run."""
        path = Path(path)
        path.write_text(self.to_yaml(reproducible=True, name=path.name), encoding="utf-8")
        return path


# Types of the keys that are not merge options (those are typed by `hf_mudsc.options`).
_TYPES: dict[str, tuple[type, ...]] = {
    "calibration": (str,),
    "independent_heads": (bool,),
    "reference_compat": (bool,),
    "image_column": (str,),
    "text_column": (str,),
    "allow_pickle": (bool,),
    "output": (str,),
    "push_to_hub": (str,),
    "private": (bool,),
    "overwrite": (bool,),
}
_NULLABLE = {"calibration", "image_column", "text_column", "output", "push_to_hub"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check one value's type (YAML `0.5` is a float, `yes` a bool); paths become strings."""
    if key == "models":
        if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: `models` must be a list of two model references, got {value!r}")
        return [os.fspath(v) if isinstance(v, os.PathLike) else _expect_str(key, v, source) for v in value]
    if key in OPTION_NAMES:
        try:
            return check_type(key, value)
        except OptionError as error:
            raise RecipeError(f"{source}: {error}") from None
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
