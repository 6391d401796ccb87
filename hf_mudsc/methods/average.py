"""Plain weight averaging: no unit matching — `average` (two parents, the baseline that fails across
initializations) and `linear` (N parents, weighted: mergekit's `linear`, the model soup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_mudsc.methods.registry import MergeMethod, MethodContext, MethodResult, register_method

if TYPE_CHECKING:
    from hf_mudsc.options import MergeOptions

PAPER_SOUPS = "https://arxiv.org/abs/2203.05482"


@dataclass(frozen=True)
class AverageMethod(MergeMethod):
    """The mean of the two parents' tensors (the classifier still concatenated when the label sets differ)."""

    builds_concatenated_head: bool = True

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        from hf_mudsc.apply.weights import apply_matches

        matches = [None] * len(context.spec.groups)
        parameters = apply_matches(context.spec, context.params_a, context.params_b, matches,
                                   concatenate_classifier=context.concatenate_classifier)
        return MethodResult(parameters=parameters, matches=list(matches))


def parent_weights(options: MergeOptions, count: int) -> list[float]:
    """The `weights` option, one per parent (merge() fills in 1 each when not given and checks the length)."""
    return [1.0] * count if options.weights is None else [float(w) for w in options.weights]


@dataclass(frozen=True)
class LinearMethod(MergeMethod):
    """mergekit's `linear`: sum_i w_i theta_i, divided by sum_i w_i unless `normalize=False`; no base needed.

    Defined by `hf_mudsc.solve.task_vectors.linear` (checked against mergekit 0.1.5)."""

    num_parents: int | None = None

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        return {"weights": options.weights, "normalize": True if options.normalize is None else options.normalize}

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        from hf_mudsc.solve.task_vectors import linear

        used = self.used_options(context.options)
        parameters = linear(None, list(context.parents), parent_weights(context.options, len(context.parents)),
                            normalize=used["normalize"])
        return MethodResult(parameters=parameters, matches=[None] * len(context.spec.groups))


AVERAGE = register_method(AverageMethod(
    name="average",
    pretty_name="Weight averaging",
    paper=None,
    description="Plain parameter average, no unit matching (fails across different initializations).",
))
LINEAR = register_method(LinearMethod(
    name="linear",
    pretty_name="Linear (weighted average, model soup)",
    paper=PAPER_SOUPS,
    description="Weighted average of N parents, normalised by the weights (mergekit `linear`); keeps the identity "
    "correspondence, so for fine-tunes of one base.",
))
