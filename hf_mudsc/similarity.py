"""Unit similarities: streaming activation correlation, weight correlation, and their dual-space blend.

All results are float64: real data has near-ties, and matching must not flip on rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .spec import PermutationSpec

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
        n = merge.shape[0] // 2
        return cls(
            merge2=tuple(AxisMap.from_matrix(2 * merge[i * n : (i + 1) * n]) for i in range(2)),  # type: ignore[arg-type]
            unmerge=tuple(AxisMap.from_matrix(unmerge[i * n : (i + 1) * n]) for i in range(2)),  # type: ignore[arg-type]
        )


def weight_features(
    spec: PermutationSpec,
    group_index: int,
    params: Mapping[str, torch.Tensor],
    model: int,
    maps: Sequence[GroupMaps | None],
) -> torch.Tensor:
    """`Z_i` of design §4.3: every non-ignored member of the group, other axes mapped into merged spaces.

    An axis that is an `in` member of a matched group q is multiplied by q's `(2·merge_i)ᵀ`, an `out`
    member by q's `U_iᵀ` (the reference's pairing); unmatched groups leave their axes untouched.
    """
    group = spec.groups[group_index]
    blocks = []
    for member in group.members:
        if member.ignore:
            continue
        tensor = params[member.param].to(torch.float64)
        axis = member.axis % tensor.dim()
        for other_index, other in spec.axes_of(member.param):
            found = maps[other_index]
            if other_index == group_index or found is None:
                continue
            axis_map = found.merge2[model] if other.role == "in" else found.unmerge[model]
            tensor = axis_map.apply(tensor, other.axis)
        blocks.append(torch.movedim(tensor, axis, 0).reshape(group.width, -1))
    return torch.cat(blocks, dim=1)


def weight_correlation(
    spec: PermutationSpec,
    group_index: int,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    maps: Sequence[GroupMaps | None],
) -> torch.Tensor:
    """`C_w`: Pearson correlation of the rows of `[Z_A; Z_B]`, centered over the column axis."""
    z = torch.cat(
        [
            weight_features(spec, group_index, params_a, 0, maps),
            weight_features(spec, group_index, params_b, 1, maps),
        ]
    )
    z = z - z.mean(dim=1, keepdim=True)
    return pearson_from_covariance(z @ z.T / z.shape[1])


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
