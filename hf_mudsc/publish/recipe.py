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

A recipe shown off this machine — the card's copy, and the file pushed to the Hub (`published_text`) — names local
folders (parents, base, calibration data) by folder name only, never by their paths, which would publish the
merging machine's layout; the pushed file says so in a comment at its top, and re-running it without those folders'
paths is refused naming them (`check_local_folders_given`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_mudsc._version import __version__
from hf_mudsc.errors import (
    MergeInputError,
    OptionError,
    RecipeError,
    brief,
    flag,
    option_hint,
    parent_label,
    shown,
)
from hf_mudsc.load.references import (
    TOKEN_FIX,
    display_name,
    is_object_reference,
    looks_like_path,
    looks_like_token,
    parse_reference,
    repo_id_refusal,
)
from hf_mudsc.methods import plugin_module
from hf_mudsc.option_values import MATCHERS as MATCHERS  # re-exported: the CLI's --matcher choices
from hf_mudsc.options import RECIPE_FILENAME as RECIPE_FILENAME
from hf_mudsc.options import REFITTING, MergeOptions, closest_names

logger = logging.getLogger(__name__)

# Keys that say where the result goes, not what it is; not written next to a merged model.
DESTINATION_KEYS = MergeOptions.names(destination=True)
# Keys only the command line may set (destinations and trust), with the flag to use instead.
COMMAND_LINE_ONLY_KEYS = MergeOptions.command_line_only()
# The largest recipe file read: written ones are about 1 kB; a bigger file is no recipe (and YAML parsing is slow).
MAX_RECIPE_BYTES = 1 << 20
# What `auto` chose and why (`Recipe.auto_chosen`): written last in a recipe, restated by its re-run.
AUTO_CHOSEN_KEY = "auto_chosen"
# Keys a recipe may carry for information only.
INFO_KEYS = ("hf_mudsc_version", AUTO_CHOSEN_KEY)

# The keys whose values may name a folder of this machine, with how to give it on the command line instead.
LOCAL_REFERENCE_KEYS = {
    "models": "the parents before --recipe (`hf-mudsc merge PATH_A PATH_B ... --recipe FILE`)",
    "base": "--base PATH",
    "calibration": "--calibration PATH (keep a `:split` suffix)",
}
# The comment on top of a recipe pushed with local folders: which entries they were (one `#   label: name` line each).
_PUBLISHED_HEADER = (
    "# Published copy: the entries listed below were local folders on the machine that merged; they are named\n"
    "# here by folder name only. To re-run, give each as a path (or a Hub id): the parents before --recipe\n"
    "# (hf-mudsc merge PATH_A PATH_B ... --recipe FILE), --base PATH, --calibration PATH, or write them here.\n"
)
# One of its lines listing an entry: `#   models[0]: vit-cars`.
_PUBLISHED_ENTRY = re.compile(rf"^#\s+({'|'.join(LOCAL_REFERENCE_KEYS)})(?:\[(\d+)\])?: (.*)$")

_HEADER = (
    "# hf-mudsc merge recipe. Reproduce the merge with:\n"
    "#   hf-mudsc merge --recipe {name} --output merged-model\n"
    "# Hub parents are pinned to the commits that were used; flags on the command line override keys.\n"
)
# The header of a recipe whose method is a plug-in (`hf_mudsc.methods.plugin_module`): the CLI cannot import it.
_PLUGIN_HEADER = (
    "# hf-mudsc merge recipe. Its method {method!r} is not built into hf-mudsc ({module}), so `hf-mudsc merge\n"
    "# --recipe` cannot run it: re-run it from Python after importing that module (the model card shows how):\n"
    "#   recipe = hf_mudsc.publish.recipe.Recipe.load({name!r})\n"
    "#   hf_mudsc.merge(recipe.models, recipe.calibration, **recipe.merge_options())\n"
    "# Hub parents are pinned to the commits that were used.\n"
)
# The line a recipe file gets when the merge's calibration data was given in memory (a `datasets.Dataset` object or
# batches to `hf_mudsc.merge`): the file names no data, and re-running it must say why (`refuse_unrecorded_data`).
IN_MEMORY_NOTE = ("# calibration: given in memory to hf_mudsc.merge (a Dataset object or batches), so not recorded "
                  "here; re-run with --calibration\n")

# How `Recipe.missing_local_inputs` says an entry is not on this machine (the fix "pass paths that exist" follows).
MISSING_MARK = " is missing: "

# The line a recipe file gets when a processor passed to `hf_mudsc.merge` (`processor=`), not parent A's,
# preprocessed the calibration data: a re-run preprocesses with parent A's, and says so (`warn_given_processor`).
PROCESSOR_NOTE = ("# processor: the calibration data was preprocessed by a processor given to hf_mudsc.merge "
                  "(processor=), not parent A's, so not recorded here; a re-run of this file preprocesses with parent "
                  "A's and may build other weights: re-run from Python with the same processor=\n")

# The line a recipe file gets for each parent given as a model object that no folder or Hub repo holds
# (`Recipe.object_entries`): a re-run is refused (`Recipe.refuse_objects`) rather than load another model.
OBJECT_NOTE = ("# {entry}: a model object given to hf_mudsc.merge, whose weights no folder or Hub repo holds, so not "
               "recorded here; re-run with the parents before --recipe\n")


class CalibrationMissing(RecipeError):
    """The recipe's method or refit reads calibration data and none is given (`Recipe.validate`); `reader` names
    which (`refit 'gate'`, `method 'zipit'`)."""

    def __init__(self, message: str, reader: str) -> None:
        super().__init__(message)
        self.reader = reader


@dataclass
class Recipe(MergeOptions):
    """What to merge and how: the parents plus every merge option (`hf_mudsc.options.MergeOptions`). Keys are the
    `hf-mudsc merge` flags with `_` for `-`; `models` comes first in files."""

    models: list[str] = field(default_factory=list)
    auto_chosen: dict[str, Any] | None = None
    """What `method="auto"` / `out_dtype="auto"` chose and why, as the merge that wrote the recipe recorded it
    (`auto_chosen_of`): `{"method": {"value", "reason", "correspondence_check"}, "out_dtype": {"value", "reason"}}`.
    The recipe pins the chosen values (a later release must re-run the same merge); a re-run restates these reasons
    (`restate_auto_choices`), so its card and config say what the original's said. Not a merge option."""
    file_keys: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """The keys the recipe file (or mapping) it was read from sets (`from_dict`): what a flag given with it overrides
    (`cli.merge.build_recipe` says so). Not a merge option, never written."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def keys(cls) -> list[str]:
        """Every key, as files order them: `models`, then the options in declaration order."""
        return ["models", *cls.names()]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
        """A recipe from a mapping (a recipe file's contents).

        Unknown keys are refused (a typo must not be silently ignored), and so are the keys only the command
        line may set (`COMMAND_LINE_ONLY_KEYS`) unless they state their default."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source} must be a YAML mapping of keys to values, got {type(data).__name__}")
        newer = newer_version(data.get("hf_mudsc_version"))
        unknown = sorted(set(data) - set(cls.keys()) - set(INFO_KEYS))
        if unknown and newer:
            raise RecipeError(f"{source} was written by hf-mudsc {newer}, newer than this one ({__version__}), and "
                              f"has key(s) {shown(unknown)} this version does not know; upgrade hf-mudsc (pip install "
                              f"-U hf-mudsc) to run it, or delete those keys to run it without them")
        if newer:
            logger.warning("%s was written by hf-mudsc %s, newer than this one (%s): every key is known here, but "
                           "the merge may differ from the one it recorded; upgrade hf-mudsc to be sure", source,
                           newer, __version__)
        if unknown:
            valid = [k for k in cls.keys() if k not in cls.command_line_only()]
            hint = closest_names(unknown, valid, len(data))
            raise RecipeError(f"{source} has unknown key(s) {shown(unknown)}{hint}; valid keys are: {', '.join(valid)}")
        for key, how in cls.command_line_only().items():
            if key not in data:
                continue
            if data[key] not in (None, False):
                raise RecipeError(
                    f"{source} sets `{key}`, which a recipe may not set; pass {how} on the command line "
                    "instead and delete the key from the file"
                )
            logger.info("%s: ignoring `%s: %s` (only the command line sets it)", source, key, data[key])
        values = {k: cls.coerce(k, v, source) for k, v in data.items()
                  if k not in INFO_KEYS and k not in cls.command_line_only()}
        for key in EMPTY_RECORDED_KEYS:  # refused as the file's, not as a flag's (`leave --image-column out`)
            if isinstance(value := values.get(key), str) and not value.strip():
                raise RecipeError(f"{source} sets `{key}` to an empty name ({shown(value)}, as a merge given an "
                                  f"empty column flag recorded it); delete `{key}` from it to read the default "
                                  "column, or name the column")
        recipe = cls(**values)
        recipe.auto_chosen = checked_auto_chosen(data.get(AUTO_CHOSEN_KEY), source)
        recipe.file_keys = frozenset(values)
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"no recipe file at {str(path)!r}; pass the path of a mudsc_recipe.yaml")
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {str(path)!r} is {size:,} bytes; a recipe is a few hundred (at most "
                              f"{MAX_RECIPE_BYTES:,}): pass the mudsc_recipe.yaml a merge wrote")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise RecipeError(f"recipe {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); "
                              "save it as UTF-8") from None
        text = text.removeprefix("\ufeff")  # a byte order mark (Notepad's UTF-8): JSON's reader refuses it
        try:
            data = read_json_recipe(text)
        except RepeatedKeyError as error:  # valid JSON, a recipe's rule: worded as YAML's (`RecipeLoader`)
            raise RecipeError(f"{str(path)!r}: {error}") from None
        except RecipeError as error:
            raise RecipeError(f"{str(path)!r} is not valid JSON: {error}") from None
        except RecursionError:
            raise RecipeError(f"{str(path)!r} is not valid JSON: it is nested too deeply to be a recipe") from None
        except ValueError as error:  # an integer longer than Python reads (4300 digits)
            raise RecipeError(f"{str(path)!r} is not valid JSON: {brief(error, None)}") from None
        try:
            if data is None:
                data = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: builds plain data only
        except RepeatedYAMLKey as error:
            raise RecipeError(f"{str(path)!r}: {error.line}") from None
        except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer longer than Python reads (4300 digits)
            if path.suffix.lower() == ".json":  # meant as JSON: JSON's own complaint, not the YAML reader's
                try:
                    json.loads(text)
                except json.JSONDecodeError as json_error:
                    raise RecipeError(f"{str(path)!r} is not valid JSON: {json_error.msg} (line {json_error.lineno}, "
                                      f"column {json_error.colno})") from None
                except (ValueError, RecursionError):
                    pass
            raise RecipeError(f"{str(path)!r} is not valid YAML: {yaml_error_line(error)}") from None
        except RecursionError:
            raise RecipeError(f"{str(path)!r} is not valid YAML: it is nested too deeply to be a recipe") from None
        return cls.from_dict(data or {}, source=f"recipe {str(path)!r}")

    def override(self, **changes: Any) -> Recipe:
        """A copy with `changes` applied (the command-line flags that were given)."""
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}")
        coerced = {k: self.coerce(k, v, COMMAND_LINE) for k, v in changes.items()}
        return dataclasses.replace(self, **coerced)

    def shown(self) -> tuple[Recipe, list[LocalReference]]:
        """The recipe as shown off this machine (the card's copy; the Hub's file is `published_text`): local folders
        by folder name, never by their paths. Also returns those entries (none: the recipe itself)."""
        values = {key: getattr(self, key) for key in LOCAL_REFERENCE_KEYS}
        local = local_references(values)
        shown = shown_values(values, local)
        return (self.override(**{entry.key: shown[entry.key] for entry in local}) if local else self), local

    @classmethod
    def coerce(cls, key: str, value: Any, source: str) -> Any:
        """Check one value's type (YAML `0.5` is a float, `yes` a bool); paths become strings."""
        if key == "models":
            if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)):
                raise RecipeError(f"{source}: `models` must be a list of model references, got {shown(value)}")
            return [os.fspath(v) if isinstance(v, os.PathLike) else _expect_str(key, v, source) for v in value]
        try:
            return cls.check_type(key, value)
        except OptionError as error:
            quote = (f"; quote a name YAML reads as something else (`{key}: '{value}'`)"
                     if key in TEXT_KEYS and isinstance(value, (bool, int, float)) else "")
            raise RecipeError(f"{source}: {error}{quote}") from None

    # ------------------------------------------------------------------ checks
    def validate(self, *, calibration_stand_in: bool = False) -> Recipe:
        """Refuse a recipe that cannot run, before anything is downloaded or computed (normalises options).
        `calibration_stand_in`: `calibration` is a placeholder for data the run must give (`inspect RECIPE` of a merge
        given its data in memory), so it is not parsed as a spec: a folder of its name here made it "ambiguous"."""
        from hf_mudsc.methods.auto import is_auto
        from hf_mudsc.methods.registry import check_size, data_free_methods, get_method

        if len(self.models) < 2:
            raise RecipeError(
                f"a merge takes two or more parent models (Hub ids `org/name[@revision]` or folders), "
                f"got {len(self.models)}: {shown(self.models)}"
            )
        try:
            checked = self.check_all(**self.values())
        except OptionError as error:
            raise RecipeError(str(error)) from None
        for key, value in checked.items():
            setattr(self, key, value)
        try:
            self.check_combination(parents=len(self.models))
        except OptionError as error:
            raise RecipeError(str(error)) from None
        self.refuse_objects()
        self.check_references(parse_calibration=not calibration_stand_in)
        if self.refit in REFITTING and not self.calibration:
            raise CalibrationMissing(f"refit {self.refit!r} needs calibration data: pass --calibration (a dataset spec "
                                     "`repo_or_path[@revision][:config]:split` or a saved dataset folder), or --refit "
                                     "none", reader=f"refit {self.refit!r}")
        for key in MergeOptions.names(kind="numbers") + MergeOptions.names(kind="number_or_numbers"):  # per parent
            value = getattr(self, key)
            if isinstance(value, list) and len(value) != len(self.models):
                raise RecipeError(f"{key} gives {len(value)} values for {len(self.models)} parents "
                                  f"(CLI: {flag(key)}); give one per parent, in parent order")
        method = None if is_auto(self.method) else get_method(self.method)
        if method is not None and method.num_parents is not None and method.num_parents != len(self.models):
            raise RecipeError(f"method {self.method!r} merges exactly {method.num_parents} parents, got "
                              f"{len(self.models)}; choose another method (CLI: --method)")
        if method is not None:  # what the method refuses when the merge starts (`inspect RECIPE` must say so too)
            try:
                check_size(method, self.size)  # a size budget it cannot spend: an option refusal (exit 2) like the rest
                method.check_options(self, len(self.models))
            except (MergeInputError, OptionError) as error:  # one line naming the option
                raise RecipeError(str(error)) from None
        if method is None:  # `auto`: options every method it may choose refuses, refused as an explicit method's
            from hf_mudsc.methods.auto import check_choices

            try:
                check_choices(self, len(self.models), has_data=bool(self.calibration), has_base=self.base is not None)
            except MergeInputError as error:
                raise RecipeError(str(error)) from None
        if method is not None and (method.needs_calibration or method.needs_data) and not self.calibration:
            raise CalibrationMissing(
                f"method {self.method!r} needs calibration data: pass --calibration "
                "(a dataset spec `repo_or_path[@revision][:config]:split` or a saved dataset folder), "
                f"or merge without data: --method {' / '.join(data_free_methods(len(self.models))[:3]) or 'auto'}",
                reader=f"method {self.method!r}")
        refusal = (None if self.push_to_hub is None
                   else repo_id_refusal(self.push_to_hub, option_hint("push_to_hub")))
        if refusal is not None:  # a token pasted there: every Hub call would carry it; a bad name: refused at once
            raise RecipeError(refusal)
        if self.private and self.push_to_hub is None:  # a destination flag for a push that does not happen
            logger.warning("%s has no effect: nothing is pushed (no %s)", option_hint("private"),
                           option_hint("push_to_hub"))
        return self

    def reference_entries(self) -> list[tuple[str, str]]:
        """`(label, reference)` of every model the recipe loads: `models[0]`, `models[1]`, ..., then `base`."""
        entries = [(f"models[{index}]", model) for index, model in enumerate(self.models)]
        return entries + ([("base", self.base)] if self.base else [])

    def object_entries(self) -> list[tuple[str, str]]:
        """The entries (`reference_entries`) naming a parent that was given to the merge as a model object whose
        weights no folder or Hub repo holds (`load.references.object_reference`): no run can load them."""
        return [(label, reference) for label, reference in self.reference_entries() if is_object_reference(reference)]

    def refuse_objects(self) -> None:
        """Refuse a recipe naming model objects (`object_entries`), in one line naming them and how to give them:
        re-running it must not load another model, nor fail on a Hub lookup of `<X object>`."""
        entries = self.object_entries()
        if entries:
            shown_entries = ", ".join(f"{label} `{reference}`" for label, reference in entries)
            raise RecipeError(
                f"{shown_entries} {'was a model object' if len(entries) == 1 else 'were model objects'} given to "
                "hf_mudsc.merge whose weights no folder or Hub repo holds (changed in memory, or loaded in another "
                "dtype), so not recorded: give the parents before --recipe (`hf-mudsc merge PATH_A PATH_B ... "
                "--recipe FILE`; --base PATH for the base), or save the objects with save_pretrained and write "
                "their folders into the file")

    def check_references(self, *, parse_calibration: bool = True) -> None:
        """Refuse a parent or base reference the loader would refuse before reading anything (an access token in
        place of a name, `org/name@` ...: `load.references.parse_reference`, reused), and calibration data named by
        a token or by a spec the data loader refuses (empty, too many `:` parts, an empty part or revision:
        `calibrate.dataset_spec.DatasetSpec.parse`, reused; it was refused only once the parents' configs were read,
        from the Hub too): at once, by `merge --recipe` and `inspect RECIPE` alike, without the token in any message.
        `parse_calibration=False`: `calibration` is a stand-in (`validate`), checked for a token only."""
        from hf_mudsc.calibrate.dataset_spec import DatasetSpec
        from hf_mudsc.errors import LoadError
        from hf_mudsc.load.references import parse_reference

        for label, reference in self.reference_entries():
            try:
                parse_reference(reference)
            except LoadError as error:
                raise RecipeError(f"{label}: {error}") from None
        if self.calibration and looks_like_token(self.calibration):
            raise RecipeError(f"calibration looks like a Hugging Face access token (not shown); {TOKEN_FIX}")
        if self.calibration is not None and parse_calibration:
            DatasetSpec.parse(self.calibration, error=RecipeError)

    def missing_local_inputs(self, skip: frozenset[str] = frozenset()) -> list[str]:
        """What a run of this recipe would not find on this machine, one line each: parent and base folders (a
        relative path is resolved from the working directory) and calibration data that do not exist, and folders
        whose weights the loader refuses (pickle only, no --allow-pickle: `load.weight_files.weights_format`,
        reused). `skip`: entry labels (`models[0]`, `calibration`) a caller handles otherwise."""
        from hf_mudsc.calibrate.dataset_spec import missing_local_data
        from hf_mudsc.errors import LoadError
        from hf_mudsc.load.references import looks_like_path
        from hf_mudsc.load.weight_files import weights_format

        problems = []
        for label, reference in self.reference_entries():
            if label in skip or not looks_like_path(reference):
                continue
            folder = Path(reference).expanduser()
            if not folder.is_dir():
                problems.append(f"{label} `{reference}`{MISSING_MARK}no folder {str(folder.absolute())!r}")
                continue
            try:
                weights_format(reference, [p.name for p in folder.iterdir() if p.is_file()], self.allow_pickle)
            except LoadError as error:
                problems.append(f"{label}: {error}")
        data = self.calibration
        if data and "calibration" not in skip and (gone := missing_local_data(data)) is not None:
            problems.append(f"calibration `{data}`{MISSING_MARK}no file or folder "
                            f"{str(Path(gone).expanduser().absolute())!r}")
        return problems

    def check_local_inputs(self, path: str | os.PathLike | None = None, skip: frozenset[str] = frozenset()) -> None:
        """Refuse, in one line before anything is loaded, local inputs this machine does not have
        (`missing_local_inputs`): every one at once, where loading would stop at the first after seconds of imports.
        `path`: the recipe file they come from (`inspect RECIPE` and `merge --recipe` say the same), None for a
        command line's own."""
        missing = self.missing_local_inputs(skip)
        if not missing:
            return
        absent = any(MISSING_MARK in problem for problem in missing)  # else only refused weights, which say their fix
        if path is None:
            raise RecipeError("; ".join(missing) + ("; pass paths that exist from this working directory"
                                                    if absent else ""))
        raise RecipeError(f"recipe {str(path)!r}: a run would fail here: {'; '.join(missing)}"
                          + ("; give the entries as paths that exist from this working directory (the parents "
                             "before --recipe, --base PATH, --calibration PATH) or fix them in the file"
                             if absent else ""))

    def inputs(self, recipe_file: str | os.PathLike | None = None) -> list[tuple[str, str | os.PathLike]]:
        """What a merge of this recipe reads from disk, as `(description, path)` pairs for `folder.check_output`:
        the local parent and base folders, the calibration file or folder, `recipe_file`, and the Hugging Face hub
        cache when a parent, the base or the data comes from the Hub (they are read from there). An output may not
        be equal to, inside or around any of them: inputs are never modified."""
        local = [reference for reference in [*self.models, self.base]  # "" would name the current directory
                 if reference and Path(reference).expanduser().exists()]
        inputs: list[tuple[str, str | os.PathLike]] = [("parent folder", reference) for reference in local
                                                       if reference in self.models]
        if self.base in local:
            inputs.append(("base folder", self.base))
        calibration = _calibration_path(self.calibration)
        if calibration is not None:
            inputs.append(("calibration data", calibration))
        if recipe_file:
            inputs.append(("recipe file", recipe_file))
        if any(reference and reference not in local for reference in [*self.models, self.base]) or (
                self.calibration and calibration is None):
            from huggingface_hub import constants

            inputs.append(("Hugging Face cache", constants.HF_HUB_CACHE))
        return inputs

    # ------------------------------------------------------------------ output
    def merge_options(self) -> dict[str, Any]:
        """Keyword arguments of `hf_mudsc.merge` that a recipe file holds (`keywords()` adds `allow_pickle`, which
        only the command line sets)."""
        return self.values(keyword=True, recipe=True)

    def to_dict(self, *, reproducible: bool = False) -> dict[str, Any]:
        """All fields; `reproducible=True` (what files hold) leaves out `COMMAND_LINE_ONLY_KEYS` (module docstring)."""
        data = {key: copy.deepcopy(getattr(self, key)) for key in self.keys()}
        if reproducible:
            for key in self.command_line_only():
                data.pop(key)
            data = {"hf_mudsc_version": __version__, **data}
        if self.auto_chosen:
            data[AUTO_CHOSEN_KEY] = copy.deepcopy(self.auto_chosen)
        return data

    def to_yaml(self, *, reproducible: bool = True, name: str = RECIPE_FILENAME,
                calibration_in_memory: bool = False, processor_given: bool = False) -> str:
        """The recipe as YAML; `reproducible=False` adds the command-line-only fields (for display, not loadable);
        `calibration_in_memory`: the merge read data given in memory, which the file says (`IN_MEMORY_NOTE`);
        `processor_given`: a processor passed to merge() preprocessed it (`PROCESSOR_NOTE`)."""
        body = yaml.dump(self.to_dict(reproducible=reproducible), Dumper=RecipeDumper, sort_keys=False,
                         allow_unicode=True)
        note = IN_MEMORY_NOTE if calibration_in_memory and not self.calibration else ""
        note += PROCESSOR_NOTE if processor_given else ""
        note += "".join(OBJECT_NOTE.format(entry=label) for label, _ in self.object_entries())
        module = plugin_module(self.method)
        header = _HEADER.format(name=name) if module is None else _PLUGIN_HEADER.format(
            method=self.method, name=name, module=f"registered by {module}" if module else "a plug-in")
        return header + note + body

    def save(self, path: str | os.PathLike, *, calibration_in_memory: bool = False,
             processor_given: bool = False) -> Path:
        """Write the recipe file; it never holds `COMMAND_LINE_ONLY_KEYS`, so it can be loaded and re-run."""
        path = Path(path)
        path.write_text(self.to_yaml(reproducible=True, name=path.name, calibration_in_memory=calibration_in_memory,
                                     processor_given=processor_given), encoding="utf-8")
        return path


