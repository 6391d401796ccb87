"""The default `method="auto"`: a registered method chosen from how the parents relate (docs/design.md §4.8).

The rule is a table (relation of the parents, base given?) -> candidate methods, the first registered one wins:

- different initializations (`independent`) or a `permuted copy`: units must be matched first -> `mudsc`;
- fine-tunes of one base (`shared base`) or the `same model`: the identity correspondence already holds ->
  `regmean` when calibration data is given (first in FusionBench's comparison and in ours,
  `scripts/bench_same_base.py`: vision 97.8 vs linear 96.1 and ties 94.3, text 103.6 vs 96.8 and 98.6, normalised
  accuracy); without data `ties` when the base is given (mergekit's and FusionBench's usual dataless choice for N
  parents), else `linear` — and `linear` too when a parent is no fine-tune of the base given (the pipeline measures
  each parent's relation to it: `hf_mudsc.pipeline`, its task vector would be as large as its weights).

With calibration data and equally weighted parents (any number), `refit="auto"` then refits after regmean
(`hf_mudsc.options.resolve_refit`, docs/design.md §4.9): on the same-init digit ViT pairs (issue 12, 9 pairs at
widths 64/128/256, `scripts/same_init_variants.py`) regmean alone lost 1.8 joint points to plain averaging (mean
over the pairs) and up to 2.7 points per task; regmean + refit ties averaging's joint (92.3 both; -0.6 at width 128)
and stays within 0.7 points of the parents per task. Three parents (15 sets, `--parents 3`): regmean alone 3.6
joint points below averaging, regmean + refit 1.7 above (docs/benchmarks/same_init_three.md). The reason string
says which and why; the log, `config.mudsc["method_choice_reason"]` and the card carry it.

A small weight distance does not prove that the units still correspond: two fine-tunes of one base trained long
at a high rate (held-out BERT / RoBERTa pairs at distance 0.45-0.60) keep weights that line up unpermuted, yet
averaging them position by position collapses (a task at 0.30 with regmean, linear, and either with the refit)
while unit matching keeps both tasks (mudsc + refit 1.00 / 0.99). So with calibration data the same-base choice
is confirmed on the activations (`CORRESPONDENCE_CHECK`, docs/design.md §4.8): the unit-matching solve runs, and
only if it leaves most units where they are (`IN_PLACE_MAJORITY`) does the same-base method merge; otherwise the
solve's own merge is kept. Fine-tunes of a pretrained base leave 97-100 % in place (MiniLM pairs, the benchmark's
same-init ViTs), the collapsing pairs 0-0.4 %.

The solve's first start — the activation matching, before its sweeps and the other starts — is looked at first:
when it alone already leaves most units in place, the units correspond and the solve is skipped (`check_record`
says so; on a MiniLM fine-tune pair the solve is most of the check's cost). Only the confirming case is shortened,
and the start is read with the zip matcher (`START_MATCHER`), which keeps few units in place wherever they moved;
a start that moved most units decides nothing, and the solve runs as before. Measured
(`scripts/correspondence_start.py`): the zip start keeps 67-85 % of units in place on the six MiniLM fine-tune
pairs (the solve 97-100 %; `auto` now 1.58x regmean's time, median of three pairs, against 4.43x when the solve
always ran), 0-4 % on the 15 pairs whose units moved (the solve 0-0.9 %), and 3-20 % on the 15 same-init digit ViT
pairs, where the solve then finds the identity as before.
Torch-free (reads the relation's label and distance, and the share of units a solve left in place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from hf_mudsc.methods.registry import AUTO, METHODS, MergeMethod
from hf_mudsc.option_values import CHECK_FIRST_START, check_solved_by

# (relation of the parents, base given) -> methods in order of preference; the first registered one is chosen.
UNIT_MATCHING = ("mudsc",)
CHOICES: dict[tuple[str, bool], tuple[str, ...]] = {
    ("independent", False): UNIT_MATCHING,
    ("independent", True): UNIT_MATCHING,
    ("permuted copy", False): UNIT_MATCHING,
    ("permuted copy", True): UNIT_MATCHING,
    ("shared base", False): ("linear",),
    ("shared base", True): ("ties", "linear"),
    ("same model", False): ("linear",),
    ("same model", True): ("linear",),  # a trimmed or scaled task vector would not give the model back
}
# With calibration data, parents whose units already correspond are merged by a data method first.
WITH_DATA: dict[str, tuple[str, ...]] = {"shared base": ("regmean",), "same model": ("regmean",)}
WHY = {
    "independent": "parents come from different initializations, so their units must be matched",
    "permuted copy": "parents are permuted copies of one model, so their units must be matched",
    "shared base": "parents share a base, so the identity correspondence holds",
    "same model": "parents are the same model, so the identity correspondence holds",
}


# The unit-matching method whose solve confirms a same-base choice on the activations, and the share of units
# (over every matched group, each unit of every parent at one index fused together) it must leave in place: most
# of them. Not fitted: any cut from 0.25 to 0.97 separates the pairs measured (docs/design.md §4.8).
CORRESPONDENCE_CHECK = "mudsc"
IN_PLACE_MAJORITY = 0.5
# The matcher of the first start the check looks at before its solve, whatever the merge's: zip, which may also fuse
# units within one parent, keeps few in place where the units moved (0-4 %, the solve 0-0.9 %) while align's start
# came within 6 points of the majority there (44 %); fine-tunes whose units correspond: zip 67-85 %, align 88-95 %
# (`scripts/correspondence_start.py`).
START_MATCHER = "zip"


def is_auto(method: str) -> bool:
    """Whether the `method` option asks for the automatic choice."""
    return method == AUTO


def choose_method(relation: str, weight_distance: float, *, has_base: bool, has_data: bool = False
                  ) -> tuple[MergeMethod, str]:
    """The method `auto` picks for parents with this relation (`hf_mudsc.load.relation.ParentRelation`), and why.

    Raises ValueError when none of the candidates is registered (a plug-in removed them)."""
    candidates = CHOICES.get((relation, has_base))
    if candidates is None:
        raise ValueError(f"method 'auto' cannot choose for parents whose relation is {relation!r}")
    with_data = WITH_DATA.get(relation, ()) if has_data else ()
    for name in with_data:
        if name in METHODS:
            reason = (f"{WHY[relation]} and calibration data is given (relative weight distance "
                      f"{weight_distance:.3g}): {name}")
            return METHODS[name], reason
    for name in candidates:
        if name in METHODS:
            base = " and the base is given" if has_base else ""
            reason = (f"{WHY[relation]}{base} (relative weight distance {weight_distance:.3g}): {name}")
            return METHODS[name], reason
    raise ValueError(f"method 'auto' would choose one of {', '.join(candidates)} for parents whose relation is "
                     f"{relation!r}, but none is registered; pass method= (CLI: --method)")


def correspondence_checker(relation: str, chosen: MergeMethod, *, has_data: bool, reference_compat: bool
                           ) -> MergeMethod | None:
    """The unit-matching method whose solve must confirm `auto`'s choice `chosen` for parents of this relation, or
    None: only a data method chosen for fine-tunes of one base (`WITH_DATA`) is confirmed — the same model needs no
    check, a dataless choice has no activations to check on, and `reference_compat=True` keeps the paper's single
    start, which does not find the identity even where it holds."""
    if (not has_data or reference_compat or chosen.name not in WITH_DATA.get(relation, ())
            or relation == "same model" or CORRESPONDENCE_CHECK not in METHODS):
        return None
    return METHODS[CORRESPONDENCE_CHECK]


def pending_reason(chosen: MergeMethod, checker: MergeMethod, weight_distance: float) -> str:
    """What `auto` says of a same-base choice `checker`'s solve has yet to confirm: the choice, conditional — not yet
    "the identity correspondence holds", which only the check can conclude (`confirm_choice` says the outcome)."""
    return (f"parents share a base by their weights (relative weight distance {weight_distance:.3g}) and calibration "
            f"data is given: {chosen.name} if their units correspond, which {checker.name}'s unit matching checks "
            "first")


def units_correspond(in_place: float) -> bool:
    """Whether a unit matching that left the share `in_place` of units where they are says the units correspond:
    most of them stayed (`IN_PLACE_MAJORITY`)."""
    return in_place >= IN_PLACE_MAJORITY


def check_record(checker: MergeMethod, parents: Sequence[str], in_place: float, *, first_start: bool = False
                 ) -> dict[str, Any]:
    """What `config.mudsc["correspondence_check"]` records of a check: the solve's method, the parents it solved
    (letters), the share of units it left in place, whether the units correspond (`units_correspond`), and — only
    when the solve's first start decided alone (`first_start`) — `"solved": CHECK_FIRST_START`."""
    record = {"method": checker.name, "parents": list(parents), "units_in_place": round(in_place, 6),
              "holds": units_correspond(in_place)}
    return {**record, "solved": CHECK_FIRST_START} if first_start else record


