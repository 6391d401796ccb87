"""Unit similarities: streaming activation correlation, weight correlation, and their dual-space blend.

All results are float64: real data has near-ties, and matching must not flip on rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .spec import Member, PermutationSpec

if TYPE_CHECKING:
    from .matching import Match

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
        # Calibration examples behind the samples (a sample is a token for per-token groups): set by
        # `collect_statistics`, carried through merges and all-reduces, reported as the calibration size.
        self.examples = 0
        self._lower_stale = False

    def update(self, samples: torch.Tensor) -> None:
        """Add `(num_samples, dim)` samples.

        One shifted copy of the batch, one GEMM: with `dtype=float64` the product is added into the sum in
        place; with `dtype=float32` the (shifted, so well-conditioned) batch product runs at fp32 GEMM speed
        and only the batch's result is added into the float64 sums — error stays per batch, never across.
        """
        if samples.dim() != 2 or samples.shape[1] != self.dim:
            raise ValueError(f"expected samples of shape (N, {self.dim}), got {tuple(samples.shape)}")
        self._check_usable()
        if samples.shape[0] == 0:
            return
        samples = samples.detach()
        home = self.outer.device
        if self.count == 0:
            # The shift is stored exactly as representable in the GEMM dtype, so the low-precision path
            # subtracts it without a float64 round trip and the moment algebra stays exact.
            self.shift = samples.to(torch.float64).mean(0).to(self.dtype).to(home, torch.float64)
        # Only the blocks [AA AB] and BB of the symmetric Gram are multiplied (3/4 of the FLOPs of a full
        # xᵀx); the BA block is filled in from AB when the sums are read (`_symmetric`).
        h = self.dim // 2
        if self.dtype == torch.float64:
            x = samples.to(home, torch.float64) - self.shift
            self.total += x.sum(0)
            self.outer[:h].addmm_(x[:, :h].T, x)
            self.outer[h:, h:].addmm_(x[:, h:].T, x[:, h:])
        else:
            # Features on an accelerator are multiplied there; only the (dim, dim) products come back.
            x = samples.to(self.dtype) - self.shift.to(samples.device, self.dtype)
            self.total += x.sum(0, dtype=torch.float64).to(home)
            # add_ widens the fp32 product element by element: no float64 copy of it is made.
            self.outer[:h].add_((x[:, :h].T @ x).to(home))
            self.outer[h:, h:].add_((x[:, h:].T @ x[:, h:]).to(home))
        self._lower_stale = True
        self.count += samples.shape[0]

    def _symmetric(self) -> torch.Tensor:
        """`self.outer` with its lower-left block brought up to date (in place)."""
        if getattr(self, "_lower_stale", False):
            h = self.dim // 2
            self.outer[h:, :h] = self.outer[:h, h:].T
            self._lower_stale = False
        return self.outer

    def _moments_around(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`Σ(x − shift)` and `Σ(x − shift)(x − shift)ᵀ` from the sums around `self.shift`."""
        delta = self.shift - shift
        total = self.total + self.count * delta
        outer = self._symmetric() + torch.outer(delta, self.total) + torch.outer(self.total, delta)
        outer += self.count * torch.outer(delta, delta)
        return total, outer

    def merge(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Fold another shard's statistics into this one (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of width {self.dim} and {other.dim}")
        self._check_usable()
        other._check_usable()
        if other.count == 0:
            return self
        if self.count == 0:
            self.shift = other.shift.clone()
        total, outer = other._moments_around(self.shift)
        self.total += total
        self._symmetric().add_(outer)
        self.count += other.count
        self.examples += other.examples
        return self

    def covariance(self) -> torch.Tensor:
        self._check_usable()
        if self.count == 0:
            raise ValueError("no calibration samples reached this accumulator")
        mean = self.total / self.count
        return self._symmetric() / self.count - torch.outer(mean, mean)

    def finalize(self) -> torch.Tensor:
        """The `(dim, dim)` Pearson correlation of everything seen."""
        return pearson_from_covariance(self.covariance())

    def finalize_in_place(self, chunk_rows: int = 1024) -> torch.Tensor:
        """`finalize()` computed inside the sums' own buffer, which it returns: the accumulator is used up.

        For the biggest groups the `(dim, dim)` sums are hundreds of MB; the plain formula makes three
        temporaries of that size. Here only `chunk_rows` rows of the `σσᵀ` denominator exist at a time.
        """
        self._check_usable()
        if self.count == 0:
            raise ValueError("no calibration samples reached this accumulator")
        mean = self.total / self.count
        covariance = self._symmetric().div_(self.count).addr_(mean, mean, alpha=-1)
        std = covariance.diagonal().clamp_min(0).sqrt()
        for start in range(0, self.dim, chunk_rows):
            rows = covariance[start:start + chunk_rows]
            rows.div_(torch.outer(std[start:start + chunk_rows], std).clamp_min_(CLAMP))
        self.outer = self.total = self.shift = None  # consumed: further use fails in _check_usable
        return covariance

    def _check_usable(self) -> None:
        if self.outer is None:
            raise RuntimeError("this accumulator was consumed by finalize_in_place(); its sums are gone")

    def tensors(self) -> list[torch.Tensor]:
        """The state as plain sums around zero, so shards can be added by an all-reduce."""
        self._check_usable()
        total, outer = self._moments_around(torch.zeros(self.dim, dtype=torch.float64))
        return [total, outer, torch.tensor([float(self.count), float(self.examples)], dtype=torch.float64)]

    def load_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Adopt summed `tensors()` (e.g. after an all-reduce); re-centres them on their mean."""
        self.shift = torch.zeros(self.dim, dtype=torch.float64)
        self.total, self.outer = tensors[0].to(torch.float64), tensors[1].to(torch.float64)
        self._lower_stale = False
        self.count = int(round(float(tensors[2][0].item())))
        self.examples = int(round(float(tensors[2][1].item()))) if tensors[2].numel() > 1 else 0
        if self.count:
            mean = self.total / self.count
            self.total, self.outer = self._moments_around(mean)
            self.shift = mean


def correlations_from(accumulators: list[CorrelationAccumulator]) -> list[torch.Tensor]:
    """Every accumulator's Pearson correlation, finalized in place one group at a time (the list is emptied).

    Peak memory stays at one copy of the statistics plus a few rows, whatever the number of groups.
    """
    correlations = []
    while accumulators:
        correlations.append(accumulators.pop(0).finalize_in_place())
    return correlations


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
    """Per model (0 = A, 1 = B): `2·merge_i` (out-role in apply) and `U_i` as AxisMaps."""

    merge2: tuple[AxisMap, AxisMap]
    unmerge: tuple[AxisMap, AxisMap]

    @classmethod
    def from_match(cls, found: Match) -> GroupMaps:
        """From a `hf_mudsc.matching.Match` (its per-unit cluster index and merge weight), without dense matrices."""
        clusters = found.cluster_of.cpu()
        n = clusters.numel() // 2
        ones = torch.ones(2 * n, dtype=torch.float64)
        weights = 2 * found.merge_weight.cpu().to(torch.float64)
        rows = [slice(i * n, (i + 1) * n) for i in range(2)]
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


def _member_block(
    spec: PermutationSpec,
    group_index: int,
    member: Member,
    params: Mapping[str, torch.Tensor],
    model: int,
    maps: Sequence[GroupMaps | None],
    as_float64: bool = True,
) -> torch.Tensor:
    """One member's `(n, D_m)` slice of `Z_i`: its other axes mapped into their groups' merged spaces.

    An axis that is an `in` member of a matched group q is multiplied by q's `(2·merge_i)ᵀ`, an `out`
    member by q's `U_iᵀ` (the reference's pairing); unmatched groups leave their axes untouched.
    `as_float64=False` may return the parameter's own dtype when every step was an exact copy (the
    caller converts while copying into its float64 buffer — same values, one copy less).
    """
    tensor = params[member.param].detach()
    if as_float64:
        tensor = tensor.to(torch.float64)
    axis = member.axis % tensor.dim()
    for other_index, other in spec.axes_of(member.param):
        found = maps[other_index]
        if other_index == group_index or found is None:
            continue
        axis_map = found.merge2[model] if other.role == "in" else found.unmerge[model]
        if not axis_map.exact:
            tensor = tensor.to(torch.float64)
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
    """`Σ z zᵀ`, `Σ z` over columns and the column count of `[Z_A; Z_B]`, built chunk by chunk.

    Only the blocks `[AA AB]` and `BB` are multiplied (3/4 of a full `Z Zᵀ`, in two GEMMs on contiguous
    row blocks); the `BA` block is the transpose of `AB` and is filled in by `correlation`.
    """

    def __init__(self, width: int, device: torch.device | str | None = None) -> None:
        self.width = width
        self.gram = torch.empty(2 * width, 2 * width, dtype=torch.float64, device=device)
        self.sums = torch.zeros(2 * width, dtype=torch.float64, device=device)
        self.columns = 0
        self._fresh = True  # gram holds garbage until the first product (saves zeroing 2n × 2n)

    def add_stacked(self, z: torch.Tensor) -> None:
        """Add the columns of a `(2n, D)` float64 block `[Z_A; Z_B]` (moved to the sums' device)."""
        z = z.to(self.gram.device)
        n = self.width
        beta = 0.0 if self._fresh else 1.0
        top, bottom = self.gram[:n], self.gram[n:, n:]
        top.addmm_(z[:n], z.T, beta=beta)
        bottom.addmm_(z[n:], z[n:].T, beta=beta)
        self._fresh = False
        self.sums += z.sum(1)
        self.columns += z.shape[1]

    def add(self, za: torch.Tensor, zb: torch.Tensor) -> None:
        self.add_stacked(torch.cat([za, zb]).to(torch.float64))

    def add_moments(self, other: _Moments) -> None:
        """Add another `_Moments`' sums into this one (in place; `other` is left untouched)."""
        if not other._fresh:
            if self._fresh:
                self.gram = other.gram.clone()
            else:
                self.gram += other.gram
            self._fresh = False
        self.sums += other.sums
        self.columns += other.columns

    def plus(self, other: _Moments) -> _Moments:
        total = _Moments(self.width, self.gram.device)
        total.add_moments(self)
        total.add_moments(other)
        return total

    def correlation(self) -> torch.Tensor:
        """Pearson correlation of the rows; a fresh matrix (the sums are left untouched)."""
        n = self.width
        mean = self.sums / self.columns
        cov = self.gram / self.columns
        cov[n:, :n] = cov[:n, n:].T
        cov -= torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        return cov.div_(torch.outer(std, std).clamp_min_(CLAMP))


# Columns of `[Z_A; Z_B]` are gathered into chunks of about this many float64 elements (32 MB) before
# each Gram update: large enough for GEMM speed, small enough that no group's full Z is materialised.
_CHUNK_ELEMENTS = 4 * 2**20


class WeightCorrelation:
    """`C_w` of design §4.3 for any group under any current matches, with the constant part cached.

    Members whose other axes belong to no group (embedding tables, norms, biases) never change between
    visits. Wide ones (BERT's 30k-column vocabulary) are cached as their Gram contribution; narrow ones
    (biases, norms: a few columns) as their columns, which is far smaller than a `2n × 2n` Gram.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        params_a: Mapping[str, torch.Tensor],
        params_b: Mapping[str, torch.Tensor],
        cache_constant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.spec = spec
        self.params = (params_a, params_b)
        self.cache_constant = cache_constant
        # Where the Gram products run (e.g. a GPU); `Z` is gathered on the CPU and the result returned there.
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._constant: dict[int, tuple[_Moments | None, torch.Tensor | None]] = {}

    def _is_constant(self, group_index: int, member: Member) -> bool:
        return all(other == group_index for other, _ in self.spec.axes_of(member.param))

    def _blocks(self, group_index: int, member: Member, maps: Sequence[GroupMaps | None]) -> list[torch.Tensor]:
        return [_member_block(self.spec, group_index, member, self.params[i], i, maps, as_float64=False)
                for i in range(2)]

    def _accumulate(
        self, moments: _Moments, group_index: int, members: Sequence[Member], maps: Sequence[GroupMaps | None],
        extra: torch.Tensor | None = None,
    ) -> None:
        """Gram-update `moments` with the members' columns (and `extra` stacked columns), chunk by chunk."""
        n = moments.width
        pending: list[list[torch.Tensor]] = []
        columns = 0

        def flush() -> None:
            nonlocal pending, columns
            if not pending:
                return
            z = torch.empty(2 * n, columns, dtype=torch.float64)
            start = 0
            for za, zb in pending:
                stop = start + za.shape[1]
                z[:n, start:stop].copy_(za)
                z[n:, start:stop].copy_(zb)
                start = stop
            moments.add_stacked(z)
            pending, columns = [], 0

        for member in members:
            blocks = self._blocks(group_index, member, maps)
            pending.append(blocks)
            columns += blocks[0].shape[1]
            if 2 * n * columns >= _CHUNK_ELEMENTS:
                flush()
        if extra is not None:
            pending.append([extra[:n], extra[n:]])
            columns += extra.shape[1]
        flush()

    def _constant_part(
        self, group_index: int, constant: Sequence[Member], maps: Sequence[GroupMaps | None]
    ) -> tuple[_Moments | None, torch.Tensor | None]:
        if group_index not in self._constant:
            width = self.spec.groups[group_index].width
            blocks = [self._blocks(group_index, m, maps) for m in constant]
            if sum(b[0].shape[1] for b in blocks) >= 2 * width:
                fixed = _Moments(width, self.device)
                self._accumulate(fixed, group_index, constant, maps)
                self._constant[group_index] = (fixed, None)
            else:
                stacked = torch.cat([torch.cat(b, dim=1) for b in zip(*blocks)], dim=0).to(torch.float64)
                self._constant[group_index] = (None, stacked)
        return self._constant[group_index]

    def __call__(self, group_index: int, maps: Sequence[GroupMaps | None]) -> torch.Tensor:
        group = self.spec.groups[group_index]
        members = [m for m in group.members if not m.ignore]
        constant = [m for m in members if self._is_constant(group_index, m)] if self.cache_constant else []
        varying = [m for m in members if m not in constant]
        fixed, columns = self._constant_part(group_index, constant, maps) if constant else (None, None)
        moments = _Moments(group.width, self.device)
        self._accumulate(moments, group_index, varying, maps, extra=columns)
        if fixed is not None:
            moments.add_moments(fixed)
        return moments.correlation().cpu()


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
