"""The unit-matching family: MuDSC and its baselines (ZipIt, activation matching, Git Re-Basin weight matching).

All four share one implementation — the solve loop of docs/design.md §4 followed by the apply step — and
differ only in their parameters: which similarity they match on (activation, weight or the dual-space blend),
which matcher (align/zip, fixed or the user's) and whether they refine the start by sweeps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_mudsc.methods.registry import (
    PAPER_MUDSC,
    PAPER_REBASIN,
    PAPER_ZIPIT,
    MergeMethod,
    MethodContext,
    MethodResult,
    register_method,
)

if TYPE_CHECKING:
    from hf_mudsc.options import MergeOptions

#: Parent relations (`load.relation.ParentRelation.relation`) whose tensors line up unpermuted: only for these is the
#: identity start (A_i <-> B_i) a correspondence worth refining, as issue 12 specifies it. For a permuted copy or
#: independent initialisations it is an arbitrary pairing — on different-init pairs the starts end within 0.004 of
#: each other, under the margin a start must clear to be kept (docs/design.md §4.5) — and its refinement cost a
#: sixth of the default solve. An unjudged relation (None) keeps it.
LINED_UP_RELATIONS = ("same model", "shared base")

#: The reference implementation's merge normaliser (`reference_compat=True`; docs/design.md §4.8).
REFERENCE_NORMALIZER_EPS = 1e-5


def _weighted(weights: list[float] | None) -> bool:
    """Whether the weights change the merge: more than two parents, or unequal weights (two parents with equal
    weights are the paper's merge, recorded as before: no weights row)."""
    return weights is not None and (len(weights) > 2 or len(set(weights)) > 1)


@dataclass(frozen=True)
class UnitMatchingMethod(MergeMethod):
    """Match the units of every spec group, then fuse the parents through the matches.

    `matcher=None`: the user picks align or zip. `alpha=None`: the user's balance factor blends weight and
    activation similarity; a fixed `alpha` is 0.0 (activations only) or 1.0 (weights only). Without
    calibration (`needs_calibration=False`) no activation start exists and the similarity is the weights'.
    `extra_starts`: starts refined besides the activation start (`hf_mudsc.solve.loop.STARTS`; docs/design.md
    §4.5), dropped under `reference_compat`, which keeps the paper's single start; the identity start only for
    parents whose relation is in `LINED_UP_RELATIONS` (or not judged).
    """

    matcher: str | None = None
    alpha: float | None = None
    iterate: bool = True
    extra_starts: tuple[str, ...] = ()
    builds_concatenated_head: bool = True
    num_parents: int | None = None  # N >= 2 parents share one merged space (docs/design.md §4.13)

    @property
    def matches_units(self) -> bool:
        return True

    def starts_for(self, relation: str | None) -> tuple[str, ...]:
        """The extra starts refined for parents of this relation: the identity start only where the parents'
        tensors line up (`LINED_UP_RELATIONS`; None: not judged, every start)."""
        if relation is None or relation in LINED_UP_RELATIONS:
            return self.extra_starts
        return tuple(name for name in self.extra_starts if name != "identity")

    @property
    def supports_size(self) -> bool:
        return True

    def matcher_choices(self) -> tuple[str | None, ...]:
        return (self.matcher,) if self.matcher is not None else ("zip", "align")

    def used_matcher(self, requested: str) -> str | None:
        return self.matcher or requested

    def recorded_alpha(self, alpha: float) -> float | None:
        return float(alpha) if self.alpha is None else None

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        """The matcher, the user's balance factor (when not fixed) and the zip settings (zip matcher only)."""
        matcher = self.used_matcher(options.matcher)
        zipping = matcher == "zip"
        return {"matcher": matcher, "alpha": self.recorded_alpha(options.alpha),
                "zip_decay": options.zip_decay if zipping else None,
                "zip_budget": options.zip_budget if zipping else None, "size": options.size,
                "size_spend": options.size_spend if options.size != 1.0 else None,
                **({"weights": list(options.weights)} if _weighted(options.weights) else {})}

    def read_as_default(self, options: MergeOptions) -> tuple[str, ...]:
        """Weights it reads that change nothing (`_weighted`: two equal ones, each parent's share of every merged
        unit as without them), recorded as None like the default."""
        return ("weights",) if options.weights is not None and not _weighted(options.weights) else ()

    def check_options(self, options: MergeOptions, num_parents: int) -> None:
        """`reference_compat` reproduces the two-parent, equal-weight reference: refused with more parents or
        unequal weights; weights must be positive (each is a share of every merged unit)."""
        from hf_mudsc.errors import MergeInputError, option_hint

        if options.reference_compat and num_parents != 2:
            raise MergeInputError(f"{option_hint('reference_compat')} reproduces the reference's two-parent merge, "
                                  f"got {num_parents} parents; drop it to merge {num_parents} parents")
        if options.size_spend != "mlp" and options.size != 1.0 and num_parents != 2:
            raise MergeInputError(f"{option_hint('size_spend')} {options.size_spend!r} merges two parents, got "
                                  f"{num_parents}; use size_spend='mlp' (CLI: --size-spend mlp)")
        weights = options.weights
        if weights is not None and any(not w > 0 for w in weights):
            raise MergeInputError(f"{option_hint('weights')} of {self.name} must all be > 0 (each parent's share of "
                                  f"every merged unit), got {list(weights)}")
        if options.reference_compat and weights is not None and len(set(weights)) > 1:
            raise MergeInputError(f"{option_hint('reference_compat')} reproduces the reference's equal-weight merge; "
                                  f"drop {option_hint('weights')} (got {list(weights)})")

    def _shortcut(self, context: MethodContext) -> bool:
        """A search candidate is solved from the paper's start only (docs/design.md §4.4); the merge the search
        returns is solved again with every start."""
        return context.candidate and not context.options.reference_compat and bool(self.starts_for(context.relation))

    def _extra_starts(self, context: MethodContext) -> tuple[str, ...]:
        """The starts refined besides the paper's: none under `reference_compat` or for a search candidate."""
        if context.options.reference_compat or self._shortcut(context):
            return ()
        return self.starts_for(context.relation)

    def _solve_options(self, context: MethodContext, *, iterate: bool = True) -> Any:
        """The solve's settings (`hf_mudsc.solve.loop.SolveOptions`) for this context: the method's matcher, alpha
        and starts with the user's options. `iterate=False`: the first start alone, unrefined (`first_start`)."""
        from hf_mudsc.solve.loop import SolveOptions

        given = context.options
        starts = self._extra_starts(context)
        return SolveOptions(
            matcher=self.used_matcher(given.matcher),
            alpha=float(given.alpha) if self.alpha is None else self.alpha,
            use_activations=self.needs_calibration,
            iterate=self.iterate and iterate,
            zip_decay=given.zip_decay,
            zip_budget=given.zip_budget,
            independent_heads=given.independent_heads or given.reference_compat,
            normalizer_eps=REFERENCE_NORMALIZER_EPS if given.reference_compat else 0.0,
            seed=given.seed,
            device=context.device,
            extra_starts=starts if iterate else (),
            constant_units=not given.reference_compat,
        )

    def _solver(self, context: MethodContext, *, iterate: bool = True) -> Any:
        """The solve loop (`hf_mudsc.solve.loop.Solver`) over the context's parents and statistics."""
        from hf_mudsc.solve.loop import Solver

        parents = list(context.parents)
        more = {"others": parents[2:]} if len(parents) > 2 else {}  # two parents: the two-parent call as before
        if context.solve_cache is not None:  # the alpha="auto" search's shared alpha-free parts
            more["cache"] = context.solve_cache
        return Solver(context.solve_spec, parents[0], parents[1], context.correlations,
                      self._solve_options(context, iterate=iterate), **more)

    def first_start(self, context: MethodContext) -> list[Any] | None:
        """The activation matching (the paper's start, ZipIt's matching for zip), unrefined: None without
        calibration statistics (a weight-only method's start is itself a sweep)."""
        if not self.needs_calibration or context.correlations is None:
            return None
        # Without the search's cache: its key holds the solve's settings, so an unrefined solve would empty it.
        unrefined = self._solver(dataclasses.replace(context, solve_cache=None), iterate=False)
        return list(unrefined.solve(progress=False).matches)

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        from hf_mudsc.apply.weights import apply_matches, apply_matches_weighted
        from hf_mudsc.blas import torch_thread_count

        given = context.options
        parents = list(context.parents)
        solver = self._solver(context)
        options = solver.options
        shortcut = self._shortcut(context)
        result = solver.solve(progress=context.progress)
        matches = list(result.matches)
        if given.size != 1.0:  # the size budget (docs/design.md §4.12): MLP units, or the stream first, unfused
            from hf_mudsc.solve.widen import plan_budget, widen_budget

            plan = plan_budget(context.spec, context.parents, given.size, given.size_spend,
                               concatenate_classifier=context.concatenate_classifier)
            with torch_thread_count():  # its weight correlations' BLAS, as in the solve
                matches = widen_budget(context.solve_spec, matches, plan,
                                       lambda index: solver.similarity_of(index, result.matches),
                                       num_models=len(context.parents), normalizer_eps=options.normalizer_eps)
        weights = list(given.weights) if given.weights is not None else [1.0] * len(parents)
        if len(parents) == 2 and not _weighted(weights):
            parameters = apply_matches(context.spec, parents[0], parents[1], matches,
                                       concatenate_classifier=context.concatenate_classifier)
        else:
            parameters = apply_matches_weighted(context.spec, parents, matches, weights,
                                                concatenate_classifier=context.concatenate_classifier)
        return MethodResult(
            parameters=parameters,
            matches=matches,
            group_names=[g.name for g in context.spec.groups],
            group_values=result.group_values(),
            objective_history=result.objective_history,
            sweeps=result.sweeps,
            solve_start=result.start,
            start_objectives=dict(result.starts),
            similarity_alpha=options.alpha,
            full=not shortcut,
            solved_matches=list(result.matches) if given.size != 1.0 else None,
        )


MUDSC = register_method(UnitMatchingMethod(
    name="mudsc",
    pretty_name="MuDSC (merging under dual-space constraints)",
    paper=PAPER_MUDSC,
    description="Units matched on alpha * weight correlation + (1 - alpha) * activation correlation, "
    "refined by seeded coordinate sweeps from several starts, the activation matching (the paper's) first (the "
    "starts run and their final objectives: Solver sweeps); the activation start's solution is kept unless another "
    "ends clearly higher.",
    # weight_matching needs no extra start: its own start is the weight start, and on same-base parents it
    # already ends at the identity (docs/research/quality_probe.md §1). zipit/activation_align do not iterate.
    needs_calibration=True, iterate=True, extra_starts=("weight", "identity"),
))
ZIPIT = register_method(UnitMatchingMethod(
    name="zipit",
    pretty_name="ZipIt! (activation zip)",
    paper=PAPER_ZIPIT,
    description="Activation correlation only, greedy zip that may also fuse units within one model.",
    needs_calibration=True, alpha=0.0, iterate=False, matcher="zip",
))
ACTIVATION_ALIGN = register_method(UnitMatchingMethod(
    name="activation_align",
    pretty_name="Activation matching (permutation)",
    paper=PAPER_REBASIN,
    description="Activation correlation only, one Hungarian permutation per group.",
    needs_calibration=True, alpha=0.0, iterate=False, matcher="align",
))
WEIGHT_MATCHING = register_method(UnitMatchingMethod(
    name="weight_matching",
    pretty_name="Weight matching (Git Re-Basin)",
    paper=PAPER_REBASIN,
    description="Weight correlation only, Hungarian permutations refined by seeded coordinate sweeps.",
    needs_calibration=False, alpha=1.0, iterate=True, matcher="align",
))