def confirm_choice(chosen: MergeMethod, reason: str, checker: MergeMethod, in_place: float, weight_distance: float,
                   pair: str = "", *, first_start: bool = False) -> tuple[MergeMethod, str]:
    """`auto`'s final method and reason once `checker`'s solve left the share `in_place` of units where they are:
    `chosen` (the same-base method) when most units stay, else `checker` itself. `pair`: the two parents solved, when
    more were given (e.g. "parents A and C"). `first_start`: the solve's first start alone gave the share."""
    solved = f" of {pair}" if pair else ""
    by = check_solved_by(checker.name, first_start=first_start)
    share = f"{by} on the calibration data leaves {in_place:.1%} of units{solved} in place"
    if units_correspond(in_place):  # "... (relative weight distance d): name" -> "... (...; share): name"
        said, name = reason.rsplit("): ", 1)
        return chosen, f"{said}; {share}): {name}"
    return checker, (f"parents share a base by their weights (relative weight distance {weight_distance:.3g}), but "
                     f"their units do not correspond on the calibration data: {share}, and a same-base method needs "
                     f"at least {IN_PLACE_MAJORITY:.0%}: {checker.name}")


def planned_method(has_data: bool) -> MergeMethod:
    """What a dry run plans for `auto`, which decides from weights a dry run does not read: the costlier candidate
    the data allows (unit matching when calibration data is given, the plain average otherwise)."""
    candidates = UNIT_MATCHING if has_data else CHOICES[("shared base", False)]
    for name in candidates:
        if name in METHODS:
            return METHODS[name]
    raise ValueError(f"method 'auto' would plan one of {', '.join(candidates)}, but none is registered; pass "
                     "method= (CLI: --method)")


