"""Every merge option, declared once: `MergeOptions`, a dataclass whose fields carry their help and checks.

Each field is one option: its name, type, default, help text, valid range (a check that raises one line naming the
option and its flag), how its `hf-mudsc merge` flag looks, and where it goes — a keyword of `hf_mudsc.merge`, a key
a recipe file may set (or one only the command line may set: where the result goes and whether to trust pickle),
a key of the merged model's `config.mudsc`, a row of the model card's settings table. Everything else is derived
from these fields (as transformers derives its CLI from `TrainingArguments`): the CLI flags (`hf_mudsc.cli.merge`),
the recipe keys and their type checks (`hf_mudsc.publish.recipe.Recipe` is a `MergeOptions` plus the parents),
`merge()`'s keyword checks and its recording, and the card's table. Adding an option is one field here (plus its
use); `tests/test_options_agree.py` checks that every derived set agrees.

A bad value must fail with one line naming the option and the fix before any weights are loaded or any data is
read. The same option is a keyword argument in Python (`zip_budget=`) and a flag on the command line
(`--zip-budget`); messages name both with `option_hint`, so they read right wherever they come from.
This module imports nothing heavy (no torch), so the CLI can check options before torch is loaded.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

# `flag`/`option_hint` live in errors.py (modules below options, e.g. methods/, name options in messages too).
from hf_mudsc.errors import OptionError, UnknownKeywordError, flag, option_hint, parent_label, shown  # noqa: F401 (re-exported)
from hf_mudsc.load.references import TOKEN_FIX, looks_like_token
from hf_mudsc.markdown import markdown_cell, markdown_code
from hf_mudsc.option_values import FACTOR_LIMIT, MATCHERS, WEIGHT_RANGE, WEIGHT_SUM_FLOOR, parse_layer_swap

STATISTICS_DTYPES = ("float32", "float64")
#: The dtypes the merged model may be returned and saved in (`out_dtype`); "auto" keeps the parents' common stored
#: dtype (`hf_mudsc.apply.dtype.resolve_out_dtype`). The merge itself always computes in float32.
OUT_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")  # float64: what `auto` keeps of float64 parents
# After-matching refits (`hf_mudsc.apply.refit`): "none" keeps the paper's merge, "ridge" refits every linear layer,
# "gate" refits on the calibration examples not held out and keeps the refit only if it is at least as faithful to
# the parents on the held-out ones (`hf_mudsc.apply.refit_gate`), "repair" renormalises per-unit mean/std
# (`hf_mudsc.apply.repair`); "auto" (the default) resolves by `resolve_refit`.
REFITS = ("auto", "none", "ridge", "gate", "repair")
#: The resolved refit values that change the merged weights from the calibration data (the gate runs the ridge
#: refit, then decides whether to keep it); each reads the data once per layer step.
REFITTING = ("ridge", "gate", "repair")
#: What `refit="auto"` resolves to where a refit applies (`resolve_refit`; measured: docs/benchmarks/refit_text.md).
AUTO_REFIT = "gate"
# The size budget's range (`size`): one parent's parameters up to two parents' (docs/design.md §4.12).
SIZE_RANGE = (1.0, 2.0)
#: Where a size budget goes (`size_spend`): MLP units only, or whole attention heads and the residual stream first
#: (the rest in MLP units); docs/design.md §4.12.
SIZE_SPENDS = ("mlp", "heads", "residual")


def resolve_refit(refit: str, *, matches_units: bool, has_data: bool, num_parents: int, reference_compat: bool,
                  rereadable: bool = True, reads_data: bool = False, weights: Sequence[float] | None = None) -> str:
    """The refit a merge runs: `refit="auto"` is `AUTO_REFIT` ("gate": the ridge refit, kept only if the parents'
    held-out log-probability agreement is at least as good with it; docs/benchmarks/refit_text.md) for a
    unit-matching method (mudsc, zipit, ...) of any N >= 2 parents with re-readable calibration data, and "none"
    otherwise — and always under `reference_compat=True`, which reproduces the reference's merge (docs/design.md
    §4.9: the refit measured +44 joint points across inits for two parents; §4.13 for N).

    Also `AUTO_REFIT` after a same-base method that reads the calibration data itself (`reads_data`: regmean,
    regmean_plusplus, fisher; what `method="auto"` picks for fine-tunes of one base given data) of N >= 2 equally
    weighted parents. Measured on the same-init digit ViTs (issue 12, docs/design.md §4.9), regmean -> regmean +
    refit: two parents (9 pairs) joint 90.5 -> 92.3 (plain averaging 92.3), worst per-task gap to the parents
    2.7 -> 0.7 points; three parents (4+3+3 splits, 15 sets at widths 64/128/256,
    docs/benchmarks/same_init_three.md) joint 78.7 -> 84.0 (plain averaging 82.2), worst per-task gap 2.2 -> 0.7.
    Unequal `weights` keep "none": there the refit (targets: the weighted mean of the parents' outputs) tied regmean
    alone on joint at best and fell below the weighted plain average at width 256, which regmean alone does not
    (same document)."""
    if refit != "auto":
        return refit
    equal = weights is None or len(set(weights)) <= 1
    after_matching = matches_units and num_parents >= 2
    after_data_method = reads_data and equal and num_parents >= 2
    applies = (after_matching or after_data_method) and has_data and rereadable and not reference_compat
    return AUTO_REFIT if applies else "none"


# A batch this large would need tens of GB of activations for any real model; a typo (an extra 0) is likelier.
MAX_BATCH_SIZE = 65536
# torch.Generator.manual_seed takes at most an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1
# The devices a merge can run on, by name; whether CUDA is really there is checked when the merge starts.
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")
# The recipe file written next to every merged model (`hf_mudsc.publish.recipe`); named here for the --output help.
RECIPE_FILENAME = "mudsc_recipe.yaml"
# Kinds of option values: how a value is type-checked (and converted to an argparse `type`).
# `numbers`: a list of floats (CLI: `--weights 1 2 1`); `number_or_numbers`: one float or a list (one per parent);
# `gradient`: one float or a list of any length (mergekit's layer gradient over the blocks: `--slerp-t 0 1`);
# `model`: a reference to a model (a Hub id `org/name[@rev]` or folder string; from Python also a model object);
# `number_or_auto`: a number or "auto" (the merge chooses it: `alpha="auto"`); `int_or_auto` likewise for a count.
KINDS = ("int", "int_or_auto", "number", "number_or_auto", "str", "bool", "choice", "dtype", "device",
         "numbers", "number_or_numbers", "gradient", "model")
#: The value of a `number_or_auto` option that asks the merge to choose the number (`alpha="auto"`).
AUTO = "auto"


def number_or_auto(text: str) -> float | str:
    """The command-line type of a `number_or_auto` option: "auto" or a float."""
    return AUTO if text == AUTO else float(text)


number_or_auto.__name__ = "float or 'auto'"  # argparse names the type in its message: "invalid float or 'auto' value"


def int_or_auto(text: str) -> int | str:
    """The command-line type of an `int_or_auto` option: "auto" or an int."""
    return AUTO if text == AUTO else int(text)


int_or_auto.__name__ = "int or 'auto'"

#: The command-line spelling of None for a nullable `int_or_auto` option (`--refit-samples all`: every calibration
#: example); Python passes None, a recipe writes `null`.
ALL = "all"


def int_auto_or_all(text: str) -> int | str | None:
    """The command-line type of a nullable `int_or_auto` option: "auto", "all" (None) or an int."""
    return None if text == ALL else int_or_auto(text)


int_auto_or_all.__name__ = "int, 'auto' or 'all'"


def int_or_all(text: str) -> int | None:
    """The command-line type of a nullable `int` option: "all" (None) or an int (`--num-samples all` resets a
    recipe's number to the whole split)."""
    return None if text == ALL else int(text)


int_or_all.__name__ = "int or 'all'"


#: The fewest unknown keys that, when they are most of a mapping's, make it another kind of file (`closest_names`).
OTHER_FILE_UNKNOWN = 3


def closest_names(unknown: Sequence[Any], valid: Sequence[str], given: int | None = None) -> str:
    """` (did you mean `alpha`?)` for the unknown names within a typo of a valid one (`alpah`, `batch-size`),
    ` (did you mean: `alpah` -> `alpha`, `sed` -> `seed`?)` for several; "" when none is close. Said wherever an
    option's name is given wrong — a recipe's or a job's key, a merge() keyword, a flag (spelt as `valid` is).
    `given`: how many keys the mapping holds; "" when most of them (and at least `OTHER_FILE_UNKNOWN`) are unknown,
    as in a config.json given as a recipe: it is another kind of file, not a recipe with typos."""
    if given is not None and len(unknown) >= OTHER_FILE_UNKNOWN and 2 * len(unknown) > given:
        return ""
    pairs = []
    for name in unknown:
        if not isinstance(name, str):
            continue
        match = difflib.get_close_matches(name, valid, n=1, cutoff=0.7) or difflib.get_close_matches(
            name.replace("-", "_").lower(), valid, n=1, cutoff=0.7)
        if match:
            pairs.append((name, match[0]))
    if not pairs:
        return ""
    if len(pairs) == 1 and len(unknown) == 1:
        return f" (did you mean `{pairs[0][1]}`?)"
    return " (did you mean: " + ", ".join(f"`{name}` -> `{meant}`" for name, meant in pairs) + "?)"


def known_keywords(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` refusing a keyword argument it does not take in one line naming the closest it does
    (`closest_names`), before running any of it; its signature is kept (`inspect.signature` reads the original)."""
    parameters = inspect.signature(function).parameters
    taken = [name for name, parameter in parameters.items() if parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(function)
    def checked(*args: Any, **keywords: Any) -> Any:
        unknown = [name for name in keywords if name not in parameters]
        if unknown:
            raise UnknownKeywordError(f"{function.__name__}() takes no keyword argument(s) {shown(unknown)}"
                                      f"{closest_names(unknown, taken)}; its options are: {', '.join(taken)}")
        return function(*args, **keywords)

    return checked


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    """Python's bool or numpy's scalar one (`np.bool_`, named `bool` in numpy 2): numpy ints and floats are taken as
    numbers, so a notebook's `np.bool_(True)` is a bool too. Read by its type's module, so numpy is not imported."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


# ---------------------------------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class CardRow:
    """Where an option shows in the model card's settings table: its row position, label and text.

    `text(value, context)` gives the cell (None hides the row); options sharing a label share one row, their texts
    joined by " / ". The value is the merged model's `config.mudsc` entry, else the recipe's (`source="merge"`),
    only the former (`"config"`) or only the recipe's (`"recipe"`, as the card shows it). `context` holds what a
    cell may need besides the value (see `hf_mudsc.publish.card.settings_rows`)."""

    position: int
    label: str
    text: Callable[[Any, Mapping[str, Any]], str | None] = lambda value, context: str(value)
    source: str = "merge"


def option(
    default: Any,
    *,
    help: str | Callable[[], str],
    kind: str,
    nullable: bool = False,
    check: Callable[[str, Any, str], None] | None = None,
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
    metavar: str | None = None,
    short: str | None = None,
    show_default: bool = True,
    keyword: bool = True,
    check_keyword: bool = True,
    recipe: bool = True,
    destination: bool = False,
    recorded: bool = False,
    per_method: bool = False,
    card: CardRow | None = None,
    command_help: Mapping[str, str] | None = None,
) -> Any:
    """A `MergeOptions` field: the option's default plus everything the derived places need (its metadata).

    Args:
        help: the `--help` text (a callable when it lists the registry); `show_default` appends "(default: X)".
        kind: one of `KINDS`, how values are type-checked; `nullable`: None is a valid value.
        check: `check(name, value, cli)` raises `OptionError` for a value out of range (`cli` = "(CLI: --flag)").
        choices: the flag's argparse choices; metavar / short: the flag's metavar and short alias (`-o`).
        keyword: a keyword argument of `hf_mudsc.merge` (not: `calibration`, its second positional argument,
            and the destinations).
        check_keyword: merge() checks the keyword with the others, up front; False = the stage that uses it
            checks it (`device`: `resolve_device` knows torch devices and whether CUDA is there).
        recipe: a recipe file may set it; False = only the command line may (a downloaded recipe must never
            write over someone's folder or repo, or run a pickle, with nothing on the command line asking for it).
        destination: says where the result goes, not what it is (the CLI and writer act on it, merge() never).
        recorded: kept in the merged model's `config.mudsc` (the value the merge used).
        per_method: read by some methods only: recorded (and shown in the card) with the value the method's
            `used_options` reports, None (row hidden) for a method that does not read it.
        card: its row in the model card's settings table.
        command_help: the `--help` text of another command that takes the flag too (`evaluate`'s --allow-pickle),
            by command, in that command's terms; `help` is merge's.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown option kind {kind!r}; one of {KINDS}")
    metadata = {"help": help, "kind": kind, "nullable": nullable or default is None, "check": check,
                "choices": choices, "metavar": metavar, "short": short, "show_default": show_default,
                "keyword": keyword, "check_keyword": check_keyword, "recipe": recipe, "destination": destination,
                "recorded": recorded, "per_method": per_method, "card": card,
                "command_help": dict(command_help or {})}
    return field(default=default, metadata=metadata)


def _method_names() -> tuple[str, ...]:
    """`auto` (the default: chosen from the parents' relation, `hf_mudsc.methods.auto`) and every registered method."""
    from hf_mudsc.methods.registry import AUTO, METHODS

    return (AUTO, *METHODS)


def _method_help() -> str:
    from hf_mudsc.methods.registry import METHODS

    return ("merge method: auto = chosen from how the parents relate (different inits -> mudsc; fine-tunes of one base "
            "-> regmean with --calibration, else ties with --base, else linear); "
            + "; ".join(f"{m.name} = {m.pretty_name}" for m in METHODS.values()))


def _calibration_help() -> str:
    """Which methods read the data comes from the registry, so a new method cannot leave this help stale."""
    from hf_mudsc.methods.registry import METHODS

    reading = ", ".join(m.name for m in METHODS.values() if m.needs_calibration or m.needs_data)
    return ("calibration data for the activation statistics: `repo_or_path[:config]:split` — a Hub dataset id (pin it "
            "like a parent: `org/ds@revision:split`; the recipe records the commit used), an imagefolder or a data "
            "file (streamed), or a folder written by Dataset.save_to_disk — local data looks like a path (`./calib`): "
            "a bare name that is also a folder here is refused as ambiguous; a split may carry a slice "
            f"(`train[:512]`). Needed by {reading}, and by --refit ridge|gate|repair and --alpha auto; the other "
            "methods merge without it (--refit auto then resolves to none)")


# ------------------------------------------------------------------------------------- range checks, one per option


def _check_method(name: str, value: str, cli: str) -> None:
    if value not in _method_names():
        raise OptionError(f"unknown merge method {shown(value)}; choose one of: {', '.join(_method_names())} {cli}")


def _check_matcher(name: str, value: str, cli: str) -> None:
    if value not in MATCHERS:
        raise OptionError(f"unknown matcher {shown(value)}; choose one of: {', '.join(MATCHERS)} {cli}")


def _check_alpha(name: str, value: float | str, cli: str) -> None:
    if value == AUTO:
        return
    if not 0.0 <= value <= 1.0:  # NaN fails every comparison
        raise OptionError(f"alpha must lie in [0, 1] {cli}, got {value}")


def _check_zip_decay(name: str, value: float, cli: str) -> None:
    # Fused similarities become min(x, y) * decay: 0 would erase them, > 1 would let fused units attract more.
    if not 0.0 < value <= 1.0:
        raise OptionError(f"zip_decay must lie in (0, 1] {cli}, got {value}")


def _check_zip_budget(name: str, value: float, cli: str) -> None:
    # Same-model budget int((n // 2) * budget): any finite factor >= 0 is meaningful (>= 2 means unlimited).
    if not (math.isfinite(value) and value >= 0.0):
        raise OptionError(f"zip_budget must be a finite number >= 0 {cli}, got {value}")


def _check_batch_size(name: str, value: int, cli: str) -> None:
    if value < 1:
        raise OptionError(f"batch_size must be >= 1 {cli}, got {value}")
    if value > MAX_BATCH_SIZE:
        raise OptionError(f"batch_size {value} is absurdly large {cli}; the limit is {MAX_BATCH_SIZE} "
                          "(a few dozen is plenty: statistics are sums over batches)")


def _check_num_samples(name: str, value: int | None, cli: str) -> None:
    if value is not None and value < 1:
        raise OptionError(f"num_samples must be >= 1, or None for the whole split ('all' on the command line) {cli}, "
                          f"got {value}")


def _check_seed(name: str, value: int, cli: str) -> None:
    if value < 0:
        raise OptionError(f"seed must be >= 0 (CLI: {flag(name)}; torch generators take non-negative seeds), "
                          f"got {value}")
    if value > MAX_SEED:
        raise OptionError(f"seed must be <= 2**64 - 1 {cli} (the largest seed of a torch generator), got {value}")


def _check_device(name: str, value: str | None, cli: str) -> None:
    if value is not None and not DEVICE_PATTERN.match(value):
        raise OptionError(f"unknown device {shown(value)} {cli}; use 'cpu', 'cuda' or 'cuda:N'")


def _check_given(what: str) -> Callable[[str, Any, str], None]:
    """The check of a text option that names something (`what`, for the fix): an empty or blank value (`-o "$UNSET"`,
    `--image-column ""`) is refused with the other options. It was read as unset (`--output` dropped beside a
    --push-to-hub that went on alone) or refused only once the parents and the data were opened."""

    def check(name: str, value: str | None, cli: str) -> None:
        if value is not None and not value.strip():
            raise OptionError(f"{name} {cli} is empty (an unset shell variable?); pass {what}, or leave "
                              f"{flag(name)} out")

    return check


def _check_text_column(name: str, value: str | None, cli: str) -> None:
    """One text column or a pair (`calibrate.datasets.text_columns`): a wrong count is known from the value alone, so
    refused with the other options, before any parent or data is opened."""
    _check_given("the text column of the calibration data (or two, comma-separated)")(name, value, cli)
    names = [] if value is None else [part.strip() for part in value.split(",")]
    if len(names) > 2 or not all(names):
        raise OptionError(f"text_column={value!r} {cli} names {len(names)} columns; name one text column or two "
                          "separated by a comma, read as text pairs (e.g. 'sentence1,sentence2')")
    if len(names) == 2 and names[0] == names[1]:
        raise OptionError(f"text_column={value!r} {cli} names column {names[0]!r} twice, which would read each text "
                          "paired with itself; name one column, or the two columns of the pairs (e.g. "
                          "'sentence1,sentence2')")


def _check_statistics_dtype(name: str, value: str, cli: str) -> None:
    if value not in STATISTICS_DTYPES:
        raise OptionError(f"statistics_dtype must be one of {', '.join(STATISTICS_DTYPES)} {cli}, got {shown(value)}")


def _check_out_dtype(name: str, value: str, cli: str) -> None:
    if value not in OUT_DTYPES:
        raise OptionError(f"unknown out_dtype {shown(value)}; choose one of: {', '.join(OUT_DTYPES)} {cli} "
                          "(auto keeps the parents' dtype)")


def _card_out_dtype(value: Any, context: Mapping[str, Any]) -> str | None:
    """`float16 (auto: every parent is stored in float16)`: the merged weights' dtype and why (config
    `out_dtype_reason`)."""
    if value is None:
        return None
    reason = (context.get("mudsc") or {}).get("out_dtype_reason")
    return f"{value} ({reason})" if reason else str(value)


def _check_refit(name: str, value: str, cli: str) -> None:
    if value not in REFITS:
        raise OptionError(f"unknown refit {shown(value)}; choose one of: {', '.join(REFITS)} {cli}")


def refit_read_options(used: Mapping[str, Any], options: Any, refit: str) -> dict[str, Any]:
    """`used` (a method's `used_options`) with the per-method options the refit `refit` (resolved) reads where the
    method does not: unequal `weights` weight the refit's targets (`apply.refit.target_maps`) after a method that
    ignores them (average, slerp), so they are recorded and not called unread."""
    weights = getattr(options, "weights", None)
    if refit in REFITTING and used.get("weights") is None and weights is not None and len(set(weights)) > 1:
        return {**used, "weights": [float(weight) for weight in weights]}
    return dict(used)


def _check_refit_weights(refit: str, weights: Sequence[float] | None, parents: int | None) -> None:
    """A refit's targets weight parent i's outputs by its share `w_i / Σw` (`apply.refit.target_maps`): refuse
    unequal `weights` that make no mean of the parents there — a sum of 0 (the division failed after the whole
    merge) or a share beyond ±`FACTOR_LIMIT` (the limit `linear` and the base-filling mean keep). Weights not one per
    parent (`parents`; None: not known here) are left to the per-parent count check, whose message is the fix."""
    if weights is None or len(set(weights)) <= 1:  # equal weights: the plain mean, whatever their value
        return
    if parents is None or len(weights) != parents:
        return
    given = (f"refit={refit!r} fits the parents' outputs weighted by each one's share of the weights, but "
             f"{shown(list(weights))}")
    fix = f"give {option_hint('weights')} with a sum away from 0, or pass {flag('refit')} none"
    total = sum(weights)
    if abs(total) < WEIGHT_SUM_FLOOR:
        raise OptionError(f"{given} sum to 0; {fix}")
    worst = max((weight / total for weight in weights), key=abs)
    if abs(worst) > FACTOR_LIMIT:
        raise OptionError(f"{given} scale a parent by {worst:g} there, beyond ±{FACTOR_LIMIT:g}; {fix}")


def _check_refit_lambda(name: str, value: float, cli: str) -> None:
    # Relative ridge: lambda = refit_lambda * mean input energy; 0 would leave rank-deficient systems unsolvable, 1e308
    # overflows float32 (NaN weights). Beyond 1e30 the ridge keeps the matched weights: the refit does nothing.
    if not 0.0 < value <= WEIGHT_RANGE[1]:  # NaN and inf fail too
        raise OptionError(f"refit_lambda must lie in (0, {WEIGHT_RANGE[1]:g}] {cli} (1e-3 is a good start), "
                          f"got {value}")


# ------------------------------------------------------ same-base method parameters (issue 13, methods/task_vector)

def _check_layer_swap(name: str, value: str | None, cli: str) -> None:
    if value is None:
        return
    try:
        parse_layer_swap(value)
    except ValueError as error:
        raise OptionError(f"layer_swap {shown(value)}: {error} {cli}") from None


def _each(value: float | list[float] | None) -> list[float]:
    """The values of a `number_or_numbers` option (one, or one per parent; none when unset)."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _check_epsilon(name: str, value: float | list[float] | None, cli: str) -> None:
    # DELLA keeps entries with probability density -/+ epsilon: both ends must be probabilities.
    for v in _each(value):
        if not 0.0 < v < 0.5:
            raise OptionError(f"epsilon must lie in (0, 0.5) {cli} (keep probabilities density ± epsilon), got {v}")


def _check_gamma(name: str, value: float | list[float] | None, cli: str) -> None:
    for v in _each(value):
        if not 0.0 <= v < 1.0:
            raise OptionError(f"gamma must lie in [0, 1) {cli} (the share of largest entries dropped), got {v}")


def _check_slerp_t(name: str, value: float | list[float], cli: str) -> None:
    for v in _each(value):
        if not 0.0 <= v <= 1.0:
            raise OptionError(f"slerp_t must lie in [0, 1] {cli} (0 = parent 0, 1 = parent 1), got {v}")


def _check_consensus_k(name: str, value: int, cli: str) -> None:
    if value < 0:
        raise OptionError(f"consensus_k must be >= 0 {cli} (tasks that must share an entry; 2 is the paper's), "
                          f"got {value}")


def _check_consensus_lambda(name: str, value: float, cli: str) -> None:
    # |tau_t| > lambda * |tau_sum - tau_t|: at 1e30 no entry passes (the merge was the base), at 1e308 inf * 0 = NaN.
    if not 0.0 <= value <= FACTOR_LIMIT:  # NaN and inf fail too
        raise OptionError(f"consensus_lambda must lie in [0, {FACTOR_LIMIT:g}] {cli} (0.6 is FusionBench's; larger "
                          f"keeps almost no entry and the merge is the base), got {value}")


def _check_pcb_ratio(name: str, value: float, cli: str) -> None:
    if not 0.0 < value <= 1.0:
        raise OptionError(f"pcb_ratio must lie in (0, 1] {cli} (the share of entries kept per task), got {value}")


def _check_weights(name: str, value: list[float] | None, cli: str) -> None:
    if value is None:
        return
    if not value:
        raise OptionError(f"weights must hold one number per parent {cli}, got an empty list")
    if not all(math.isfinite(v) for v in value):
        raise OptionError(f"weights must be finite numbers {cli}, got {shown(value)}")
    # float32 merges: 1e-320 rounds to 0 (then 0/0), 1e308 * 2 is inf; either way the merged weights are NaN.
    if not all(v == 0 or WEIGHT_RANGE[0] <= abs(v) <= WEIGHT_RANGE[1] for v in value):
        raise OptionError(f"weights must be 0 or of magnitude {WEIGHT_RANGE[0]:g} to {WEIGHT_RANGE[1]:g} {cli} "
                          f"(only their ratios matter when normalized), got {shown(value)}")


def _check_density(name: str, value: float | list[float] | None, cli: str) -> None:
    values = [] if value is None else value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise OptionError(f"density must be a number in (0, 1] or one per parent {cli}, got an empty list")
    for v in values:
        if not 0.0 < v <= 1.0:  # NaN fails too
            raise OptionError(f"density must lie in (0, 1] {cli} (the fraction of each task vector kept), got {v}")


def _check_scaling(name: str, value: float, cli: str) -> None:
    if not -FACTOR_LIMIT <= value <= FACTOR_LIMIT:  # NaN and inf fail too
        raise OptionError(f"scaling must lie in [{-FACTOR_LIMIT:g}, {FACTOR_LIMIT:g}] {cli} (mergekit's lambda: "
                          f"task arithmetic uses 0.3 to 1, -1 negates a task), got {value}")


# Calibration-data same-base methods (hf_mudsc/methods/data.py).
def _check_regmean_scale(name: str, value: float, cli: str) -> None:
    # The off-diagonal factor of a Gram: 1 keeps it (plain least squares), 0 leaves only the diagonal.
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise OptionError(f"regmean_scale must lie in [0, 1] {cli} (0.95 is FusionBench's), got {value}")


def _check_fisher_epsilon(name: str, value: float, cli: str) -> None:
    # A floor on every (float32) Fisher entry: 0 — or below float32's 1.4e-45, which rounds to 0 — divides 0 by 0
    # where no parent's data moves a parameter; 1e308 is inf in float32 (NaN weights). Beyond 1e30 the floor
    # outweighs any Fisher: the merge is the weighted average already.
    low, high = WEIGHT_RANGE
    if not low <= value <= high:  # NaN and inf fail too
        raise OptionError(f"fisher_epsilon must lie in [{low:g}, {high:g}] {cli} (1e-6 is the paper's), got {value}")


def _check_size(name: str, value: float, cli: str) -> None:
    low, high = SIZE_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise OptionError(f"size must lie in [{low:g}, {high:g}] {cli} (times one parent's parameters; 1 = the "
                          f"paper's merge), got {value}")


def _check_size_spend(name: str, value: str, cli: str) -> None:
    if value not in SIZE_SPENDS:
        raise OptionError(f"unknown size_spend {shown(value)}; choose one of: {', '.join(SIZE_SPENDS)} {cli}")


def _card_size(value: Any, context: Mapping[str, Any]) -> str | None:
    """`1.5× one parent: intermediate_size 96 (+32 units kept unfused); 123,456 parameters (1.470× ...)`; hidden for
    methods without a budget."""
    budget = (context.get("mudsc") or {}).get("size_budget")
    if value is None or not budget:
        return None
    def extra(key: str) -> str:
        count = budget["extra_units"][key]
        noun = "head" if key.endswith("heads") else "unit"  # a heads count widens by whole heads
        return f"+{count} {noun}{'' if count == 1 else 's'} kept unfused"

    widths = ", ".join(f"{key} {width} ({extra(key)})"
                       for key, width in budget["widths"].items()) if value != 1.0 else "nothing widened"
    return (f"{value:g}× one parent: {widths}; {budget['num_parameters']:,} parameters "
            f"({budget['ratio']:.3f}× the parent's {budget['parent_parameters']:,})")


def _check_refit_samples(name: str, value: int | str | None, cli: str) -> None:
    if value is not None and value != AUTO and value < 1:
        raise OptionError(f"refit_samples must be >= 1, '{AUTO}' (enough rows per unknown) or None for all "
                          f"calibration examples ('{ALL}' on the command line) {cli}, got {value}")


def _card_refit(value: Any, context: Mapping[str, Any]) -> str:
    """`ridge`, `none`, or the gate's decision with both held-out scores (config `refit_gate`); `+ LayerNorms`
    when the refit also refitted them (config `refit_norms`)."""
    mudsc = context.get("mudsc") or {}
    gate = mudsc.get("refit_gate")
    norms = " + LayerNorms" if mudsc.get("refit_norms") else ""
    if value != "gate" or not gate:
        return f"{value}{norms}"
    if gate.get("none") is None:
        return f"gate{norms}: refit kept (no held-out example to score)"
    measure = gate.get("measure", "log-probability agreement")
    refit, none = gate_scores(gate["refit"], gate["none"])
    return (f"gate{norms}: refit {'kept' if gate['kept'] else 'dropped'} (held-out {measure} "
            f"{refit} with, {none} without{gate_tie_note(gate)}; {gate['held_out_examples']} examples"
            f"{gate_lowered_tasks_text(gate)})")


#: Decimals a gate score is shown with: 4, more (up to the 6 recorded, `GateDecision.as_config`) when two scores
#: differ only past the 4th — a refit dropped at -0.856132 against -0.856065 read as a tie at 4, which it keeps.
GATE_DIGITS = (4, 6)


def gate_scores(*scores: float) -> tuple[str, ...]:
    """`scores` as the card and `inspect` show them: with the fewest decimals (`GATE_DIGITS`) at which those that
    differ as recorded are shown different."""
    low, high = GATE_DIGITS
    digits = next((d for d in range(low, high + 1)
                   if len({round(float(s), d) for s in scores}) == len({float(s) for s in scores})), high)
    return tuple(f"{float(s):.{digits}f}" for s in scores)


def gate_tie_note(gate: Mapping[str, Any]) -> str:
    """What a dropped refit scored equal to the merge without it as recorded says: the gate keeps ties, so the refit
    was lower past the recorded digits (`apply.refit_gate.decide` compares the scores as measured) — unless it lowered a
    task (`lowered_tasks`), which drops it whatever the pooled scores (`gate_lowered_tasks_text` says so)."""
    if (gate.get("kept") is False and gate.get("refit") is not None and gate.get("refit") == gate.get("none")
            and not gate.get("lowered_tasks")):
        return " (lower past the recorded digits)"
    return ""


def gate_task_names(gate: Mapping[str, Any]) -> list[str] | None:
    """The held-out terms' task names the gate recorded (config `refit_gate["task_names"]`): a merged parent holds
    several tasks, task i being no longer parent i's; None when task i is parent i's."""
    names = gate.get("task_names")
    return [str(name) for name in names] if isinstance(names, list) and names else None


def gate_tasks_text(gate: Mapping[str, Any], indices: Sequence[Any]) -> str:
    """`task(s) 'task1', 'task2'` for the held-out terms `indices` (e.g. the average check's lowered tasks) when the
    gate names its tasks, else `parent(s) A, B` (task i is parent i's)."""
    names = gate_task_names(gate)
    indices = [i for i in indices if isinstance(i, int)]
    if names and all(i < len(names) for i in indices):
        return f"task(s) {', '.join(repr(names[i]) for i in indices)}"
    return f"parent(s) {', '.join(parent_label(i) for i in indices)}"


def gate_lowered_tasks_text(gate: Mapping[str, Any]) -> str:
    """`; it lowered parent B's task: -0.7000 with, -0.6000 without` for each task whose own held-out term the
    refit lowered (config `refit_gate["lowered_tasks"]`): why a refit with the higher pooled score was dropped (card
    and `inspect`); empty when none was."""
    lowered = [i for i in gate.get("lowered_tasks") or () if isinstance(i, int)]
    tasks_none, tasks_refit = gate.get("tasks_none") or [], gate.get("tasks_refit") or []
    names = gate_task_names(gate)

    def task(i: int) -> str:
        return f"task {names[i]!r}" if names and i < len(names) else f"parent {parent_label(i)}'s task"

    parts = ["{}: {} with, {} without".format(task(i), *gate_scores(tasks_refit[i], tasks_none[i]))
             for i in lowered if i < min(len(tasks_none), len(tasks_refit))]
    return f"; it lowered {'; '.join(parts)}" if parts else ""


def _card_refit_samples(value: Any, context: Mapping[str, Any]) -> str:
    """The examples the refit read (config `refit_examples`), with what was asked when that differs: `auto: 483
    examples`, `all: 60 examples`, `100 asked: 60 examples` (the data held fewer), `512 examples`; `—` without a
    refit."""
    examples = (context.get("mudsc") or {}).get("refit_examples")
    if examples is None:
        return "—"
    if value == AUTO:
        return f"auto: {examples} examples"
    if value is None:
        return f"all: {examples} examples"
    return f"{examples} examples" if value == examples else f"{value} asked: {examples} examples"


# --------------------------------------------------------------------------------------------- card cells


def _card_method(value: Any, context: Mapping[str, Any]) -> str:
    method = context.get("method")
    return f"`{value}`" + (f" — {method.description}" if method else "")


def _card_alpha(value: Any, context: Mapping[str, Any]) -> str:
    if value is None:
        return "—"
    curve = (context.get("mudsc") or {}).get("alpha_auto")
    if not curve:
        return str(value)
    if curve.get("returned_fidelity") is None:  # no held-out example: nothing was scored
        return f"{value} (auto: not scored, no held-out example; {value} used)"
    points = ", ".join(f"{alpha}: {score:.3f}" for alpha, score in zip(curve["grid"], curve["fidelity"]))
    # The candidates were solved from the paper's start; the merge returned, with every start, may differ.
    returned = ("" if curve.get("returned_is_candidate", True)
                else f"; {value} with every start (the merge returned): {curve['returned_fidelity']:.3f}")
    return f"{value} (auto: held-out fidelity {points}{returned}; {curve['held_out_examples']} examples)"


def _card_zip(value: Any, context: Mapping[str, Any]) -> str | None:
    return None if context["settings"].get("zip_decay") is None else str(value)


def _matches_units(context: Mapping[str, Any]) -> bool:
    """The merge matched units (head pairing and the reference switch apply); unknown methods count as matching."""
    method = context.get("method")
    return method is None or bool(method.matches_units)


def _card_numbers(value: Any, context: Mapping[str, Any]) -> str | None:
    """A per-method option's cell: hidden (None) when the method does not read it; lists joined by spaces."""
    if value is None:
        return None
    return " ".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _card_base(value: Any, context: Mapping[str, Any]) -> str | None:
    """The base by the name the card's parents table gives it (`base_name`: a model object by its class, as in-memory
    parents are named; the config's own name for it is a fallback), then how it was found."""
    if not value:
        return None
    source = context.get("base_source")
    return markdown_code(context.get("base_name") or value) + (f" ({source})" if source else "")


def _card_calibration(value: Any, context: Mapping[str, Any]) -> str:
    if not value:  # batches or a dataset object given to `merge` leave no reference in the recipe
        return "given in memory (not in the recipe)" if context.get("num_samples") else "none"
    dataset = context.get("calibration_dataset")
    named = (f"[{markdown_cell(value)}]({context['hub_url']}/datasets/{dataset})" if dataset
             else markdown_code(value))
    # Given to a merge that read none of it (a method reading no data, no refit): not what it was built from.
    return named if context.get("num_samples") else f"{named} (given, not read: the merge reads no data)"


# ---------------------------------------------------------------------------------------------------- options


@dataclass
class MergeOptions:
    """The options of a merge, each declared once (module docstring). Field names are `hf_mudsc.merge`'s keywords
    and, with `-` for `_`, the `hf-mudsc merge` flags; a recipe file holds them as YAML keys."""

    calibration: str | None = option(
        None, kind="str", keyword=False, recorded=True, metavar="SPEC", show_default=False,
        card=CardRow(5, "Calibration data", _card_calibration, source="recipe"),
        help=_calibration_help)
    method: str = option(
        "auto", kind="choice", check=_check_method, choices=_method_names, help=_method_help, recorded=True,
        card=CardRow(1, "Method", _card_method))
    matcher: str = option(
        "zip", kind="choice", check=_check_matcher, choices=MATCHERS, recorded=True, per_method=True,
        card=CardRow(2, "Matcher", lambda value, context: value if value else "— (no unit matching)"),
        help="how matched units are fused for method mudsc: zip (ZipIt greedy, may fuse units within one "
        "model) or align (one permutation)")
    alpha: float | str = option(
        0.5, kind="number_or_auto", check=_check_alpha, metavar="A", recorded=True, per_method=True,
        card=CardRow(3, "Balance factor α (weight share)", lambda value, context: _card_alpha(value, context)),
        help="MuDSC balance factor: weight-space share of the similarity, in [0, 1]; 'auto' chooses it without "
        "labels — each of 0.1, 0.3, ..., 0.9 is solved and the merge most faithful to the parents on held-out "
        "calibration examples (every 5th) wins")
    num_samples: int | None = option(
        None, kind="int", check=_check_num_samples, metavar="N", show_default=False,
        # The card shows the number of samples actually used (`config.mudsc["num_calibration_samples"]`).
        card=CardRow(6, "Calibration samples", lambda value, context: str(context.get("num_samples") or 0)),
        help="calibration samples to use, or 'all' (default: the whole split)")
    batch_size: int = option(
        32, kind="int", check=_check_batch_size, metavar="N", recorded=True,
        card=CardRow(6, "Calibration batch size", lambda value, context: None if not context.get("num_samples")
                     else str(value) if value is not None else "as given (batches passed to merge)"),
        help="calibration batch size: speed against memory; the merged weights may differ in their last bits "
        "between batch sizes (the order of floating-point sums), so it is recorded")
    seed: int = option(
        0, kind="int", check=_check_seed, metavar="N", recorded=True, card=CardRow(9, "Seed"),
        help="seed of the calibration shuffle, the solver's group order and the random masks of dare_* and della*")
    zip_decay: float = option(
        0.5, kind="number", check=_check_zip_decay, metavar="A", recorded=True, per_method=True,
        card=CardRow(4, "Zip decay / budget", _card_zip, source="config"),
        help="zip matcher: similarity decay after a fusion (ZipIt's alpha), in (0, 1]")
    zip_budget: float = option(
        1.0, kind="number", check=_check_zip_budget, metavar="B", recorded=True, per_method=True,
        card=CardRow(4, "Zip decay / budget", _card_zip, source="config"),
        help="zip matcher: same-model fusion budget factor (ZipIt's beta), >= 0")
    independent_heads: bool = option(
        False, kind="bool", recorded=True,
        card=CardRow(7, "Head pairing", lambda value, context: None if not _matches_units(context)
                     else "independent per group (reference)" if value else "shared per attention block"),
        help="pair q/k heads and v heads separately, as the reference implementation does")
    reference_compat: bool = option(
        False, kind="bool", recorded=True,
        card=CardRow(8, "Reference-compatible weights", lambda value, context: None if not _matches_units(context)
                     else "yes" if value else "no"),
        help="reproduce the reference implementation's merged weights (its +1e-5 normaliser and "
        "independent heads)")
    # --- same-base method parameters (methods/task_vector.py reads them; recorded only by the methods that do)
    gamma: float | list[float] | None = option(
        None, kind="number_or_numbers", check=_check_gamma, metavar="G", recorded=True, per_method=True,
        show_default=False, card=CardRow(10, "Breadcrumbs γ (largest entries dropped)", _card_numbers),
        help="breadcrumbs, breadcrumbs_ties: share of each task vector's LARGEST entries dropped, in [0, 1), one "
        "number or one per parent (mergekit gamma; default 0.01); with density + gamma > 1 the density kept comes "
        "first and only the largest 1 - density are dropped (none at density 1), with a warning")
    epsilon: float | list[float] | None = option(
        None, kind="number_or_numbers", check=_check_epsilon, metavar="E", recorded=True, per_method=True,
        show_default=False, card=CardRow(10, "DELLA ε (keep-probability spread)", _card_numbers),
        help="della, della_linear: keep probabilities run from density - epsilon (smallest entries of a row) to "
        "density + epsilon (largest), epsilon in (0, 0.5), one number or one per parent (mergekit epsilon; default "
        "0.15)")
    slerp_t: float | list[float] = option(
        0.5, kind="gradient", check=_check_slerp_t, metavar="T", recorded=True, per_method=True,
        card=CardRow(11, "SLERP t", _card_numbers),
        help="slerp: where between parent 0 (t=0) and parent 1 (t=1) each tensor is interpolated (mergekit t); "
        "several numbers are mergekit's layer gradient: encoder block b of L takes them interpolated at b/(L-1), "
        "embeddings, final norms and head the first (e.g. --slerp-t 0 0.5 1)")
    consensus_k: int = option(
        2, kind="int", check=_check_consensus_k, metavar="K", recorded=True, per_method=True,
        card=CardRow(12, "Consensus k / λ", _card_numbers),
        help="consensus: keep an entry only where at least K tasks' TALL masks hold it (2 drops 'selfish' "
        "weights; 0 = task arithmetic)")
    consensus_lambda: float = option(
        0.6, kind="number", check=_check_consensus_lambda, metavar="L", recorded=True, per_method=True,
        card=CardRow(12, "Consensus k / λ", _card_numbers),
        help="consensus: TALL mask of task t holds the entries where |tau_t| > L * |tau_sum - tau_t| (tau_sum: the "
        "unweighted sum of the task vectors; --weights scale only the kept entries), L in [0, 100]")
    pcb_ratio: float = option(
        0.1, kind="number", check=_check_pcb_ratio, metavar="R", recorded=True, per_method=True,
        card=CardRow(13, "PCB ratio", _card_numbers),
        help="pcb: share of each task vector's entries kept after the balancing scores (PCB_merge's ratio), in (0, 1]")
    layer_swap: str | None = option(
        None, kind="str", check=_check_layer_swap, metavar="P:A-B,...", recorded=True, per_method=True,
        show_default=False,
        card=CardRow(14, "Layer swap (parent:blocks)", _card_numbers),
        help="layer_swap: which parent each encoder block comes from, e.g. '1:0-5,2:6-8' = blocks 0-5 from "
        "parent 1, 6-8 from parent 2; unlisted blocks, embeddings, final norm and head from parent 0")
    refit: str = option(
        "auto", kind="choice", check=_check_refit, choices=REFITS, recorded=True,
        card=CardRow(4, "Refit / ridge λ (relative) / examples", _card_refit),
        help="after matching, refit every linear layer in forward order by ridge least squares toward the parents' "
        "outputs on the calibration data (no labels, no gradients): ridge closes most of the gap to the ensemble "
        "across initializations; repair only rescales each unit of every linear layer and LayerNorm to the parents' "
        "mean and std (REPAIR: no Gram matrices, a smaller gain); none keeps the paper's merge; gate = ridge fitted on "
        "the calibration examples not "
        "held out (every 5th), kept only if the parents' log-probabilities agree at least as well on the held-out "
        "ones (both scores recorded); auto = gate for unit-matching methods (mudsc, "
        "zipit, ...) of any number of parents, and for regmean / regmean_plusplus / fisher of equally weighted "
        "parents, given calibration data; none otherwise and under --reference-compat")
    refit_lambda: float = option(
        1e-3, kind="number", check=_check_refit_lambda, metavar="L", recorded=True,
        card=CardRow(4, "Refit / ridge λ (relative) / examples",
                     lambda value, context: "—" if value is None else str(value)),
        help="refit ridge strength, relative to the mean input energy of each layer (pulls toward the matched "
        "weights), in (0, 1e30]")
    refit_norms: bool = option(
        False, kind="bool", recorded=True,
        help="with the ridge refit (ridge, gate, auto): also refit every LayerNorm's weight and bias, per unit, "
        "in forward order with the linear layers, toward the parents' LayerNorm outputs "
        "(docs/benchmarks/refit_layernorm.md)")
    # ---- same-base merging (issue 13): the common base and the task-vector parameters, as mergekit names them
    base: str | None = option(
        None, kind="model", metavar="MODEL", show_default=False, recorded=True,
        card=CardRow(1, "Base model", _card_base),
        help="the parents' common base model (a Hub id `org/name[@revision]` or a folder; from Python also a model): "
        "task-vector methods (task_arithmetic, ties, dare_*, ...) merge the parents' differences from it. When a "
        "method needs it and it is not given, the base_model every parent's model card names is used")
    weights: list[float] | None = option(
        None, kind="numbers", check=_check_weights, metavar="W", show_default=False, recorded=True, per_method=True,
        card=CardRow(3, "Weights", _card_numbers),
        help="one weight per parent, in parent order (mergekit's `weight`; default 1 each), e.g. --weights 1 2 1")
    density: float | list[float] | None = option(
        None, kind="number_or_numbers", check=_check_density, metavar="D", show_default=False, recorded=True,
        per_method=True, card=CardRow(3, "Density", _card_numbers),
        help="fraction of each task vector kept, in (0, 1]: one number or one per parent (TIES, DARE, breadcrumbs, "
        "DELLA; default: the method's)")
    normalize: bool | None = option(
        None, kind="bool", show_default=False, recorded=True, per_method=True,
        card=CardRow(3, "Normalize by the weights", lambda value, context: None if value is None
                     else "yes" if value else "no"),
        help="divide by the sum of the weights — with sign election (ties, dare_ties, breadcrumbs_ties, della) each "
        "entry by the weights' sum of the parents whose sign agrees (default: the method's, as mergekit: linear, ties "
        "and della do; task_arithmetic, dare_*, breadcrumbs* and della_linear do not)")
    scaling: float = option(
        1.0, kind="number", check=_check_scaling, metavar="L", recorded=True, per_method=True,
        card=CardRow(3, "Scaling λ", _card_numbers),
        help="factor on the merged task vector (mergekit's `lambda`), in [-100, 100]")
    rescale: bool = option(
        True, kind="bool", recorded=True, per_method=True, card=CardRow(3, "Rescale kept entries", _card_numbers),
        help="DARE/DELLA: rescale each tensor's kept entries so its L1 norm is kept (--no-rescale to skip); ties and "
        "breadcrumbs* never rescale (mergekit's default for them; recipes record this option for every method)")
    # ---- end of the same-base options


    refit_samples: int | str | None = option(
        AUTO, kind="int_or_auto", nullable=True, check=_check_refit_samples, metavar="N", recorded=True,
        card=CardRow(4, "Refit / ridge λ (relative) / examples", _card_refit_samples),
        help="examples the refit reads: a subset of the calibration data chosen by a shuffle seeded with --seed "
        "(all of it when it holds fewer). The refit reads it once per layer step, so this bounds its cost. 'auto': "
        "enough that every per-token layer's least squares has 16 token rows per unknown, within [128, 1024] "
        f"examples; '{ALL}': every calibration example (a recipe: null)")
    statistics_dtype: str = option(
        "float32", kind="dtype", check=_check_statistics_dtype, choices=STATISTICS_DTYPES, recorded=True,
        help="precision of the calibration statistics: float32 multiplies each batch in float32 and sums "
        "in float64 (about twice as fast on CPUs); float64 keeps every product in float64")
    out_dtype: str = option(
        "auto", kind="dtype", check=_check_out_dtype, choices=OUT_DTYPES, recorded=True,
        card=CardRow(8, "Weights dtype", _card_out_dtype),
        help="dtype of the merged model's weights, as returned and saved (config dtype set to match); the merge "
        "computes in float32 either way. auto = the dtype every parent is stored in (safetensors headers, or a "
        "model object's own), float32 when they differ; float16 / bfloat16 halve the size on disk")
    size: float = option(
        1.0, kind="number", check=_check_size, metavar="S", recorded=True, per_method=True,
        card=CardRow(4, "Size budget", _card_size),
        help="size budget for the unit-matching methods: the merged model may hold up to S times one parent's "
        "parameters, in [1, 2]; the extra keeps the MLP units with the weakest cross-parent match unfused (a wider "
        "intermediate_size, still a stock class; --size-spend chooses other units). 1 = the paper's merge")
    size_spend: str = option(
        "mlp", kind="choice", check=_check_size_spend, choices=SIZE_SPENDS, recorded=True, per_method=True,
        help="where a size budget goes: mlp keeps MLP units unfused (a wider intermediate_size); heads first keeps "
        "whole attention head pairs and as many residual-stream units unfused (hidden_size and num_attention_heads "
        "grow together, head_dim kept; ViT only), residual first keeps residual-stream units unfused (hidden_size "
        "grows, the config pins head_dim; ViT only); both spend the rest on MLP units")
    # ---- calibration-data same-base methods (regmean, regmean_plusplus, fisher: hf_mudsc/methods/data.py)
    regmean_scale: float = option(
        0.95, kind="number", check=_check_regmean_scale, metavar="R", recorded=True, per_method=True,
        card=CardRow(3, "RegMean off-diagonal scale", _card_numbers),
        help="regmean, regmean_plusplus: factor on the off-diagonal entries of every input Gram matrix, in [0, 1] "
        "(1 = plain least squares on the parents' inputs; smaller pulls toward a per-feature average)")
    fisher_epsilon: float = option(
        1e-6, kind="number", check=_check_fisher_epsilon, metavar="E", recorded=True, per_method=True,
        card=CardRow(3, "Fisher floor ε", _card_numbers),
        help="fisher: floor on every parent's diagonal Fisher (where no parent's data moves a parameter, the "
        "weighted average), in [1e-30, 1e30]")
    # ---- end of the calibration-data method options
    device: str | None = option(
        None, kind="device", check=_check_device, metavar="DEVICE", show_default=False, check_keyword=False,
        help="where the calibration forward passes run: cpu, cuda or cuda:N (default: cuda when available, "
        "else cpu); the merged model is saved the same either way")
    image_column: str | None = option(
        None, kind="str", check=_check_given("the image column of the calibration data"), metavar="NAME",
        show_default=False,
        help="image column of the calibration dataset (default: image or img)")
    text_column: str | None = option(
        None, kind="str", check=_check_text_column, metavar="NAME", show_default=False,
        help="text column of the calibration dataset (default: text or sentence), or two separated by a comma "
        "read as text pairs, e.g. sentence1,sentence2 (default: sentence1+sentence2, question+sentence or "
        "premise+hypothesis when the data holds one such pair and no other text column)")
    allow_pickle: bool = option(
        False, kind="bool", recipe=False,
        help="allow parents with pickle-only weights (pytorch_model.bin can run arbitrary code when loaded; "
        "only for sources you trust)",
        command_help={"evaluate": "load the models scored (DIR and the parents) from pickle-only weights "
                      "(pytorch_model.bin can run arbitrary code when loaded; only for sources you trust)"})
    dry_run: bool = option(
        False, kind="bool", recipe=False,
        help="plan the merge without doing it: resolve the parents' revisions, read their configs and safetensors "
        "headers (no weights downloaded), print the parents, their relation, the method, the groups and widths, "
        "the calibration rows and an estimate of time and peak memory; nothing is written or pushed")
    output: str | None = option(
        None, kind="str", check=_check_given("the folder for the merged model"), keyword=False, recipe=False,
        destination=True, metavar="DIR", short="-o", show_default=False,
        help="folder for the merged model (safetensors weights, processor, README.md card, "
        f"{RECIPE_FILENAME}, the diagnostics: merge_diagnostics.json, plots/); must not exist unless --overwrite")
    push_to_hub: str | None = option(
        None, kind="str", keyword=False, recipe=False, destination=True, metavar="ORG/NAME", show_default=False,
        help="also push the merged model, card and recipe to this Hub repo in one commit (refused if the "
        "repo exists, unless --overwrite)")
    private: bool = option(
        False, kind="bool", keyword=False, recipe=False, destination=True,
        help="create the --push-to-hub repo private")
    overwrite: bool = option(
        False, kind="bool", keyword=False, recipe=False, destination=True,
        help="replace an existing --output folder (only one written by hf-mudsc) and an existing "
        "--push-to-hub repo's files")

    # ------------------------------------------------------------------ the declaration, read by the derived places
    @classmethod
    def option_fields(cls) -> tuple[Field, ...]:
        """The options' fields, in declaration order (a subclass may add fields that are not options: no metadata)."""
        return tuple(f for f in fields(cls) if "kind" in f.metadata)

    @classmethod
    def option_field(cls, name: str) -> Field:
        for f in cls.option_fields():
            if f.name == name:
                return f
        raise KeyError(f"{name!r} is not a merge option")

    @classmethod
    def names(cls, **where: Any) -> tuple[str, ...]:
        """The option names whose metadata match `where` (e.g. `names(keyword=True)`, `names(recipe=False)`)."""
        return tuple(f.name for f in cls.option_fields() if all(f.metadata[k] == v for k, v in where.items()))

    @classmethod
    def command_line_only(cls) -> dict[str, str]:
        """The options only the command line may set, with how to pass them (`output` -> "--output DIR")."""
        return {f.name: flag(f.name) + (f" {f.metadata['metavar']}" if f.metadata["metavar"] else "")
                for f in cls.option_fields() if not f.metadata["recipe"]}

    # ------------------------------------------------------------------ checks
    @classmethod
    def check_type(cls, name: str, value: Any) -> Any:
        """`value` with the type option `name` needs (ints stay ints, numbers become floats); refuse anything else.

        Booleans are refused for numbers (`True` is an int to Python, never a meant batch size)."""
        meta = cls.option_field(name).metadata
        kind = meta["kind"]

        def hint(what: str) -> str:  # not str.format: the value's text may hold braces (`method: {a: 1}`)
            return f"{name} must be {what} (CLI: {flag(name)}), got {shown(value)} ({type(value).__name__})"

        def as_float(number: Any) -> float:
            """float(number), refusing an int too long for a float (float() raises OverflowError past 1.8e308)."""
            try:
                return float(number)
            except OverflowError:
                digits = len(str(abs(int(number))))
                raise OptionError(f"{name} must be a number of float range, at most about 1.8e308 (CLI: "
                                  f"{flag(name)}), got an integer of {digits} digits") from None

        if value is None and meta["nullable"]:
            return None
        if value == ALL and meta["nullable"] and kind in ("int", "int_or_auto"):  # the CLI's word, written elsewhere
            raise OptionError(f"{name} takes '{ALL}' on the command line only ({flag(name)} {ALL}); for every "
                              f"calibration example write `{name}: null` in a recipe, {name}=None from Python")
        if kind in ("str", "bool"):
            if value is None:
                raise OptionError(f"`{name}` cannot be null")
            if kind == "str" and isinstance(value, os.PathLike):
                return os.fspath(value)
            if kind == "bool":
                if not _is_bool(value):
                    raise OptionError(f"`{name}` must be bool, got {shown(value)} ({type(value).__name__})")
                return bool(value)
            if not isinstance(value, str):
                raise OptionError(f"`{name}` must be str, got {shown(value)} ({type(value).__name__})")
            if looks_like_token(value):  # it would name a folder, a card, a log line, a job record
                raise OptionError(f"{name} (CLI: {flag(name)} {meta['metavar']}) looks like a Hugging Face access "
                                  f"token (not shown); {TOKEN_FIX}")
            return value
        if kind == "int":
            if not _is_int(value):
                raise OptionError(hint("an int"))
            return int(value)
        if kind == "number":
            if not _is_number(value):
                raise OptionError(hint("a number"))
            return as_float(value)
        if kind == "numbers":
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise OptionError(hint("a list of numbers"))
            return [as_float(v) for v in value]
        if kind == "gradient":
            if _is_number(value):
                return as_float(value)
            if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value):
                raise OptionError(hint("a number or a list of numbers (mergekit's layer gradient)"))
            return as_float(value[0]) if len(value) == 1 else [as_float(v) for v in value]
        if kind == "number_or_numbers":
            if _is_number(value):
                return as_float(value)
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise OptionError(hint("a number or a list of numbers (one per parent)"))
            # One value given as a list (the CLI's `--density 0.5`) is that value.
            return as_float(value[0]) if len(value) == 1 else [as_float(v) for v in value]
        if kind == "model":
            # From Python a model object is accepted too (merge() loads it); files and the CLI hold a reference.
            if isinstance(value, os.PathLike):
                return os.fspath(value)
            if isinstance(value, str):
                if not value:
                    raise OptionError(f"{name} must name a model (CLI: {flag(name)}), got an empty string")
                return value
            if type(value).__name__ in ("LoadedParent",) or hasattr(value, "state_dict"):
                return value
            raise OptionError(hint("a Hub id `org/name[@revision]`, a folder or a model"))
        if kind in ("int_or_auto", "number_or_auto"):
            if value == AUTO:
                return AUTO
            accepts, convert, what = (_is_int, int, "an int") if kind == "int_or_auto" else (
                _is_number, as_float, "a number")
            if not accepts(value):
                raise OptionError(hint(f"{what} or '{AUTO}'"))
            return convert(value)
        if kind == "device":
            # A torch.device is accepted by its text without importing torch (`torch.device("cuda", 0)` -> "cuda:0").
            if type(value).__module__ == "torch" and type(value).__name__ == "device":
                return str(value)
            if not isinstance(value, str):
                raise OptionError(hint("a string like 'cpu' or 'cuda:0'"))
            return value
        if kind == "dtype":
            # A torch dtype is accepted by name without importing torch (`torch.float32` -> "float32").
            if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
                value = str(value).removeprefix("torch.")
            if not isinstance(value, str):
                raise OptionError(hint(f"one of {', '.join(meta['choices'])} or a torch dtype"))
        if not isinstance(value, str):
            raise OptionError(hint("a string"))
        return value

    @classmethod
    def check(cls, name: str, value: Any) -> Any:
        """Type and range of one option; returns the normalised value. Raises `OptionError`."""
        value = cls.check_type(name, value)
        check = cls.option_field(name).metadata["check"]
        if check is not None:
            check(name, value, f"(CLI: {flag(name)})")
        return value

    @classmethod
    def check_all(cls, **options: Any) -> dict[str, Any]:
        """Check every given option (type, then range); return them normalised. Raises `OptionError`."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise OptionError(f"unknown option(s) {unknown}{closest_names(unknown, cls.names())}; valid options are: "
                              f"{', '.join(cls.names())}")
        return {name: cls.check(name, value) for name, value in options.items()}

    @classmethod
    def from_keywords(cls, **keywords: Any) -> MergeOptions:
        """The options of a `hf_mudsc.merge` call from its keyword arguments, every one checked (the same checks as
        a recipe and the CLI); keywords that are not merge() options are refused."""
        unknown = sorted(set(keywords) - set(cls.names(keyword=True)))
        if unknown:
            raise OptionError(f"unknown keyword argument(s) {unknown}{closest_names(unknown, cls.names(keyword=True))}"
                              "; merge() options are: "
                              f"{', '.join(cls.names(keyword=True))}")
        unchecked = {name for name in keywords if not cls.option_field(name).metadata["check_keyword"]}
        checked = cls.check_all(**{name: value for name, value in keywords.items() if name not in unchecked})
        return cls(**checked, **{name: keywords[name] for name in unchecked})

    # ------------------------------------------------------------------ derived views
    def values(self, **where: Any) -> dict[str, Any]:
        """{name: value} of the options whose metadata match `where`, in declaration order."""
        return {name: getattr(self, name) for name in self.names(**where)}

    def check_combination(self, parents: int | None = None) -> None:
        """Refuse options that contradict each other (each alone is valid). Raises `OptionError`. `parents`: how
        many parents are merged, if known: the refit's weight check reads only one weight per parent (another count
        is the caller's per-parent count check to refuse, with its own fix)."""
        if self.alpha == AUTO and self.reference_compat:
            raise OptionError(f"alpha='auto' chooses the balance factor, but reference_compat=True reproduces the "
                              f"reference's merge at a given one; pass a number ({flag('alpha')} 0.5) or drop "
                              f"{flag('reference_compat')}")
        if self.size != 1.0 and self.reference_compat:
            raise OptionError(f"size={self.size:g} widens the merged model, which reference_compat=True must keep "
                              f"equal to the reference's; drop one of {flag('size')} / {flag('reference_compat')}")
        if self.size_spend == "heads" and self.size != 1.0 and self.independent_heads:  # any method, auto too
            raise OptionError(f"{option_hint('size_spend')} 'heads' unfuses head pairs shared by q/k and v, which "
                              f"{option_hint('independent_heads')} pairs apart; drop one of them")
        if self.refit_norms and (self.refit in ("none", "repair") or self.reference_compat):
            because = (f"refit={self.refit!r} runs no ridge refit" if not self.reference_compat
                       else "reference_compat=True runs no refit")
            raise OptionError(f"refit_norms=True refits the LayerNorms within the ridge refit, but {because}; pass "
                              f"{flag('refit')} ridge, gate or auto without {flag('reference_compat')}, or drop "
                              f"{flag('refit_norms')}")
        if self.refit in REFITTING and self.reference_compat:
            raise OptionError(f"refit={self.refit!r} changes the merged weights, which reference_compat=True must "
                              f"keep equal to the reference's; drop one of {flag('refit')} / "
                              f"{flag('reference_compat')}")
        if self.refit in REFITTING:
            _check_refit_weights(self.refit, self.weights, parents)

    def keywords(self) -> dict[str, Any]:
        """The keyword arguments of `hf_mudsc.merge` these options stand for."""
        return self.values(keyword=True)


def check_option(name: str, value: Any) -> Any:
    """Type and range of one option (`MergeOptions.check`), for callers that check one value at a time."""
    return MergeOptions.check(name, value)
