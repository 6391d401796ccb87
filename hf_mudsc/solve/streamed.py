"""Big tensors of the tensor-wise merges in row chunks: a working set that does not grow with the number of parents.

The pure functions of `hf_mudsc.solve.task_vectors` take whole tensors: for one tensor name they hold every
parent's version and several N-sized intermediates (stacked task vectors, masks, sort indices ...). For MiniLM's
30522x384 word embeddings and 8 parents that is ~40 copies of the tensor (issue 13: merging 8 parents must need at
most 1.5x the memory of 2). Here one tensor is merged with the SAME definitions in two phases:

1. statistics of the whole tensor, one parent at a time: the magnitude thresholds of the TIES / breadcrumbs trims
   (a `RankWindow`: the boundary magnitudes and how many entries exceed them, so the tie rule of the stable sort —
   equal magnitudes kept in flat-index order — is reproduced exactly) and the L1 rescale factor;
2. the tensor in row chunks (dim 0), with every parent's rows of that chunk (`TensorSource.read_rows`: a
   safetensors slice, not the whole tensor): masks, sign election, agreeing mean and divisor are elementwise, so
   each chunk gives exactly those rows of the whole result. DARE's and DELLA's masks are drawn chunk after chunk
   from the parent's generator (`tensor_generator(seed, name, i)`), which `torch.bernoulli` consumes one draw per
   entry in row-major order: the same draws in the same order as one whole-tensor draw.

Chunks hold a multiple of `ALIGN` entries: torch's sum over the stacked parents (dim 0) takes a different summation
order for the last few entries of a contiguous run than for the vectorised rest, so chunk boundaries sit where the
whole tensor's vector blocks do, and the results are bitwise equal (tests/test_streaming_methods.py).

`merge_tensor` returns None for a tensor it does not chunk (small, 1-D, integer, shapes that differ, missing base,
non-finite task vectors ...): the caller then calls the pure function on whole tensors, which also raises the
errors for bad inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from hf_mudsc.solve import task_vectors as tv

#: Entries per chunk, summed over every input (base and parents): ~8 MB of float32 rows, whatever N is.
DEFAULT_BUDGET = 1 << 21
#: Chunks hold a multiple of this many entries (the widest vector block of torch's CPU sum: 4 x 512-bit registers
#: of float32 = 64 entries; 128 leaves a margin).
ALIGN = 128


@dataclass(frozen=True)
class TensorSource:
    """One input's version of one tensor: its shape, the whole tensor, and a range of its rows (dim 0)."""

    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    read_rows: Callable[[int, int], torch.Tensor]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSource:
        """A source over a tensor already in memory (tests, parents loaded whole)."""
        return cls(tuple(tensor.shape), lambda: tensor, lambda start, stop: tensor[start:stop])


def chunk_rows(shape: Sequence[int], inputs: int, budget: int = DEFAULT_BUDGET) -> int | None:
    """Rows per chunk for a tensor read from `inputs` sources, or None when it is not chunked (it fits the budget
    whole, or has fewer than 2 dims: DELLA ranks within rows, a 1-D tensor is one row)."""
    if len(shape) < 2 or shape[0] < 2:
        return None
    row = math.prod(shape[1:])
    if row == 0 or math.prod(shape) * inputs <= budget:
        return None
    step = ALIGN // math.gcd(row, ALIGN)
    rows = max(step, budget // (inputs * row) // step * step)
    return rows if rows < shape[0] else None


@dataclass
class RankWindow:
    """The entries whose rank by decreasing magnitude (equal magnitudes in flat-index order, as the stable sort of
    `magnitude_mask` / `outlier_mask`) lies in [lo, hi), decided chunk by chunk in flat order.

    An entry strictly between the boundary magnitudes is kept, one beyond them is not; an entry equal to a boundary
    magnitude has rank `greater + (equal entries before it)`, counted across chunks in `seen`.
    """

    lo: int
    hi: int
    numel: int
    top: float = math.inf
    bottom: float = -math.inf
    bounds: list[tuple[float, int]] = field(default_factory=list)  # (magnitude, how many entries exceed it)
    seen: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, delta: torch.Tensor, lo: int, hi: int) -> RankWindow:
        """The window's boundary magnitudes from the whole task vector (a selection, no sort)."""
        n = delta.numel()
        window = cls(lo, hi, n)
        if hi <= lo or (lo <= 0 and hi >= n):
            return window
        magnitudes = delta.detach().abs().reshape(-1)
        low_index, high_index = n - hi, n - 1 - lo  # ascending positions of ranks hi-1 and lo
        selected = np.partition(magnitudes.numpy(), [low_index, high_index])
        window.top, window.bottom = float(selected[high_index]), float(selected[low_index])
        for value in dict.fromkeys((window.top, window.bottom)):
            window.bounds.append((value, int((magnitudes > value).sum())))
        window.seen = [0] * len(window.bounds)
        return window

    def restart(self) -> None:
        """Back to the tensor's first entry (the tie counters count from there)."""
        self.seen = [0] * len(self.bounds)

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """The mask of the next rows (in flat order after those already masked), in `delta`'s dtype."""
        if self.hi <= self.lo:
            return torch.zeros_like(delta)
        if self.lo <= 0 and self.hi >= self.numel:
            return torch.ones_like(delta)
        magnitudes = delta.abs().reshape(-1)
        keep = (magnitudes < self.top) & (magnitudes > self.bottom)
        for position, (value, greater) in enumerate(self.bounds):
            equal = magnitudes == value
            count = int(equal.sum())
            if count:
                rank = torch.cumsum(equal, 0) + (greater + self.seen[position] - 1)
                keep |= equal & (rank >= self.lo) & (rank < self.hi)
            self.seen[position] += count
        return keep.reshape(delta.shape).to(delta.dtype)