def possible_methods(*, has_data: bool, has_base: bool) -> list[MergeMethod]:
    """Every registered method `auto` may choose, whatever the parents' relation (which a dry run does not know):
    the dry run warns of an option only when none of them reads it, as the merge then will."""
    names = [name for (_, base), candidates in CHOICES.items() if base == has_base for name in candidates]
    names += [name for candidates in WITH_DATA.values() for name in candidates] if has_data else []
    return [METHODS[name] for name in dict.fromkeys(names) if name in METHODS]


def choice_refusals(options: Any, num_parents: int, *, has_data: bool, has_base: bool) -> dict[str, str]:
    """What each method `auto` may choose here (`possible_methods`) would refuse before loading, as an explicit
    method's options are refused (its parent count, calibration data it needs, `check_size`, `check_options`):
    method name -> the one-line refusal. The relation that picks among them is known from the weights only."""
    from hf_mudsc.methods.registry import check_size

    refused: dict[str, str] = {}
    for method in possible_methods(has_data=has_data, has_base=has_base):
        try:
            if method.num_parents is not None and method.num_parents != num_parents:
                raise ValueError(f"method {method.name!r} merges exactly {method.num_parents} parents, got "
                                 f"{num_parents}")
            if (method.needs_calibration or method.needs_data) and not has_data:
                raise ValueError(f"method {method.name!r} needs calibration data (CLI: --calibration)")
            check_size(method, options.size)
            method.check_options(options, num_parents)
        except ValueError as error:
            refused[method.name] = str(error)
    return refused


