"""The merge-method registry: one object per method, carrying what it needs and the function that merges.

`hf_mudsc.merge` loads and checks the parents, collects activation statistics when the method asks for
calibration data, then hands a `MethodContext` to `method.merge_parameters` and builds the model from the
parameters it returns. It never branches on a method's name; the API, the CLI's `--method` choices, the card,
the demo and the benchmarks all read this registry. Adding a method = one module with a `MergeMethod`
subclass + `register_method` (docs/adding_a_method.md).

Torch-free on purpose: `hf-mudsc merge --help` lists the methods without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from hf_mudsc.solve.matchers import Match
    from hf_mudsc.spec import PermutationSpec

PAPER_MUDSC = "https://arxiv.org/abs/2403.01753"
PAPER_ZIPIT = "https://arxiv.org/abs/2305.03053"
PAPER_REBASIN = "https://arxiv.org/abs/2209.04836"


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may read to merge two loaded parents (parameters on the CPU, never modified)."""

    spec: PermutationSpec
    """The parents' permutation spec: groups, members, attention heads (what apply maps)."""
    solve_spec: PermutationSpec
    """The spec to compute weight similarities with (the classifier left out when heads are concatenated)."""
    params_a: Mapping[str, torch.Tensor]
    params_b: Mapping[str, torch.Tensor]
    correlations: Sequence[torch.Tensor] | None
    """One activation correlation `(2n, 2n)` per spec group; None unless the method needs calibration."""
    concatenate_classifier: bool
    """The parents' label sets differ: the merged classifier is A's rows then B's."""
    matcher: str
    alpha: float
    zip_decay: float
    zip_budget: float
    independent_heads: bool
    reference_compat: bool
    seed: int
    device: str
    progress: bool = False


@dataclass
class MethodResult:
    """What a method produced: the merged parameters (parent A's names) and, for the report, how it matched."""

    parameters: dict[str, torch.Tensor]
    matches: list[Match | None]
    group_names: list[str] = field(default_factory=list)
    group_values: list[float] = field(default_factory=list)
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0
    solve_start: str | None = None
    """The start whose solution was kept (None: no solve)."""
    start_objectives: dict[str, float] = field(default_factory=dict)
    """Each start's final objective, in the order the starts ran."""
    similarity_alpha: float | None = None
    """The weight share of the similarity the units were matched on (None: no matching), for the diagnostics."""


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: what it needs (the pipeline checks and provides it) and how it merges.

    Subclasses implement `merge_parameters`; the other hooks say what the method records.
    """

    name: str
    pretty_name: str
    paper: str | None
    description: str
    needs_calibration: bool = False
    """Needs activation statistics (`context.correlations`), i.e. calibration data."""
    needs_base_model: bool = False
    """Needs the parents' common ancestor (same-base methods; `merge()` cannot take one yet)."""
    num_parents: int = 2

    @property
    def matches_units(self) -> bool:
        """Whether the merge report's `matches` say which units were fused (False: no unit matching)."""
        return False

    def matcher_choices(self) -> tuple[str | None, ...]:
        """The matchers this method runs with, the demo's first; `(None,)` when the matcher plays no part."""
        return (None,)

    def used_matcher(self, requested: str) -> str | None:
        """The matcher recorded in the config and card for the user's `matcher` option."""
        return None

    def recorded_alpha(self, alpha: float) -> float | None:
        """The balance factor recorded in the config and card (None where the method does not read it)."""
        return None

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        """Merge the parents' parameters; runs on the main process only, after calibration."""
        raise NotImplementedError(f"merge method {self.name!r} does not implement merge_parameters")


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (the API, CLI choices, card, demo and benchmarks see it from then on)."""
    if not isinstance(method, MergeMethod):
        raise TypeError(f"register_method takes a MergeMethod, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> MergeMethod:
    """Remove a registered method (tests and plug-ins that register one temporarily)."""
    try:
        return METHODS.pop(name)
    except KeyError:
        raise ValueError(f"merge method {name!r} is not registered") from None


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


def method_runs(label_format: str = "{name} ({matcher})") -> list[tuple[str, dict[str, Any]]]:
    """Every registered method with each of its matchers, in registry order: `(label, merge options)`.

    A method with several matchers gets one run per matcher, labelled with `label_format`; the others are
    labelled by their name. The demo and the benchmarks compare the methods from this list.
    """
    runs: list[tuple[str, dict[str, Any]]] = []
    for method in METHODS.values():
        choices = method.matcher_choices()
        for matcher in choices:
            options: dict[str, Any] = {"method": method.name}
            if matcher is not None:
                options["matcher"] = matcher
            label = label_format.format(name=method.name, matcher=matcher) if len(choices) > 1 else method.name
            runs.append((label, options))
    return runs