def _window(sparsify: str, numel: int, density: float, gamma: float) -> tuple[int, int]:
    if sparsify == "magnitude":
        return tv.magnitude_window(numel, density)
    return tv.outlier_window(numel, density, gamma)


@dataclass
class _Parent:
    """Phase 1's results for one parent: where its rows come from and how its task vector is masked."""

    index: int
    source: TensorSource
    window: RankWindow | None = None
    factor: torch.Tensor | None = None
    generator: torch.Generator | None = None


def _options(function: str, weights: Any, keywords: Mapping[str, Any]) -> dict[str, Any]:
    """The pure function's arguments with its own defaults filled in (so a chunked call uses the same values)."""
    import inspect

    bound = inspect.signature(getattr(tv, function)).bind(None, None, weights, **keywords)
    bound.apply_defaults()
    return dict(bound.arguments)


@torch.no_grad()
def merge_tensor(function: str, name: str, base: TensorSource | None, parents: Sequence[TensorSource | None],
                 weights: Any = None, keywords: Mapping[str, Any] | None = None, *,
                 budget: int | None = None) -> torch.Tensor | None:
    """Tensor `name` merged by `hf_mudsc.solve.task_vectors.<function>` in row chunks, equal to the function's
    result on whole tensors; None when this tensor is not chunked (the caller calls the function instead).

    `function` is one of `task_vectors.GTA_FORMS` (two phases) or a function that is elementwise across a tensor
    (`linear`, `consensus`: each chunk is one call of it). `parents[i]` is None for a parent without the tensor.
    `budget`: entries per chunk over all inputs (None: `DEFAULT_BUDGET`).
    """
    keywords = dict(keywords or {})
    present = [(i, source) for i, source in enumerate(parents) if source is not None]
    reference = base if base is not None else (parents[0] if parents else None)
    if reference is None or not present or any(s.shape != reference.shape for _, s in present):
        return None
    inputs = len(present) + (base is not None)
    rows = chunk_rows(reference.shape, inputs, DEFAULT_BUDGET if budget is None else budget)
    if rows is None:
        return None
    if function in tv.GTA_FORMS:
        if base is None:
            return None
        return _gta_chunked(function, name, base, present, len(parents), weights, keywords, rows)
    return _elementwise_chunked(function, name, base, parents, weights, keywords, rows, reference.shape)


