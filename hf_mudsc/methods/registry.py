"""The merge-method registry: one object per method, carrying what it needs and the function that merges.

`hf_mudsc.merge` loads and checks the parents, collects activation statistics when the method asks for
calibration data, then hands a `MethodContext` to `method.merge_parameters` and builds the model from the
parameters it returns. The default `method="auto"` is resolved to a registered method by
`hf_mudsc.methods.auto`. It never branches on a method's name; the API, the CLI's `--method` choices, the card,
the demo and the benchmarks all read this registry. Adding a method = one module with a `MergeMethod`
subclass + `register_method` (docs/adding_a_method.md).

Torch-free on purpose: `hf-mudsc merge --help` lists the methods without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hf_mudsc.errors import MergeInputError, flag

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from hf_mudsc.options import MergeOptions
    from hf_mudsc.solve.matchers import Match
    from hf_mudsc.spec import PermutationSpec

PAPER_MUDSC = "https://arxiv.org/abs/2403.01753"
PAPER_ZIPIT = "https://arxiv.org/abs/2305.03053"
PAPER_REBASIN = "https://arxiv.org/abs/2209.04836"
# The `method` option's default: not a registry entry but a choice among them from the parents' relation
# (`hf_mudsc.methods.auto.choose_method`).
AUTO = "auto"


@dataclass(frozen=True)
class MethodContext:
    """Everything a method may read to merge N loaded parents (parameters on the CPU, never modified)."""

    spec: PermutationSpec
    """The parents' permutation spec: groups, members, attention heads (what apply maps)."""
    solve_spec: PermutationSpec
    """The spec to compute weight similarities with (the classifier left out when heads are concatenated)."""
    parents: Sequence[Mapping[str, torch.Tensor]]
    """Each parent's parameters, in parent order. When the heads are concatenated (`concatenate_classifier`) and
    the method does not build the concatenated head itself (`builds_concatenated_head`), the classifier tensors
    are left out here and the pipeline concatenates them."""
    base: Mapping[str, torch.Tensor] | None
    """The common base's parameters when `base=` was given or found (else None); same names as the parents'
    (a base classifier of another label set is left out)."""
    models: Sequence[PreTrainedModel]
    """The loaded parents (for methods that run them: `needs_data`)."""
    batches: Callable[[], Iterable[dict]] | None
    """A new pass over the calibration input batches at each call (None without calibration data)."""
    correlations: Sequence[torch.Tensor] | None
    """One activation correlation `(N·n, N·n)` per spec group (the N parents' units stacked in parent order); None
    unless the method needs calibration."""
    concatenate_classifier: bool
    """The parents' label sets differ: the merged classifier is parent 0's rows, then parent 1's, ..."""
    options: MergeOptions
    """Every merge option, checked (`alpha`, `matcher`, `seed`, `weights`, `density`, ...)."""
    device: str
    progress: bool = False
    solve_cache: Any = None
    """What successive solves of one merge may share (`hf_mudsc.solve.loop.SolveCache`, the `alpha="auto"`
    search's): the parts of a solve that do not depend on alpha. None: every solve starts from scratch."""
    relation: str | None = None
    """How the parents relate by their weights (`load.relation.ParentRelation.relation`; for N parents the loosest
    relation to parent 0), None when not judged: unit matching refines the identity start only for parents whose
    tensors line up (`methods.matching.LINED_UP_RELATIONS`)."""
    candidate: bool = False
    """A candidate merge of the `alpha="auto"` search, only to be scored: the method may merge more cheaply (unit
    matching: the paper's single start) and say so (`MethodResult.full`); the search merges the chosen one again
    in full."""

    @property
    def params_a(self) -> Mapping[str, torch.Tensor]:
        """Parent 0's parameters (two-parent methods)."""
        return self.parents[0]

    @property
    def params_b(self) -> Mapping[str, torch.Tensor]:
        """Parent 1's parameters (two-parent methods)."""
        return self.parents[1]


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
    calibration_examples: int = 0
    """Examples read per pass over the calibration data, by a method that reads it itself (`needs_data`)."""
    full: bool = True
    """False: a cheaper merge for a search candidate (`MethodContext.candidate`), not the merge to return."""
    solved_matches: list[Match | None] | None = None
    """The solve's matches when a size budget widened them into `matches` (None: not widened): the similarity the
    units were matched on maps the other groups' axes by these (docs/design.md §4.12), so the diagnostics do too."""


