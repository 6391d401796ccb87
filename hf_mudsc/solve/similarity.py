"""Unit similarities: streaming activation correlation, weight correlation, and their dual-space blend.

All results are float64: real data has near-ties, and matching must not flip on rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from hf_mudsc.blas import can_syrk, mirror_upper, syrk_upper
from hf_mudsc.calibrate.correlation import CLAMP, match_constant_units
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.spec import Member, PermutationSpec


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
    """`Z_i` of docs/design.md §4.3: every non-ignored member of the group, concatenated column-wise in spec order."""
    return torch.cat(list(weight_feature_blocks(spec, group_index, params, model, maps)), dim=1)


def weight_feature_blocks(
    spec: PermutationSpec,
    group_index: int,
    params: Mapping[str, torch.Tensor],
    model: int,
    maps: Sequence[GroupMaps | None],
    *,
    as_float64: bool = True,
) -> Iterator[torch.Tensor]:
    """The column blocks of `Z_i`, one `(n, D_m)` block per non-ignored member, in spec order: for sums over the
    columns of a wide group (BERT's 30k-column vocabulary) without concatenating all of them at once.
    `as_float64=False` keeps a block in the parameters' dtype where every map applied to it was an exact copy."""
    for member in spec.groups[group_index].members:
        if not member.ignore:
            yield _member_block(spec, group_index, member, params, model, maps, as_float64=as_float64)


# Rows of the `(2n, 2n)` correlation finalized at a time (the `μμᵀ`, `σσᵀ` temporaries stay this many rows).
_CORRELATION_ROWS = 256


class _Moments:
    """`Σ z zᵀ`, `Σ z` over columns and the column count of `[Z_A; Z_B]`, built chunk by chunk.

    On the CPU only the upper triangle is summed (BLAS `dsyrk`: half the multiply-adds of `Z Zᵀ`); elsewhere the
    blocks `[AA AB]` and `BB` (3/4 of it, two GEMMs on contiguous row blocks). `correlation` fills in the rest.
    """

    def __init__(self, width: int, device: torch.device | str | None = None, models: int = 2) -> None:
        self.width = width
        self.models = models
        # Off the CPU the first `split` rows are multiplied against all columns, the rest only against themselves
        # (n for two models: the blocks [AA AB] and BB; the same 3/4 of the product for N models).
        self.split = models * width // 2
        self.gram = torch.empty(models * width, models * width, dtype=torch.float64, device=device)
        self.sums = torch.zeros(models * width, dtype=torch.float64, device=device)
        self.columns = 0
        self._fresh = True  # gram holds garbage until the first product (saves zeroing 2n × 2n)

    def add_stacked(self, z: torch.Tensor) -> None:
        """Add the columns of a `(2n, D)` float64 block `[Z_A; Z_B]` (moved to the sums' device)."""
        z = z.to(self.gram.device)
        beta = 0.0 if self._fresh else 1.0
        if can_syrk(self.gram, z):
            syrk_upper(self.gram, z, rows=True, beta=beta)
        else:
            n = self.split
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
        total = _Moments(self.width, self.gram.device, self.models)
        total.add_moments(self)
        total.add_moments(other)
        return total

    def correlation(self, *, consume: bool = False, constants: bool = True) -> torch.Tensor:
        """Pearson correlation of the rows: a fresh matrix, or with `consume` the Gram's own buffer (the moments
        are used up) and no `(2n, 2n)` temporary — `_CORRELATION_ROWS` rows of `μμᵀ` and `σσᵀ` at a time.

        Both ways compute every entry with the same operations, so the results are bitwise equal; the solve
        consumes (a visit of a MiniLM MLP group otherwise makes three 75 MB temporaries, which also fragment
        the heap between the solve's starts). `constants`: constant rows of one value (pruned units: every weight
        zero) get 1, as `calibrate.correlation.match_constant_units` does for activations."""
        size = self.models * self.width
        mean = self.sums / self.columns
        cov = self.gram.div_(self.columns) if consume else self.gram / self.columns
        if consume:
            self.gram, self._fresh = torch.empty(0, dtype=torch.float64), True
        mirror_upper(cov)
        for start in range(0, size, _CORRELATION_ROWS):
            cov[start:start + _CORRELATION_ROWS] -= torch.outer(mean[start:start + _CORRELATION_ROWS], mean)
        variance = cov.diagonal().clone()
        std = variance.clamp_min(0).sqrt()
        for start in range(0, size, _CORRELATION_ROWS):
            rows = cov[start:start + _CORRELATION_ROWS]
            rows.div_(torch.outer(std[start:start + _CORRELATION_ROWS], std).clamp_min_(CLAMP))
        if constants:
            match_constant_units(cov, mean, variance)
        return cov


# Columns of `[Z_A; Z_B]` are gathered into chunks of about this many float64 elements (32 MB) before
# each Gram update: large enough for GEMM speed, small enough that no group's full Z is materialised.
_CHUNK_ELEMENTS = 4 * 2**20


class WeightCorrelation:
    """`C_w` of docs/design.md §4.3 for any group under any current matches, with the constant part cached.

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
        others: Sequence[Mapping[str, torch.Tensor]] = (),
        constants: bool = True,
    ) -> None:
        """`others`: parents after the first two (N > 2: `Z = [Z_0; Z_1; ...]`, an `(N·n, N·n)` correlation);
        `constants=False`: plain Pearson for constant rows (the reference's, `reference_compat=True`)."""
        self.constants = constants
        self.spec = spec
        self.params = (params_a, params_b, *others)
        self.cache_constant = cache_constant
        # Where the Gram products run (e.g. a GPU); `Z` is gathered on the CPU and the result returned there.
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._constant: dict[int, tuple[_Moments | None, torch.Tensor | None]] = {}

    def _is_constant(self, group_index: int, member: Member) -> bool:
        return all(other == group_index for other, _ in self.spec.axes_of(member.param))

    def _blocks(self, group_index: int, member: Member, maps: Sequence[GroupMaps | None]) -> list[torch.Tensor]:
        return [_member_block(self.spec, group_index, member, self.params[i], i, maps, as_float64=False)
                for i in range(len(self.params))]

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
            z = torch.empty(len(self.params) * n, columns, dtype=torch.float64)
            start = 0
            for blocks in pending:
                stop = start + blocks[0].shape[1]
                for model, block in enumerate(blocks):
                    z[model * n:(model + 1) * n, start:stop].copy_(block)
                start = stop
            moments.add_stacked(z)
            pending, columns = [], 0

        for member in members:
            blocks = self._blocks(group_index, member, maps)
            pending.append(blocks)
            columns += blocks[0].shape[1]
            if len(self.params) * n * columns >= _CHUNK_ELEMENTS:
                flush()
        if extra is not None:
            pending.append([extra[i * n:(i + 1) * n] for i in range(len(self.params))])
            columns += extra.shape[1]
        flush()

    def _constant_part(
        self, group_index: int, constant: Sequence[Member], maps: Sequence[GroupMaps | None]
    ) -> tuple[_Moments | None, torch.Tensor | None]:
        if group_index not in self._constant:
            width = self.spec.groups[group_index].width
            blocks = [self._blocks(group_index, m, maps) for m in constant]
            if sum(b[0].shape[1] for b in blocks) >= 2 * width:
                fixed = _Moments(width, self.device, len(self.params))
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
        moments = _Moments(group.width, self.device, len(self.params))
        self._accumulate(moments, group_index, varying, maps, extra=columns)
        if fixed is not None:
            moments.add_moments(fixed)
        return moments.correlation(consume=True, constants=self.constants).cpu()


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
