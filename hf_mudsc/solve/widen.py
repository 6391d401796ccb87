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

`size_spend="heads"` / `"residual"` (ViT, two parents) spend the budget on the residual stream first: whole head
pairs of every block left unfused with as many stream units (`hidden_size` and `num_attention_heads` grow
together), or stream units alone (the config pins `head_dim`); the rest goes to MLP units as above
(`plan_stream`, `widen_stream`; docs/benchmarks/size_residual.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hf_mudsc.errors import MergeInputError, flag, option_hint
from hf_mudsc.solve.matchers import Match, attention_head_scores
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
    stream = stream_groups(spec)
    if stream is not None and spec.stream is not None:
        member = spec.groups[stream.residual].members[0]
        grown = int(merged[member.param].shape[member.axis]) - spec.groups[stream.residual].width
        if grown:  # size_spend="heads"/"residual": the stream (and the heads) grew (both axes of some tensors)
            group_widths = {i: int(merged[spec.groups[i].members[0].param].shape[spec.groups[i].members[0].axis])
                            for i in range(len(spec.groups))}
            head = spec.classifier.weight if spec.classifier is not None else None
            concatenated = head is not None and merged[head].shape[0] != parents[0][head].shape[0]
            added = (parameter_count(spec, parents, group_widths, concatenate_classifier=concatenated)
                     - parameter_count(spec, parents, {}, concatenate_classifier=concatenated))
            heads = (group_widths[stream.attention[0]] - spec.groups[stream.attention[0]].width) // stream.head_dim
            extra = {spec.stream.width_key: grown, **({spec.stream.heads_key: heads} if heads else {}), **extra}
            widths = {spec.stream.width_key: spec.groups[stream.residual].width + grown,
                      **({spec.stream.heads_key: stream.num_heads + heads} if heads else {}), **widths}
    return SizePlan(size=float(size), parent_parameters=max(counts), base_parameters=total - added, extra=extra,
                    widths=widths, num_parameters=total)


def unspent_stream_warning(spec: PermutationSpec, plan: SizePlan, spend: str) -> str | None:
    """A stream spend (`size_spend="heads"` / `"residual"`) whose budget bought not one head (stream unit): all of it
    went to MLP units. Said (log, card, dry run), since the recorded `size_spend` would read as applied."""
    if spend == "mlp" or plan.size == 1.0 or spec.stream is None or plan.extra.get(spec.stream.width_key):
        return None
    what = "attention head" if spend == "heads" else "residual-stream unit"
    spent = ", ".join(f"{key} +{units}" for key, units in plan.extra.items() if units) or "nothing"
    return (f"size {plan.size:g} with size_spend={spend!r} (CLI: {flag('size_spend')} {spend}) bought no {what} (one "
            f"costs more than the budget): it went to MLP units instead ({spent}); raise size to widen the stream, or "
            "use size_spend='mlp'")


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


# ------------------------------------------------------------------------------------------------------------------
# size_spend="heads": the residual stream and whole attention heads (docs/design.md §4.12)
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamGroups:
    """The groups that widen together when the residual stream gains whole heads: the stream and the attention
    groups (q/k and v of every block, `num_heads` heads of `head_dim` units each)."""

    residual: int
    attention: tuple[int, ...]
    num_heads: int
    head_dim: int


def stream_groups(spec: PermutationSpec) -> StreamGroups | None:
    """The spec's `StreamGroups`, or None when its architecture does not declare a widenable stream
    (`PermutationSpec.stream`)."""
    if spec.stream is None:
        return None
    residual = spec.group_index(spec.stream.group)
    # every attention group (a pinned head_dim makes them narrower than the stream: a size_spend="residual" merge)
    attention = tuple(i for i, g in enumerate(spec.groups) if g.is_attention)
    shapes = {(spec.groups[i].num_heads, spec.groups[i].width) for i in attention}
    if len(shapes) != 1:
        raise ValueError(f"the stream's attention groups differ in (heads, width): {sorted(shapes)}")
    num_heads, width = shapes.pop()
    return StreamGroups(residual=residual, attention=attention, num_heads=num_heads, head_dim=width // num_heads)


def check_spend(spec: PermutationSpec, size: float, spend: str) -> None:
    """Refuse `size_spend="heads"` for an architecture without a declared stream, in one line, before calibration
    (merge() calls it as soon as the spec is known)."""
    if size != 1.0 and spend != "mlp" and spec.stream is None:
        raise MergeInputError(f"{option_hint('size_spend')} {spend!r} widens the residual stream, which only ViT "
                              f"supports so far, not {spec.family or 'this architecture'}; use size_spend='mlp' "
                              f"(CLI: --size-spend mlp)")


def parameter_count(spec: PermutationSpec, parents: Sequence[Mapping[str, torch.Tensor]],
                    widths: Mapping[int, int], *, concatenate_classifier: bool = False) -> int:
    """The merged model's exact parameter count when group `i` has width `widths[i]` (others: the parents'): every
    tensor's shape with each grouped axis replaced — exact also when both axes of a tensor grow (q/k/v/o)."""

    def count(name: str, tensor: torch.Tensor) -> int:
        shape = list(tensor.shape)
        for index, member in spec.axes_of(name):
            if index in widths:
                shape[member.axis] = widths[index]
        return math.prod(shape)

    total = sum(count(name, tensor) for name, tensor in parents[0].items())
    if concatenate_classifier and spec.classifier is not None:
        head = [n for n in (spec.classifier.weight, spec.classifier.bias) if n]
        total += sum(count(name, p[name]) for p in parents[1:] for name in head)
    return total


def plan_stream(spec: PermutationSpec, parents: Sequence[Mapping[str, torch.Tensor]], size: float, spend: str, *,
                concatenate_classifier: bool = False) -> SizePlan:
    """A budget spent on the residual stream first, then as many MLP units as the rest allows (the MLP groups'
    `width_key`, one width for all layers). Counted exactly.

    `spend="heads"`: the most whole heads `k` that fit (the stream and every attention group grow by `k · head_dim`
    units, the config by `k` heads; at most every head pair unfused). `spend="residual"`: the most stream units `r`
    that fit (at most every unit unfused), the attention groups unchanged — the config then pins `head_dim`
    (`Stream.head_dim_key`), since the stream is no longer `heads · head_dim` wide."""
    stream = stream_groups(spec)
    if stream is None or spec.stream is None:
        raise ValueError(f"the {spec.family or 'given'} architecture declares no widenable residual stream")
    if len(parents) != 2:
        raise ValueError(f"size_spend={spend!r} merges two parents")
    counts = [sum(int(t.numel()) for t in p.values()) for p in parents]
    parent_parameters = max(counts)
    limit = math.floor(size * parent_parameters)
    keys = widenable_groups(spec)
    residual_width = spec.groups[stream.residual].width
    per_step = stream.head_dim if spend == "heads" else 1  # stream units per step
    steps_cap = stream.num_heads if spend == "heads" else residual_width

    def widths_for(steps: int, mlp: Mapping[str, int]) -> dict[int, int]:
        grown = {stream.residual: residual_width + steps * per_step}
        if spend == "heads":
            grown.update({i: spec.groups[i].width + steps * stream.head_dim for i in stream.attention})
        for key, indices in keys.items():
            grown.update({i: spec.groups[i].width + mlp.get(key, 0) for i in indices})
        return grown

    def total(steps: int, mlp: Mapping[str, int]) -> int:
        return parameter_count(spec, parents, widths_for(steps, mlp), concatenate_classifier=concatenate_classifier)

    base = total(0, {})
    steps = 0
    if size > 1.0:
        low, high = 0, steps_cap  # the count grows with the steps: the largest that fits, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if total(middle, {}) <= limit else (low, middle - 1)
        steps = low
    extra = dict.fromkeys(keys, 0)
    if size > 1.0:
        capacity = {key: spec.groups[indices[0]].width for key, indices in keys.items()}
        while True:
            used = total(steps, extra)
            fits = [key for key in keys if extra[key] < capacity[key]
                    and total(steps, {**extra, key: extra[key] + 1}) <= limit]
            if not fits:
                break
            key = min(fits, key=lambda k: extra[k] / capacity[k])
            step = total(steps, {**extra, key: extra[key] + 1}) - used
            # Units of one key cost the same at a fixed stream width: take all that fit at once.
            room = min(capacity[key] - extra[key], (limit - used) // step) if len(keys) == 1 else 1
            extra[key] += max(room, 1)
    mlp = dict(extra)
    widths: dict[str, int] = {key: spec.groups[indices[0]].width + extra[key] for key, indices in keys.items()}
    if steps:
        keys_of = spec.stream
        stream_extra = {keys_of.width_key: steps * per_step}
        stream_widths = {keys_of.width_key: residual_width + steps * per_step}
        if spend == "heads":
            stream_extra[keys_of.heads_key] = steps
            stream_widths[keys_of.heads_key] = stream.num_heads + steps
        extra, widths = {**stream_extra, **extra}, {**stream_widths, **widths}
    return SizePlan(size=float(size), parent_parameters=parent_parameters, base_parameters=base, extra=extra,
                    widths=widths, num_parameters=total(steps, mlp))


def weakest_head_pairs(head_scores: torch.Tensor | Sequence[Sequence[float]], pairing: Sequence[int],
                       count: int) -> list[int]:
    """The A heads of the `count` weakest matched head pairs (`head_scores[j, pairing[j]]` lowest first; ties:
    lower head first), in increasing head order."""
    scores = torch.as_tensor(head_scores, dtype=torch.float64)
    paired = torch.stack([scores[j, p] for j, p in enumerate(pairing)])
    order = torch.argsort(paired, stable=True).tolist()
    return sorted(order[:count])


def unfuse_heads(found: Match, heads: Sequence[int], num_heads: int, *, normalizer_eps: float = 0.0) -> Match:
    """`found` (a group matched inside head pairs) with the head pairs of A heads `heads` left unfused: A head `j`
    keeps merged head `j`, each of its units alone in its own column (unit `i` -> column `j·d + i`); its partner B
    head `pairing[j]` becomes a new merged head appended after the `num_heads` existing ones (in the order of
    `heads`), likewise unit by unit. Every other unit keeps its column and weight, so `heads=()` returns `found`.
    The merged width grows by `len(heads) · d` (`d` = head_dim): merged heads stay contiguous blocks of `d`."""
    if not heads:
        return found
    if found.head_pairing is None or found.num_models != 2:
        raise ValueError("only a two-parent match inside head pairs can have head pairs unfused")
    n = found.cluster_of.numel() // 2
    d = n // num_heads
    clusters = found.cluster_of.cpu().clone()
    weights = found.merge_weight.cpu().clone()
    single = 1.0 / (1.0 + normalizer_eps)
    for position, head in enumerate(heads):
        partner = found.head_pairing[head]
        a_units = torch.arange(head * d, (head + 1) * d)
        b_units = n + torch.arange(partner * d, (partner + 1) * d)
        clusters[a_units] = head * d + torch.arange(d)
        clusters[b_units] = (num_heads + position) * d + torch.arange(d)
        weights[a_units] = single
        weights[b_units] = single
    return Match(cluster_of=clusters.to(found.cluster_of.device), merge_weight=weights.to(found.merge_weight.device),
                 num_merged=found.num_merged + len(heads) * d, value=found.value, head_pairing=found.head_pairing,
                 num_models=2)


def widen_stream(spec: PermutationSpec, matches: Sequence[Match | None], plan: SizePlan,
                 similarity_of: Callable[[int], torch.Tensor], *, normalizer_eps: float = 0.0
                 ) -> list[Match | None]:
    """`size_spend="heads"` / `"residual"`: the stream's weakest-matched units unfused (`unfuse`: `k · head_dim`
    of them, or the plan's `r`); with heads, in every attention block the `k` head pairs with the lowest summed head
    score over its tied groups (q/k and v: `attention_head_scores` at the final matches, the score that paired
    them) left unfused (`unfuse_heads`); then the MLP groups as `widen_matches` does."""
    stream = stream_groups(spec)
    if stream is None or spec.stream is None:
        raise ValueError(f"the {spec.family or 'given'} architecture declares no widenable residual stream")
    heads = plan.extra.get(spec.stream.heads_key, 0)
    units = plan.extra.get(spec.stream.width_key, 0)
    widened = list(matches)
    if units:
        found = matches[stream.residual]
        if found is None:
            raise ValueError(f"group {spec.groups[stream.residual].name!r} has no match to widen")
        widened[stream.residual] = unfuse(found, similarity_of(stream.residual), units, normalizer_eps=normalizer_eps)
    if heads:
        ties: dict[str | None, list[int]] = {}
        for index in stream.attention:
            ties.setdefault(spec.groups[index].head_tie or spec.groups[index].name, []).append(index)
        for members in ties.values():
            tied = [matches[i] for i in members]
            if any(m is None for m in tied):
                raise ValueError(f"group {spec.groups[members[0]].name!r} has no match to widen")
            pairing = tied[0].head_pairing  # type: ignore[union-attr]
            if pairing is None or any(m.head_pairing != pairing for m in tied):  # type: ignore[union-attr]
                raise ValueError(f"groups {[spec.groups[i].name for i in members]} do not share one head pairing")
            scores = sum(torch.as_tensor(attention_head_scores(similarity_of(i), stream.num_heads))
                         for i in members)
            chosen = weakest_head_pairs(scores, pairing, heads)  # type: ignore[arg-type]
            for i, found_head in zip(members, tied, strict=True):
                widened[i] = unfuse_heads(found_head, chosen, stream.num_heads,  # type: ignore[arg-type]
                                          normalizer_eps=normalizer_eps)
    # widen_matches reads only the MLP width keys of the plan (the stream's keys name no widenable group)
    return widen_matches(spec, widened, plan, similarity_of, normalizer_eps=normalizer_eps)


def plan_budget(spec: PermutationSpec, parents: Sequence[Mapping[str, torch.Tensor]], size: float, spend: str, *,
                concatenate_classifier: bool = False) -> SizePlan:
    """The plan a merge with `size` and `size_spend=spend` carries out: the stream first (`plan_stream`) for
    "heads"/"residual" with a budget, else MLP units only (`plan_size`; `size=1.0` adds nothing)."""
    if size != 1.0 and spend != "mlp":
        return plan_stream(spec, parents, size, spend, concatenate_classifier=concatenate_classifier)
    return plan_size(spec, parents, size, concatenate_classifier=concatenate_classifier)


def widen_budget(spec: PermutationSpec, matches: Sequence[Match | None], plan: SizePlan,
                 similarity_of: Callable[[int], torch.Tensor], *, num_models: int = 2,
                 normalizer_eps: float = 0.0) -> list[Match | None]:
    """`matches` widened as `plan` (from `plan_budget`) says: the stream and heads first when it grows them
    (`widen_stream`), the MLP units in any case (`widen_matches`)."""
    stream = spec.stream
    if stream is not None and (plan.extra.get(stream.width_key) or plan.extra.get(stream.heads_key)):
        return widen_stream(spec, matches, plan, similarity_of, normalizer_eps=normalizer_eps)
    return widen_matches(spec, matches, plan, similarity_of, num_models=num_models, normalizer_eps=normalizer_eps)

