"""`hf-mudsc` entry point: one sub-command per module of `hf_mudsc.cli` (`merge.py`, `evaluate.py`, ...)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import functools
import importlib
import logging
import os
import re
import shlex
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from hf_mudsc._version import __version__
from hf_mudsc.errors import EDQUOT, PushInterrupted, SpecError, UsageError, brief, disk_error, escaped
from hf_mudsc.load.references import EscapedControls, HiddenCredentials, clean_token, hide_tokens, looks_like_token
from hf_mudsc.options import closest_names

# Sub-command name -> module in hf_mudsc.cli exposing `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "demo": "Train two small ViTs from different seeds on halves of sklearn's digits and merge them.",
    "merge": "Merge two or more models (Hub ids, folders) into one and save or push it.",
    "push": "Push a merged model folder to the Hub with its card and recipe.",
    "evaluate": "Evaluate a merged model (and its parents) per task and jointly.",
    "inspect": "Summarise a merged folder (or a recipe) and redraw its diagnostic plots.",
    "serve": "Run the merging service: merge jobs over HTTP, a job store that survives restarts, a web page.",
}


def _module(name: str):
    return importlib.import_module(f"hf_mudsc.cli.{name}")


# A flag whose value is a secret: `--token`, `--api-key`, an abbreviation argparse accepts (`--tok`, `--api`) or a
# mistyped one (`--tokn`, `--api_key`).
SECRET_FLAG = re.compile(r"--(?:to(?:k[\w-]*)?|ap(?:i[\w-]*)?)")


def secret_values(argv: Sequence[str]) -> list[str]:
    """The values given to a secret flag (`SECRET_FLAG`) anywhere in `argv`, as `--token X` or `--token=X`."""
    values = []
    for at, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if SECRET_FLAG.fullmatch(name):
            if equals:
                values.append(value)
            elif at + 1 < len(argv):
                values.append(argv[at + 1])
    return [value for value in values if value]


def command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named in `argv`: the first argument that is not a top-level option (those take no value) nor
    the value of a secret flag given before the command (`hf-mudsc --token X merge ...`, refused by the parser)."""
    after_secret_flag = False
    for arg in argv:
        if after_secret_flag:
            after_secret_flag = False
        elif SECRET_FLAG.fullmatch(arg):
            after_secret_flag = True
        elif not arg.startswith("-"):
            return arg
    return None


# The commands that take each secret flag: the first is the example a misplaced flag's error gives.
SECRET_FLAG_COMMANDS = {"--token": ("merge", "evaluate", "push"), "--api-key": ("serve",)}


def secret_flag_before_command(argv: Sequence[str]) -> str | None:
    """The one-line error for a secret flag given before the command (`hf-mudsc --token X merge ...`), else None.
    argparse read the flag's value as the command and said "invalid choice: '***'", which tells nobody what to do:
    a command's flags go after it. The flag is named in full (`--tok`, `--tokn` -> `--token`), its value never."""
    command = command_in(argv)
    for arg in argv:
        if arg == command:
            return None
        if SECRET_FLAG.fullmatch(arg.partition("=")[0]):
            flag = "--api-key" if arg.startswith("--ap") else "--token"
            takers = SECRET_FLAG_COMMANDS[flag]
            example = command if command in takers else takers[0]
            named = f"{', '.join(takers[:-1])} and {takers[-1]}" if len(takers) > 1 else takers[0]
            return (f"{flag} goes after the command, not before it: `hf-mudsc {example} ... {flag} ***` (an option of "
                    f"{named}; the value given is not shown)")
    return None


# The HTTP client's loggers: one INFO line per request (`HTTP Request: GET ...`), shown only with -v.
HTTP_LOGGERS = ("httpx2", "httpx", "httpcore", "urllib3", "huggingface_hub")