@dataclass(frozen=True)
class LocalReference:
    """One recipe entry naming a folder of this machine (`given`, its path) and how it is shown off it (`shown`)."""

    key: str
    index: int | None  # the position in a list (`models`), None for a single value
    given: str
    shown: str

    @property
    def label(self) -> str:
        """How messages and the pushed file's comment name the entry: `models[0]`, `calibration`."""
        return self.key if self.index is None else f"{self.key}[{self.index}]"


def local_references(values: Mapping[str, Any]) -> list[LocalReference]:
    """The entries of `values` (recipe keys) that name a local folder, in key order: the one place that decides
    which entries are hidden off this machine, and how (`load.references.display_name`)."""
    found = []
    for key in LOCAL_REFERENCE_KEYS:
        value = values.get(key)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, given in items:
            if isinstance(given, (str, os.PathLike)) and display_name(given) != os.fspath(given):
                found.append(LocalReference(key, index, os.fspath(given), display_name(given)))
    return found


def published_text(text: str, *, name: str = RECIPE_FILENAME) -> str:
    """A recipe file's text as pushed to the Hub: each local folder named as the card shows it (`Recipe.shown`)
    and a comment on top listing those entries; every other byte as in `text`. Without local folders: `text`.

    The local file keeps the paths (it re-runs the merge on this machine); a pushed copy, possibly public, must not
    publish the machine's layout. Values are replaced where the YAML parser found them, so nothing else changes."""
    refused = RecipeError(f"{name} is not a recipe as hf-mudsc writes it, so its local folders cannot be named by "
                          "folder name for the Hub; write the folder again with `hf-mudsc merge --output DIR`")
    try:
        data = yaml.load(text, Loader=RecipeLoader)
        # Nested aliases (billion laughs) are shared objects here, but comparing the published copy below expands
        # them: a recipe is a few hundred values (`auto_chosen`'s records at most `AUTO_CHOSEN_MAX_VALUES` each).
        if not is_small_json(data, MAX_RECIPE_VALUES):
            raise refused
        local = local_references(data) if isinstance(data, Mapping) else []
        if not local:
            return text
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        nodes = {key.value: value for key, value in root.value if isinstance(key, yaml.ScalarNode)}
        spans = []
        for entry in local:
            node = nodes[entry.key] if entry.index is None else nodes[entry.key].value[entry.index]
            spans.append((node.start_mark.index, node.end_mark.index, _yaml_scalar(entry.shown)))
    except (yaml.YAMLError, ValueError, RecursionError, LookupError, AttributeError):
        raise refused from None
    for start, end, value in sorted(spans, reverse=True):
        text = text[:start] + value + text[end:]
    lines = "".join(f"#   {entry.label}: {' '.join(entry.shown.splitlines())}\n" for entry in local)
    published = _PUBLISHED_HEADER + lines + text
    # A layout the writer never makes (anchors, ...):
    if yaml.load(published, Loader=RecipeLoader) != shown_values(data, local):
        raise refused
    return published


