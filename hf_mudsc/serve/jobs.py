"""A request body -> a validated job, before anything is queued: the same keys and checks as a recipe file.

The body holds recipe keys (`models`, `calibration`, `method`, ... — `hf_mudsc.publish.recipe.Recipe`), the
destination keys a recipe FILE may not set but a job must (`output`, `push_to_hub`, `private`, `overwrite`), and
`dry_run`. Every error names the offending key; the web process answers it with 400. What `hf-mudsc merge` refuses
before loading is refused here too (an existing output, options the method refuses, names that are no Hub id, a
pushed recipe's local folders named by folder name only, local inputs that are not there or hold only pickle weights
(`refuse_missing_inputs`), and — when parent A is a local folder — option values the method refuses for its shapes,
`check_shapes_on_disk`), so
a client hears it at POST rather than from a job failed in its worker.

`output` is a folder under the service's output root (default `<state-dir>/outputs`): a client names a folder
there, never a path elsewhere on the server, and a refusal names it as the client did, never the root's path
(`hide_output_root`). `allow_pickle` is refused: the service never unpickles weights.

What a job READS from the server's disk — a parent or `base` folder, `calibration` data, and the base a local
parent's model card names when the job's method takes it from there — must lie inside a folder the operator listed
with `hf-mudsc serve --local-root DIR` (resolved with symlinks followed); without one, a job names Hub references
only. Otherwise anyone who may POST could make the server merge, and push to the Hub, any folder it can read. Which
references are local is decided exactly as the loader decides it (`load.references`, `calibrate.dataset_spec`), in
the worker's working folder (the server's). A local dataset folder (or the working folder a bare builder name
reads) is walked once for symbolic links, which datasets reads through: one leading outside every root refuses the
job too (`link_out`; a parent's folder is the loader's to check, `load.links.refuse_links_out`). The check runs at
POST and again when the job is about to start, and the worker is handed the resolved paths (`resolve_local_paths`):
a link inside a root re-pointed after the check does not redirect a load (a link inside a dataset folder can still
be: its files are opened by name). A refusal names the path the client sent, never the roots nor where a link leads
(the server's log has them).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from hf_mudsc._version import __version__
from hf_mudsc.calibrate.dataset_spec import DatasetSpec, missing_local_data
from hf_mudsc.errors import BIDI_CONTROLS, CalibrationError, LoadError, RecipeError, option_hint, shown
from hf_mudsc.load.config_json import read_card
from hf_mudsc.load.references import (
    TOKEN_FIX,
    card_base_model,
    looks_like_path,
    looks_like_token,
    parse_reference,
)
from hf_mudsc.methods.registry import AUTO, check_size, get_method
from hf_mudsc.options import closest_names
from hf_mudsc.publish.recipe import (
    AUTO_CHOSEN_KEY,
    DESTINATION_KEYS,
    IN_MEMORY_NOTE,
    INFO_KEYS,
    CalibrationMissing,
    Recipe,
    check_push_target,
    given_processor_warning,
    newer_version,
    unresolved_published_entries,
)
from hf_mudsc.runner import check_merge_output
from hf_mudsc.serve import is_long_secret

logger = logging.getLogger(__name__)

SERVICE_KEYS = ("dry_run",)
NAME_MAX = 255  # bytes in one folder name (Linux, macOS, Windows)
CONTROLS = "control characters (newlines, tabs, escapes, direction overrides)"
# How a refusal tells the client a local path is not allowed: no server path but the one it sent (docs/design.md §11).
# How the service tells a client that sent a token in a field where its token goes (the library's `TOKEN_FIX` is the
# Python API's and the CLI's advice).
SERVICE_TOKEN_FIX = ("send the token as the request's `Authorization: Bearer hf_...` header (the page's token field), "
                     "never in a field of the job")
# The CLI's and the Python API's spellings in the library's messages, rewritten as a service client spells them
# (`service_advice`), in this order: a JSON key, `"overwrite": true`, the `Authorization: Bearer` header — never a
# flag, a keyword argument or `hf auth login`, which a client cannot run on the server. A flag that is no job key
# (the operator's `--local-root`) is left as it is.
BEARER = "`Authorization: Bearer hf_...`"
FLAG = r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)"
SERVICE_SPELLINGS: tuple[tuple[str, str | None], ...] = (
    (r"pass a valid one \(CLI --token, token=, or `hf auth login`\)", f"send a valid one as {BEARER}"),
    (r"pass token= or log in with `hf auth login`", f"send a token that can read it as {BEARER}"),
    (r"pass a token \(CLI: --token, or log in with `hf auth login`\)", f"send a token as {BEARER}"),
    # `load.weight_files.weights_format`: the service refuses `allow_pickle`, so converting is the one fix
    (r"Convert it to safetensors( \([^()]*\))?, or pass allow_pickle=True(?: \(CLI: --allow-pickle\))? if you "
     r"trust its source", r"This service loads safetensors only: convert it to safetensors\1"),
    (r"\bpass a token\b(?! as)", f"send a token as {BEARER}"),
    (r"\b(\w+)= \(CLI: --[\w-]+(?: [A-Z][\w/:\[\]@.-]*)?\)", r"`\1`"),  # `errors.option_hint`: `x= (CLI: --x)`
    (r"\(CLI: " + FLAG + r" ([a-z][\w.:-]*)\)", None),  # an aside with a value: `(CLI: --method linear)`
    (r" ?\(CLI:? [^()]*(?:\([^()]*\)[^()]*)*\)", ""),  # an aside naming a flag: `(CLI: --calibration SPEC)`
    (r"\boverwrite=True\b|(?<![\w-])--overwrite\b", '`"overwrite": true`'),
    (r"(?<![\w-])--(device|refit|method) ([a-z][\w:]*)\b|\b(device)='(cpu|cuda(?::\d+)?)'", None),  # and a value
    (FLAG + r"(?: (?:[A-Z][A-Z0-9_/:\[\]@.-]*[A-Z]\b|name\b))?", None),  # a flag, and its metavar: `--output DIR`
)
INT_TOO_LONG = "int_max_str_digits"  # Python's refusal to read an integer of over 4300 digits says this
OUTSIDE = "which is outside the folders this server allows (its operator lists them with --local-root)"


@dataclass(frozen=True)
class JobRequest:
    """A validated job: the recipe (destination included, `output` resolved) and whether it is a dry run."""

    recipe: Recipe
    dry_run: bool
    inputs: tuple[tuple[str, str], ...] = ()
    """What the job reads from the server's disk, (key, path resolved): parents, base, calibration data. The store
    claims them (`JobStore.add`): no job may write over them, nor may this job read another's output being written."""
    base_from_cards: bool = False
    """The recipe's `base` is the folder every parent's model card names, resolved by the start check
    (`resolve_local_paths`) so the worker loads the folder that was checked; the merged model says where it came
    from as the loader would have."""
    warnings: tuple[str, ...] = ()
    """What the request's checks warned about (`private` without `push_to_hub`, ...), in the service's words: the
    POST answer, the job and its result carry them (the server's console is no client's)."""

    @property
    def output(self) -> str | None:
        return self.recipe.output

    @property
    def repo_id(self) -> str | None:
        return self.recipe.push_to_hub

    def to_dict(self) -> dict[str, Any]:
        """What the store keeps and the worker receives (JSON): every recipe field, plus `dry_run` (and
        `base_from_cards` in what the worker receives, when set)."""
        data = {**self.recipe.to_dict(), "dry_run": self.dry_run}
        if self.base_from_cards:
            data["base_from_cards"] = True
        if self.warnings:
            data["warnings"] = list(self.warnings)
        return data

    @classmethod
    def unknown_stored_keys(cls, data: Mapping[str, Any]) -> list[str]:
        """The keys of a stored job this version would drop (`from_stored` reads only what it knows): a job queued by
        a newer or an older hf-mudsc, before the service was changed, would run without them."""
        known = {*Recipe.keys(), *INFO_KEYS, "dry_run", "base_from_cards", "warnings"}
        return sorted(str(key) for key in data if key not in known)

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> JobRequest:
        values = {k: v for k, v in data.items() if k in Recipe.keys()}
        recipe = Recipe(**values)
        recipe.auto_chosen = data.get(AUTO_CHOSEN_KEY)  # checked at POST (`Recipe.from_dict`): the re-run restates it
        return cls(recipe, bool(data.get("dry_run", False)),
                   base_from_cards=bool(data.get("base_from_cards", False)),
                   warnings=tuple(data.get("warnings") or ()))


