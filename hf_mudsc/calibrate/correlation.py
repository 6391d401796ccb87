"""Streaming activation statistics (sums, Gram, count) and their Pearson correlation (docs/design.md §4.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hf_mudsc.blas import add_upper, mirror_upper, syrk_upper

CLAMP = 1e-7
#: A unit whose standard deviation over the calibration samples is at most this (times max(1, |mean|)) is constant
#: there: a dead ReLU/GELU unit (exactly 0), a unit whose input row is zero (its bias's activation), or any unit of
#: a group that saw one sample. Pearson correlation is undefined for it (0 after the clamp).
CONSTANT_STD = 1e-12
#: Two constant units are the same unit on the calibration data when their values agree to this share of the largest
#: constant's magnitude (float32 forward passes of one function in two unit orders differ in the last bits).
CONSTANT_MATCH = 1e-5
CONSTANT_ROWS = 256  # constant units compared per step in `match_constant_units`


def match_constant_units(correlation: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Give two constant units (`CONSTANT_STD`) of equal value (`CONSTANT_MATCH`) similarity 1, in place.

    Pearson gives a constant unit 0 with every unit, its twin in the other parent included: align then paired a dead
    unit with a constant one (their biases averaged, the constant lost) and zip left dead units unfused and fused
    two live twin pairs into one cluster instead; a group read once per example matched at random on one example.
    Equal constants are interchangeable on the data, so they are as similar as units get; a constant unit and a
    varying one stay at 0. Only constant units change, so every other merge keeps its numbers."""
    std = variance.clamp_min(0).sqrt()
    constant = torch.nonzero(std <= CONSTANT_STD * mean.abs().clamp_min(1.0)).flatten()
    if constant.numel() < 2:
        return correlation
    values = mean[constant]
    # relative to the largest constant, with no absolute floor: MiniLM's last LayerNorm scales two residual units by
    # ~5e-33, constant there at -4.5e-32 and +3.8e-32 — opposite signs, not one unit (an absolute 1e-5 matched them)
    tolerance = CONSTANT_MATCH * float(values.abs().max())
    one = torch.ones((), dtype=correlation.dtype, device=correlation.device)
    for start in range(0, constant.numel(), CONSTANT_ROWS):  # a few rows at a time: no (k, k) temporaries
        rows, columns = ((values[start:start + CONSTANT_ROWS, None] - values[None, :]).abs() <= tolerance).nonzero(
            as_tuple=True)
        correlation.index_put_((constant[start:start + CONSTANT_ROWS][rows], constant[columns]), one)
    return correlation