def shown_values(values: Mapping[str, Any], local: list[LocalReference]) -> dict[str, Any]:
    """A copy of `values` with the `local` entries (`local_references(values)`) as shown off this machine."""
    shown = dict(values)
    for key in {entry.key for entry in local if entry.index is not None}:
        shown[key] = list(values[key])  # `values`' own list is left as it is
    for entry in local:
        if entry.index is None:
            shown[entry.key] = entry.shown
        else:
            shown[entry.key][entry.index] = entry.shown
    return shown


def unresolved_published_entries(text: str, recipe: Recipe) -> list[LocalReference]:
    """The entries the comment on top of a pushed recipe lists (`published_text`) whose value in `recipe` is still
    the folder name listed there and names no folder here: what a re-run must be given. An entry written over in
    the file or given anew (a path, a Hub id) is not one of them — the comment says "or write them here".
    `LocalReference.given` is the name listed; `shown` the same."""
    unresolved = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith("#"):
            break
        match = _PUBLISHED_ENTRY.match(line)
        if match is None:
            continue
        key, index, name = match.group(1), match.group(2), match.group(3)
        value = getattr(recipe, key)
        if index is not None:
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
        if value != name or any(os.path.exists(os.path.expanduser(part)) for part in (name, name.partition(":")[0])
                                if part):
            continue
        unresolved.append(LocalReference(key, None if index is None else int(index), name, name))
    return unresolved