def accepted_keys() -> list[str]:
    """The keys a job may send, each once: the recipe's (`dry_run` is one too), without `allow_pickle`."""
    keys = [k for k in Recipe.keys() if k != "allow_pickle"]
    return keys + [k for k in SERVICE_KEYS if k not in keys]


class WarningRecorder(logging.Handler):
    """Collects the warnings the library logs on one thread (the request's): a POST's checks run in a thread pool,
    and another request's warnings are not this one's."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(service_advice(" ".join(record.getMessage().split())))


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """The `hf_mudsc` warnings logged on this thread inside the block (still logged as before), de-duplicated."""
    recorder = WarningRecorder()
    library = logging.getLogger("hf_mudsc")
    library.addHandler(recorder)
    found: list[str] = []
    try:
        yield found
    finally:
        library.removeHandler(recorder)
        found.extend(dict.fromkeys(recorder.messages))


def parse_job(body: Any, output_root: Path, *, dry_run: bool = False, local_roots: Sequence[Path] = (),
              text: str | None = None, being_written: Sequence[str] = ()) -> JobRequest:
    """Validate a POST /api/jobs body (`check_job`); the warnings its checks log are the job's `warnings`."""
    with recorded_warnings() as warnings:
        try:
            job = check_job(body, output_root, dry_run=dry_run, local_roots=local_roots, text=text,
                            being_written=being_written)
        except RecursionError:  # a body nested just shallower than the parser's limit, deeper than the checks'
            raise RecipeError("the body is nested too deeply; a recipe is a flat mapping") from None
    return JobRequest(job.recipe, job.dry_run, job.inputs, warnings=tuple(warnings))