def check_choices(options: Any, num_parents: int, *, has_data: bool, has_base: bool) -> list[str]:
    """Refuse `auto` before anything is loaded when every method it may choose refuses these options (else the
    merge read every tensor of the parents to choose, then refused): one line with each method's reason. When only
    some refuse, the dry run's warnings (returned): which choice would be refused, and why. A data method refused
    for want of data is not warned of (without data auto never takes one that merges)."""
    from hf_mudsc.errors import MergeInputError

    possible = [method.name for method in possible_methods(has_data=has_data, has_base=has_base)]
    refused = choice_refusals(options, num_parents, has_data=has_data, has_base=has_base)
    if possible and len(refused) == len(possible):
        reasons = "; ".join(f"{name}: {_without_name(name, text)}" for name, text in refused.items())
        raise MergeInputError(f"method 'auto' chooses among {', '.join(possible)} from the parents' weights, and "
                              f"each refuses these options — {reasons}; change them, or pass method= (CLI: --method)")
    return [f"method auto chooses {name} only for some parents (it decides from their weights at merge time); if it "
            f"chooses {name}, the merge is refused: {_without_name(name, text)}"
            for name, text in refused.items() if has_data or not (METHODS[name].needs_calibration
                                                                   or METHODS[name].needs_data)]


def _without_name(name: str, text: str) -> str:
    """A method's refusal without its leading "method 'name': " (the caller names the method)."""
    return text.removeprefix(f"method {name!r}: ")


def refit_runs(method: MergeMethod, refit: str, *, has_data: bool, num_parents: int, reference_compat: bool,
               rereadable: bool, weights: list[float] | None = None) -> str:
    """The refit that runs for `method`: "none", "ridge" or "gate" (`refit="auto"` resolved: a unit-matching method,
    or a method that reads the calibration data itself with equally weighted parents, given data:
    `hf_mudsc.options.resolve_refit`)."""
    from hf_mudsc.options import resolve_refit

    return resolve_refit(refit, matches_units=method.matches_units, has_data=has_data, num_parents=num_parents,
                         reference_compat=reference_compat, rereadable=rereadable, reads_data=method.needs_data,
                         weights=weights)


ALPHA_HANDED = 0.5
"""The balance factor a method is handed under `alpha="auto"`: each candidate's while the search runs, this for a
method that runs no search (it does not read α), which the recipe then records instead of `auto`."""


def handed_options(options: Any, num_parents: int) -> Any:
    """`options` as a method reads them: `weights` one per parent (1 each when not given), and `alpha="auto"` handed
    as `ALPHA_HANDED` until the search sets each candidate. The merge, its dry run and the search's check share it."""
    alpha = ALPHA_HANDED if options.alpha == AUTO else options.alpha
    return dataclasses.replace(options, weights=list(options.weights or [1.0] * num_parents), alpha=alpha)


def reference_compat_unread(method: MergeMethod, options: Any) -> bool:
    """Whether `reference_compat=True` (`options.reference_compat`) was given to a method that matches no units (e.g.
    the regmean `auto` picks for fine-tunes of one base): there is no reference merge to reproduce, and the option
    only keeps `refit="auto"` off."""
    return bool(options.reference_compat) and not method.matches_units


def alpha_searched(method: MergeMethod, options: Any, num_parents: int) -> bool:
    """Whether `alpha="auto"` (`options.alpha`) runs its search with `method` (docs/design.md §4.4): a method that
    matches units on activation statistics and reads α. The merge and its dry run record `auto` only then."""
    if options.alpha != AUTO or not method.needs_calibration:
        return False
    return method.used_options(handed_options(options, num_parents)).get("alpha") is not None
