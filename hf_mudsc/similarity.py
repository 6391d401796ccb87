"""Unit similarities: streaming activation correlation, weight correlation, and their dual-space blend.

All results are float64: real data has near-ties, and matching must not flip on rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .spec import Member, PermutationSpec

CLAMP = 1e-7


def pearson_from_covariance(covariance: torch.Tensor) -> torch.Tensor:
    """Pearson correlation `Cov / clamp(σσᵀ, 1e-7)`; zero-variance units get zero rows and columns."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    return covariance / torch.outer(std, std).clamp_min(CLAMP)


class CorrelationAccumulator:
    """Streaming `Σx`, `Σxxᵀ` and count of `dim`-wide samples, summable across processes.

    `update` per batch, `merge` another accumulator (another shard's statistics), `finalize` for the
    Pearson correlation. Sums are float64 and taken around a shift (the first batch's mean), so
    `E[xxᵀ] − μμᵀ` does not cancel catastrophically for units with a large mean.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64) -> None:
        self.dim = dim
        self.dtype = dtype
        self.shift = torch.zeros(dim, dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, samples: torch.Tensor) -> None:
        """Add `(num_samples, dim)` samples."""
        if samples.dim() != 2 or samples.shape[1] != self.dim:
            raise ValueError(f"expected samples of shape (N, {self.dim}), got {tuple(samples.shape)}")
        if samples.shape[0] == 0:
            return
        x = samples.detach().to(torch.float64)
        if self.count == 0:
            self.shift = x.mean(0)
        x = (x - self.shift).to(self.dtype)
        self.total += x.sum(0).to(torch.float64)
        self.outer += (x.T @ x).to(torch.float64)
        self.count += samples.shape[0]

    def _moments_around(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`Σ(x − shift)` and `Σ(x − shift)(x − shift)ᵀ` from the sums around `self.shift`."""
        delta = self.shift - shift
        total = self.total + self.count * delta
        outer = self.outer + torch.outer(delta, self.total) + torch.outer(self.total, delta)
        outer += self.count * torch.outer(delta, delta)
        return total, outer

    def merge(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Fold another shard's statistics into this one (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of width {self.dim} and {other.dim}")
        if other.count == 0:
            return self
        if self.count == 0:
            self.shift = other.shift.clone()
        total, outer = other._moments_around(self.shift)
        self.total += total
        self.outer += outer
        self.count += other.count
        return self

    def covariance(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no calibration samples reached this accumulator")
        mean = self.total / self.count
        return self.outer / self.count - torch.outer(mean, mean)

    def finalize(self) -> torch.Tensor:
        """The `(dim, dim)` Pearson correlation of everything seen."""
        return pearson_from_covariance(self.covariance())

    def tensors(self) -> list[torch.Tensor]:
        """The state as plain sums around zero, so shards can be added by an all-reduce."""
        total, outer = self._moments_around(torch.zeros(self.dim, dtype=torch.float64))
        return [total, outer, torch.tensor([float(self.count)], dtype=torch.float64)]

    def load_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Adopt summed `tensors()` (e.g. after an all-reduce); re-centres them on their mean."""
        self.shift = torch.zeros(self.dim, dtype=torch.float64)
        self.total, self.outer = tensors[0].to(torch.float64), tensors[1].to(torch.float64)
        self.count = int(round(float(tensors[2].item())))
        if self.count:
            mean = self.total / self.count
            self.total, self.outer = self._moments_around(mean)
            self.shift = mean


def transform_axis(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract `tensor`'s `axis` (size n) with a dense `matrix` (n, m): the axis becomes size m."""
    moved = torch.movedim(tensor, axis, -1)
    return torch.movedim(moved @ matrix.to(moved.dtype), -1, axis)


@dataclass(frozen=True)
class AxisMap:
    """A `(n, m)` merge/unmerge block with one nonzero per row, stored as (column, weight) per row.

    Every original unit belongs to exactly one merged unit, so contracting an axis with the block is a
    weighted scatter-add: O(tensor size) instead of the O(n · tensor size) of a dense product.
    """

    index: torch.Tensor
    weight: torch.Tensor
    size: int

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> AxisMap:
        if (matrix != 0).sum(1).ne(1).any():
            raise ValueError("merge/unmerge rows must have exactly one nonzero entry")
        index = matrix.abs().argmax(1)
        return cls(index=index, weight=matrix.gather(1, index[:, None])[:, 0].to(torch.float64), size=matrix.shape[1])

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        # index_add_ along the last (contiguous) axis: along axis 0 torch's threaded kernel is orders of
        # magnitude slower for small tensors.
        moved = torch.movedim(tensor, axis % tensor.dim(), -1) * self.weight.to(tensor.dtype)
        out = torch.zeros(*moved.shape[:-1], self.size, dtype=tensor.dtype).index_add_(-1, self.index, moved)
        return torch.movedim(out, -1, axis % tensor.dim())


@dataclass(frozen=True)
class GroupMaps:
    """Per model (0 = A, 1 = B): `2·merge_i` (out-role in apply) and `U_i` as AxisMaps."""

    merge2: tuple[AxisMap, AxisMap]
    unmerge: tuple[AxisMap, AxisMap]

    @classmethod
    def from_matrices(cls, merge: torch.Tensor, unmerge: torch.Tensor) -> GroupMaps:
        two_n, m = unmerge.shape
        n = two_n // 2
        nonzero = unmerge.nonzero()
        if nonzero.shape[0] != two_n or not torch.equal(nonzero[:, 0], torch.arange(two_n)):
            raise ValueError("merge/unmerge rows must have exactly one nonzero entry")
        clusters = nonzero[:, 1]
        ones = unmerge[nonzero[:, 0], clusters].to(torch.float64)
        weights = 2 * merge[nonzero[:, 0], clusters].to(torch.float64)
        rows = [slice(i * n, (i + 1) * n) for i in range(2)]
        return cls(
            merge2=tuple(AxisMap(clusters[r], weights[r], m) for r in rows),  # type: ignore[arg-type]
            unmerge=tuple(AxisMap(clusters[r], ones[r], m) for r in rows),  # type: ignore[arg-type]
        )


def _member_block(
    spec: PermutationSpec,
    group_index: int,
    member: Member,
    params: Mapping[str, torch.Tensor],
    model: int,
    maps: Sequence[GroupMaps | None],
) -> torch.Tensor:
    """One member's `(n, D_m)` slice of `Z_i`: its other axes mapped into their groups' merged spaces.

    An axis that is an `in` member of a matched group q is multiplied by q's `(2·merge_i)ᵀ`, an `out`
    member by q's `U_iᵀ` (the reference's pairing); unmatched groups leave their axes untouched.
    """
    tensor = params[member.param].to(torch.float64)
    axis = member.axis % tensor.dim()
    for other_index, other in spec.axes_of(member.param):
        found = maps[other_index]
        if other_index == group_index or found is None:
            continue
        axis_map = found.merge2[model] if other.role == "in" else found.unmerge[model]
        tensor = axis_map.apply(tensor, other.axis)
    return torch.movedim(tensor, axis, 0).reshape(spec.groups[group_index].width, -1)


def weight_features(
    spec: PermutationSpec,
    group_index: int,
    params: Mapping[str, torch.Tensor],
    model: int,
    maps: Sequence[GroupMaps | None],
) -> torch.Tensor:
    """`Z_i` of design §4.3: every non-ignored member of the group, concatenated column-wise in spec order."""
    members = [m for m in spec.groups[group_index].members if not m.ignore]
    return torch.cat([_member_block(spec, group_index, m, params, model, maps) for m in members], dim=1)


class _Moments:
    """`Σ z zᵀ`, `Σ z` over columns and the column count of `[Z_A; Z_B]`, built member by member."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.gram = torch.zeros(2 * width, 2 * width, dtype=torch.float64)
        self.sums = torch.zeros(2 * width, dtype=torch.float64)
        self.columns = 0

    def add(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        n = self.width
        self.gram[:n, :n].addmm_(za, za.T)
        self.gram[n:, n:].addmm_(zb, zb.T)
        cross = za @ zb.T
        self.gram[:n, n:] += cross
        self.gram[n:, :n] += cross.T
        self.sums[:n] += za.sum(1)
        self.sums[n:] += zb.sum(1)
        self.columns += za.shape[1]

    def plus(self, other: _Moments) -> _Moments:
        total = _Moments(self.width)
        total.gram = self.gram + other.gram
        total.sums = self.sums + other.sums
        total.columns = self.columns + other.columns
        return total

    def correlation(self) -> torch.Tensor:
        mean = self.sums / self.columns
        return pearson_from_covariance(self.gram / self.columns - torch.outer(mean, mean))


class WeightCorrelation:
    """`C_w` of design §4.3 for any group under any current matches, with the constant part cached.

    Members whose other axes belong to no group (embedding tables, norms, biases) never change between
    visits, so their Gram contribution is computed once — for BERT that is the 30k-column vocabulary.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        params_a: Mapping[str, torch.Tensor],
        params_b: Mapping[str, torch.Tensor],
        cache_constant: bool = True,
    ) -> None:
        self.spec = spec
        self.params = (params_a, params_b)
        self.cache_constant = cache_constant
        self._constant: dict[int, _Moments] = {}

    def _is_constant(self, group_index: int, member: Member) -> bool:
        return all(other == group_index for other, _ in self.spec.axes_of(member.param))

    def _add(self, moments: _Moments, group_index: int, member: Member, maps: Sequence[GroupMaps | None]) -> None:
        blocks = [_member_block(self.spec, group_index, member, self.params[i], i, maps) for i in range(2)]
        moments.add(*blocks)

    def __call__(self, group_index: int, maps: Sequence[GroupMaps | None]) -> torch.Tensor:
        group = self.spec.groups[group_index]
        members = [m for m in group.members if not m.ignore]
        constant = [m for m in members if self._is_constant(group_index, m)] if self.cache_constant else []
        moments = _Moments(group.width)
        for member in members:
            if member not in constant:
                self._add(moments, group_index, member, maps)
        if constant:
            if group_index not in self._constant:
                fixed = _Moments(group.width)
                for member in constant:
                    self._add(fixed, group_index, member, maps)
                self._constant[group_index] = fixed
            moments = moments.plus(self._constant[group_index])
        return moments.correlation()


def weight_correlation(
    spec: PermutationSpec,
    group_index: int,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    maps: Sequence[GroupMaps | None],
) -> torch.Tensor:
    """`C_w`: Pearson correlation of the rows of `[Z_A; Z_B]`, centered over the column axis."""
    return WeightCorrelation(spec, params_a, params_b, cache_constant=False)(group_index, maps)


def blend(weight: torch.Tensor | None, activation: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """The dual-space similarity `alpha·C_w + (1 − alpha)·C_act` (a missing side must have weight 0)."""
    if weight is None and activation is None:
        raise ValueError("no similarity to blend")
    if weight is None:
        if alpha != 0:
            raise ValueError("weight similarity missing but alpha > 0")
        return activation
    if activation is None:
        if alpha != 1:
            raise ValueError("activation similarity missing but alpha < 1")
        return weight
    return alpha * weight + (1 - alpha) * activation
