"""Merged parameters from the matches: each tensor axis mapped into the merged space (docs/design.md §4.7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import PermutationSpec


def apply_matches(
    spec: PermutationSpec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    matches: Sequence[Match | None],
    *,
    concatenate_classifier: bool = False,
) -> dict[str, torch.Tensor]:
    """docs/design.md §4.7: out axes by `(2·merge_i)ᵀ`, in axes by `U_iᵀ`, then the mean of the two parents.

    Classifier tensors are concatenated (A's rows first) instead of averaged when label sets differ.
    """
    classifier = {spec.classifier.weight, spec.classifier.bias} if spec.classifier else set()
    maps = [GroupMaps.from_match(m) if m is not None else None for m in matches]
    merged: dict[str, torch.Tensor] = {}
    for name, tensor_a in params_a.items():
        transformed = []
        for model, params in enumerate((params_a, params_b)):
            tensor = params[name].detach().to(torch.float64)
            for group_index, member in spec.axes_of(name):
                found = maps[group_index]
                if found is None:
                    continue
                axis_map = found.merge2[model] if member.role == "out" else found.unmerge[model]
                tensor = axis_map.apply(tensor, member.axis)
            transformed.append(tensor)
        if concatenate_classifier and name in classifier:
            value = torch.cat(transformed, dim=0)
        else:
            value = (transformed[0] + transformed[1]) / 2
        merged[name] = value.to(tensor_a.dtype)
    return merged