def check_local_folders_given(path: str | os.PathLike, recipe: Recipe) -> None:
    """Refuse to re-run a pushed recipe (`published_text`) whose local folders, named by folder name only, were not
    given as paths (`unresolved_published_entries`; `recipe`: with the command line's flags applied): one line
    naming each entry and how to give it, before anything is loaded."""
    unresolved = unresolved_published_entries(Path(path).read_text(encoding="utf-8"), recipe)
    missing = {f"{entry.label} `{entry.given}`": LOCAL_REFERENCE_KEYS[entry.key] for entry in unresolved}
    if missing:
        one = len(missing) == 1
        raise RecipeError(
            f"recipe {str(path)!r}: {', '.join(missing)} {'was a local folder' if one else 'were local folders'} on "
            "the machine that merged, named by folder name only in a published recipe; give "
            f"{'its path (or a Hub id)' if one else 'their paths (or Hub ids)'}: "
            f"{'; '.join(dict.fromkeys(missing.values()))} — or write them into the file"
        )


def refuse_unrecorded_data(path: str | os.PathLike, error: CalibrationMissing) -> None:
    """Say why a recipe file names no calibration data when its merge was given the data in memory
    (`IN_MEMORY_NOTE`): `error` (the generic "needs calibration data") would suggest the merge ran without any."""
    if IN_MEMORY_NOTE not in Path(path).read_text(encoding="utf-8"):
        return
    raise RecipeError(
        f"recipe {str(path)!r}: the merge's calibration data was given in memory (a Dataset object or batches to "
        f"hf_mudsc.merge), so it is not recorded in the recipe, and {error.reader} needs it: pass the same data "
        "with --calibration (a dataset spec `repo_or_path[@revision][:config]:split` or a saved dataset folder)"
    ) from None


