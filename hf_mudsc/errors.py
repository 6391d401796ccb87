"""Every error hf_mudsc raises on purpose: each message names the problem and the fix."""

from __future__ import annotations

import errno
import re
import reprlib
import unicodedata
from typing import Any

# How messages show a value someone gave: nested, long or aliased values (a YAML "billion laughs" is gigabytes
# when printed whole) are cut, so a message stays one short line whatever the input.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 2, 120, 60, 120
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxarray = _SHOWN.maxdict = _SHOWN.maxset = _SHOWN.maxfrozenset = 6


def flag(name: str) -> str:
    """The command-line flag of an option or keyword argument: `text_column` -> `--text-column`."""
    return "--" + name.replace("_", "-")


def parent_label(index: int) -> str:
    """How messages, tables, cards and scorer names name parent `index` (0-based): A, B, ..., Z, then its number as
    people count (index 26 -> "27"). One function, light (no torch), so that every place names a parent alike."""
    return chr(ord("A") + index) if 0 <= index < 26 else str(index + 1)


def parent_names(count: int) -> list[str]:
    """The evaluation's scorer names of `count` parents in merge order: `parent_a`, `parent_b`, ... (`parent_27` past
    `parent_z`, as `parent_label` names parents). Here, below both, so that the evaluation (which names its scorers)
    and publish (whose cards and charts read them back) spell them alike without publish importing evaluate."""
    return [f"parent_{parent_label(index).lower()}" for index in range(count)]


def shown(value: Any) -> str:
    """`repr(value)` shortened for a message: `[1, 2, 3, 4, 5, 6, ...]`, `'aaaa...aaaa'`."""
    return _SHOWN.repr(value)


def brief(error: BaseException, limit: int | None = 300) -> str:
    """Another library's error text for one message line: whitespace folded, cut to `limit` characters (None: whole),
    the error's type when it has no text. Library messages span screens and embed the value they choke on (a
    processor showed every byte of a column's images: a 1.7 MB message)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 4] + " ..."


def first_line(error: BaseException, limit: int | None = 300) -> str:
    """The first non-empty line of an error's text, cut like `brief`: for messages whose later lines are a
    traceback, a URL or advice that does not apply here."""
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return brief(ValueError(line), limit) if line else type(error).__name__


# Bidirectional overrides make a name display as another (U+202A-U+202E, U+2066-U+2069).
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def escaped(text: str, keep: str = "") -> str:
    """`text` with every control character (but those in `keep`) and bidirectional override written as its escape
    (`\\x1b`, `\\n`, `\\u202e`): printed or logged, a name from a config or a dataset shows what it holds instead of
    acting on the terminal (clearing it, or forging a line of output)."""
    return "".join(char if char in keep or (unicodedata.category(char) != "Cc" and char not in BIDI_CONTROLS)
                   else char.encode("unicode_escape").decode("ascii") for char in text)


def option_hint(name: str) -> str:
    """How messages name an option, right from Python and the CLI alike: `text_column= (CLI: --text-column)`."""
    return f"{name}= (CLI: {flag(name)})"


class MergeInputError(ValueError):
    """The parents or options cannot be merged; the message names the problem and the fix."""


class LoadError(ValueError):
    """A parent cannot be loaded safely; the message says why and what to do."""


class ParentMismatchError(LoadError, MergeInputError):
    """The parents cannot be merged with each other (architecture, configuration or vocabulary differ)."""


class CalibrationError(ValueError):
    """The calibration data cannot be used (empty, missing columns, wrongly shaped)."""


class RecipeError(ValueError):
    """A recipe (file or flags) is invalid; the message names the key and the fix."""


class UsageError(ValueError):
    """The command line is invalid: flags that contradict each other or the model they name (an unknown task). The
    CLI exits 2 for it, as argparse does, not 1 (the work itself failing); the message names the flag and the fix."""


class EvaluationError(ValueError):
    """The models or data cannot be evaluated as asked; the message names the problem and the fix."""


class OutputLocationError(ValueError):
    """The output cannot be written where asked (under a file, name too long, folder not writable)."""


class SpecError(ValueError):
    """A permutation spec does not describe the model it was built for (an adapter bug, or a layout of a supported
    model type the adapter has no place for: `unplaced` names those parameters; `absent` the spec's parameters the
    model lacks, once per problem naming one; `problems` lists every problem, those among them)."""

    def __init__(self, message: str, unplaced: tuple[str, ...] = (), problems: tuple[str, ...] = (),
                 absent: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.unplaced = unplaced
        self.problems = problems
        self.absent = absent


class RepoExistsError(FileExistsError):
    """The target repo exists and `overwrite` was not given."""


class PushError(RuntimeError):
    """The upload failed; the message says what the repo really holds afterwards."""


class PushInterrupted(KeyboardInterrupt):  # noqa: N818 - a KeyboardInterrupt, named as the CLI's line says it
    """Ctrl-C (or SIGTERM, its `__cause__`) stopped a push: unlike other interrupts it may have changed the Hub, so
    the message says what the repo (and the local output) hold; the CLI prints it after "interrupted". `pushed`: the
    commit was made before the interrupt took effect."""

    def __init__(self, message: str, *, pushed: bool = False) -> None:
        super().__init__(message)
        self.pushed = pushed


class OptionError(ValueError):
    """A merge option has a wrong type or value; the message names the option, its flag and the valid values."""


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


class UnknownKeywordError(MergeInputError, TypeError):
    """A keyword argument a function of the API does not take (`merge(..., alpah=0.3)`): Python's TypeError named
    no option meant; still a TypeError, so callers catching that one catch this."""


class UnmergeableModelError(MergeInputError):
    """A parent is protected against merging (e.g. MergeLock-style re-factored attention heads); no option
    overrides this: its owner asked not to be merged, and the merge would collapse."""


# Disk failures the user fixes outside the tool, said in one line (the CLI's `disk_failure`, a service job's error):
# a plain OSError, or safetensors' SafetensorError ("... No space left on device (os error 28)", no OSError) while
# the weights are written. EDQUOT: the disk-quota errno where the platform has one (-1, which no error carries).
EDQUOT = getattr(errno, "EDQUOT", -1)
DISK_FAILURES = {errno.ENOSPC: "no space left on device", EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EIO: "input/output error"}
OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")


def disk_error(error: BaseException) -> tuple[int, str, str | None] | None:
    """(errno, what it is in words, the file it names or None) when `error` is a disk failure (`DISK_FAILURES`)."""
    if isinstance(error, OSError):
        number, where = error.errno, error.filename
    elif type(error).__name__ == "SafetensorError" and (code := OS_ERROR_CODE.search(str(error))):
        number, where = int(code.group(1)), "the weights"
    else:
        return None
    what = DISK_FAILURES.get(number) if number is not None else None
    return None if what is None else (number, what, None if where is None else str(where))
