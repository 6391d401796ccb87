"""The merge options, checked in one place: `hf_mudsc.merge`, a recipe file and `hf-mudsc merge` all call this.

A bad value must fail with one line naming the option and the fix before any weights are loaded or any data is
read. The same option is a keyword argument in Python (`zip_budget=`) and a flag on the command line
(`--zip-budget`); messages name both with `option_hint`, so they read right wherever they come from.
This module imports nothing heavy (no torch), so the CLI can check options before torch is loaded.
"""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Any

from hf_mudsc.errors import OptionError

MATCHERS = ("align", "zip")
STATISTICS_DTYPES = ("float32", "float64")
# A batch this large would need tens of GB of activations for any real model; a typo (an extra 0) is likelier.
MAX_BATCH_SIZE = 65536
# torch.Generator.manual_seed takes at most an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1




def flag(name: str) -> str:
    """The command-line flag of an option or keyword argument: `text_column` -> `--text-column`."""
    return "--" + name.replace("_", "-")


def option_hint(name: str) -> str:
    """How messages name an option, right from Python and the CLI alike: `text_column= (CLI: --text-column)`."""
    return f"{name}= (CLI: {flag(name)})"


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


# option -> "int" | "number" | "choice" | "dtype"
_KINDS = {
    "method": "choice", "matcher": "choice", "alpha": "number", "num_samples": "int", "batch_size": "int",
    "seed": "int", "zip_decay": "number", "zip_budget": "number", "statistics_dtype": "dtype", "device": "device",
}
OPTION_NAMES = tuple(_KINDS)
NULLABLE_OPTIONS = frozenset({"num_samples", "device"})
# The devices a merge can run on, by name; whether CUDA is really there is checked when the merge starts.
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_type(name: str, value: Any) -> Any:
    """`value` with the type option `name` needs (ints stay ints, numbers become floats); refuse anything else.

    Booleans are refused for numbers (`True` is an int to Python, never a meant batch size)."""
    kind = _KINDS[name]
    hint = f"{name} must be {{}} (CLI: {flag(name)}), got {value!r} ({type(value).__name__})"
    if value is None and name in NULLABLE_OPTIONS:
        return None
    if kind == "int":
        if not _is_int(value):
            raise OptionError(hint.format("an int"))
        return int(value)
    if kind == "number":
        if not _is_number(value):
            raise OptionError(hint.format("a number"))
        return float(value)
    if kind == "device":
        # A torch.device is accepted by its text without importing torch (`torch.device("cuda", 0)` -> "cuda:0").
        if type(value).__module__ == "torch" and type(value).__name__ == "device":
            return str(value)
        if not isinstance(value, str):
            raise OptionError(hint.format("a string like 'cpu' or 'cuda:0'"))
        return value
    if kind == "dtype":
        # A torch dtype is accepted by name without importing torch (`torch.float32` -> "float32").
        if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
            value = str(value).removeprefix("torch.")
        if not isinstance(value, str):
            raise OptionError(hint.format("a string"))
        return value
    if not isinstance(value, str):
        raise OptionError(hint.format("a string"))
    return value


def check_option(name: str, value: Any) -> Any:
    """Type and range of one option (see `check_options`); returns the normalised value."""
    value = check_type(name, value)
    cli = f"(CLI: {flag(name)})"
    if name == "method":
        from hf_mudsc.methods.registry import METHODS

        if value not in METHODS:
            raise OptionError(f"unknown merge method {value!r}; choose one of: {', '.join(METHODS)} {cli}")
    elif name == "matcher":
        if value not in MATCHERS:
            raise OptionError(f"unknown matcher {value!r}; choose one of: {', '.join(MATCHERS)} {cli}")
    elif name == "alpha":
        if not 0.0 <= value <= 1.0:  # NaN fails every comparison
            raise OptionError(f"alpha must lie in [0, 1] {cli}, got {value}")
    elif name == "zip_decay":
        # Fused similarities become min(x, y) * decay: 0 would erase them, > 1 would let fused units attract more.
        if not 0.0 < value <= 1.0:
            raise OptionError(f"zip_decay must lie in (0, 1] {cli}, got {value}")
    elif name == "zip_budget":
        # Same-model budget int((n // 2) * budget): any finite factor >= 0 is meaningful (>= 2 means unlimited).
        if not (math.isfinite(value) and value >= 0.0):
            raise OptionError(f"zip_budget must be a finite number >= 0 {cli}, got {value}")
    elif name == "batch_size":
        if value < 1:
            raise OptionError(f"batch_size must be >= 1 {cli}, got {value}")
        if value > MAX_BATCH_SIZE:
            raise OptionError(f"batch_size {value} is absurdly large {cli}; the limit is {MAX_BATCH_SIZE} "
                              "(a few dozen is plenty: statistics are sums over batches)")
    elif name == "num_samples":
        if value is not None and value < 1:
            raise OptionError(f"num_samples must be >= 1, or None for the whole split {cli}, got {value}")
    elif name == "seed":
        if value < 0:
            raise OptionError(f"seed must be >= 0 (CLI: {flag(name)}; torch generators take non-negative seeds), "
                              f"got {value}")
        if value > MAX_SEED:
            raise OptionError(f"seed must be <= 2**64 - 1 {cli} (the largest seed of a torch generator), got {value}")
    elif name == "device":
        if value is not None and not DEVICE_PATTERN.match(value):
            raise OptionError(f"unknown device {value!r} {cli}; use 'cpu', 'cuda' or 'cuda:N'")
    elif name == "statistics_dtype":
        if value not in STATISTICS_DTYPES:
            raise OptionError(f"statistics_dtype must be one of {', '.join(STATISTICS_DTYPES)} {cli}, got {value!r}")
    return value


def check_options(**options: Any) -> dict[str, Any]:
    """Check every given merge option (type, then range); return them normalised. Raises `OptionError`.

    Valid ranges follow the algorithm: `alpha` in [0, 1] (a convex combination of the two similarities),
    `zip_decay` in (0, 1], `zip_budget` finite >= 0, `batch_size` in [1, 65536], `num_samples` >= 1 or None,
    `seed` in [0, 2**64 - 1], `matcher`/`method`/`statistics_dtype` from their lists.
    """
    return {name: check_option(name, value) for name, value in options.items()}