def check_job(body: Any, output_root: Path, *, dry_run: bool = False, local_roots: Sequence[Path] = (),
              text: str | None = None, being_written: Sequence[str] = ()) -> JobRequest:
    """Validate a POST /api/jobs body; raises `RecipeError` naming the key (before anything is loaded).

    `local_roots`: the folders a job may read local paths from (`--local-root`); none: Hub references only.
    `text`: the body as sent when it is YAML, whose comments may list entries a pushed recipe names by folder
    name only (`refuse_published_names`). `being_written`: the outputs active jobs write (absolute, resolved), where
    an input is not missing but claimed (the store answers 409: `refuse_missing_inputs`).

    A dry run's `output` is checked as a merge's (an existing folder, one overlapping an input): the plan answers
    whether the merge would start, as `hf-mudsc merge --dry-run` does (`runner.check_before_dry_run`), so a job that
    passes its dry run is not then refused for its output."""
    if not isinstance(body, Mapping):
        raise RecipeError(f"the body must be a mapping of recipe keys to values (JSON or YAML), "
                          f"got {type(body).__name__}")
    try:  # a lone surrogate (JSON's "\ud800") cannot be stored or answered as UTF-8: refused here
        json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError as problem:
        raise RecipeError(f"the body is not valid Unicode text: it holds a lone surrogate "
                          f"{problem.object[problem.start:problem.end]!r}") from None
    body = dict(body)
    refuse_tokens(body)  # `auto_chosen` and `hf_mudsc_version` included: a re-run's card restates the reasons
    refuse_control_characters(body)
    newer = newer_version(body.pop("hf_mudsc_version", None))
    unknown = sorted(str(k) for k in set(body) - set(accepted_keys()) - {"allow_pickle", *INFO_KEYS})
    if unknown and newer:
        raise RecipeError(f"the recipe was written by hf-mudsc {newer}, newer than this service's ({__version__}), "
                          f"and has key(s) {unknown} this version does not know: ask the service's operator to "
                          "upgrade hf-mudsc to run it, or delete those keys to run it without them")
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown}{closest_names(unknown, accepted_keys(), len(body))}; valid keys "
                          f"are: {', '.join(accepted_keys())}")
    if newer:  # a warning of the request (`parse_job` records it)
        logger.warning("the recipe was written by hf-mudsc %s, newer than this service's (%s): every key is known "
                       "here, but the merge may differ from the one it recorded; ask the service's operator to "
                       "upgrade hf-mudsc to be sure", newer, __version__)
    if body.get("allow_pickle") not in (None, False):
        raise RecipeError("`allow_pickle` is refused: the service never loads pickle weights; "
                          "convert the parents to safetensors")
    body.pop("allow_pickle", None)
    flag = body.pop("dry_run", False)
    if not isinstance(flag, bool):
        raise RecipeError(f"`dry_run` must be true or false, got {flag!r}")
    # Checked here so a wrong type is named as the job's (`override` would say "command line").
    destination = {k: body.pop(k) for k in DESTINATION_KEYS if k in body}
    destination = {k: Recipe.coerce(k, v, "job") for k, v in destination.items() if v is not None}
    recipe = Recipe.from_dict(body, source="job")  # `auto_chosen` checked as a recipe file's
    recipe = recipe.override(**destination)
    refuse_objects(recipe)
    try:
        recipe = recipe.validate()
    except CalibrationMissing as missing:
        refuse_unrecorded_data(text, missing)
        raise
    if text is not None:
        refuse_published_names(text, recipe)
        if (said := given_processor_warning(text)) is not None:  # a warning of the request, as `merge --recipe`'s
            logger.warning("the recipe: %s", said)
    # Refuses; the store keeps what the client sent, the worker gets the paths resolved again when the job starts.
    resolved = resolve_local_paths(JobRequest(recipe, dry_run), local_roots).recipe
    refuse_missing_inputs(recipe, being_written)
    # a parent's or a given base's repo (a base local cards name is a folder in `resolved`: no repo), in the job's
    # words (`service_advice`, as the worker's refusal reads); a Hub base the cards name: below
    check_push_target(resolved.override(push_to_hub=recipe.push_to_hub))
    check_hub_ids(recipe)
    check_method(recipe)
    check_device(recipe.device)
    named = check_base_found(recipe, resolved)
    if recipe.push_to_hub and named is not None:
        check_push_target(resolved.override(push_to_hub=recipe.push_to_hub, base=named))
    check_shapes_on_disk(resolved)
    dry_run = dry_run or flag
    if recipe.output is not None:
        recipe.output = str(resolve_output(recipe.output, output_root))
        # As the CLI does before loading, for a dry run too (`runner.check_before_dry_run`: a dry run must not pass
        # what the merge refuses at once); the worker checks again, the folder may change.
        try:
            check_merge_output(Path(recipe.output), resolved.override(output=recipe.output), flag="output")
        except (FileExistsError, ValueError) as problem:
            raise RecipeError(hide_output_root(str(problem), output_root)) from None
    if not dry_run and not recipe.output and not recipe.push_to_hub:
        raise RecipeError("say where the merged model goes: `output` (a folder name under the service's output "
                          "root) and/or `push_to_hub` (`org/name`)")
    return JobRequest(recipe, dry_run, inputs=local_inputs(resolved))


def refuse_objects(recipe: Recipe) -> None:
    """A recipe naming a model object (`Recipe.object_entries`: its merge was given one whose weights nothing holds),
    refused in one line naming each entry and what a client writes in its place (the recipe's own refusal advises
    the CLI's command line)."""
    entries = recipe.object_entries()
    if entries:
        one = len(entries) == 1
        raise RecipeError(
            f"{', '.join(f'`{label}` {shown(reference)}' for label, reference in entries)} "
            f"{'was a model object' if one else 'were model objects'} given to hf_mudsc.merge whose weights no folder "
            "or Hub repo holds, so the recipe does not record them: in the recipe, replace "
            f"{'it' if one else 'each'} by a Hub reference `org/name[@revision]` (or a path inside the folders this "
            "server allows: its operator lists them with --local-root)")


def refuse_unrecorded_data(text: str | None, missing: CalibrationMissing) -> None:
    """A recipe file whose merge was given its calibration data in memory (`IN_MEMORY_NOTE`) says so: the generic
    "needs calibration data" (`missing`, raised otherwise) would suggest the merge ran without any."""
    if text is None or IN_MEMORY_NOTE not in text:
        return
    raise RecipeError(
        "the recipe's merge was given its calibration data in memory (a Dataset object or batches to "
        f"hf_mudsc.merge), so the recipe does not record it, and {missing.reader} needs it: send the same data as "
        "`calibration` (a Hub dataset `org/name[@revision][:config]:split`, or a saved dataset folder)") from None