@dataclass(frozen=True)
class PassFacts:
    """What the dry run knows of one calibration example's work in a method's own data pass (`data_pass_flops`),
    from parent A's shapes: no weights are read (docs/design.md, "Dry run")."""

    forward: float
    """FLOPs of one example's forward pass (`plan.forward_flops`)."""
    grams: float
    """FLOPs of one example's float64 input Grams of every linear layer (`Σ 4 · tokens · in²`: a float64 product
    counted twice)."""
    parameters: int
    classes: int
    """Outputs of the classification head (0 without one)."""
    blocks: int
    """Transformer blocks (`solve.regmean.transformer_blocks`)."""
    layers: tuple[tuple[int, int, int | None], ...] = ()
    """Every `nn.Linear` as (in features, out features, index of the transformer block holding it or None), in the
    model's order: the shapes of a method's per-layer working set (`working_bytes`)."""


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: what it needs (the pipeline checks and provides it) and how it merges.

    Subclasses implement `merge_parameters`; the other hooks say what the method records.
    """

    name: str
    """The registry key: `method=` (CLI `--method`, recipe `method:`), lower case."""
    pretty_name: str
    """The name the card and `--help` show (`"TIES-Merging"`)."""
    paper: str | None
    """A link to the method's paper, for the card (None: none)."""
    description: str
    """One sentence on how it merges, for the card's Method row."""
    needs_calibration: bool = False
    """Needs activation statistics (`context.correlations`), i.e. calibration data."""
    needs_base_model: bool = False
    """Needs the parents' common base (`context.base`): `base=` (CLI: --base), or the parents' model cards' one."""
    num_parents: int | None = 2
    """How many parents it merges: a number, or None for any N >= 2."""
    needs_data: bool = False
    """Reads the calibration batches itself (`context.batches`, e.g. RegMean, Fisher), without the statistics."""
    demo_options: tuple[tuple[str, Any], ...] = ()
    """(option, value) pairs its runs in the demo and benchmarks add (`method_runs`): a method with an option that
    has no default (layer_swap's block ranges) is run with these."""
    streams: bool = False
    """Reads each parent's tensor only while merging that name (tensor-wise methods): merge() then gives it
    parents after the first and the base as `LazyParameters` read from disk one tensor at a time, so memory does
    not grow with the number of parents (docs/design.md §4.10)."""
    needs_classifier: bool = False
    """Reads the parents' predictive distribution (a classification head's logits: Fisher), so parents whose
    architecture has no head are refused from parent A's configuration, before any weights (`check_classifier`)."""
    needs_gradients: bool = False
    """Takes the gradients of the parents' outputs with respect to their parameters (Fisher), so parents whose
    parameters are inference tensors (made under `torch.inference_mode()`) are refused before any work."""
    builds_concatenated_head: bool = False
    """With different label sets, builds the concatenated classifier itself (the unit-matching apply step does);
    otherwise the classifier is left out of `context.parents` and the pipeline concatenates it."""

    @property
    def matches_units(self) -> bool:
        """Whether the merge report's `matches` say which units were fused (False: no unit matching)."""
        return False

    @property
    def supports_size(self) -> bool:
        """Whether it can spend a size budget (`size` > 1: a merged model wider than one parent, docs/design.md
        §4.12); the others keep one parent's shape and refuse `size` != 1."""
        return False

    def first_start(self, context: MethodContext) -> list[Any] | None:
        """The unit matches of the method's first start, before any refinement (unit matching: the activation
        matching, the paper's start), for a cheap look at how the parents' units relate (`auto`'s correspondence
        check, docs/design.md §4.8); None for a method that has none."""
        return None

    def matcher_choices(self) -> tuple[str | None, ...]:
        """The matchers this method runs with, the demo's first; `(None,)` when the matcher plays no part."""
        return (None,)

    def used_matcher(self, requested: str) -> str | None:
        """The matcher recorded in the config and card for the user's `matcher` option."""
        return None

    def recorded_alpha(self, alpha: float) -> float | None:
        """The balance factor recorded in the config and card (None where the method does not read it)."""
        return None

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        """The per-method options (`MergeOptions` fields declared `per_method`) this method reads, with the values
        it used (a method default resolved): the config and card record these; every other per-method option is
        recorded as None (its card row hidden)."""
        return {}

    @property
    def pairs_attention_heads(self) -> bool:
        """Whether its merge pairs attention heads, so that `independent_heads` changes it: the unit-matching
        methods (the others fuse every tensor by position)."""
        return self.matches_units

    def read_as_default(self, options: MergeOptions) -> tuple[str, ...]:
        """Per-method options it reads but records as None (`used_options`) because the value given equals its
        default (unit matching's two equal weights): not "unread" (`diagnostics.unread_options`)."""
        return ()

    def data_pass_flops(self, facts: PassFacts, parents: int) -> float:
        """FLOPs per calibration example of the method's own pass over the data with `parents` parents (a method
        that reads the batches itself, `needs_data`), for the dry run's estimate; 0 for the others (calibration's
        statistics are counted apart)."""
        return 0.0

    def working_bytes(self, facts: PassFacts, parents: int) -> float:
        """Bytes the method holds at its peak while merging `parents` parents, besides their weights, for the dry
        run's peak memory (docs/design.md, "Dry run"): by default the merged tensors (float32, 4 bytes per
        parameter); a method that holds more (float64 systems, Grams, Fisher sums) says so."""
        return 4.0 * facts.parameters

    def check_options(self, options: MergeOptions, num_parents: int) -> None:
        """Refuse option values this method cannot use with `num_parents` parents (raise `MergeInputError`, one
        line naming the option); merge() calls it before anything is loaded (after `auto` chose, for `auto`)."""

    def option_warnings(self, options: MergeOptions, num_parents: int) -> list[str]:
        """What the method does other than its options say, though it can run with them (breadcrumbs' gamma when
        density + gamma > 1): said as warnings, recorded with the merge's other option warnings and listed by the
        dry run. None by default."""
        return []

    @property
    def checks_shapes(self) -> bool:
        """Whether the method has a `check_shapes` rule (overrides it): a caller that would build the shapes for it
        only (the service at POST: a weightless model needs torch) skips the others."""
        return type(self).check_shapes is not MergeMethod.check_shapes

    def check_shapes(self, options: MergeOptions, shapes: Callable[[], Mapping[str, tuple[int, ...]]]) -> None:
        """Refuse option values that keep nothing of tensors of these shapes (raise `MergeInputError`, one line):
        `shapes()` gives parent A's parameter shapes by name (built from its config, so called only by a method that
        needs them). merge() and the CLI call it before any weights are read (`pipeline.check_before_weights`), the
        dry run from the configs; `auto`'s choice is checked when it merges."""

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        """Merge the parents' parameters; runs on the main process only, after calibration."""
        raise NotImplementedError(f"merge method {self.name!r} does not implement merge_parameters")


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (the API, CLI choices, card, demo and benchmarks see it from then on).

    Returns:
        `method` itself, so that it can be registered where it is defined.

    Raises:
        TypeError: `method` is not a `MergeMethod`. ValueError: its name is already registered.
    """
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
    """The registered method `name` (not `auto`, which `hf_mudsc.methods.auto.choose_method` resolves).

    Returns:
        The `MergeMethod` registered under `name`; an unknown name raises ValueError listing the known ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


