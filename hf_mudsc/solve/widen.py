"""A size budget (docs/design.md §4.12): units of the MLP groups left unfused, so the merged model may be wider.

`merge(..., size=s)` lets the merged model hold up to `s` times one parent's parameters. The extra is spent on
the groups whose width a stock config sets (`Group.width_key`: the MLP hidden layer, `intermediate_size`): of the
`N·k` original units of such a group, the ones whose best cross-parent match is weakest are taken out of their
clusters and kept as merged units of their own. The apply step needs nothing new: a cluster of one unit of parent
`i` is copied by the out axis (`2·merge_i` = 2, averaged with the other parent's 0) and its in-axis columns (the
down projection) are halved by the parents' mean — so the block adds each kept unit's contribution with its
parent's weight. With every unit kept (two parents, size 2.0 or enough budget) the MLP's output is the mean of
the parents' MLP outputs on the same input. This is ZipIt's "partial zip" (arXiv:2305.03053 §5) applied to
units instead of layers: the merged width grows from `k` to `k + e` and stays a stock class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import PermutationSpec


@dataclass(frozen=True)
class SizePlan:
    """How a size budget is spent: units added per width key, the merged widths and the exact parameter count."""

    size: float
    parent_parameters: int
    """The largest parent's parameter count (the budget is `size` times this)."""
    base_parameters: int
    """The merged model's parameters with nothing widened (a concatenated head counts all its rows)."""
    extra: dict[str, int]
    """Units added to every group of each width key (config attribute)."""
    widths: dict[str, int]
    """The merged width of each width key: the parents' width plus `extra`."""
    num_parameters: int
    """The merged model's parameter count under this plan (`base_parameters` + the added units' tensors)."""

    def as_config(self) -> dict[str, object]:
        """What `config.mudsc["size_budget"]` and the card record."""
        return {"size": self.size, "widths": dict(self.widths), "extra_units": dict(self.extra),
                "num_parameters": self.num_parameters, "parent_parameters": self.parent_parameters,
                "ratio": round(self.num_parameters / self.parent_parameters, 6)}


def unit_cost(spec: PermutationSpec, params: Mapping[str, torch.Tensor], index: int) -> int:
    """Parameters one more unit of group `index` adds: every member tensor's slice along its unit axis."""
    total = 0
    for member in spec.groups[index].members:
        shape = tuple(params[member.param].shape)
        total += math.prod(shape) // shape[member.axis]
    return total


def widenable_groups(spec: PermutationSpec) -> dict[str, list[int]]:
    """Group indices per width key, in spec order (only groups a stock config can widen)."""
    keys: dict[str, list[int]] = {}
    for index, group in enumerate(spec.groups):
        if group.width_key is not None:
            keys.setdefault(group.width_key, []).append(index)
    return keys


def plan_size(spec: PermutationSpec, parents: Sequence[Mapping[str, torch.Tensor]], size: float, *,
              concatenate_classifier: bool = False) -> SizePlan:
    """The most units that fit `size` × the largest parent's parameters, counted exactly (heads included).

    Every group of one width key grows by the same number of units (a stock class has one width per config
    attribute); several keys (CLIP's two towers) grow one unit at a time, the key with the smallest share of its
    `(N-1)·k` possible extra units first, while the next unit still fits. At most `(N-1)·k` units per group can be
    added (every unit kept). `size=1.0` adds nothing.
    """
    counts = [sum(int(t.numel()) for t in p.values()) for p in parents]
    parent_parameters = max(counts)
    base = counts[0]
    if concatenate_classifier and spec.classifier is not None:
        head = [n for n in (spec.classifier.weight, spec.classifier.bias) if n]
        base += sum(int(p[name].numel()) for p in parents[1:] for name in head)
    keys = widenable_groups(spec)
    widths: dict[str, int] = {}
    costs: dict[str, int] = {}
    for key, indices in keys.items():
        found = {spec.groups[i].width for i in indices}
        if len(found) != 1:
            raise ValueError(f"groups of width key {key!r} have different widths {sorted(found)}")
        widths[key] = found.pop()
        costs[key] = sum(unit_cost(spec, parents[0], i) for i in indices)
    extra = dict.fromkeys(keys, 0)
    budget = math.floor(size * parent_parameters) - base
    if size > 1.0:
        capacity = {key: (len(parents) - 1) * widths[key] for key in keys}
        while True:
            open_keys = [key for key in keys if extra[key] < capacity[key] and costs[key] <= budget]
            if not open_keys:
                break
            key = min(open_keys, key=lambda k: extra[k] / widths[k])
            extra[key] += 1
            budget -= costs[key]
    added = sum(extra[key] * costs[key] for key in keys)
    return SizePlan(size=float(size), parent_parameters=parent_parameters, base_parameters=base, extra=extra,
                    widths={key: widths[key] + extra[key] for key in keys}, num_parameters=base + added)