def given_processor_warning(text: str) -> str | None:
    """What a run of a recipe file (`text`) must say when its merge preprocessed the data with a processor passed to
    merge() (`PROCESSOR_NOTE`): this run preprocesses with parent A's, so the weights may differ. None otherwise."""
    if PROCESSOR_NOTE not in text:
        return None
    return ("its merge's calibration data was preprocessed by a processor given to hf_mudsc.merge (processor=), not "
            "parent A's; a run of this file preprocesses with parent A's, so its weights may differ: re-run from "
            "Python with the same processor= to reproduce it")


def warn_given_processor(path: str | os.PathLike) -> None:
    """Log `given_processor_warning` of the recipe file at `path`, if it has one (`merge --recipe`)."""
    said = given_processor_warning(Path(path).read_text(encoding="utf-8"))
    if said is not None:
        logger.warning("recipe %s: %s", path, said)


def auto_chosen_of(mudsc: Mapping[str, Any]) -> dict[str, Any] | None:
    """What `auto` chose in a merge, from its `config.mudsc` (`Recipe.auto_chosen`): the method when its choice has
    a reason (`method_choice_reason`, with `correspondence_check`), the dtype when its reason is auto's. None: the
    merge chose nothing."""
    chosen: dict[str, Any] = {}
    if mudsc.get("method_choice_reason"):
        chosen["method"] = {"value": mudsc.get("method"), "reason": mudsc["method_choice_reason"],
                            "correspondence_check": copy.deepcopy(mudsc.get("correspondence_check")),
                            "parent_relation": copy.deepcopy(mudsc.get("parent_relation"))}
    reason = mudsc.get("out_dtype_reason")
    if isinstance(reason, str) and reason.startswith("auto"):
        chosen["out_dtype"] = {"value": mudsc.get("out_dtype"), "reason": reason}
    return chosen or None


