"""Merged parameters from the matches: each tensor axis mapped into the merged space (docs/design.md §4.7)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hf_mudsc.solve.maps import AxisMap, GroupMaps
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


def apply_matches_weighted(
    spec: PermutationSpec,
    parents: Sequence[Mapping[str, torch.Tensor]],
    matches: Sequence[Match | None],
    weights: Sequence[float],
    *,
    concatenate_classifier: bool = False,
) -> dict[str, torch.Tensor]:
    """N parents with per-parent weights (docs/design.md §4.13): merged unit = the weighted mean of its
    cluster, `Σ_u w_{p(u)} x_u / Σ_u w_{p(u)}`; a consumer column = `Σ_i w̄_i Σ_{u ∈ cluster, parent i} W_i[:, u]`
    (`w̄` the weights normalised to sum 1); ungrouped tensors the weighted mean. Two parents with equal weights
    give `apply_matches`' merge (the two-parent path itself stays `apply_matches`, bit for bit).
    """
    total = float(sum(weights))
    share = torch.tensor([float(w) / total for w in weights], dtype=torch.float64)
    classifier = {spec.classifier.weight, spec.classifier.bias} if spec.classifier else set()
    # Per group and parent: (out map, in map). Out weight of unit u = 1 / Σ_{v in u's cluster} w̄_{p(v)}.
    maps: list[list[tuple[AxisMap, AxisMap]] | None] = []
    for found in matches:
        if found is None:
            maps.append(None)
            continue
        clusters = found.cluster_of.cpu()
        models = found.num_models
        if models != len(parents):
            raise ValueError(f"a match of {models} models cannot merge {len(parents)} parents")
        n = clusters.numel() // models
        unit_share = share.repeat_interleave(n)
        cluster_share = torch.zeros(found.num_merged, dtype=torch.float64).index_add_(0, clusters, unit_share)
        out_weight = 1.0 / cluster_share[clusters]
        ones = torch.ones(n, dtype=torch.float64)
        rows = [slice(i * n, (i + 1) * n) for i in range(models)]
        maps.append([(AxisMap(clusters[r], out_weight[r], found.num_merged),
                      AxisMap(clusters[r], ones, found.num_merged)) for r in rows])
    merged: dict[str, torch.Tensor] = {}
    for name, tensor_0 in parents[0].items():
        transformed = []
        for model, params in enumerate(parents):
            tensor = params[name].detach().to(torch.float64)
            for group_index, member in spec.axes_of(name):
                found = maps[group_index]
                if found is None:
                    continue
                tensor = found[model][0 if member.role == "out" else 1].apply(tensor, member.axis)
            transformed.append(tensor)
        if concatenate_classifier and name in classifier:
            value = torch.cat(transformed, dim=0)
        else:
            value = sum(float(w) * t for w, t in zip(share, transformed, strict=True))
        merged[name] = value.to(tensor_0.dtype)
    return merged