def refuse_missing_inputs(recipe: Recipe, being_written: Sequence[str] = ()) -> None:
    """Local inputs this server does not have — a parent or base folder or calibration data that is not there, a
    parent holding only pickle weights (other refusals of a folder's files stay the loader's) — refused at POST,
    every one at once, as `hf-mudsc merge` refuses them before loading (`Recipe.missing_local_inputs`); the job would
    fail in its worker at the first. Run after the roots' check (`resolve_local_paths`): whether a path outside them
    exists is none of a client's business. Each names the path as the client sent it, never the server's working
    folder. An input inside an output an active job writes (`being_written`) is that job's to write: the store
    refuses the claim (409, naming the job), which says more than "not there"."""
    from hf_mudsc.load.weight_files import PICKLE_SUFFIXES, weights_format

    problems: list[str] = []
    absent = False
    for key, given, path, builder in local_paths(recipe):
        if builder or any(path.resolve().is_relative_to(output) for output in being_written):
            continue
        if key == "calibration":
            if missing_local_data(recipe.calibration) is not None or not path.exists():
                problems.append(f"`calibration` {shown(given)} is no file or folder on this server")
                absent = True
            continue
        if not path.is_dir():
            problems.append(f"`{key}` {shown(given)} is no folder on this server")
            absent = True
            continue
        try:
            names = [p.name for p in path.iterdir() if p.is_file()]
            weights_format(given, names, False)
        except LoadError as problem:  # the pickle-only folder; any other refusal of its files is the worker's
            if any(name.endswith(PICKLE_SUFFIXES) for name in names):
                problems.append(f"`{key}`: {service_advice(str(problem))}")
        except OSError:  # unreadable: the loader says why
            continue
    if problems:
        raise RecipeError("; ".join(problems) + ("; name folders that exist inside the folders this server allows "
                                                 "(its operator lists them with --local-root), or Hub references "
                                                 "`org/name[@revision]`" if absent else ""))


def local_inputs(recipe: Recipe) -> tuple[tuple[str, str], ...]:
    """(key, path resolved) of every local path `recipe` reads (its paths already checked inside the roots, the
    cards' base included as `base`): what the store claims for the job's run."""
    found = []
    for key, _, path, _ in local_paths(recipe):
        try:
            found.append((key, str(path.resolve())))
        except (OSError, RuntimeError, ValueError):  # (refused by the roots' check already)
            continue
    return tuple(found)


def service_advice(message: str) -> str:
    """A refusal or warning as a service client reads it (`SERVICE_SPELLINGS`): a token's advice says where a job's
    token goes (the `Authorization: Bearer` header), not the library's `token=`, the CLI's `--token` or `hf auth
    login`; an option is named by its job key (`output`, `"overwrite": true`), not its flag or keyword argument.
    The recipe's and the loaders' refusals at POST, a job's error and the warnings a job reports all go through it."""
    keys = set(accepted_keys())

    def rewrite(match: re.Match[str]) -> str:
        groups = [g for g in match.groups() if g is not None]
        text = match.group(0)
        if text.startswith("(CLI: "):  # `(CLI: --method linear)` -> (`"method": "linear"`)
            key = groups[0].replace("-", "_")
            return f'(`"{key}": "{groups[1]}"`)' if key in keys else ""
        if len(groups) == 2:  # `--device cpu`, `device='cpu'` -> `"device": "cpu"`
            return f'`"{groups[0]}": "{groups[1]}"`'
        key = groups[0].replace("-", "_")
        if key == "token":
            return BEARER
        return f"`{key}`" if key in keys else text

    message = message.replace(TOKEN_FIX, SERVICE_TOKEN_FIX)
    for pattern, replacement in SERVICE_SPELLINGS:
        message = re.sub(pattern, rewrite if replacement is None else replacement, message)
    return message


def integer_too_long(problem: Exception) -> bool:
    """Whether `problem` is Python's refusal to read an integer of thousands of digits (JSON's or YAML's)."""
    return INT_TOO_LONG in str(problem)


def refuse_published_names(text: str, recipe: Recipe) -> None:
    """Refuse a recipe pushed to the Hub whose local folders are still named by folder name only: one line naming
    each entry, as `hf-mudsc merge --recipe` refuses it (`publish.recipe.check_local_folders_given`). The names pass
    as Hub ids (`vit-cars`) or datasets builders, so the job would otherwise be queued and fail in its worker.

    The entries are the ones the comment on top of the file lists whose value is still the name listed there; one
    replaced by a Hub reference or a path (the comment left in place) goes through the usual checks, and so does a
    name that is a path in the service's working folder (the local roots decide), as the CLI leaves it to the loader."""
    missing = [f"`{entry.label}` {shown(entry.given)}" for entry in unresolved_published_entries(text, recipe)]
    if missing:
        one = len(missing) == 1
        raise RecipeError(
            f"{', '.join(missing)} {'was a local folder' if one else 'were local folders'} on the machine that "
            "merged, named by folder name only in a published recipe: in the recipe, replace "
            f"{'it' if one else 'each'} by a Hub reference (`org/name[@revision]`, a dataset "
            "`org/name[:config]:split`) or a path inside the folders this server allows (its operator lists them "
            "with --local-root)")