def measured_plan(spec: PermutationSpec, parents: Sequence[Mapping[str, torch.Tensor]],
                  merged: Mapping[str, torch.Tensor], size: float) -> SizePlan:
    """The plan a merge carried out, read from its merged tensors: widths from their shapes, parameters counted."""
    counts = [sum(int(t.numel()) for t in p.values()) for p in parents]
    widths: dict[str, int] = {}
    extra: dict[str, int] = {}
    for key, indices in widenable_groups(spec).items():
        group = spec.groups[indices[0]]
        member = group.members[0]
        widths[key] = int(merged[member.param].shape[member.axis])
        extra[key] = widths[key] - group.width
    total = sum(int(t.numel()) for t in merged.values())
    added = sum(extra[key] * sum(unit_cost(spec, parents[0], i) for i in indices)
                for key, indices in widenable_groups(spec).items())
    return SizePlan(size=float(size), parent_parameters=max(counts), base_parameters=total - added, extra=extra,
                    widths=widths, num_parameters=total)


def best_cross_match(similarity: torch.Tensor, num_models: int = 2) -> torch.Tensor:
    """Each original unit's highest similarity to any unit of another parent (rows `[A 0..k-1; B 0..k-1; ...]`),
    block by block: no `(N·k, N·k)` temporary besides the similarity itself."""
    k = similarity.shape[0] // num_models
    blocks = [slice(i * k, (i + 1) * k) for i in range(num_models)]
    best = []
    for i, rows in enumerate(blocks):
        others = [similarity[rows, columns].amax(dim=1) for j, columns in enumerate(blocks) if j != i]
        best.append(torch.stack(others).amax(dim=0))
    return torch.cat(best).to(torch.float64)


def unfuse(found: Match, similarity: torch.Tensor, extra: int, *, num_models: int = 2,
           normalizer_eps: float = 0.0) -> Match:
    """`found` with `extra` more merged units: units taken out of their clusters, weakest best cross-parent match
    first (ties: lower unit index first), each into a new column appended after the existing ones.

    A unit is taken out only while its cluster still holds another unit (taking one of a pair out leaves two kept
    units, one more merged unit). Clusters that lose a unit get their merge weights recomputed (1 / (size +
    `normalizer_eps`)); every other unit keeps its weight and column, so `extra=0` returns `found` itself. The
    match value (the solve's objective) is kept: the matching did not change, only what is fused.
    """
    if extra == 0:
        return found
    if found.head_pairing is not None:
        raise ValueError("units of attention heads cannot be left unfused (the head structure would break)")
    clusters = found.cluster_of.cpu().tolist()
    weights = found.merge_weight.cpu().clone()
    sizes = [0] * found.num_merged
    for column in clusters:
        sizes[column] += 1
    score = best_cross_match(similarity.cpu(), num_models)
    order = torch.argsort(score, stable=True).tolist()
    touched: set[int] = set()
    added = 0
    for unit in order:
        if added == extra:
            break
        column = clusters[unit]
        if sizes[column] < 2:
            continue
        sizes[column] -= 1
        touched.add(column)
        clusters[unit] = len(sizes)
        touched.add(len(sizes))
        sizes.append(1)
        added += 1
    if added < extra:
        raise ValueError(f"only {added} units can be left unfused in this group, {extra} were asked for")
    cluster_of = torch.tensor(clusters, dtype=found.cluster_of.dtype)
    for unit, column in enumerate(clusters):
        if column in touched:
            weights[unit] = 1.0 / (sizes[column] + normalizer_eps)
    return Match(cluster_of=cluster_of.to(found.cluster_of.device), merge_weight=weights.to(found.merge_weight.device),
                 num_merged=len(sizes), value=found.value, head_pairing=None, num_models=found.num_models)


def widen_matches(spec: PermutationSpec, matches: Sequence[Match | None], plan: SizePlan,
                  similarity_of: Callable[[int], torch.Tensor], *, num_models: int = 2,
                  normalizer_eps: float = 0.0) -> list[Match | None]:
    """Every widenable group's match with its plan's extra units (`similarity_of(index)`: the group's similarity
    under the final matches, computed only for groups that grow)."""
    widened = list(matches)
    for key, indices in widenable_groups(spec).items():
        extra = plan.extra.get(key, 0)
        if not extra:
            continue
        for index in indices:
            found = matches[index]
            if found is None:
                raise ValueError(f"group {spec.groups[index].name!r} has no match to widen")
            widened[index] = unfuse(found, similarity_of(index), extra, num_models=num_models,
                                    normalizer_eps=normalizer_eps)
    return widened