def pinned_choices(recipe: Recipe, merged: Any) -> Recipe:
    """`recipe` with what the merge `merged` resolved pinned, so that its re-run runs the same merge: `auto` recorded
    as the method, refit and out_dtype it chose, `alpha: auto` as the α handed to a method that ignores it (as
    `merge_report.recipe`), `normalize` as the merge ran it (plain averaging returned by `auto`'s averaging check
    divides by the weights' sum whatever was given), the base as it was read, and why `auto` chose them
    (`auto_chosen_of`). Shared by `hf-mudsc merge` and `hf-mudsc demo`, whose recipes must pin alike."""
    report = merged.merge_report
    pinned = recipe.override(base=report.recipe["base"], method=report.method, alpha=report.recipe["alpha"],
                             refit=report.recipe["refit"], out_dtype=report.recipe["out_dtype"],
                             normalize=report.recipe["normalize"])
    pinned.auto_chosen = auto_chosen_of(merged.config.mudsc)
    return pinned


def restate_auto_choices(mudsc: dict[str, Any], recipe: Recipe, auto_out_dtype: tuple[str, str] | None = None
                         ) -> None:
    """In a re-run's `config.mudsc` (changed in place), the reasons `recipe.auto_chosen` recorded for the values the
    recipe pins, where the re-run ran those same values (the pinned method on parents that relate as the recorded
    ones did, not other parents; the pinned dtype, not one given on the command line) and the reason still holds:
    its card then says what the original's said, not "asked for" or nothing. The dtype's reason only when
    `out_dtype="auto"` gives that value and reason for these parents (`auto_out_dtype`, `MergeReport`'s): other
    parents (stored in float16), or a reason edited by hand, keep "asked for". The weights do not change (they
    are the pinned values')."""
    chosen = recipe.auto_chosen or {}
    method = chosen.get("method")
    same_parents = method and method.get("parent_relation") == mudsc.get("parent_relation")  # not other parents'
    if (same_parents and mudsc.get("method") == method["value"] == recipe.method
            and not mudsc.get("method_choice_reason")):
        mudsc["method_choice_reason"] = method["reason"]
        mudsc["correspondence_check"] = copy.deepcopy(method.get("correspondence_check"))
    dtype = chosen.get("out_dtype")
    if (dtype and mudsc.get("out_dtype") == dtype["value"] == recipe.out_dtype
            and auto_out_dtype is not None and tuple(auto_out_dtype) == (dtype["value"], dtype["reason"])):
        mudsc["out_dtype_reason"] = dtype["reason"]