def check_hub_ids(recipe: Recipe) -> None:
    """Every parent or base the loader would fetch from the Hub, and `push_to_hub`, is a valid Hub id: refused
    here in one line (the loader and the push refuse them too, but only in the job's worker, and their message
    repeats the id as given — a newline in it included)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    named = [(f"models[{i}]", reference) for i, reference in enumerate(recipe.models)]
    if isinstance(recipe.base, str):
        named.append(("base", recipe.base))
    hub = [(key, given, parse_reference(given)[0]) for key, given in named if looks_local(given) is None]
    if recipe.push_to_hub is not None:
        hub.append(("push_to_hub", recipe.push_to_hub, recipe.push_to_hub))
    if recipe.calibration and not any(key == "calibration" for key, *_ in local_paths(recipe)):
        dataset = DatasetSpec.parse(recipe.calibration).path
        if "/" in dataset:  # a Hub dataset `org/name` (a bare name is a datasets builder, `local_paths` checks it)
            hub.append(("calibration", recipe.calibration, dataset))
    for key, given, repo_id in hub:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            what = {"push_to_hub": "is not a Hub repo id `org/name`",
                    "calibration": "names neither local data nor a Hub dataset `org/name[@revision][:config]:split`"
                    }.get(key, "is neither a folder of this machine nor a Hub id `org/name[@revision]`")
            raise RecipeError(f"`{key}` {shown(given)} {what}: a Hub name has letters, digits, '-', '_' and '.' "
                              "(not first or last, no '--' or '..'), at most 96 characters") from None


def check_method(recipe: Recipe) -> None:
    """What the method refuses before anything is loaded (`check_size`, its `check_options`), as `hf-mudsc merge`
    refuses it; `auto` chooses its method in the worker, which checks then."""
    if recipe.method == AUTO:
        return
    method = get_method(recipe.method)
    try:
        check_size(method, recipe.size)
        method.check_options(recipe, len(recipe.models))
    except ValueError as problem:
        raise RecipeError(str(problem)) from None


def check_device(device: str | None) -> None:
    """`device: cuda[:N]` refused at POST when this server has no such CUDA device, as `hf-mudsc merge` refuses it
    before loading (`calibrate.device.resolve_device`); its format is the recipe's check."""
    if device is None or not device.startswith("cuda"):
        return
    count = cuda_devices()
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise RecipeError(f'`device` {device!r}: CUDA is not available on this server; send `"device": "cpu"` '
                          "(or leave `device` out: the server then uses what it has)")
    if index >= count:
        raise RecipeError(f"`device` {device!r}: this server has no CUDA device {index} ({count} available: "
                          f"0-{count - 1})")


