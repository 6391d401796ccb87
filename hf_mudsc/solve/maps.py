"""Maps of a tensor axis into a group's merged space, built from a match (used by the solve and apply)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hf_mudsc.solve.matchers import Match


def transform_axis(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Contract `tensor`'s `axis` (size n) with a dense `matrix` (n, m): the axis becomes size m."""
    moved = torch.movedim(tensor, axis, -1)
    return torch.movedim(moved @ matrix.to(moved.dtype), -1, axis)


@dataclass(frozen=True)
class AxisMap:
    """A `(n, m)` merge/unmerge block with one nonzero per row, stored as (column, weight) per row.

    Every original unit belongs to exactly one merged unit, so contracting an axis with the block is a
    weighted scatter-add: O(tensor size) instead of the O(n · tensor size) of a dense product. When the
    block is a permutation (align; zip without same-model fusions) the scatter is a gather, and with unit
    weights it is an exact copy — valid in any dtype (`exact`), so callers may skip a float64 round trip.
    """

    index: torch.Tensor
    weight: torch.Tensor
    size: int
    inverse: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    exact: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.index.numel()
        if n == self.size and n and bool((torch.bincount(self.index, minlength=n) == 1).all()):
            object.__setattr__(self, "inverse", torch.argsort(self.index))
            object.__setattr__(self, "exact", bool((self.weight == 1).all()))

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> AxisMap:
        if (matrix != 0).sum(1).ne(1).any():
            raise ValueError("merge/unmerge rows must have exactly one nonzero entry")
        index = matrix.abs().argmax(1)
        return cls(index=index, weight=matrix.gather(1, index[:, None])[:, 0].to(torch.float64), size=matrix.shape[1])

    def apply(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        axis = axis % tensor.dim()
        if self.inverse is not None:
            # out[c] = w[inv[c]] · x[inv[c]]: the same products the scatter-add into zeros would give.
            out = tensor.index_select(axis, self.inverse)
            if not self.exact:
                shape = [1] * tensor.dim()
                shape[axis] = self.size
                out *= self.weight[self.inverse].to(tensor.dtype).reshape(shape)
            return out
        # index_add_ along the last (contiguous) axis: along axis 0 torch's threaded kernel is orders of
        # magnitude slower for small tensors.
        moved = torch.movedim(tensor, axis, -1) * self.weight.to(tensor.dtype)
        out = torch.zeros(*moved.shape[:-1], self.size, dtype=tensor.dtype).index_add_(-1, self.index, moved)
        return torch.movedim(out, -1, axis)


@dataclass(frozen=True)
class GroupMaps:
    """Per model (0 = A, 1 = B, 2, ...): `N·merge_i` (out-role in apply; `2·merge_i` for two models) and `U_i` as
    AxisMaps."""

    merge2: tuple[AxisMap, ...]
    unmerge: tuple[AxisMap, ...]

    @classmethod
    def from_match(cls, found: Match) -> GroupMaps:
        """From a `hf_mudsc.matching.Match` (its per-unit cluster index and merge weight), without dense matrices.

        The match says how many models its units come from (`Match.num_models`)."""
        clusters = found.cluster_of.cpu()
        models = found.num_models
        n = clusters.numel() // models
        ones = torch.ones(models * n, dtype=torch.float64)
        weights = models * found.merge_weight.cpu().to(torch.float64)
        rows = [slice(i * n, (i + 1) * n) for i in range(models)]
        return cls(
            merge2=tuple(AxisMap(clusters[r], weights[r], found.num_merged) for r in rows),  # type: ignore[arg-type]
            unmerge=tuple(AxisMap(clusters[r], ones[r], found.num_merged) for r in rows),  # type: ignore[arg-type]
        )

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