def add_verbosity(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """`-q/--quiet` and `-v/--verbose`: global options, given before the command (`hf-mudsc -q merge ...`) or after it
    (`hf-mudsc merge ... -q`). `defaults=False` (a command's copy, `verbosity_parent`): unset flags stay absent
    (SUPPRESS), so they do not reset what was given before the command."""
    unset: dict[str, object] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors: no progress, no INFO lines", **({"default": False} | unset))
    parser.add_argument("-v", "--verbose", action="count", help="debug lines of hf_mudsc and the HTTP client's "
                        "per-request lines; -vv: every library's debug lines", **({"default": 0} | unset))


def verbosity_parent() -> argparse.ArgumentParser:
    """The parent parser every command gets (`parents=`), so that -q/-v may follow the command too."""
    parent = argparse.ArgumentParser(add_help=False)
    add_verbosity(parent, defaults=False)
    return parent


def configure_logging(verbose: int, quiet: bool) -> None:
    """Levels for one run: hf_mudsc's INFO lines by default, other libraries' warnings only (the HTTP client
    logs every request at INFO); `quiet`: warnings and errors only; `verbose` >= 1: hf_mudsc's DEBUG lines and
    the per-request lines; >= 2: every library's DEBUG lines."""
    own = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_mudsc").setLevel(own)
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose
                                         else logging.WARNING)
    # Every line that reaches stderr (the root's handlers, huggingface_hub's own) without an HF_ENDPOINT's credentials,
    # and with the control characters of the names it holds escaped.
    for handler in logging.getLogger().handlers + logging.getLogger("huggingface_hub").handlers:
        for kind in (HiddenCredentials, EscapedControls):
            if not any(isinstance(each, kind) for each in handler.filters):
                handler.addFilter(kind())


# The libraries' own progress bars (weights loading, shard writing, dataset saving), switched off by these.
LIBRARY_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def silence_library_bars() -> None:
    """Turn off the progress bars of huggingface_hub, transformers and datasets (their bars in a log are walls of
    carriage returns, and -q means no progress): by environment for those imported later and the processes the
    command starts, by their switches for those already imported. A variable the user set is left alone. Run inside
    `library_bars_restored`, which puts everything back."""
    # huggingface_hub reads its variable once, when imported: imported after it is set, its switch would stay off for
    # the rest of the process (and the user's `enable_progress_bars()` would be refused); it is cheap, so import it
    # first and turn it off by its switch. transformers, imported later, takes the Hub's switch as its own.
    from huggingface_hub import utils as hub_utils

    unset = [name for name in LIBRARY_BAR_SWITCHES if name not in os.environ]
    for name in unset:
        os.environ[name] = "1"
    if "HF_HUB_DISABLE_PROGRESS_BARS" in unset:
        hub_utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "HF_DATASETS_DISABLE_PROGRESS_BARS" in unset and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


@contextlib.contextmanager
def library_bars_restored() -> Iterator[None]:
    """Around one command: the bar variables and the Hub's, transformers' and datasets' bar switches as they were
    before it. A process of its own ends with them; `main()` run in-process (a notebook, a test) left them off, and
    the user's own switch (`huggingface_hub.utils.disable_progress_bars()`, which hf_mudsc's bars follow too) no
    longer said what the user chose."""
    variables = {name: os.environ.get(name) for name in LIBRARY_BAR_SWITCHES}
    hub_tqdm = sys.modules.get("huggingface_hub.utils.tqdm")
    hub_states = dict(hub_tqdm.progress_bar_states) if hub_tqdm is not None else None
    transformers = sys.modules.get("transformers")
    transformers_on = transformers.utils.logging.is_progress_bar_enabled() if transformers is not None else None
    datasets = sys.modules.get("datasets")
    datasets_on = datasets.is_progress_bar_enabled() if datasets is not None else None
    try:
        yield
    finally:
        for name, value in variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        restore_library_bars(hub_states, transformers_on, datasets_on, variables)


def restore_library_bars(hub_states: dict[str, bool] | None, transformers_on: bool | None,
                         datasets_on: bool | None, variables: dict[str, str | None]) -> None:
    """The libraries' switches back as `library_bars_restored` found them; a library first imported during the
    command gets what it would have had imported after it: transformers the Hub's switch, datasets its variable's."""
    hub_tqdm = sys.modules.get("huggingface_hub.utils.tqdm")

    def hub_back() -> None:
        if hub_tqdm is not None:
            hub_tqdm.progress_bar_states.clear()
            hub_tqdm.progress_bar_states.update(hub_states or {})

    hub_back()
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        if transformers_on is None:  # imported during the command: what it reads from the Hub's switch at import
            transformers_on = hub_tqdm is None or not sys.modules["huggingface_hub"].utils.are_progress_bars_disabled()
        with warnings.catch_warnings():  # its switch calls the Hub's, which HF_HUB_DISABLE_PROGRESS_BARS may refuse
            warnings.simplefilter("ignore")
            if transformers_on:
                transformers.utils.logging.enable_progress_bar()
            else:
                transformers.utils.logging.disable_progress_bar()
        hub_back()  # as it was, whatever transformers' switch did to it
    datasets = sys.modules.get("datasets")
    if datasets is None:
        return
    if datasets_on is None:  # imported during the command, its variable then set: read as the user has it
        datasets_tqdm = sys.modules.get("datasets.utils.tqdm")
        user = variables["HF_DATASETS_DISABLE_PROGRESS_BARS"]
        if datasets_tqdm is not None and user is None:
            for module in (datasets_tqdm, sys.modules.get("datasets.config")):
                if module is not None and hasattr(module, "HF_DATASETS_DISABLE_PROGRESS_BARS"):
                    module.HF_DATASETS_DISABLE_PROGRESS_BARS = None
            datasets_on = True
    with warnings.catch_warnings():  # HF_DATASETS_DISABLE_PROGRESS_BARS may refuse it: then it is as it was
        warnings.simplefilter("ignore")
        if datasets_on:
            datasets.enable_progress_bars()
        elif datasets_on is not None:
            datasets.disable_progress_bars()