# Suggested first when a merge has no calibration data: unit matching by weights alone (different inits, two
# parents), then the usual dataless same-base choices.
SUGGESTED_WITHOUT_DATA = ("weight_matching", "ties", "linear")


def data_free_methods(num_parents: int) -> list[str]:
    """Registered methods that merge `num_parents` parents without calibration data, the suggested ones first
    (error messages offer them when data is missing)."""
    fits = [m.name for m in METHODS.values()
            if not (m.needs_calibration or m.needs_data) and m.num_parents in (None, num_parents)]
    preferred = [name for name in SUGGESTED_WITHOUT_DATA if name in fits]
    return preferred + [name for name in fits if name not in preferred]


def check_size(method: MergeMethod, size: float, chosen: str | None = None) -> None:
    """Refuse a size budget (`size` != 1) for a method that keeps one parent's shape, in one line (`chosen`: why
    `auto` chose it). merge() and the CLI call it before any weights are loaded (after the choice, for `auto`)."""
    if size == 1.0 or method.supports_size:
        return
    why = f"method 'auto' chose {method.name!r} ({chosen}), which" if chosen else f"method {method.name!r}"
    able = ", ".join(m.name for m in METHODS.values() if m.supports_size) or "none registered"
    raise MergeInputError(f"{why} keeps one parent's shape, so it cannot spend size={size:g} (CLI: {flag('size')}); "
                          f"use size=1 or a unit-matching method: {able} (CLI: --method)")


def method_runs(label_format: str = "{name} ({matcher})", *, with_base: bool = False
                ) -> list[tuple[str, dict[str, Any]]]:
    """Every registered method with each of its matchers, in registry order: `(label, merge options)`.

    A method with several matchers gets one run per matcher, labelled with `label_format`; the others are
    labelled by their name. The demo and the benchmarks compare the methods from this list. Methods that need a
    base model are listed only `with_base` (the demo's two parents have none).
    """
    runs: list[tuple[str, dict[str, Any]]] = []
    for method in METHODS.values():
        if method.needs_base_model and not with_base:
            continue
        choices = method.matcher_choices()
        for matcher in choices:
            options: dict[str, Any] = {"method": method.name, **dict(method.demo_options)}
            if matcher is not None:
                options["matcher"] = matcher
            label = label_format.format(name=method.name, matcher=matcher) if len(choices) > 1 else method.name
            runs.append((label, options))
    return runs


def check_classifier(method: MergeMethod, model: Any) -> None:
    """Refuse, before any weights are read, parents a method that reads a classification head's logits
    (`needs_classifier`) cannot merge: `model` is parent A (or a weightless model built from its config), whose
    architecture spec says whether it has a head, and whose config whether the head is read by one softmax (a
    regression or multi-label head is refused: `head_rule_message`)."""
    if not method.needs_classifier:
        return
    from hf_mudsc.architectures import spec_for
    from hf_mudsc.calibrate.fisher import head_rule_message, no_head_message

    if spec_for(model).classifier is None:
        raise MergeInputError(no_head_message(method.name))
    refusal = head_rule_message(method.name, model.config)
    if refusal is not None:
        raise MergeInputError(refusal)