@functools.lru_cache(maxsize=1)
def cuda_devices() -> int:
    """How many CUDA devices the workers see: asked once, of a child process, so the web process never imports torch
    (`test_the_web_process_does_not_import_the_merge_engine`); 0 when torch cannot say."""
    script = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              check=True)
        return int(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as problem:
        logger.warning("could not ask torch how many CUDA devices this server has (%s): jobs naming one are "
                       "checked by their worker", problem)
        return 1 << 30  # unknown: let the worker decide


def check_base_found(recipe: Recipe, resolved: Recipe) -> str | None:
    """A method that needs the parents' base, given none, whose parents are all local folders whose model cards do
    not name one common `base_model`: refused at POST in the loader's words (`load.parents.locate_base`), as the merge
    would refuse it before loading any weights. Returns the Hub base those cards name, which the merge will take
    (a local folder they name is `resolved.base` already), or None when there is none to tell at POST (a Hub parent's
    card, or `auto`'s choice, is the worker's to read)."""
    if recipe.base is not None or resolved.base is not None or recipe.method == AUTO:
        return None
    if not get_method(recipe.method).needs_base_model:
        return None
    if any(looks_local(reference) is None for reference in recipe.models):
        return None
    named = [card_base_model(card_text(Path(folder))) for folder in resolved.models]
    if named and named[0] is not None and len(set(named)) == 1:
        return named[0]  # a Hub id every card names: the loader takes it
    raise RecipeError(f"method {recipe.method!r} needs the parents' common base model and none was given, and the "
                      "parents' model cards (README.md) do not name one common base_model; pass "
                      f"{service_advice(option_hint('base'))} (a Hub id `org/name[@revision]` or a folder), or choose "
                      'a method that needs no base (`"method": "linear"`)')


class ConfigUnreadable(Exception):
    """Parent A's config on disk could not be read at POST: the worker reads it again and refuses in its words."""


def check_shapes_on_disk(recipe: Recipe) -> None:
    """What the method refuses from parent A's shapes before any weights are read (`MergeMethod.check_shapes`, as
    `hf-mudsc merge` runs it through `pipeline.check_before_weights`, with the same `pipeline.parameter_shapes`), when
    parent A is a local folder (`recipe`: the paths resolved inside the roots). Otherwise — a Hub parent, or `auto`,
    which chooses in the worker — the worker checks it once it has the config. Only for a method with a shape rule:
    the shapes come from a weightless model, so the web process then imports torch (once, a few seconds and a few
    hundred MB)."""
    if recipe.method == AUTO:
        return
    method = get_method(recipe.method)
    if not method.checks_shapes:
        return
    reference = recipe.models[0]
    folder = config_on_disk(reference)
    if folder is None:
        return

    def shapes() -> dict[str, tuple[int, ...]]:
        from hf_mudsc.load.parents import load_config
        from hf_mudsc.pipeline import parameter_shapes

        try:  # refused as the loader refuses a config (hostile counts, remote code) before transformers reads it
            return parameter_shapes(load_config(folder, reference, for_merge=True))
        except Exception as problem:  # noqa: BLE001 - the worker reads it again and refuses it in its own words
            raise ConfigUnreadable(str(problem)) from problem

    try:
        method.check_shapes(recipe, shapes)
    except ConfigUnreadable as problem:
        logger.info("POST: the shapes of %r were not checked (its config did not read: %s); the worker checks them",
                    reference, problem)
    except ValueError as problem:  # the method's refusal (MergeInputError): one line naming the option
        raise RecipeError(str(problem)) from None


def config_on_disk(reference: str) -> Path | None:
    """The folder holding `reference`'s config.json when it is a local folder (inside the roots); None otherwise.
    A Hub parent is left to the worker even when the server's Hub cache holds it: its shapes, in a refusal, would
    tell a client without the repo's token about a private model someone else merged."""
    path = looks_local(reference)
    if path is None:
        return None
    return path if (path / "config.json").is_file() else None


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (a newline, a tab, an escape) or a bidirectional override, which
    makes a name display as another (U+202A-U+202E, U+2066-U+2069)."""
    return any(unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS for char in text)


def refuse_tokens(body: Mapping[str, Any]) -> None:
    """No key or value of a job is shaped like an access token (a token pasted as a parent folder's name, a base, an
    unknown key): a job is stored, listed, shown on the page and answered as sent, and a token goes only in the
    `Authorization` header. Refused naming where it is, never showing it."""
    def holds_token(value: Any) -> bool:
        if isinstance(value, str):
            return looks_like_token(value)
        if isinstance(value, Mapping):
            return any(holds_token(k) or holds_token(v) for k, v in value.items())
        return isinstance(value, (list, tuple)) and any(holds_token(item) for item in value)

    for key, value in body.items():
        if holds_token(key) or holds_token(value):
            where = "a key" if holds_token(key) else f"`{key}`"
            raise RecipeError(f"{where} of the job looks like a Hugging Face access token (not shown); send a token "
                              "only as the `Authorization: Bearer <token>` header, never in a job's fields")


def refuse_secrets(body: Any, *, api_key: str | None, token: str | None) -> None:
    """No field of a job holds the service's API key or the job's own Hub token (as its `Authorization` header sent
    it, whatever its shape): a job is stored, listed and shown to anyone who may read the service (reading needs no
    key), its recipe lands in the pushed card, and `refuse_tokens` knows only the Hub's `hf_` shape. A secret of
    `TOKEN_MIN_LENGTH` characters or more (or shaped like a token) is found anywhere, key names (at any depth) and
    numbers included; a shorter one only as a whole string value or a whole key below the job's own field names
    (`--api-key main` is not the parent `org/main`, nor the field `models`; `--api-key 2024` is not `seed: 2024`:
    a number is not a secret's text by chance, and refusing it would refuse ordinary jobs). Refused naming the
    field and which secret it holds, never showing it, before any other check may repeat the value."""
    if not isinstance(body, Mapping):
        return  # `check_job` refuses it (its message shows no value)
    for what, secret, advice in (("the service's API key", api_key, "send the API key only as the `X-API-Key` header"),
                                 ("the request's Hub token", token, SERVICE_TOKEN_FIX)):
        if not secret:
            continue
        for key, value in body.items():
            if secret_in_field(key, value, secret):
                where = "a key" if is_long_secret(secret) and secret in str(key) else f"`{key}`"
                raise RecipeError(f"{where} of the job holds {what} (not shown): a job's fields are stored and shown "
                                  f"to anyone who reads the service; {advice}")


def secret_in_field(key: Any, value: Any, secret: str) -> bool:
    """Whether the field `key: value` of a job holds `secret` as `refuse_secrets` looks for it. The field's own name
    is one of the job's keys (`check_job` refuses any other): only a long secret is looked for in it."""
    if is_long_secret(secret):
        return any(secret in text for text in (str(key), *texts_in(value, numbers=True)))
    return any(text == secret for text in texts_in(value, numbers=False))


def texts_in(value: Any, *, numbers: bool) -> Iterator[str]:
    """Every string in `value`, however deep, the keys of its mappings included; its numbers too (as their text: a
    numeric secret sent unquoted) when `numbers`."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            if numbers:
                yield str(item)
        elif isinstance(item, Mapping):
            pending.extend(item.keys())  # a number only when `numbers` (a YAML key may be one)
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)


def refuse_control_characters(body: Mapping[str, Any]) -> None:
    """No value of a job holds a control character (a newline, a tab, an escape): none belongs in a reference, a
    dataset spec or an option, and one would reach the Hub, the job's log lines and the card as it is. `output` has
    its own checks (`resolve_output`)."""
    for key, value in body.items():
        if key == "output":
            continue
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            for text in strings_in(item):  # a mapping's too (`auto_chosen`: its reasons reach the card)
                if has_control(text):
                    where = f"{key}[{index}]" if isinstance(value, list) else key
                    raise RecipeError(f"`{where}` must not contain {CONTROLS}, got {shown(text)}")


def strings_in(value: Any) -> Iterator[str]:
    """Every string in `value`: itself, or the keys and values of its mappings and lists, however deep (a stack, not
    recursion: a body nested deeply must not exhaust Python's)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)


# How the writer's location check shortens a long path in a refusal (`publish.folder.check_location`): its first
# SHORTENED_HEAD characters, "...", its last SHORTENED_TAIL.
SHORTENED_HEAD, SHORTENED_TAIL = 60, 17


def resolve_output(output: str, output_root: Path) -> Path:
    """`output` as a folder inside `output_root` (relative names; `..` or another absolute path is refused)."""
    if "\x00" in output:
        raise RecipeError(f"`output` must not contain a NUL byte, got {output!r}")
    if has_control(output):  # a newline would forge log lines and the card's title
        raise RecipeError(f"`output` must not contain {CONTROLS}, got {shown(output)}")
    if any(len(part.encode()) > NAME_MAX for part in Path(output).parts):
        raise RecipeError(f"`output` has a folder name longer than {NAME_MAX} bytes (the file system's limit): "
                          f"{output[:80]!r}...")
    root = output_root.expanduser().resolve()
    path = expanded("output", output)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise RecipeError(f"`output` must name a folder inside the service's output root: a relative name such as "
                          f"`merged-model` or `runs/merged-model` (no `..`, no path elsewhere), got {output!r}")
    refuse_long_output(output, resolved, root)
    return resolved


def refuse_long_output(output: str, resolved: Path, root: Path) -> None:
    """Refuse an `output` too deep or too long to create, in words built from the client's own string: the writer's
    location check (`check_location`) says it with the whole path shortened to its first and last characters, which
    for an output root over 60 characters is most of the root (`hide_output_root` hides only whole forms of it)."""
    from hf_mudsc.publish.folder import MAX_NEW_FOLDERS, STAGING_SUFFIX_LENGTH

    depth = len(resolved.relative_to(root).parts)
    if depth > MAX_NEW_FOLDERS:
        raise RecipeError(f"`output` {output[:40]!r}... names {depth} nested folders (hf-mudsc creates at most "
                          f"{MAX_NEW_FOLDERS}); choose an `output` with fewer folders")
    try:
        path_limit = os.pathconf(root, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_limit = 4096
    if len(os.fsencode(str(resolved))) + STAGING_SUFFIX_LENGTH + 1 >= path_limit:
        raise RecipeError(f"`output` {output[:40]!r}... is too long: inside the service's output root, with "
                          f"hf-mudsc's temporary sibling, it is over this system's path limit ({path_limit} bytes); "
                          "choose a shorter `output`")


def hide_output_root(text: str, output_root: Path) -> str:
    """`text` (a refusal) with the output root's path taken out: a folder inside it as the client names one,
    relative to the root, and the root itself as "the service's output root". The client learns its own `output`
    back, never where the server keeps outputs."""
    root = output_root.expanduser()
    for form in sorted({str(root.absolute()), str(root.resolve())}, key=len, reverse=True):
        text = text.replace(repr(form), "the service's output root").replace(form + os.sep, "")
        if len(form) >= SHORTENED_HEAD:  # a long path the writer shortened (`check_location`) begins inside the root
            text = re.sub(re.escape(form[:SHORTENED_HEAD]) + rf"\.\.\.(.{{{SHORTENED_TAIL}}})",
                          lambda match, form=form: "..." + _unrooted(match.group(1), form + os.sep), text)
    return text


def _unrooted(tail: str, rooted: str) -> str:
    """A shortened path's last characters without the end of the root they may begin with."""
    for cut in range(min(len(tail), len(rooted)), 0, -1):
        if rooted.endswith(tail[:cut]):
            return tail[cut:]
    return tail


def resolve_local_paths(job: JobRequest, local_roots: Sequence[Path]) -> JobRequest:
    """The job as its worker runs it: every path it reads from the server's disk resolved (symlinks followed) and
    inside a local root, and — when its method takes the base from the parents' model cards and they name a folder
    — that folder as its `base`. Refused in one line (`RecipeError`) otherwise, before anything but the cards is read.

    Resolved, because a path checked and later opened by name could be a link re-pointed in between. The refusal
    names the key and the path as the client gave it — never the roots nor where a link leads (logged instead)."""
    roots = [Path(root).expanduser().resolve() for root in local_roots]
    recipe = job.recipe
    resolved: dict[str, str] = {}
    for key, given, path, builder in local_paths(recipe):
        inside = inside_roots(path, roots)
        if inside is None:
            refuse(key, given, path, builder, roots)
        if key == "calibration" and inside.is_dir():  # datasets reads every file under it, through their links
            leaving = link_out(inside, roots)
            if leaving is not None:
                refuse(key, given, path, builder, roots, link=leaving)
        if not builder:
            resolved[key] = str(inside)
    changes: dict[str, Any] = {"models": [resolved.get(f"models[{i}]", ref) for i, ref in enumerate(recipe.models)]}
    if "base" in resolved:
        changes["base"] = resolved["base"]
    if "calibration" in resolved:
        changes["calibration"] = with_data_path(recipe.calibration, resolved["calibration"])
    from_cards = None
    if recipe.base is None and recipe.method != AUTO and get_method(recipe.method).needs_base_model:
        from_cards = card_base(recipe.models, changes["models"], roots)
        if from_cards is not None:
            changes["base"] = from_cards
    return JobRequest(recipe.override(**changes), job.dry_run, job.inputs, base_from_cards=from_cards is not None,
                      warnings=job.warnings)


def inside_roots(path: Path, roots: Sequence[Path]) -> Path | None:
    """`path` resolved (symlinks followed) when it lies inside one of `roots`, else None."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: never inside
        return None
    return resolved if any(resolved == root or resolved.is_relative_to(root) for root in roots) else None


def link_out(folder: Path, roots: Sequence[Path]) -> tuple[Path, Path] | None:
    """The first symbolic link under `folder` (a local dataset folder, walked once, each real folder visited once)
    that leads outside every root: (its path relative to `folder`, its resolved target); None when every link stays
    inside. No file is opened. Links to folders count and linked folders inside the roots are walked, although
    datasets 5.2 reads files through links but does not descend into linked folders: a builder or a later version
    may."""
    seen: set[str] = set()
    pending = [(folder, Path())]
    while pending:
        directory, relative = pending.pop()
        real = os.path.realpath(directory)
        if real in seen:  # a folder linked twice, or a link back up the tree
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:  # unreadable: datasets cannot read it either
            continue
        for entry in entries:
            name = relative / entry.name
            if entry.is_symlink() and inside_roots(Path(entry.path), roots) is None:
                return name, Path(os.path.realpath(entry.path))
            try:
                if entry.is_dir():  # a link to a folder inside the roots included (see above)
                    pending.append((Path(entry.path), name))
            except OSError:
                continue
    return None


def refuse(key: str, given: str, path: Path, builder: bool, roots: Sequence[Path], *,
           link: tuple[Path, Path] | None = None) -> NoReturn:
    """One line for the client naming the key and the path it sent — and, when the path is inside the roots but a
    symbolic link in that folder leads out (`link`: its name in the folder, its target), the link's name; the roots
    and where a link leads go to the server's log only."""
    if link is not None:
        logger.warning("refused a job: `%s` %r (%s) holds %s, a symbolic link to %s, outside the local roots %s",
                       key, given, path, link[0], link[1], ", ".join(map(str, roots)))
        where = (f"whose {link[0].as_posix()!r} is a symbolic link to a path {OUTSIDE}: put the files themselves "
                 "there, or link only inside them")
    elif roots:
        logger.warning("refused a job: `%s` %r (%s) is outside the local roots %s", key, given, path,
                       ", ".join(map(str, roots)))
        where = f"{OUTSIDE}: name a path inside them or a Hub reference `org/name[@revision]`"
    else:
        where = ("but this service reads no local paths (it was started without --local-root): name a Hub "
                 "reference `org/name[@revision]`, or start the service with --local-root DIR for a folder "
                 "holding it")
    if builder:
        raise RecipeError(f"`{key}` {given!r} is no `org/name` Hub dataset: a bare name is a datasets builder "
                          f"(json, csv, imagefolder, ...) that reads the service's working folder, {where}")
    raise RecipeError(f"`{key}` names the local path {given!r}, {where}")


def with_data_path(calibration: str, path: str) -> str:
    """A calibration spec with its local data path replaced (`:config:split` kept); the spec as given when the new
    path would not parse back as that path (a ':' in it)."""
    spec = DatasetSpec.parse(calibration)
    changed = str(DatasetSpec(path=path, config=spec.config, split=spec.split, revision=spec.revision))
    return changed if DatasetSpec.parse(changed).path == path else calibration


def card_base(given: Sequence[str], models: Sequence[str], roots: Sequence[Path]) -> str | None:
    """The base the loader would take from the parents' model cards, when it is a folder of this machine: resolved,
    after every local parent's card naming a folder was checked to name one inside the roots (refused otherwise).
    None when the loader would take a Hub id or nothing from them (it also ignores a folder a Hub card names)."""
    named: list[tuple[str, Path] | None] = []  # (the card's value as written, the folder it resolves to)
    for index, (reference, model) in enumerate(zip(given, models)):
        value = card_base_model(card_text(Path(model))) if looks_local(reference) is not None else None
        path = looks_local(value) if value is not None else None  # a Hub parent's card: the loader ignores folders
        if path is None:
            named.append(None)
            continue
        inside = inside_roots(path, roots)
        if inside is None:
            logger.warning("refused a job: the model card of `models[%d]` %r names base_model %r, outside the local "
                           "roots %s", index, reference, value, ", ".join(map(str, roots)))
            raise RecipeError(f"`models[{index}]` {reference!r}: its model card (README.md) names a local base_model, "
                              f"{OUTSIDE}: pass `base` (a Hub reference `org/name[@revision]` or a folder inside "
                              "them)")
        named.append((value, inside))
    values = {n[0] if n is not None else None for n in named}
    if len(values) == 1 and None not in values:  # the loader takes the base only when every card names the same
        return str(named[0][1])
    return None


def looks_local(reference: str) -> Path | None:
    """The path a parent or base reference names on this machine, as the loader reads it; None for a Hub id."""
    try:
        name, revision = parse_reference(reference)
    except LoadError:
        return None
    return Path(os.path.expanduser(name)) if revision is None and looks_like_path(name) else None


def card_text(folder: Path) -> str | None:
    """A parent folder's model card, unless it is missing or a link out of the folder (the loader refuses those); read
    as the loader reads it (`load.config_json.read_card`: none over `SIDE_FILE_MAX_BYTES`, nor one not UTF-8)."""
    card = folder / "README.md"
    try:
        if not card.is_file() or not card.resolve().is_relative_to(folder.resolve()):
            return None
        return read_card(card)
    except OSError:
        return None


def expanded(key: str, text: str) -> Path:
    """`text` as a path with `~` expanded; refused in one line when `~user` names no user of this machine (pathlib
    raises RuntimeError, `os.path.expanduser` would keep it as a relative folder named `~user`)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise RecipeError(f"`{key}` {shown(text)} starts with '~' but names no user of this machine: give the "
                          "folder's full path") from None


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
            yield key, reference, expanded(key, name), False
    if recipe.calibration:
        try:  # as `calibrate.datasets.load_calibration_dataset` reads it
            spec = DatasetSpec.parse(recipe.calibration)
        except CalibrationError as problem:
            raise RecipeError(f"`calibration`: {problem}") from None
        if looks_like_path(spec.path) or os.path.exists(os.path.expanduser(spec.path)):  # False for a too long name
            yield "calibration", spec.path, expanded("calibration", spec.path), False
        elif "/" not in spec.path:  # `json`, `imagefolder`, ...: datasets' packaged builders read the working folder
            yield "calibration", recipe.calibration, Path.cwd(), True
