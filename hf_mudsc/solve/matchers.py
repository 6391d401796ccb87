"""Unit matchers of MuDSC (docs/design.md §4.6): align, group align, zip and group zip.

Every matcher reads one symmetric ``(2n, 2n)`` similarity of the units of models A and B (rows and
columns ``[A 0..n-1; B 0..n-1]``) and returns a :class:`Match`: a 0/1 ``unmerge`` matrix whose column
``j`` lists the original units fused into merged unit ``j``, the column-normalised ``merge`` matrix and
the mean similarity of the picks (the solver's objective). The merged width is always ``n``.

The behaviour is that of the MuDSC reference implementation, cluster for cluster, including its tie
order (row-major first) and its same-model / same-head budgets; :func:`zip_reference` keeps the
straightforward ``O(n^3)`` greedy loop as the executable specification of the fast zip.
Everything is computed in float64: real similarities have near-ties that float32 would flip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from hf_mudsc.option_values import MATCHERS

logger = logging.getLogger(__name__)

__all__ = ["MATCHERS", "Match", "attention_head_scores", "attention_head_scores_n", "match", "pair_attention_heads",
           "pair_attention_heads_n", "zip_reference"]


_NEG_INF = -np.inf


@dataclass(frozen=True, eq=False)
class Match:
    """Result of matching one group: how the ``2n`` original units fuse into ``n`` merged units.

    Column order is deterministic: align puts A unit i's pair in column i; zip orders clusters by their
    lowest original unit (the reference's order); the group matchers give merged head j (A head j and its
    partner) the contiguous columns ``j*g .. (j+1)*g - 1``. ``eq=False``: tensors have no single truth value.
    """

    cluster_of: torch.Tensor
    """(2n,) int64: the merged unit (column) each original unit `[A 0..n-1; B 0..n-1]` is fused into."""
    merge_weight: torch.Tensor
    """(2n,) float64: each original unit's entry in `merge_matrix`, 1 / (its cluster's size + normalizer_eps)."""
    num_merged: int
    """Merged width m (columns)."""
    value: float
    """Mean similarity of the picks (matched entries, or zip's picked maxima)."""
    head_pairing: tuple[int, ...] | None = None
    """For num_heads > 1: the partner B head of each A head; None otherwise. N > 2 models: model 1's partner heads,
    then model 2's, ..."""
    num_models: int = 2
    """How many models the units come from: `cluster_of` lists model 0's n units, then model 1's, ..."""

    # Stored as one index and one weight per original unit: the dense (2n, n) matrices of a ViT-B MLP group
    # are 150 MB each, and a solve keeps several matches of every group alive.
    @property
    def unmerge(self) -> torch.Tensor:
        """(2n, m) float64 0/1; column j lists the original units fused into merged unit j (built on access)."""
        return self._dense(torch.ones_like(self.merge_weight))

    @property
    def merge_matrix(self) -> torch.Tensor:
        """(2n, m) float64 = unmerge / (unmerge.sum(0) + normalizer_eps) (built on access)."""
        return self._dense(self.merge_weight)

    def _dense(self, values: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(self.cluster_of.numel(), self.num_merged, dtype=torch.float64,
                            device=self.cluster_of.device)
        return dense.scatter_(1, self.cluster_of[:, None], values[:, None])

    def same_as(self, other: Match) -> bool:
        """Equal unit assignment and merge weights (the value may differ)."""
        return (self.num_merged == other.num_merged and self.num_models == other.num_models
                and torch.equal(self.cluster_of, other.cluster_of)
                and torch.equal(self.merge_weight, other.merge_weight))

    def clusters(self) -> list[tuple[int, ...]]:
        """Original unit indices (rows) fused into each merged unit, in column order."""
        out: list[list[int]] = [[] for _ in range(self.num_merged)]
        for row, col in enumerate(self.cluster_of.tolist()):
            out[col].append(row)
        return [tuple(c) for c in out]

    def units_in_place(self) -> int:
        """How many unit indices i have every model's unit i fused into one merged unit: the pairs the identity
        correspondence makes (n for the identity itself)."""
        n = self.cluster_of.numel() // self.num_models
        columns = self.cluster_of.reshape(self.num_models, n)
        return int((columns == columns[0]).all(dim=0).sum())


def share_in_place(matches: Sequence[Match | None]) -> float:
    """The share of units the matches leave in place (`Match.units_in_place`), over every matched group's units
    (groups left unmatched are left out; 1.0 when none is matched: nothing was moved)."""
    found = [match for match in matches if match is not None]
    units = sum(match.cluster_of.numel() // match.num_models for match in found)
    return sum(match.units_in_place() for match in found) / units if units else 1.0


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------
_TILE = 256
_ASYMMETRY_TOL = 1e-4


def _scan(arr: np.ndarray) -> tuple[float, float, float]:
    """(min, max, max |C - C^T|) in one pass, tile by tile (a whole transposed read thrashes the cache).

    NaN propagates into all three, so one pass also detects it.
    """
    size = arr.shape[0]
    low, high, worst = np.inf, -np.inf, 0.0
    for i in range(0, size, _TILE):
        for j in range(i, size, _TILE):
            upper = arr[i : i + _TILE, j : j + _TILE].astype(np.float64)
            lower = arr[j : j + _TILE, i : i + _TILE].T
            low = min(low, float(upper.min()), float(lower.min()))
            high = max(high, float(upper.max()), float(lower.max()))
            with np.errstate(invalid="ignore"):  # inf - inf: reported as "infinite entries" by the caller
                worst = max(worst, float(np.abs(upper - lower).max()))
    return low, high, worst


def _symmetrize(arr: np.ndarray) -> np.ndarray:
    """(C + C^T) / 2, tile by tile; exactly symmetric because float addition commutes."""
    size = arr.shape[0]
    out = np.empty(arr.shape, dtype=np.float64)
    for i in range(0, size, _TILE):
        for j in range(i, size, _TILE):
            upper = arr[i : i + _TILE, j : j + _TILE].astype(np.float64)
            tile = (upper + arr[j : j + _TILE, i : i + _TILE].T) * 0.5
            out[i : i + _TILE, j : j + _TILE] = tile
            out[j : j + _TILE, i : i + _TILE] = tile.T
    return out


def _prepare(similarity: torch.Tensor | np.ndarray, num_models: int = 2) -> np.ndarray:
    """Validate a (2n, 2n) similarity and return it as an exactly symmetric array, read-only.

    The array keeps the input's float dtype (possibly sharing its memory): every consumer converts just
    the part it reads to float64, which saves a full-size conversion for align and the group matchers.
    Nearly symmetric input (rounding in a float32 ``X @ X.T``) is averaged with its transpose in float64,
    a no-op for exactly symmetric input; clearly asymmetric input is refused.
    """
    if isinstance(similarity, np.ndarray):
        similarity = torch.from_numpy(similarity)
    if not isinstance(similarity, torch.Tensor):
        raise TypeError(f"similarity must be a torch.Tensor, got {type(similarity).__name__}")
    if similarity.is_complex():
        raise ValueError("similarity must be real-valued, got a complex tensor")
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            "similarity must be a square (2n, 2n) matrix over the units [A; B], "
            f"got shape {tuple(similarity.shape)}"
        )
    size = similarity.shape[0]
    if size == 0:
        raise ValueError("similarity is empty: a group needs at least one unit per model")
    if num_models == 2 and size % 2:
        raise ValueError(f"similarity must have an even size 2n (rows [A units; B units]), got {size}x{size}")
    if size % num_models:
        raise ValueError(f"similarity of {num_models} models must have a size N·n (rows [model 0 units; model 1 "
                         f"units; ...]), got {size}x{size}")
    tensor = similarity.detach().cpu()
    eps = torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0.0
    if tensor.dtype not in (torch.float16, torch.float32, torch.float64):  # bfloat16 has no numpy twin
        tensor = tensor.to(torch.float64)
    arr = tensor.numpy()
    low, high, asym = _scan(arr)
    if not (np.isfinite(low) and np.isfinite(high) and np.isfinite(asym)):
        nan = int(np.isnan(arr).sum())
        if nan:
            raise ValueError(
                f"similarity contains {nan} NaN entries; check the calibration data / weights "
                "(zero-variance units should give zero rows, not NaN)"
            )
        raise ValueError("similarity contains infinite entries; every similarity must be finite")
    scale = max(1.0, -low, high)
    if asym > max(_ASYMMETRY_TOL, 100 * eps) * scale:  # only gross mistakes; rounding is averaged away
        raise ValueError(
            f"similarity must be symmetric (a correlation of the stacked units [A; B]); "
            f"max |C - C^T| = {asym:.3g}"
        )
    if asym:
        logger.debug("symmetrising a similarity with max asymmetry %.3g", asym)
        arr = _symmetrize(arr)
    return arr


def _check_num_heads(num_heads: int, n: int) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    num_heads = int(num_heads)
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if n % num_heads:
        raise ValueError(
            f"n = {n} units per model is not divisible by num_heads = {num_heads}; "
            "heads must be equal contiguous blocks of units"
        )
    return num_heads


def _check_pairing(head_pairing: Sequence[int], num_heads: int) -> tuple[int, ...]:
    try:
        pairing = tuple(int(h) for h in head_pairing)
        exact = all(int(h) == h and not isinstance(h, bool) for h in head_pairing)
    except (TypeError, ValueError):
        raise ValueError(
            f"head_pairing must be a sequence of ints (a permutation of range({num_heads})), "
            f"got {head_pairing!r}"
        ) from None
    if not exact or len(pairing) != num_heads or sorted(pairing) != list(range(num_heads)):
        raise ValueError(
            f"head_pairing must be a permutation of range({num_heads}) (the partner B head of each A head), "
            f"got {head_pairing!r}"
        )
    return pairing


def _check_zip_params(decay: float, budget: float) -> tuple[float, float]:
    decay, budget = float(decay), float(budget)
    if not (np.isfinite(decay) and 0.0 < decay <= 1.0):
        raise ValueError(f"decay must lie in (0, 1] (fused similarities are min(x, y) * decay), got {decay}")
    if not (np.isfinite(budget) and budget >= 0.0):
        raise ValueError(f"budget must be a finite number >= 0 (same-model budget factor), got {budget}")
    return decay, budget


def _model_budget(n: int, budget: float) -> int:
    """Same-model fusions allowed per model; the reference adds 1e-4 before truncating. Capped at n: a model's n
    units allow at most n - 1 same-model fusions, so a larger budget never binds (and `int(inf)` of a budget factor
    like 1e308 would raise)."""
    return int(min((n // 2) * budget + 1e-4, n))


# ---------------------------------------------------------------------------------------------------
# Assembling results
# ---------------------------------------------------------------------------------------------------
def _build(
    clusters: Sequence[Sequence[int]],
    size: int,
    value: float,
    head_pairing: tuple[int, ...] | None,
    normalizer_eps: float,
    device: torch.device,
    num_models: int = 2,
) -> Match:
    sizes = np.array([len(members) for members in clusters], dtype=np.float64)
    rows = np.fromiter((i for members in clusters for i in members), dtype=np.int64, count=size)
    cols = np.repeat(np.arange(len(clusters)), sizes.astype(np.int64))
    if not np.array_equal(np.sort(rows), np.arange(size)):
        raise AssertionError("every original unit must belong to exactly one cluster")
    cluster_of = np.empty(size, dtype=np.int64)
    cluster_of[rows] = cols
    return Match(
        cluster_of=torch.from_numpy(cluster_of).to(device),
        merge_weight=torch.from_numpy((1.0 / (sizes + normalizer_eps))[cluster_of]).to(device),
        num_merged=len(clusters),
        value=float(value),
        head_pairing=head_pairing,
        num_models=num_models,
    )


def _pair_clusters(n: int, partner: np.ndarray) -> list[list[int]]:
    """Merged unit i = {A_i, B_partner[i]}."""
    return [[i, n + int(p)] for i, p in enumerate(partner)]


# ---------------------------------------------------------------------------------------------------
# Align and heads
# ---------------------------------------------------------------------------------------------------
def _hungarian(block: np.ndarray) -> tuple[np.ndarray, float]:
    """Column assigned to each row of a square block, and the mean matched similarity (float64)."""
    block = np.asarray(block, dtype=np.float64)
    rows, cols = linear_sum_assignment(block, maximize=True)
    return cols, float(block[rows, cols].mean())


def _head_block(c: np.ndarray, n: int, g: int, a_head: int, b_head: int) -> np.ndarray:
    return c[a_head * g : (a_head + 1) * g, n + b_head * g : n + (b_head + 1) * g]


def _all_head_blocks(c: np.ndarray, n: int, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores (k, k) and in-block assignments (k, k, g) of every (A head, B head) pair."""
    g = n // num_heads
    scores = np.empty((num_heads, num_heads), dtype=np.float64)
    assign = np.empty((num_heads, num_heads, g), dtype=np.int64)
    for j in range(num_heads):
        for l_head in range(num_heads):
            assign[j, l_head], scores[j, l_head] = _hungarian(_head_block(c, n, g, j, l_head))
    return scores, assign


def attention_head_scores(similarity: torch.Tensor, num_heads: int) -> np.ndarray:
    """(k, k) score[j, l] = mean of the Hungarian-matched entries of block (A head j rows, B head l cols).

    Exposed so the solver can sum the scores of several groups (q/k and v of one attention block) and
    pair their heads once with :func:`pair_attention_heads`.
    """
    c = _prepare(similarity)
    n = c.shape[0] // 2
    num_heads = _check_num_heads(num_heads, n)
    return _all_head_blocks(c, n, num_heads)[0]


def pair_attention_heads(scores: np.ndarray) -> tuple[int, ...]:
    """Hungarian (maximize) on a k x k head score matrix -> partner B head for each A head."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"head scores must be a non-empty square (k, k) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("head scores contain NaN or infinite entries")
    return tuple(int(h) for h in _hungarian(arr)[0])


def _align(c: np.ndarray, n: int) -> tuple[list[list[int]], float]:
    partner, value = _hungarian(c[:n, n:])
    return _pair_clusters(n, partner), value


def _group_align(
    c: np.ndarray, n: int, num_heads: int, pairing: tuple[int, ...] | None
) -> tuple[list[list[int]], float, tuple[int, ...]]:
    g = n // num_heads
    if pairing is None:
        scores, assign = _all_head_blocks(c, n, num_heads)
        pairing = pair_attention_heads(scores)
        blocks = [(assign[j, p], scores[j, p]) for j, p in enumerate(pairing)]
    else:
        blocks = [_hungarian(_head_block(c, n, g, j, p)) for j, p in enumerate(pairing)]
    partner = np.concatenate([p * g + cols for p, (cols, _) in zip(pairing, blocks, strict=True)])
    value = float(np.mean([score for _, score in blocks]))
    return _pair_clusters(n, partner), value, pairing


# ---------------------------------------------------------------------------------------------------
# Fast zip
# ---------------------------------------------------------------------------------------------------
def _refresh_rows(s: np.ndarray, rowmax: np.ndarray, rowarg: np.ndarray, rows: np.ndarray) -> None:
    """Recompute max and first argmax of the given rows."""
    if rows.size == 1:
        r = int(rows[0])
        arg = int(s[r].argmax())
        rowarg[r], rowmax[r] = arg, s[r, arg]
    elif rows.size:
        sub = s[rows]
        arg = sub.argmax(axis=1)
        rowarg[rows] = arg
        rowmax[rows] = sub[np.arange(rows.size), arg]


def _mask_label(
    s: np.ndarray, labels: np.ndarray, alive: np.ndarray, label: int, rowmax: np.ndarray, rowarg: np.ndarray
) -> None:
    """Forbid every remaining pair of clusters carrying ``label`` (budget exhausted)."""
    idx = np.flatnonzero(alive & (labels == label))
    s[np.ix_(idx, idx)] = _NEG_INF
    _refresh_rows(s, rowmax, rowarg, idx)


def _zip_core(
    s: np.ndarray,
    labels: np.ndarray,
    target: int,
    decay: float,
    model_budget: list[int],
    model_masked: list[bool],
    head_budget: list[int] | None = None,
    unit_models: np.ndarray | None = None,
    original: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    relaxed_fusions: list[int] | None = None,
) -> tuple[list[list[int]], list[float]]:
    """ZipIt's greedy on ``s`` (modified in place, diagonal already -inf) down to ``target`` clusters.

    Instead of deleting rows and scanning the whole matrix for every pick, dead rows/columns are set to
    -inf and each row keeps its max and first argmax. A fusion (lo, hi) rewrites row/column lo to
    ``min(row lo, row hi) * decay`` (which can *raise* negative entries), so: rows whose argmax was lo or
    hi are recomputed, every other row only compares its old max with its new entry at lo (ties go to
    the lower column, as a row-major argmax does). Deleting preserves relative order, so the lowest
    surviving index is the reference's first position and the picks are identical.

    ``labels[i]`` is the model (0 = A, 1 = B) of cluster i's lowest member; ``model_budget`` and
    ``model_masked`` are shared with later calls (group zip); ``head_budget`` is the per-head budget
    of the two heads in play (labels coincide with heads inside one head pair).
    ``unit_models`` (N > 2 models; docs/design.md §4.13): each local unit's model; the decay is then
    applied only to a fused cluster that is complete (one unit per model or more) or holds two units of one model,
    so a cluster still missing some models' units is not penalised for taking one. None: always (two models).
    ``original`` (N > 2 models): the unmodified similarity of local units `(rows, columns)`, read only if needed.
    There a cluster's label (its lowest member's model) can leave every remaining pair masked by exhausted budgets
    before ``target`` is reached (two models never can: a cross-model pair is always left); the rest is then fused
    without the budgets, on the min-linkage of ``original`` (`_without_budgets`); the fusions left then are appended
    to ``relaxed_fusions`` (the caller says it once per group).
    Returns the surviving clusters (lists of local indices, by lowest index) and the picked values.
    """
    size = s.shape[0]
    alive = np.ones(size, dtype=bool)
    members: list[list[int]] = [[i] for i in range(size)]
    rowarg = s.argmax(axis=1)
    rowmax = s[np.arange(size), rowarg]
    for label in range(len(model_masked)):
        if model_masked[label]:
            _mask_label(s, labels, alive, label, rowmax, rowarg)
    picks: list[float] = []
    relaxed = False
    for step in range(size - target):
        lo = int(np.argmax(rowmax))
        hi = int(rowarg[lo])
        if (hi <= lo or not alive[hi]) and original is not None and not relaxed:
            if relaxed_fusions is not None:
                relaxed_fusions.append(size - target - step)
            _without_budgets(s, original, members, alive, rowmax, rowarg)
            relaxed = True
            lo = int(np.argmax(rowmax))
            hi = int(rowarg[lo])
        if hi <= lo or not alive[hi]:  # only possible if no finite pair is left, which validation excludes
            raise RuntimeError("zip found no admissible pair to fuse")
        picks.append(float(rowmax[lo]))

        new = np.minimum(s[lo], s[hi])
        if unit_models is None or _complete(members[lo] + members[hi], unit_models, len(model_masked)):
            new *= decay
        new[lo] = _NEG_INF
        s[lo] = new
        s[:, lo] = new
        s[hi] = _NEG_INF
        s[:, hi] = _NEG_INF
        alive[hi] = False
        rowmax[hi] = _NEG_INF
        members[lo].extend(members[hi])
        members[hi] = []

        stale = (rowarg == lo) | (rowarg == hi)
        stale[lo] = True
        stale &= alive
        keep = alive & ~stale
        better = keep & ((new > rowmax) | ((new == rowmax) & (rowarg > lo)))
        rowmax[better] = new[better]
        rowarg[better] = lo
        _refresh_rows(s, rowmax, rowarg, np.flatnonzero(stale))

        if labels[lo] == labels[hi]:
            label = int(labels[lo])
            model_budget[label] -= 1
            exhausted = model_budget[label] <= 0
            if exhausted:
                model_masked[label] = True
            if head_budget is not None:
                head_budget[label] -= 1
                exhausted = exhausted or head_budget[label] <= 0
            if exhausted and not relaxed:
                _mask_label(s, labels, alive, label, rowmax, rowarg)
    return [members[i] for i in np.flatnonzero(alive)], picks


def _without_budgets(s: np.ndarray, original: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     members: list[list[int]], alive: np.ndarray, rowmax: np.ndarray, rowarg: np.ndarray) -> None:
    """Rewrite ``s`` for the alive clusters as the min-linkage of ``original`` (a pair's similarity: the least of
    its members' pairwise similarities, what the greedy's `min` update keeps, without decay), budgets ignored."""
    live = np.flatnonzero(alive)
    order = np.concatenate([np.asarray(members[i]) for i in live])
    starts = np.cumsum([0] + [len(members[i]) for i in live[:-1]])
    for row, i in enumerate(live):
        least = original(np.asarray(members[i]), order).min(axis=0)  # to every unit, least over i's members
        s[i, live] = np.minimum.reduceat(least, starts)
        s[i, live[row]] = _NEG_INF
    _refresh_rows(s, rowmax, rowarg, live)


def _complete(cluster: Sequence[int], unit_models: np.ndarray, num_models: int) -> bool:
    """A cluster with at least one unit per model, or with two units of one model (N-model zip's decay rule)."""
    models = unit_models[np.asarray(cluster)]
    return len(cluster) >= num_models or np.unique(models).size < len(cluster)


def _zip(c: np.ndarray, n: int, decay: float, budget: float) -> tuple[list[list[int]], float]:
    s = c.astype(np.float64)
    np.fill_diagonal(s, _NEG_INF)
    labels = np.repeat(np.array([0, 1]), n)
    budgets = [_model_budget(n, budget)] * 2
    clusters, picks = _zip_core(s, labels, n, decay, budgets, [False, False])
    return clusters, float(np.mean(picks))


def _group_zip(
    c: np.ndarray, n: int, num_heads: int, decay: float, budget: float, pairing: tuple[int, ...] | None
) -> tuple[list[list[int]], float, tuple[int, ...]]:
    """Zip each head pair separately, in A-head order; only the model budgets carry over between pairs.

    In the reference every step is an argmax over the whole matrix with the other heads masked out, and
    a fusion only rewrites the fused cluster's row/column, so head pairs interact only through the
    model budgets (and the global same-model mask once a model's budget is spent).
    """
    if pairing is None:
        pairing = pair_attention_heads(_all_head_blocks(c, n, num_heads)[0])
    g = n // num_heads
    labels = np.repeat(np.array([0, 1]), g)
    model_budget = [_model_budget(n, budget)] * 2
    model_masked = [False, False]
    clusters: list[list[int]] = []
    picks: list[float] = []
    for j, p in enumerate(pairing):
        idx = np.r_[j * g : (j + 1) * g, n + p * g : n + (p + 1) * g]
        s = c[np.ix_(idx, idx)].astype(np.float64, copy=False)
        np.fill_diagonal(s, _NEG_INF)
        head_budget = [n // (2 * num_heads)] * 2
        local, local_picks = _zip_core(s, labels, g, decay, model_budget, model_masked, head_budget)
        clusters.extend([int(idx[i]) for i in members] for members in local)
        picks.extend(local_picks)
    return clusters, float(np.mean(picks)), pairing


# ---------------------------------------------------------------------------------------------------
# N > 2 models (docs/design.md §4.13): rows/columns [model 0 units; model 1 units; ...]
# ---------------------------------------------------------------------------------------------------
#: Passes of the sum-of-pairwise refinement of N-model align (each pass re-matches every model but model 0).
ALIGN_N_PASSES = 20


def _model_budget_n(n: int, num_models: int, budget: float) -> int:
    """ZipIt's N-model budget: `((N-1)·n // N) · b` same-model fusions per model; `(n // 2) · b` for two."""
    return int(min(((num_models - 1) * n // num_models) * budget + 1e-4, n))  # capped as `_model_budget`


def _pairwise_value(c: np.ndarray, chosen: Sequence[np.ndarray]) -> float:
    """Mean over every pair of models (l < j) of the mean similarity of their units in the same merged unit."""
    values = [float(c[chosen[l_model], chosen[j]].mean())
              for l_model in range(len(chosen)) for j in range(l_model + 1, len(chosen))]
    return float(np.mean(values))


def _align_n(c: np.ndarray, units: Sequence[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """One permutation per model onto model 0's order: `chosen[j][i]` = model j's unit in merged unit i.

    Start: every model matched to model 0 (Hungarian on the (0, j) block). Then coordinate ascent on the
    sum-of-pairwise objective: model j (j >= 1) is re-matched, by one Hungarian, against the sum of its
    similarities to the other models' units of each merged unit; a pass never lowers the objective. Stops when a
    pass changes nothing (at most `ALIGN_N_PASSES`). Value: `_pairwise_value`.
    """
    chosen = [np.asarray(units[0])]
    for j in range(1, len(units)):
        cols, _ = _hungarian(c[np.ix_(units[0], units[j])])
        chosen.append(np.asarray(units[j])[cols])
    for _ in range(ALIGN_N_PASSES):
        changed = False
        for j in range(1, len(units)):
            cost = sum(c[np.ix_(chosen[l_model], units[j])] for l_model in range(len(units)) if l_model != j)
            cols, _ = _hungarian(cost)
            picked = np.asarray(units[j])[cols]
            if not np.array_equal(picked, chosen[j]):
                changed, chosen[j] = True, picked
        if not changed:
            break
    return chosen, _pairwise_value(c, chosen)


def _head_units(n: int, g: int, model: int, head: int) -> np.ndarray:
    return model * n + head * g + np.arange(g)


def _head_scores_n(c: np.ndarray, n: int, num_heads: int, num_models: int) -> np.ndarray:
    """(N-1, k, k): score[j-1, a, b] = mean Hungarian-matched similarity of model 0's head a and model j's head b."""
    g = n // num_heads
    scores = np.empty((num_models - 1, num_heads, num_heads), dtype=np.float64)
    for j in range(1, num_models):
        for a in range(num_heads):
            for b in range(num_heads):
                block = c[np.ix_(_head_units(n, g, 0, a), _head_units(n, g, j, b))]
                scores[j - 1, a, b] = _hungarian(block)[1]
    return scores


def attention_head_scores_n(similarity: torch.Tensor, num_heads: int, num_models: int) -> np.ndarray:
    """`attention_head_scores` for N models: one (k, k) score matrix of model 0's heads against model j's."""
    c = _prepare(similarity, num_models)
    n = c.shape[0] // num_models
    return _head_scores_n(c, n, _check_num_heads(num_heads, n), num_models)


def pair_attention_heads_n(scores: np.ndarray) -> tuple[int, ...]:
    """Each model j >= 1's partner head of every model-0 head (one Hungarian per model), flattened in model order:
    entries `(j-1)·k .. j·k - 1` are model j's."""
    return tuple(h for per_model in np.asarray(scores) for h in pair_attention_heads(per_model))


def _split_pairing(pairing: tuple[int, ...], num_heads: int, num_models: int) -> list[tuple[int, ...]]:
    return [pairing[(j - 1) * num_heads : j * num_heads] for j in range(1, num_models)]


def _check_pairing_n(head_pairing: Sequence[int], num_heads: int, num_models: int) -> tuple[int, ...]:
    flat = tuple(head_pairing) if not isinstance(head_pairing, (str, bytes)) else head_pairing
    if len(flat) != (num_models - 1) * num_heads:
        raise ValueError(f"head_pairing of {num_models} models must hold {num_models - 1} x {num_heads} partner "
                         f"heads (model 1's, then model 2's, ...), got {head_pairing!r}")
    return tuple(h for chunk in _split_pairing(flat, num_heads, num_models)
                 for h in _check_pairing(chunk, num_heads))


def _head_sets(n: int, num_heads: int, num_models: int, pairing: tuple[int, ...]) -> list[list[np.ndarray]]:
    """For each merged head h: the units of model 0's head h and of each model's partner head."""
    g = n // num_heads
    per_model = _split_pairing(pairing, num_heads, num_models)
    return [[_head_units(n, g, 0, h)] + [_head_units(n, g, j, per_model[j - 1][h]) for j in range(1, num_models)]
            for h in range(num_heads)]


def _match_n(c: np.ndarray, n: int, num_models: int, matcher: str, num_heads: int, decay: float, budget: float,
             pairing: tuple[int, ...] | None) -> tuple[list[list[int]], float, tuple[int, ...] | None]:
    """Align or zip of N > 2 models; merged unit i of head h is column h·g + i (as for two models)."""
    if num_heads == 1:
        heads = [[np.arange(n) + j * n for j in range(num_models)]]
        pairing = None
    else:
        if pairing is None:
            pairing = pair_attention_heads_n(_head_scores_n(c, n, num_heads, num_models))
        heads = _head_sets(n, num_heads, num_models, pairing)
    g = n // num_heads
    clusters: list[list[int]] = []
    values: list[float] = []
    model_budget = [_model_budget_n(n, num_models, budget)] * num_models
    model_masked = [False] * num_models
    relaxed: list[int] = []
    for units in heads:
        if matcher == "align":
            chosen, value = _align_n(c, units)
            clusters.extend([int(chosen[j][i]) for j in range(num_models)] for i in range(g))
            values.append(value)
            continue
        idx = np.concatenate(units)
        s = c[np.ix_(idx, idx)].astype(np.float64)
        np.fill_diagonal(s, _NEG_INF)
        labels = np.repeat(np.arange(num_models), g)
        head_budget = [(num_models - 1) * g // num_models] * num_models if num_heads > 1 else None
        local, picks = _zip_core(s, labels, g, decay, model_budget, model_masked, head_budget, unit_models=labels,
                                 original=lambda rows, cols, idx=idx: c[np.ix_(idx[rows], idx[cols])],
                                 relaxed_fusions=relaxed)
        clusters.extend([int(idx[i]) for i in members] for members in local)
        values.extend(picks)
    if relaxed:
        logger.warning("zip: the same-model budgets (zip_budget=%g) left no pair of clusters to fuse in %d of %d "
                       "head(s) of a group (%d fusions to go); those were fused without the budgets (a larger "
                       "zip_budget avoids it)", budget, len(relaxed), len(heads), sum(relaxed))
    return clusters, float(np.mean(values)), pairing


# ---------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------
def match(
    similarity: torch.Tensor,
    *,
    matcher: str = "align",
    num_heads: int = 1,
    decay: float = 0.5,
    budget: float = 1.0,
    head_pairing: Sequence[int] | None = None,
    normalizer_eps: float = 0.0,
    num_models: int = 2,
) -> Match:
    """Match the 2n units of one group into n merged units (docs/design.md §4.6).

    ``num_models = N > 2``: the similarity is over ``[model 0 units; ...; model N-1 units]`` and the N·n units
    are matched into n merged units (docs/design.md §4.13); ``head_pairing`` then holds model 1's
    partner heads, then model 2's, ... (`pair_attention_heads_n`).

    ``matcher`` is ``"align"`` (Hungarian, a permutation) or ``"zip"`` (ZipIt's greedy, which may also
    fuse units of the same model); ``num_heads > 1`` selects their group variants, which only match units
    inside paired heads. ``head_pairing`` (partner B head of each A head) overrides the Hungarian head
    pairing so several groups can share one. ``decay``/``budget`` only affect zip.
    """
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; valid matchers: {', '.join(MATCHERS)}")
    if isinstance(num_models, bool) or not isinstance(num_models, (int, np.integer)) or num_models < 2:
        raise ValueError(f"num_models must be an int >= 2, got {num_models!r}")
    if num_models != 2:
        return _match_models(similarity, int(num_models), matcher, num_heads, decay, budget, head_pairing,
                             normalizer_eps)
    c = _prepare(similarity)
    device = similarity.device if isinstance(similarity, torch.Tensor) else torch.device("cpu")
    n = c.shape[0] // 2
    num_heads = _check_num_heads(num_heads, n)
    pairing = None if head_pairing is None else _check_pairing(head_pairing, num_heads)
    decay, budget = _check_zip_params(decay, budget)
    normalizer_eps = float(normalizer_eps)
    if not (np.isfinite(normalizer_eps) and normalizer_eps >= 0.0):
        raise ValueError(f"normalizer_eps must be a finite number >= 0, got {normalizer_eps}")

    start = time.perf_counter()
    if num_heads == 1:
        if matcher == "align":
            clusters, value = _align(c, n)
        else:
            clusters, value = _zip(c, n, decay, budget)
        pairing = None
    elif matcher == "align":
        clusters, value, pairing = _group_align(c, n, num_heads, pairing)
    else:
        clusters, value, pairing = _group_zip(c, n, num_heads, decay, budget, pairing)
    elapsed = time.perf_counter() - start
    logger.debug(
        "matched 2x%d units (%s, %d heads) in %.3fs, value %.6f", n, matcher, num_heads, elapsed, value
    )
    return _build(clusters, 2 * n, value, pairing, normalizer_eps, device)


def _match_models(similarity: torch.Tensor, num_models: int, matcher: str, num_heads: int, decay: float,
                  budget: float, head_pairing: Sequence[int] | None, normalizer_eps: float) -> Match:
    c = _prepare(similarity, num_models)
    device = similarity.device if isinstance(similarity, torch.Tensor) else torch.device("cpu")
    n = c.shape[0] // num_models
    num_heads = _check_num_heads(num_heads, n)
    pairing = None if head_pairing is None or num_heads == 1 else _check_pairing_n(head_pairing, num_heads,
                                                                                   num_models)
    decay, budget = _check_zip_params(decay, budget)
    normalizer_eps = float(normalizer_eps)
    if not (np.isfinite(normalizer_eps) and normalizer_eps >= 0.0):
        raise ValueError(f"normalizer_eps must be a finite number >= 0, got {normalizer_eps}")
    clusters, value, pairing = _match_n(c, n, num_models, matcher, num_heads, decay, budget, pairing)
    return _build(clusters, num_models * n, value, pairing, normalizer_eps, device, num_models)


def zip_reference(
    similarity: torch.Tensor,
    *,
    decay: float = 0.5,
    budget: float = 1.0,
    num_heads: int = 1,
    head_pairing: Sequence[int] | None = None,
) -> Match:
    """The straightforward O(n^3) ZipIt / MuDSC greedy loop: the executable specification of zip.

    It deletes the fused row/column and rescans the whole matrix at every step, exactly as the reference
    implementation does. ``num_heads > 1`` gives group zip the reference's way: one global matrix,
    the current head pair selected by a -inf mask, model budgets shared by all head pairs and a
    per-original-head budget of n // (2 k) same-head fusions. Kept for tests and benchmarks only.
    """
    c = _prepare(similarity)
    n = c.shape[0] // 2
    num_heads = _check_num_heads(num_heads, n)
    decay, budget = _check_zip_params(decay, budget)
    grouped = num_heads > 1
    if grouped:
        pairing = (
            pair_attention_heads(_all_head_blocks(c, n, num_heads)[0])
            if head_pairing is None
            else _check_pairing(head_pairing, num_heads)
        )
        rounds = [(j, num_heads + p) for j, p in enumerate(pairing)]
    else:
        pairing, rounds = None, [(0, 1)]
    g = n // num_heads

    s = c.astype(np.float64)
    np.fill_diagonal(s, _NEG_INF)
    clusters: list[list[int]] = [[i] for i in range(2 * n)]
    model = np.repeat(np.array([0, 1]), n)  # model of each cluster's lowest member, by position
    head = np.arange(2 * n) // g  # original head of each cluster's lowest member (B heads k..2k-1)
    model_budget = [_model_budget(n, budget)] * 2
    head_budget = [n // (2 * num_heads)] * (2 * num_heads)
    picks: list[float] = []
    columns: list[list[int]] = []
    for heads in rounds:
        offset = None  # -inf outside the current head pair
        if grouped:
            inside = np.isin(head, heads)
            offset = np.where(inside[:, None] & inside[None, :], 0.0, _NEG_INF)
        for _ in range(g if grouped else n):
            row, col = divmod(int(np.argmax(s if offset is None else s + offset)), s.shape[1])
            picks.append(float(s[row, col]))
            lo, hi = min(row, col), max(row, col)
            s[:, lo] = np.minimum(s[:, lo], s[:, hi]) * decay
            s = np.delete(s, hi, axis=1)
            s[lo, :] = np.minimum(s[lo, :], s[hi, :]) * decay
            s = np.delete(s, hi, axis=0)
            if offset is not None:
                offset = np.delete(np.delete(offset, hi, axis=1), hi, axis=0)
            clusters[lo].extend(clusters.pop(hi))
            same_model, same_head = model[lo] == model[hi], head[lo] == head[hi]
            model, head = np.delete(model, hi), np.delete(head, hi)
            if same_model:
                model_budget[model[lo]] -= 1
                if model_budget[model[lo]] <= 0:
                    sel = model == model[lo]
                    s[sel[:, None] & sel[None, :]] = _NEG_INF
            if grouped and same_head:
                head_budget[head[lo]] -= 1
                if head_budget[head[lo]] <= 0:
                    sel = head == head[lo]
                    s[sel[:, None] & sel[None, :]] = _NEG_INF
        if grouped:
            columns.extend(members for members, h in zip(clusters, head, strict=True) if h in heads)
    if not grouped:
        columns = clusters
    return _build(columns, 2 * n, float(np.mean(picks)), pairing, 0.0, torch.device("cpu"))