def pearson_from_covariance(covariance: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson correlation `Cov / clamp(σσᵀ, 1e-7)`; zero-variance units get zero rows and columns, except that, given
    the units' `mean`, two constant units of one value get 1 (`match_constant_units`)."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    correlation = covariance / torch.outer(std, std).clamp_min(CLAMP)
    if mean is not None:
        match_constant_units(correlation, mean, covariance.diagonal())
    return correlation


def column_sums(x: torch.Tensor) -> torch.Tensor:
    """`x.sum(0, dtype=torch.float64)` of a CPU matrix. For float32 rows (the default statistics) by numpy's outer
    reduction: the same row-after-row float64 sums as torch's (equal bit for bit), but torch took 38 ms for a
    (2048, 3072) batch where numpy takes 3 ms (one core), and calibration runs one per group per batch. float64 rows
    keep torch's own sum: there torch sums in another order than numpy's row after row (more accurately)."""
    if x.dtype != torch.float32:
        return x.sum(0, dtype=torch.float64)
    return torch.from_numpy(x.detach().numpy().sum(0, dtype=np.float64))


class CorrelationAccumulator:
    """Streaming `Σx`, `Σxxᵀ` and count of `dim`-wide samples, summable across processes.

    `update` per batch, `combine` another accumulator (another shard's statistics), `finalize` for the
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
        # Of those, the examples that repeat one read before by the same process (`collect_statistics`): summed over
        # processes, a repeat across shards goes uncounted (never a false warning).
        self.repeats = 0
        self._lower_stale = False

    def update(self, samples: torch.Tensor) -> None:
        """Add `(num_samples, dim)` samples.

        One shifted copy of the batch, one symmetric product (on the CPU BLAS `?syrk`: one triangle, half a GEMM's
        multiply-adds): with `dtype=float64` it is added into the sum in place; with `dtype=float32` the
        (shifted, so well-conditioned) batch product runs at fp32 speed and only the batch's result is added
        into the float64 sums — error stays per batch, never across.
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
        if samples.device.type == "cpu" and home.type == "cpu":
            # The upper triangle by BLAS ?syrk (half the multiply-adds of xᵀx); the lower one is filled in from it
            # when the sums are read (`_symmetric`).
            x = samples.to(self.dtype) - self.shift.to(self.dtype)
            self.total += column_sums(x)
            if self.dtype == torch.float64:
                syrk_upper(self.outer, x)
            else:  # the batch's product in the GEMM dtype, only its result added into the float64 sums
                product = torch.empty(self.dim, self.dim, dtype=self.dtype)
                syrk_upper(product, x, beta=0.0)  # the upper triangle; the lower one is never read
                add_upper(self.outer, product)  # widens element by element: no float64 copy of it is made
        else:
            # Features on an accelerator are multiplied there, only the blocks [AA AB] and BB (3/4 of the FLOPs of
            # xᵀx); only the (dim, dim) products come back.
            h = self.dim // 2
            x = samples.to(self.dtype) - self.shift.to(samples.device, self.dtype)
            self.total += x.sum(0, dtype=torch.float64).to(home)
            self.outer[:h].add_((x[:, :h].T @ x).to(home))
            self.outer[h:, h:].add_((x[:, h:].T @ x[:, h:]).to(home))
        self._lower_stale = True
        self.count += samples.shape[0]

    def _symmetric(self) -> torch.Tensor:
        """`self.outer` with its lower triangle brought up to date from the upper one (in place)."""
        if getattr(self, "_lower_stale", False):
            mirror_upper(self.outer)
            self._lower_stale = False
        return self.outer

    def _moments_around(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`Σ(x − shift)` and `Σ(x − shift)(x − shift)ᵀ` from the sums around `self.shift`."""
        delta = self.shift - shift
        total = self.total + self.count * delta
        outer = self._symmetric() + torch.outer(delta, self.total) + torch.outer(self.total, delta)
        outer += self.count * torch.outer(delta, delta)
        return total, outer

    def combine(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Fold another shard's statistics into this one (in place) and return self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot combine accumulators of width {self.dim} and {other.dim}")
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
        self.repeats += other.repeats
        return self

    def covariance(self) -> torch.Tensor:
        self._check_usable()
        if self.count == 0:
            raise ValueError("no calibration samples reached this accumulator")
        mean = self.total / self.count
        return self._symmetric() / self.count - torch.outer(mean, mean)

    def finalize(self, *, constants: bool = True) -> torch.Tensor:
        """The `(dim, dim)` Pearson correlation of everything seen (`constants`: with `match_constant_units`)."""
        return pearson_from_covariance(self.covariance(), self.shift + self.total / self.count if constants else None)

    def finalize_in_place(self, chunk_rows: int = 1024, *, constants: bool = True) -> torch.Tensor:
        """`finalize()` computed inside the sums' own buffer, which it returns: the accumulator is used up.

        For the biggest groups the `(dim, dim)` sums are hundreds of MB; the plain formula makes three
        temporaries of that size. Here only `chunk_rows` rows of the `σσᵀ` denominator exist at a time.
        """
        self._check_usable()
        if self.count == 0:
            raise ValueError("no calibration samples reached this accumulator")
        mean = self.total / self.count
        covariance = self._symmetric().div_(self.count).addr_(mean, mean, alpha=-1)
        variance = covariance.diagonal().clone()
        std = variance.clamp_min(0).sqrt()
        for start in range(0, self.dim, chunk_rows):
            rows = covariance[start:start + chunk_rows]
            rows.div_(torch.outer(std[start:start + chunk_rows], std).clamp_min_(CLAMP))
        if constants:
            match_constant_units(covariance, self.shift + mean, variance)
        self.outer = self.total = self.shift = None  # consumed: further use fails in _check_usable
        return covariance

    def _check_usable(self) -> None:
        if self.outer is None:
            raise RuntimeError("this accumulator was consumed by finalize_in_place(); its sums are gone")

    def tensors(self) -> list[torch.Tensor]:
        """The state as plain sums around zero, so shards can be added by an all-reduce."""
        self._check_usable()
        total, outer = self._moments_around(torch.zeros(self.dim, dtype=torch.float64))
        return [total, outer, torch.tensor([float(self.count), float(self.examples), float(self.repeats)],
                                           dtype=torch.float64)]

    def load_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Adopt summed `tensors()` (e.g. after an all-reduce); re-centres them on their mean."""
        self.shift = torch.zeros(self.dim, dtype=torch.float64)
        self.total, self.outer = tensors[0].to(torch.float64), tensors[1].to(torch.float64)
        self._lower_stale = False
        self.count = int(round(float(tensors[2][0].item())))
        self.examples = int(round(float(tensors[2][1].item()))) if tensors[2].numel() > 1 else 0
        self.repeats = int(round(float(tensors[2][2].item()))) if tensors[2].numel() > 2 else 0
        if self.count:
            mean = self.total / self.count
            self.total, self.outer = self._moments_around(mean)
            self.shift = mean


def correlations_from(accumulators: list[CorrelationAccumulator], *, constants: bool = True) -> list[torch.Tensor]:
    """Every accumulator's Pearson correlation, finalized in place one group at a time (the list is emptied).

    Peak memory stays at one copy of the statistics plus a few rows, whatever the number of groups. `constants=False`
    keeps plain Pearson for constant units (0 with everything: the reference implementation's, for
    `reference_compat=True`) instead of `match_constant_units`.
    """
    correlations = []
    while accumulators:
        correlations.append(accumulators.pop(0).finalize_in_place(constants=constants))
    return correlations