def checked_auto_chosen(value: Any, source: str) -> dict[str, Any] | None:
    """A recipe's `auto_chosen` (`Recipe.auto_chosen`), refused in one line unless it has the shape hf-mudsc writes:
    its reasons reach the card of every re-run."""
    if value is None:
        return None
    entries = {"method": ("value", "reason", "correspondence_check", "parent_relation"),
               "out_dtype": ("value", "reason")}
    valid = isinstance(value, Mapping) and set(value) <= set(entries) and all(
        isinstance(entry, Mapping) and set(entry) <= set(entries[key]) and isinstance(entry.get("value"), str)
        and isinstance(entry.get("reason"), str)
        and all(isinstance(entry.get(name), (Mapping, type(None))) and is_small_json(entry.get(name))
                for name in ("correspondence_check", "parent_relation"))
        for key, entry in value.items())
    if not valid:
        raise RecipeError(f"{source}: `{AUTO_CHOSEN_KEY}` is not as hf-mudsc writes it (what method/out_dtype auto "
                          "chose, and why); delete the key: the pinned `method` and `out_dtype` keys still apply")
    return {key: dict(entry) for key, entry in value.items()}


# What `auto_chosen`'s records may hold once expanded: hf-mudsc writes a few dozen values; YAML aliases can make a
# short file expand to billions when the record is copied into a re-run's config.json.
AUTO_CHOSEN_MAX_VALUES = 10_000
#: What a whole recipe file may hold once expanded: its keys plus both `auto_chosen` records, with room to spare.
MAX_RECIPE_VALUES = 4 * AUTO_CHOSEN_MAX_VALUES


def is_small_json(value: Any, limit: int = AUTO_CHOSEN_MAX_VALUES) -> bool:
    """Whether `value` is plain JSON data (dicts with string keys, lists, strings, numbers, booleans, None) of at
    most `limit` values counted with aliases expanded: what `json.dumps` writes into config.json as is."""
    remaining = limit
    pending = [value]
    while pending:
        item = pending.pop()
        remaining -= 1
        if remaining < 0:
            return False
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return False
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):  # strict JSON readers refuse NaN and inf
            return False
        elif item is not None and not isinstance(item, (str, int, float)):  # bool is an int
            return False
    return True


def newer_version(written: Any) -> str | None:
    """`written` (a recipe's `hf_mudsc_version`) if it names a release newer than this one, else None (the same or
    older, absent, or not a version: nothing to say). Releases compare by leading numbers (`0.2.0rc1` as 0.2.0)."""
    def numbers(text: str) -> tuple[int, ...] | None:
        found = re.match(r"^v?(\d+(?:\.\d+)*)", text.strip())
        return tuple(int(part) for part in found.group(1).split(".")) if found else None

    if not isinstance(written, (str, int, float)) or isinstance(written, bool):
        return None
    theirs, ours = numbers(str(written)), numbers(__version__)
    if theirs is None or ours is None:
        return None
    width = max(len(theirs), len(ours))  # 1.2 == 1.2.0
    theirs, ours = theirs + (0,) * (width - len(theirs)), ours + (0,) * (width - len(ours))
    return str(written) if theirs > ours else None


def _calibration_path(spec: str | None) -> Path | None:
    """The local file or folder of a calibration spec (`path[:config]:split`), if it names one."""
    if not spec:
        return None
    for candidate in (spec, spec.partition(":")[0]):
        if candidate and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser()
    return None


def _yaml_scalar(value: str) -> str:
    """`value` as one YAML scalar (quoted when it must be), to put in place of another in a recipe's text."""
    item = yaml.dump([value], Dumper=RecipeDumper, default_flow_style=False, width=float("inf"), allow_unicode=True)
    return item.removeprefix("- ").removesuffix("\n")  # a block sequence's item: quoted as a block value would be


def yaml_value(value: Any) -> str:
    """`value` on one line as the recipe file writes it (`RecipeDumper`, flow style): `true`, `null`, `[a, b]`, so a
    line naming a key's value from the file shows it as the file does, not as Python prints it (`True`, `None`)."""
    text = yaml.dump(value, Dumper=RecipeDumper, default_flow_style=True, width=float("inf"), allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


# The column keys a merge given an empty flag (`--image-column ""`) recorded as '' before that was refused: such a
# recipe is refused naming its file and the key to delete (as an unknown key is), not the flag never passed.
EMPTY_RECORDED_KEYS = ("image_column", "text_column")


# How `Recipe.override` names the command line's flags as a source (no YAML there: no advice to quote).
COMMAND_LINE = "command line"


def _expect_str(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not value:
        fix = ("give every parent as a Hub id or a folder (an unset shell variable gives '')" if source == COMMAND_LINE
               else "quote a name YAML reads as something else (`'yes'`, `'null'`)")
        raise RecipeError(f"{source}: every entry of `{key}` must be a non-empty string, got {shown(value)}; {fix}")
    return value


# A number with an exponent, as JSON and YAML 1.2 write it (`1e-3`, `2E+5`, `1.0e9`): PyYAML (YAML 1.1) reads these as
# strings unless they have a dot and a signed exponent, so `refit_lambda: 1e-3` was refused as "must be a number".
EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


# Characters YAML 1.1 counts as line breaks besides CR and LF. Written raw in a quoted scalar, PyYAML reads U+0085
# back as a space (a folder `a\x85b` named `a b`), and a YAML 1.2 reader (the Hub's, of a card's front matter) keeps
# the indentation PyYAML writes after each one as part of the name.
UNICODE_LINE_BREAKS = "\x85\u2028\u2029"


def represent_text(dumper: yaml.representer.BaseRepresenter, text: str) -> yaml.ScalarNode:
    """A string as YAML, as PyYAML writes it, but double-quoted when it holds a `UNICODE_LINE_BREAKS` character: there
    they are written as the escapes `\\N`, `\\L`, `\\P`, which every YAML reader reads back as the character."""
    style = '"' if any(char in text for char in UNICODE_LINE_BREAKS) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


class RecipeDumper(yaml.SafeDumper):
    """`yaml.SafeDumper` that quotes a string `RecipeLoader` would read as a number (a folder named `1e3`), and one
    holding a Unicode line break (`represent_text`)."""


RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))
RecipeDumper.add_representer(str, represent_text)


