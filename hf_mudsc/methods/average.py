"""Plain weight averaging: no unit matching — `average` (two parents, the baseline that fails across
initializations). The weighted N-parent average, mergekit's `linear`, is in `hf_mudsc.methods.task_vector`."""

from __future__ import annotations

from dataclasses import dataclass

from hf_mudsc.methods.registry import MergeMethod, MethodContext, MethodResult, register_method


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


AVERAGE = register_method(AverageMethod(
    name="average",
    pretty_name="Weight averaging",
    paper=None,
    description="Plain parameter average, no unit matching (fails across different initializations).",
))