# What argument errors must never echo: the value of a --token flag (also a mistyped or unknown one, `--tokn X`) and
# anything shaped like a Hub token (`hf_...`, `api_org_...`), e.g. given where a number goes.
SECRET_PATTERN = re.compile(r"(?<=--tok)(\w*[ =])(\S+)|\b(?:hf|api_org)_[A-Za-z0-9]{8,}")


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with tokens replaced by `***` (see `SECRET_PATTERN`), and every one of `secrets` (the values of the
    command line's secret flags, `secret_values`) wherever it stands (`invalid choice: '***'`)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", "***", text)
    return SECRET_PATTERN.sub(lambda m: f"{m.group(1)}***" if m.group(1) else "***", text)


# How torch says an allocation failed (CPU: "DefaultCPUAllocator: can't allocate memory"; CUDA: "out of memory").
OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory", re.IGNORECASE)


# The commands whose every write is staged and renamed into place (`publish.folder`): a failure leaves nothing
# half-written; and the flag that writes elsewhere.
STAGED_WRITES = {"merge": "--output", "inspect": "--output", "evaluate": None}


def disk_failure(error: BaseException, command: str | None) -> str | None:
    """The one line for a full disk (or quota, read-only or failing disk) `error`, else None (not a disk failure)."""
    found = disk_error(error)
    if found is None:
        return None
    number, what, where = found
    flag = STAGED_WRITES.get(command or "")
    if number == errno.EIO:  # reading too: no "while writing"
        line, fix = f"{what}{f' on {where}' if where else ''}", "check that disk (or network file system) and run again"
    else:
        line = f"{what} while writing{f' {where}' if where else ''}"
        if number == errno.EROFS:
            fix = f"choose a writable {flag}" if flag else "use a folder on a writable disk"
        else:
            quota = " (or raise the quota)" if number == EDQUOT else ""
            fix = f"free space{' on its disk' if where else ''}{quota}{f', or choose another {flag}' if flag else ''}"
    claim = "; nothing was left half-written" if command in STAGED_WRITES else ""
    return f"hf-mudsc {command}: error: {line}{claim}; {fix}"


# How much of a path too long for the system `name_too_long` shows, at each end.
LONG_PATH_SHOWN = 40
# The longest name (one path component) and path, in bytes, Linux and macOS file systems take (NAME_MAX, PATH_MAX - 1).
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4095


def name_too_long(error: BaseException, command: str | None) -> str | None:
    """The one line for a path the system refuses as too long (ENAMETOOLONG: a name past 255 bytes, a path past
    PATH_MAX), else None. Any path a command reads (a parent, --recipe, --base, inspect's or evaluate's DIR, push's
    folder) raised it from a first look (`is_dir`, `exists`) that only a missing path was expected to answer: a
    traceback. The path (the error's second one when that is the long one: a rename's target) is shown by its ends,
    with nothing of a name shaped like a token: shortened first, a token's `hf_` could be cut off and the rest shown."""
    if not isinstance(error, OSError) or error.errno != errno.ENAMETOOLONG:
        return None
    given = [os.fsdecode(name) for name in (error.filename, error.filename2)
             if isinstance(name, (str, bytes, os.PathLike))]
    where = max(given, key=lambda name: (has_long_name(name), len(os.fsencode(name))), default="")
    size = len(os.fsencode(where))
    shown_path = hide_tokens(os.sep.join("***" if looks_like_token(part) else part for part in where.split(os.sep)))
    if len(shown_path) > 2 * LONG_PATH_SHOWN + 3:
        shown_path = f"{shown_path[:LONG_PATH_SHOWN]}...{shown_path[-LONG_PATH_SHOWN:]}"
    named = f" ({shown_path!r}, {size} bytes)" if where else ""
    fix = ("pass a shorter path" if not where else
           f"pass a shorter path (a name of at most {NAME_MAX_BYTES} bytes)" if has_long_name(where) else
           f"the whole path is too long (at most {PATH_MAX_BYTES} bytes): pass a shorter one (fewer or shorter "
           "folder names, or relative to a nearer working directory)")
    return (f"hf-mudsc {command}: error: a path given is too long for this system{named}: no such file or folder can "
            f"exist; {fix}")


def has_long_name(path: str) -> bool:
    """Whether a name of `path` (a component) is longer than a file system takes (`NAME_MAX_BYTES`)."""
    return any(len(os.fsencode(part)) > NAME_MAX_BYTES for part in path.split(os.sep))


# The argparse actions that hold one value (store, --x/--no-x): given a second time, argparse keeps the last
# silently. Not counted: flags meant to repeat (append, count: `--dataset`, `-v`) and switches storing one constant
# (store_true / store_const: `-q`), which mean the same however often they are given.
SINGLE_VALUE_ACTIONS = (argparse._StoreAction, argparse.BooleanOptionalAction)


class GivenOnce:
    """Mixed into a flag's action that holds one value (`SINGLE_VALUE_ACTIONS`): a second occurrence on one command
    line (`--alpha 0.3 --alpha 0.7`, `--rescale --no-rescale`, `-o A --output B`) is refused in one line naming the
    flag — argparse kept the last value and the merge ran with a value the user may not have meant."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = getattr(parser, "given_flags", None)
        if given is not None:
            # `--dry-run --dry-run` says one thing; `--rescale --no-rescale` two
            switched = isinstance(self, argparse.BooleanOptionalAction) and given.get(self) != option_string
            if self in given and (switched or not isinstance(self, argparse.BooleanOptionalAction)):
                parser.exit(2, f"{parser.prog}: error: {repeated_flag_line(self, given[self], option_string)}\n")
            given[self] = option_string
        super().__call__(parser, namespace, values, option_string)  # type: ignore[misc]


@functools.cache
def given_once(action_class: type[argparse.Action]) -> type[argparse.Action]:
    """`action_class` with `GivenOnce` mixed in (one class per action class)."""
    return type(f"GivenOnce{action_class.__name__}", (GivenOnce, action_class), {})


def repeated_flag_line(action: argparse.Action, first: str | None, second: str | None) -> str:
    """`--alpha is given twice; give it once` — the flag by its long name (`-o` -> `--output`), how each was spelled
    when they differ (`-o` and `--output`, `--x` and `--no-x`; argparse hands an abbreviation, `--alp`, over as the
    flag's full name, so it is never shown), never the values (one may be a token)."""
    names = action.option_strings
    if isinstance(action, argparse.BooleanOptionalAction):
        name = "/".join(names[:2])
    else:
        name = max(names, key=len)
    spelled = f" (as {first} and {second})" if first != second and None not in (first, second) else ""
    together = f", with all its values after one {name}" if action.nargs in ("+", "*") else ""
    return f"{name} is given twice{spelled}; give it once{together}"


class Parser(argparse.ArgumentParser):
    """argparse's parser, except that its error line never echoes a token (`unrecognized arguments: --token hf_...`
    when a command has no --token flag, `invalid choice: '<token>'` when --token came before the command): `secrets`
    are the command line's secret values (`secret_values`), shown as `***`. A flag that holds one value and is
    given twice is refused (`GivenOnce`)."""

    def __init__(self, *args: Any, secrets: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.secrets = list(secrets)
        self.given_flags: dict[argparse.Action, str | None] | None = None

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        # Every flag this parser holds, however added (groups, `parents=`), counted per parse.
        for action in self._actions:
            if (action.option_strings and isinstance(action, SINGLE_VALUE_ACTIONS)
                    and not isinstance(action, GivenOnce)):
                action.__class__ = given_once(type(action))
        self.given_flags = {}
        try:
            parsed, extras = super().parse_known_args(args, namespace)
        finally:
            self.given_flags = None
        flags = [name for action in self._actions for name in action.option_strings if name.startswith("--")]
        unknown = [extra.partition("=")[0] for extra in extras if extra.startswith("--")]
        if closest := closest_names(unknown, flags):  # `--alpah 0.3`: argparse named no flag meant
            self.exit(2, f"{self.prog}: error: {redact(f'unrecognized arguments: {shlex.join(extras)}', self.secrets)}"
                      f"{closest.replace('`', '')}\n")
        listed = [action for action in self._actions if not action.option_strings and action.nargs in ("*", "+")]
        stray = [extra for extra in extras if not extra.startswith("-")]
        # `merge org/a --alpha 0.3 org/b`: argparse reads one run of MODELs, then "unrecognized". Beside an unknown
        # flag, a stray word is that flag's value (`--frobnicate 3`): argparse's own line says so.
        if listed and stray and not unknown:
            name = listed[0].metavar or listed[0].dest
            self.exit(2, f"{self.prog}: error: {redact(f'unrecognized arguments: {shlex.join(extras)}', self.secrets)}"
                      f"; a {name} given apart from the others is not read: give every {name} together, before "
                      f"or after the flags (`{self.prog} {name} {name} ... --flag VALUE`)\n")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        super().error(redact(message, self.secrets))


def build_parser(available: Sequence[str] | None = None, secrets: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the commands in `available` (all when None) get their flags, i.e. import their module. Its
    errors show each of `secrets` as `***`.

    Every command is listed by `hf-mudsc --help` either way: a command module may import torch (evaluate does),
    and help or an argument error of another command must answer in a second, not after 5-8 s of imports.
    """
    parser = Parser(
        secrets=secrets,
        prog="hf-mudsc",
        description="Merge fine-tuned Hugging Face transformers without training (MuDSC, CVPR 2024).",
    )
    parser.add_argument("--version", action="version", version=f"hf-mudsc {__version__}")
    add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=functools.partial(Parser, secrets=secrets))
    verbosity = verbosity_parent()
    for name, help_text in COMMANDS.items():
        if available is not None and name not in available:
            sub.add_parser(name, help=help_text, description=help_text)  # listed, flags not loaded
            continue
        try:
            module = _module(name)
        except ModuleNotFoundError as error:
            if error.name != f"hf_mudsc.cli.{name}":
                raise  # a missing dependency must not silently hide a command
            continue
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[verbosity],
                                 formatter_class=DefaultsOnceFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


class DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, once: a help that states it in words (`(default: DIR/plots)`, where the
    parsed value is None) is not followed by argparse's `(default: None)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        """A default of several values shown as they are typed (`--seeds A B ... (default: 0 1)`), not as Python
        writes a tuple (`(0, 1)`, which the flag refuses)."""
        if isinstance(action.default, (list, tuple)):
            action = copy.copy(action)
            action.default = " ".join(map(str, action.default))
        return super()._expand_help(action)


# The exit status of a command stopped by Ctrl-C: 128 + SIGINT, what a shell reports for a process it killed.
INTERRUPTED_EXIT = 130
# The exit status of a command whose reader went away (`hf-mudsc inspect DIR | head -1`): 128 + SIGPIPE, what the
# shell reports for coreutils' `cat` in `cat file | head -1` (killed by SIGPIPE; Python ignores that signal and
# raises BrokenPipeError instead), so `set -o pipefail` treats both alike.
BROKEN_PIPE_EXIT = 141


def stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end was closed (poll says POLLERR): a BrokenPipeError from
    anything else (a worker's pipe, a socket) is a real failure. Where poll cannot tell, it is taken as stdout's."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.__stdout__.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `docker stop`, Slurm, torchrun passing on Ctrl-C), raised where the command runs: a
    KeyboardInterrupt, so every cleanup Ctrl-C runs (staged folders removed, parents restored) runs for it too."""


# The exit status of a command stopped by SIGTERM: 128 + 15, what a shell reports for a process it killed.
TERMINATED_EXIT = 143


@contextlib.contextmanager
def interrupts_as_exceptions(command: str | None) -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated` as Ctrl-C raises KeyboardInterrupt (by default SIGTERM ends
    the process on the spot: no line, staging folders left). Once either has been raised, later SIGINTs and SIGTERMs
    are ignored, so the cleanup runs to its end (torchrun sends SIGTERM 2 ms after passing on a Ctrl-C). Handlers
    someone else set (an ignored SIGINT inherited by a background job, a host program's) are left alone, and so is
    `serve`, whose server handles its own signals; the previous handlers come back afterwards, unless a signal
    stopped the command (then both stay ignored while the process exits)."""
    import signal
    import threading

    if command == "serve" or threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def on_signal(number: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise Terminated if number == signal.SIGTERM else KeyboardInterrupt

    replaced = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    own = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for number, previous in replaced.items():
        if previous is own[number]:
            signal.signal(number, on_signal)
    try:
        yield
    finally:
        for number, previous in replaced.items():
            if previous is own[number]:
                # Once a signal has stopped the command the process is ending: later ones stay ignored (torchrun's
                # SIGTERM 2 ms after a Ctrl-C would otherwise kill it after its cleanup, before its exit status).
                signal.signal(number, signal.SIG_IGN if stopping else previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; Ctrl-C ends it in one line (exit 130), and SIGTERM too (exit 143), not a traceback: every
    writer stages its output and renames it into place (`publish.folder`), so an interrupted run has left nothing
    half-written. A reader of its output that went away (`| head -1`) ends it quietly (exit 141)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with interrupts_as_exceptions(command_in(argv)):
            code = run_command(argv)
            sys.stdout.flush()  # a closed reader is found here, not in the flush at exit (a traceback nobody catches)
        return code
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        # Quiet, as coreutils: stdout points at /dev/null so that the interpreter's last flush has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt as interrupt:
        logging.getLogger("hf_mudsc").debug("interrupted", exc_info=True)
        prog = " ".join(["hf-mudsc", *filter(None, [command_in(argv)])])
        # A push says what the Hub holds (`PushInterrupted`, the signal's exception its cause); nothing else writes
        # outside its staged output.
        pushing = isinstance(interrupt, PushInterrupted)
        terminated = isinstance(interrupt.__cause__ if pushing else interrupt, Terminated)
        said = hide_tokens(str(interrupt)) if pushing else "nothing was left half-written"
        print(f"{prog}: interrupted ({'SIGTERM' if terminated else 'Ctrl-C'}); {said}", file=sys.stderr)
        return TERMINATED_EXIT if terminated else INTERRUPTED_EXIT


def error_text(error: BaseException) -> str:
    """How the CLI prints an error it ends in: tokens hidden, control characters escaped so a name from a config
    cannot act on the terminal or forge a line; a `SpecError` keeps its own line breaks (its list of problems, one a
    line, each name in it repr'd so a line break inside a name stays escaped)."""
    return escaped(hide_tokens(str(error)), keep="\n" if isinstance(error, SpecError) else "")


def run_command(argv: list[str]) -> int:
    """Parse `argv` and run its command, turning the errors a user can fix into one line and an exit code."""
    parser = build_parser(available=[command] if (command := command_in(argv)) else [], secrets=secret_values(argv))
    if (misplaced := secret_flag_before_command(argv)) is not None:
        parser.exit(2, f"{parser.prog}: error: {misplaced}\n")
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose contradict each other; pass one of them")
    if isinstance(getattr(args, "token", None), str):  # merge, evaluate, push: read from a file, a line break with it
        try:
            args.token = clean_token(args.token, "--token")
        except ValueError as error:
            print(f"hf-mudsc {args.command}: error: {error}", file=sys.stderr)
            return 2
    configure_logging(args.verbose, args.quiet)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    with library_bars_restored():
        return run_parsed(args)


def run_parsed(args: argparse.Namespace) -> int:
    """Run the parsed command (Hugging Face's bars off with -q or no terminal), turning the errors a user can fix
    into one line and an exit code."""
    from hf_mudsc.progress import interactive

    if args.quiet or not interactive():
        silence_library_bars()
    try:
        return int(args._run(args) or 0)
    except UsageError as error:  # an invalid command line: argparse's exit code
        logging.getLogger("hf_mudsc").debug("command refused", exc_info=True)
        print(f"hf-mudsc {args.command}: error: {error_text(error)}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as error:
        logging.getLogger("hf_mudsc").debug("command failed", exc_info=True)
        # A token the user gave in place of a path or name (`inspect $HF_TOKEN`) is not shown back.
        print(f"hf-mudsc {args.command}: error: {error_text(error)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and not OUT_OF_MEMORY.search(str(error)):
            raise
        logging.getLogger("hf_mudsc").debug("command failed", exc_info=True)
        said = escaped(hide_tokens(brief(error, None)))
        print(f"hf-mudsc {args.command}: error: out of memory{f' ({said[:300]})' if said else ''}; `hf-mudsc "
              "merge ... --dry-run` estimates the peak memory: use fewer parents, calibration samples or a "
              "smaller --batch-size", file=sys.stderr)
        return 1
    except Exception as error:
        line = disk_failure(error, args.command) or name_too_long(error, args.command)
        if line is None:
            raise
        logging.getLogger("hf_mudsc").debug("command failed", exc_info=True)
        print(escaped(hide_tokens(line)), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