# The keys that hold names, paths or choices (`models`, `base`, `calibration`, `output`, ...). A plain `1e5` there is
# read as the text written: YAML 1.1 (and hf-mudsc before `EXPONENT_FLOAT`) read it so, and recipes of those versions
# name folders and models `1e5` unquoted. Any other number there (`3`, `1.5`) is refused, naming the key and the fix
# (quote it), as YAML always read it as a number.
TEXT_KEYS = frozenset(("models", *(f.name for f in MergeOptions.option_fields()
                                   if f.metadata["kind"] in ("str", "model", "choice", "device", "dtype"))))
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TEXT_TAG = "tag:yaml.org,2002:str"


def repeated_key_line(key: Any, mark: yaml.Mark | None = None) -> str:
    """How a recipe's key given twice is refused, read as JSON or YAML alike: the key, where (YAML knows), the fix."""
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"key {shown(key)} is given twice{where}; give each key once"


class RepeatedKeyError(RecipeError):
    """A JSON recipe gives a key twice (`read_json_recipe`); the message is `repeated_key_line`'s."""


class RepeatedYAMLKey(yaml.constructor.ConstructorError):
    """A YAML mapping gives a key twice (`RecipeLoader`): a YAML error as before (the service's job reader says it
    so), carrying `line`, the refusal a recipe file gets (`repeated_key_line`)."""

    def __init__(self, key: Any, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"key {shown(key)} is given twice", mark)
        self.line = repeated_key_line(key, mark)


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice (plain YAML keeps the last one silently): a recipe file's,
    and (with aliases refused too) a service job's (`hf_mudsc.serve.app`). Under `TEXT_KEYS` a plain `EXPONENT_FLOAT`
    scalar is read as the text written (`models: [1e5, 2e3]` names two folders)."""

    def construct_document(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value in TEXT_KEYS:
                    items = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    for item in items:
                        if (isinstance(item, yaml.ScalarNode) and item.style is None and item.tag == _FLOAT_TAG
                                and EXPONENT_FLOAT.match(item.value)):
                            item.tag = _TEXT_TAG
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)  # `<<` merge keys first: a key they bring is overridden, not repeated
        keys = [self.construct_object(key_node, deep=deep) for key_node, _ in node.value]
        index = repeated_key(keys)
        if index is not None:
            raise RepeatedYAMLKey(keys[index], node.value[index][0].start_mark)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789"))


def read_json_recipe(text: str) -> Any:
    """A recipe file written as JSON (`{...}`), read as JSON — as the service reads a job: JSON indented with tabs
    is no YAML (a tab starts no YAML token). None when the text is not JSON (YAML, a YAML flow mapping `{a: 1}`):
    read as YAML then. A key given twice is refused (`repeated_key`), as in YAML; raises `RecipeError` naming it."""
    if not text.lstrip().startswith("{"):
        return None

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        index = repeated_key([key for key, _ in pairs])
        if index is not None:
            raise RepeatedKeyError(repeated_key_line(pairs[index][0]))
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=mapping)
    except json.JSONDecodeError:
        return None


def repeated_key(keys: list[Any]) -> int | None:
    """The position of the first key given a second time in one mapping (None: none; an unhashable key ends the
    search, the loader names it) — a YAML recipe's and a JSON job's (`object_pairs_hook`) one rule."""
    seen: set[Any] = set()
    for index, key in enumerate(keys):
        try:
            if key in seen:
                return index
            seen.add(key)
        except TypeError:
            return None
    return None


def yaml_error_line(error: Exception) -> str:
    """A YAML error as one line: what is wrong and where (`found unhashable key (line 2, column 3)`)."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return ", ".join(part for part in (error.context, error.problem) if part) + where
    return brief(error, None)


def check_push_target(recipe: Recipe, *, given_as: str = "--push-to-hub") -> None:
    """Refuse a `push_to_hub` repo that is a parent's or the base's Hub repo (any revision; the Hub's repo names
    ignore case): with `overwrite` the push would replace that input's files with the merged model, which local
    outputs never may (`runner.check_merge_output`). Before any Hub call, for the merge and its dry run alike."""
    if not recipe.push_to_hub:
        return
    named = [(f"parent {parent_label(index)}", reference) for index, reference in enumerate(recipe.models)]
    for what, reference in named + ([("the base", recipe.base)] if isinstance(recipe.base, str) else []):
        if not isinstance(reference, str) or looks_like_path(reference):
            continue
        try:
            repo_id, _ = parse_reference(reference)
        except ValueError:  # refused, with its reason, where the reference is loaded
            continue
        if repo_id.casefold() == recipe.push_to_hub.casefold():
            another = f"{given_as} name" if given_as.startswith("--") else given_as  # as `check_target` says it
            raise RecipeError(f"{given_as} {recipe.push_to_hub!r} is the Hub repo of {what} ({reference!r}); inputs "
                              f"are never modified: choose another {another}")