def _elementwise_chunked(function: str, name: str, base: TensorSource | None,
                         parents: Sequence[TensorSource | None], weights: Any, keywords: dict[str, Any],
                         rows: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Each chunk is one call of the function (an integer buffer included: the function copies it)."""
    pure = getattr(tv, function)
    out: torch.Tensor | None = None
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        chunk_base = None if base is None else {name: base.read_rows(start, stop)}
        chunk_parents = [{} if s is None else {name: s.read_rows(start, stop)} for s in parents]
        merged = pure(chunk_base, chunk_parents, weights, **keywords).get(name)
        if merged is None:
            return None
        if out is None:
            out = torch.empty(shape, dtype=merged.dtype)
        out[start:stop] = merged
    return out


def _gta_chunked(function: str, name: str, base: TensorSource, present: list[tuple[int, TensorSource]], n: int,
                 weights: Any, keywords: dict[str, Any], rows: int) -> torch.Tensor | None:
    """`_gta` of `task_vectors` for one tensor in two phases (module docstring); None: merge it whole."""
    sparsify, consensus = tv.GTA_FORMS[function]
    options = _options(function, weights, keywords)
    w_all = tv.per_parent(weights, n, "weights", 1.0)
    d_all = tv.per_parent(options.get("density"), n, "density", 1.0)
    g_all = tv.per_parent(options.get("gamma"), n, "gamma", 0.01)
    e_all = tv.per_parent(options.get("epsilon"), n, "epsilon", 0.15)
    rescale, seed = bool(options.get("rescale", False)), int(options.get("seed", 0))
    windowed = sparsify in ("magnitude", "outliers")
    random = sparsify in ("random", "della_magprune")

    # Phase 1: per-parent statistics of the whole tensor, one parent at a time.
    plans = [_Parent(i, source) for i, source in present]
    if windowed or (random and rescale):
        whole_base = base.read()
        if not whole_base.is_floating_point():
            return None  # an integer buffer: the function copies it
        b32 = whole_base.to(tv.work_dtype(whole_base))
        for plan in plans:
            delta = plan.source.read().to(b32.dtype) - b32
            if not torch.isfinite(delta).all():
                return None  # the pure function decides what NaN ranks as
            i = plan.index
            if windowed:
                plan.window = RankWindow.build(delta, *_window(sparsify, delta.numel(), d_all[i], g_all[i]))
                if rescale:
                    plan.factor = tv.l1_factor(delta, plan.window.mask(delta))
                    plan.window.restart()
            else:
                mask = tv.sparsify_mask(sparsify, delta, d_all[i], g_all[i], e_all[i],
                                        partial(tv.tensor_generator, seed, name, i))
                plan.factor = tv.l1_factor(delta, mask)
            del delta
        del whole_base, b32

    # Phase 2: row chunks with every parent's rows.
    if random:
        for plan in plans:
            plan.generator = tv.tensor_generator(seed, name, plan.index)
    out: torch.Tensor | None = None
    length = base.shape[0]
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        b = base.read_rows(start, stop)
        if not b.is_floating_point():
            return None  # an integer buffer: the function copies it
        b32 = b.to(tv.work_dtype(b))
        deltas = []
        for plan in plans:
            delta = plan.source.read_rows(start, stop).to(b32.dtype) - b32
            i = plan.index
            if plan.window is not None:
                mask = plan.window.mask(delta)
            else:
                mask = tv.sparsify_mask(sparsify, delta, d_all[i], g_all[i], e_all[i],
                                        lambda plan=plan: plan.generator)
            if mask is not None:
                delta = delta * mask
                if rescale and plan.factor is not None:
                    delta = delta * plan.factor
            deltas.append(delta)
        merged = tv.combine_task_vectors(b, b32, deltas, [w_all[plan.index] for plan in plans],
                                         consensus=consensus, normalize=bool(options["normalize"]),
                                         scaling=float(options["scaling"]))
        if out is None:
            out = torch.empty(base.shape, dtype=merged.dtype)
        out[start:stop] = merged
    return out


@torch.no_grad()
def localize_stitch(base: Mapping[str, torch.Tensor], parents: Sequence[Mapping[str, torch.Tensor]],
                    weights: Any = None, *, sparsity: float = 0.1, exclude: Sequence[str] = (),
                    source: Callable[[Mapping[str, torch.Tensor], str], TensorSource | None],
                    budget: int | None = None) -> dict[str, torch.Tensor]:
    """`task_vectors.localize_stitch` with a working set that does not grow with the number of parents.

    Phase 1, one parent at a time: the threshold of its top-`sparsity` task-vector magnitudes over the whole model
    (the same value as the function's `topk(...).values.min()`: a selection of the k-th largest). Phase 2, tensor
    by tensor in row chunks: the stitch is elementwise (masks `|tau_i| > threshold_i`, overlaps shared), so each
    chunk gives those rows of the function's result. `source(mapping, name)` gives a tensor's `TensorSource` (None
    when the mapping lacks it). Inputs the function refuses (shapes that differ) or ranks in another dtype (mixed
    float dtypes) are handed to it whole.
    """
    if base is None or not parents:
        return tv.localize_stitch(base, parents, weights, sparsity=sparsity, exclude=exclude)  # its error
    n = len(parents)
    w_all = tv.per_parent(weights, n, "weights", 1.0)
    excluded = set(exclude)
    sources: dict[str, tuple[TensorSource, list[TensorSource | None]]] = {}
    for name in base:
        b_source = source(base, name)
        if b_source is None or name in excluded or not _head(b_source).is_floating_point():
            continue
        sources[name] = (b_source, [source(parent, name) for parent in parents])
    if any(s is not None and s.shape != b.shape for b, ps in sources.values() for s in ps):
        return tv.localize_stitch(base, parents, weights, sparsity=sparsity, exclude=exclude)  # its error

    thresholds: list[float | None] = []
    for i in range(n):
        magnitudes, dtypes = [], set()
        for b_source, p_sources in sources.values():
            if p_sources[i] is not None:
                b = b_source.read()
                wd = tv.work_dtype(b)
                dtypes.add(wd)
                magnitudes.append((p_sources[i].read().to(wd) - b.to(wd)).abs().reshape(-1))
        if len(dtypes) > 1:
            return tv.localize_stitch(base, parents, weights, sparsity=sparsity, exclude=exclude)
        flat = torch.cat(magnitudes) if magnitudes else torch.zeros(0)
        del magnitudes
        k = int(sparsity * flat.numel())
        tv.check_stitch_keeps(sparsity, flat.numel())
        index = flat.numel() - k
        thresholds.append(float(np.partition(flat.numpy(), index)[index]) if k > 0 else None)
        del flat

    out: dict[str, torch.Tensor] = {}
    for name in base:
        if name not in sources:
            present = [{name: parent[name]} if name in parent else {} for parent in parents]
            out[name] = tv.localize_stitch({name: base[name]}, present, weights, sparsity=sparsity,
                                           exclude=[name])[name]
            continue
        b_source, p_sources = sources[name]
        rows = chunk_rows(b_source.shape, 1 + sum(s is not None for s in p_sources),
                          DEFAULT_BUDGET if budget is None else budget)
        if rows is None:
            b = b_source.read()
            out[name] = stitch(b, [None if s is None else s.read() for s in p_sources], thresholds, w_all)
            continue
        merged = torch.empty(b_source.shape, dtype=_head(b_source).dtype)
        for start in range(0, b_source.shape[0], rows):
            stop = min(start + rows, b_source.shape[0])
            merged[start:stop] = stitch(b_source.read_rows(start, stop),
                                        [None if s is None else s.read_rows(start, stop) for s in p_sources],
                                        thresholds, w_all)
        out[name] = merged
    return out


def _head(source: TensorSource) -> torch.Tensor:
    """A little of the tensor, for its dtype (the first row; a 0-d tensor whole)."""
    return source.read_rows(0, 1) if source.shape else source.read()


def stitch(b: torch.Tensor, parents: Sequence[torch.Tensor | None], thresholds: Sequence[float | None],
           weights: Sequence[float]) -> torch.Tensor:
    """Localize-and-Stitch's stitch of (rows of) one tensor, the same operations as `task_vectors.localize_stitch`:
    parent i's mask `|tau_i| > threshold_i` (none without a threshold), overlapping entries shared equally."""
    wd = tv.work_dtype(b)
    b32 = b.to(wd)
    taus = [None if t is None else t.to(wd) - b32 for t in parents]
    masks = [None if tau is None else (torch.zeros_like(tau, dtype=torch.bool) if thr is None else tau.abs() > thr)
             for tau, thr in zip(taus, thresholds)]
    count = torch.zeros(b.shape, dtype=wd)
    for mask in masks:
        if mask is not None:
            count += mask.to(wd)
    inv = torch.where(count > 0, 1.0 / torch.where(count > 0, count, 1), 0).to(wd)
    acc = b32.clone()
    for weight, mask, tau in zip(weights, masks, taus):
        if tau is not None:
            acc += weight * mask.to(wd) * inv * tau
    return acc.to(b.dtype)
