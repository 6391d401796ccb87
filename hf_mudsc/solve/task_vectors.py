"""Tensor-level same-base merges: task arithmetic, TIES, DARE, breadcrumbs, SLERP, PCB, consensus, RegMean, Fisher.

The pure functions behind the registered methods (methods/task_vector.py, methods/data.py), which add the base
model, the N parents and the streaming loader. Facts and citations: docs/research/same_base_facts.md.

Pure functions over state dicts (``name -> torch.Tensor``); nothing here knows about
architectures, files or models. Every method takes

    base:     the common base state dict (``None`` only where a method does not use it),
    parents:  list of N parent state dicts (fine-tunes of ``base``),
    weights:  one float per parent (default 1.0 each),

plus its own options, and returns a new merged state dict. The definitions follow

* mergekit 0.1.5 (PyPI wheel; see docs/research/same_base_facts.md) for ``linear``, ``task_arithmetic``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
  ``della_linear`` and ``slerp``: same parameters, defaults, sign election, divisor and
  guards. Deliberate differences (all documented in docs/research/same_base_facts.md): math is done in float32
  (float64 for float64 inputs) and cast back to the base dtype, where mergekit computes the
  task-vector methods in the inputs' own (promoted) dtype; random masks come from a
  ``torch.Generator`` seeded from ``seed`` and the tensor name (reproducible, order
  independent); ties in magnitude rankings are broken by flat index (stable sort).
* PCB-Merging (Du et al. 2024, duguodong7/pcb-merging ``PCB_merge``), TALL-masks consensus
  merging (Wang et al. 2024, nik-dim/tall_masks), dataless Localize-and-Stitch (He et al.
  2024, yifei-he/Localize-and-Stitch), RegMean (Jin et al. 2023, FusionBench
  ``method/regmean``) and Fisher merging (Matena & Raffel 2022, the paper's Fisher-weighted mean with the
  authors' floor on every Fisher; not FusionBench's normalised form).

Tensor selection (all methods): the output has the base's keys (the first parent's for
methods without a base). A parent that lacks a tensor does not contribute to it (mergekit's
optional-weight behaviour); a parent whose tensor has a different shape is refused with a
``ValueError`` (mergekit 0.1.5 raises too; vocabulary alignment is the caller's job).
Non-floating tensors (integer buffers) are copied when all inputs agree and refused
otherwise (mergekit 0.1.5 ``copy_non_floating_buffer``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch

from hf_mudsc.errors import option_hint

StateDict = dict[str, torch.Tensor]
FloatOrList = float | Sequence[float]

__all__ = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "pcb",
    "consensus",
    "localize_stitch",
    "layer_swap",
    "block_index",
    "layer_gradient",
    "regmean_solve",
    "regmean",
    "fisher_average",
    "fisher_share",
    "magnitude_mask",
    "outlier_mask",
    "bernoulli_mask",
    "l1_rescale",
    "l1_factor",
    "sparsify_mask",
    "check_density_keeps",
    "UNFLOORED_SPARSIFIERS",
    "combine_task_vectors",
    "work_dtype",
    "GTA_FORMS",
    "per_parent",
    "magnitude_window",
    "outlier_window",
    "della_mask",
    "tensor_generator",
]


# --------------------------------------------------------------------------- helpers


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def per_parent(value: FloatOrList | None, n: int, name: str, default: float) -> list[float]:
    """Broadcast a scalar option to one value per parent, or check a per-parent list."""
    if value is None:
        return [float(default)] * n
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per parent), got {len(values)}")
    return values


def _check_parents(parents: Sequence[Mapping[str, torch.Tensor]], minimum: int = 1) -> None:
    if len(parents) < minimum:
        raise ValueError(f"need at least {minimum} parent state dicts, got {len(parents)}")


def _gather(
    name: str, ref: torch.Tensor, parents: Sequence[Mapping[str, torch.Tensor]]
) -> list[tuple]:
    """(parent index, tensor) for every parent holding ``name``; shapes must match ``ref``."""
    out = []
    for i, sd in enumerate(parents):
        if name not in sd:
            continue
        t = sd[name]
        if t.shape != ref.shape:
            raise ValueError(
                f"tensor {name!r}: parent {i} has shape {tuple(t.shape)}, base has "
                f"{tuple(ref.shape)}; parents must be fine-tunes of the base (align "
                f"vocabularies before merging)"
            )
        out.append((i, t))
    return out


def _copy_buffer(name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype or not torch.equal(t, first):
            raise ValueError(f"non-floating tensor {name!r} differs between inputs; resolve it first")
    return first.clone()


def _unmerged(name: str, base: torch.Tensor, present: Sequence[tuple]) -> torch.Tensor | None:
    """The output of a base tensor that takes no part in a task-vector merge: an integer buffer (equal in every
    input) or a tensor no parent holds (the base's own); None for a tensor to merge."""
    if not base.is_floating_point():
        return _copy_buffer(name, [base] + [t for _, t in present])
    if not present:
        return base.clone()
    return None


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator for (seed, tensor name, parent index).

    Seeding per tensor and parent (rather than drawing from one stream) makes the masks
    independent of tensor order, streaming and sharding: the same seed gives the same merge.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(index)}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


# ----------------------------------------------------------------- sparsifiers (deltas)


def l1_factor(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """The factor `l1_rescale` multiplies ``delta * mask`` by (a 0-d tensor), or None when either L1 norm < eps.
    Public so a tensor merged in row chunks (`hf_mudsc.solve.streamed`) scales every chunk by the same factor."""
    before = delta.abs().sum()
    after = (delta * mask).abs().sum()
    if before < eps or after < eps:
        return None
    return before / after


def l1_rescale(delta: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``delta * mask`` scaled so its L1 norm equals ``delta``'s (mergekit
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``): no rescale when either norm < eps."""
    masked = delta * mask
    factor = l1_factor(delta, mask, eps)
    return masked if factor is None else masked * factor


def _desc_order(delta: torch.Tensor) -> torch.Tensor:
    """Flat indices by decreasing magnitude; equal magnitudes keep flat-index order."""
    return torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices


def magnitude_window(numel: int, density: float) -> tuple[int, int]:
    """The ranks (by decreasing magnitude, equal magnitudes in flat-index order) the TIES trim keeps: [lo, hi)."""
    if density >= 1:
        return 0, numel
    if density <= 0 or numel == 0:
        return 0, 0
    return 0, max(1, int(density * numel))


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim (mergekit 0.1.5 ``sparsify.magnitude``): keep the top
    ``k = max(1, int(density * numel))`` entries by magnitude; ``density >= 1`` keeps all,
    ``density <= 0`` keeps none."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    lo, hi = magnitude_window(n, density)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[_desc_order(delta)[lo:hi]] = 1
    return mask.reshape(delta.shape)


def outlier_window(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """The ranks (by decreasing magnitude, equal magnitudes in flat-index order) Model Breadcrumbs keeps:
    [lo, hi). mergekit: ascending order, keep positions [n_bot, n_bot + target); in descending rank that is
    [n - n_bot - target, n - n_bot)."""
    if density >= 1:
        return 0, numel
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    start = numel - n_bot - target
    return start, start + target


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (mergekit 0.1.5 ``sparsify.magnitude_outliers``): drop the
    ``int(gamma * numel)`` largest magnitudes, then the smallest, keeping
    ``int(density * numel)`` entries (may be 0). If the two do not fit, fewer large ones
    are dropped (the kept entries are then the smallest ``int(density * numel)``)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    lo, hi = outlier_window(n, density, gamma)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[_desc_order(delta)[lo:hi]] = 1
    return mask.reshape(delta.shape)


def bernoulli_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE drop (mergekit ``sparsify.bernoulli``): each entry kept with probability
    ``density``; ``density >= 1`` keeps all."""
    if density >= 1:
        return torch.ones_like(delta)
    p = torch.full(delta.shape, float(density), dtype=torch.float32)
    return torch.bernoulli(p, generator=generator).to(delta.dtype)


def della_mask(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA MagPrune (mergekit ``sparsify.della_magprune``): per row (dim 1 of the tensor,
    1-D and 0-d tensors as one row), keep probability rises linearly with magnitude rank from
    ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("della: epsilon must keep density +/- epsilon inside (0, 1)")
    x = delta if delta.dim() >= 2 else delta.reshape(1, -1)  # 1-D and 0-d (CLIP's logit_scale): one row
    order = torch.sort(x.abs(), dim=1, stable=True).indices
    ranks = order.argsort(dim=1).to(torch.float32) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    span = hi - lo
    rank_norm = torch.where(span > 0, (ranks - lo) / torch.where(span > 0, span, 1), 0).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(delta.dtype)
    return mask.reshape(delta.shape)


# ----------------------------------------------------- generalized task arithmetic core


def _gta(
    base: Mapping[str, torch.Tensor],
    parents: Sequence[Mapping[str, torch.Tensor]],
    weights: FloatOrList | None,
    *,
    sparsify: str | None,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    scaling: float,
    density: FloatOrList | None = None,
    gamma: FloatOrList | None = None,
    epsilon: FloatOrList | None = None,
    seed: int = 0,
) -> StateDict:
    """mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge.merge_group`` over a state dict."""
    if base is None:
        raise ValueError("this method needs the common base model (base=...)")
    _check_parents(parents)
    n = len(parents)
    w_all = per_parent(weights, n, "weights", 1.0)
    d_all = per_parent(density, n, "density", 1.0)
    g_all = per_parent(gamma, n, "gamma", 0.01)
    e_all = per_parent(epsilon, n, "epsilon", 0.15)
    out: StateDict = {}
    for name, b in base.items():
        present = _gather(name, b, parents)
        kept = _unmerged(name, b, present)
        if kept is not None:
            out[name] = kept
            continue
        wd = work_dtype(b)
        b32 = b.to(wd)
        deltas = []
        for i, t in present:
            delta = t.to(wd) - b32
            mask = sparsify_mask(sparsify, delta, d_all[i], g_all[i], e_all[i],
                                 partial(tensor_generator, seed, name, i))
            if mask is not None:
                delta = l1_rescale(delta, mask) if rescale else delta * mask
            deltas.append(delta)
        out[name] = combine_task_vectors(b, b32, deltas, [w_all[i] for i, _ in present], consensus=consensus,
                                         normalize=normalize, scaling=scaling)
    return out


#: The sparsifiers that may keep no entry of a tensor (mergekit 0.1.5): Model Breadcrumbs keeps int(density·entries)
#: (no at-least-one rule, unlike the TIES trim's max(1, ...)), DARE and DELLA each entry with probability density
#: on average.
UNFLOORED_SPARSIFIERS = ("outliers", "random", "della_magprune")


def check_density_keeps(sparsify: str | None, density: float, entries: int, parent: str | None = None) -> None:
    """Refuse a `density` with which `sparsify` keeps no entry (on average less than one, for the random kinds) of
    even the largest tensor of a task vector, `entries` its size: the merge would leave that task vector out — every
    tensor of it dropped — silently (as mergekit 0.1.5 does). `parent` (`parent B`): the density is that parent's."""
    if sparsify not in UNFLOORED_SPARSIFIERS or density >= 1 or not entries or density * entries >= 1:
        return
    kept = "no entry" if sparsify == "outliers" else "on average less than one entry"
    whose = f"{parent}'s " if parent else ""
    left = f"{parent}'s task vector" if parent else "every task vector: it would be the base"
    raise ValueError(f"{whose}density {density:g} keeps {kept} of even the largest tensor ({entries:,} entries), so "
                     f"the merge would leave out {left}; give a density of at least 1/{entries:,} = "
                     f"{1 / entries:.3g}, {option_hint('density')}")


def sparsify_mask(sparsify: str | None, delta: torch.Tensor, density: float, gamma: float, epsilon: float,
                  generator: Callable[[], torch.Generator]) -> torch.Tensor | None:
    """One parent's mask of a generalized-task-arithmetic merge (None: no sparsification); `generator` makes the
    parent's generator for the random kinds (called only by them)."""
    if sparsify == "magnitude":
        return magnitude_mask(delta, density)
    if sparsify == "outliers":
        return outlier_mask(delta, density, gamma)
    if sparsify == "random":
        return bernoulli_mask(delta, density, generator())
    if sparsify == "della_magprune":
        return della_mask(delta, density, epsilon, generator())
    return None


def combine_task_vectors(b: torch.Tensor, b32: torch.Tensor, deltas: Sequence[torch.Tensor],
                         weights: Sequence[float], *, consensus: bool, normalize: bool,
                         scaling: float) -> torch.Tensor:
    """The merged tensor from the (sparsified) task vectors of the parents holding it (mergekit 0.1.5's
    sign election, divisor and scaling). Elementwise across the tensor: applied to the same rows of every input it
    gives those rows of the whole result (`hf_mudsc.solve.streamed` merges big tensors in row chunks)."""
    wd = b32.dtype
    D = torch.stack(list(deltas))  # (m, *shape)
    w = torch.tensor(list(weights), dtype=wd).reshape(-1, *([1] * b.dim()))
    WD = D * w
    if consensus:
        # TIES sign election by the sum: elected = +1 where sum >= 0 (zero -> +), else -1.
        elected = torch.where(WD.sum(0) >= 0, 1.0, -1.0).to(wd)
        # An entry agrees only if its own sign equals the elected one; zeros (trimmed or
        # unchanged entries) have sign 0 and never agree, so they are not counted.
        agree = (torch.sign(WD) == elected).to(wd)
        mixed = (WD * agree).sum(0)
        divisor = (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = WD.sum(0)
        divisor = w.sum(0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    if scaling != 1:
        mixed = mixed * scaling
    return (b32 + mixed).to(b.dtype)


#: The generalized-task-arithmetic functions below: function name -> (sparsify, consensus) as `_gta` is called.
#: `hf_mudsc.solve.streamed` merges big tensors of these in row chunks with the same definitions.
GTA_FORMS: dict[str, tuple[str | None, bool]] = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("outliers", False),
    "breadcrumbs_ties": ("outliers", True),
    "della": ("della_magprune", True),
    "della_linear": ("della_magprune", False),
}


def task_arithmetic(base, parents, weights=None, *, normalize: bool = False, scaling: float = 1.0) -> StateDict:
    """Task arithmetic (Ilharco et al. 2023; mergekit ``task_arithmetic``):
    base + scaling * sum_i w_i (theta_i - base) [/ sum_i w_i if normalize]."""
    return _gta(base, parents, weights, sparsify=None, consensus=False, normalize=normalize,
                rescale=False, scaling=scaling)


def ties(base, parents, weights=None, *, density: FloatOrList = 1.0, normalize: bool = True,
         rescale: bool = False, scaling: float = 1.0) -> StateDict:
    """TIES-Merging (Yadav et al. 2023; mergekit ``ties``): trim each task vector to its top
    ``density`` magnitudes, elect signs by the weighted sum, average agreeing entries."""
    return _gta(base, parents, weights, sparsify="magnitude", consensus=True, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density)


def dare_linear(base, parents, weights=None, *, density: FloatOrList = 1.0, normalize: bool = False,
                rescale: bool = True, scaling: float = 1.0, seed: int = 0) -> StateDict:
    """DARE (Yu et al. 2024; mergekit ``dare_linear``): random drop with keep probability
    ``density``, L1-norm-preserving rescale, then task arithmetic."""
    return _gta(base, parents, weights, sparsify="random", consensus=False, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density, seed=seed)


def dare_ties(base, parents, weights=None, *, density: FloatOrList = 1.0, normalize: bool = False,
              rescale: bool = True, scaling: float = 1.0, seed: int = 0) -> StateDict:
    """DARE + TIES sign consensus (mergekit ``dare_ties``)."""
    return _gta(base, parents, weights, sparsify="random", consensus=True, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density, seed=seed)


def breadcrumbs(base, parents, weights=None, *, density: FloatOrList = 1.0, gamma: FloatOrList = 0.01,
                normalize: bool = False, rescale: bool = False, scaling: float = 1.0) -> StateDict:
    """Model Breadcrumbs (Davari & Belilovsky 2023; mergekit ``breadcrumbs``): drop the
    largest ``gamma`` and the smallest magnitudes, keep ``density``; task arithmetic."""
    return _gta(base, parents, weights, sparsify="outliers", consensus=False, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density, gamma=gamma)


def breadcrumbs_ties(base, parents, weights=None, *, density: FloatOrList = 1.0, gamma: FloatOrList = 0.01,
                     normalize: bool = False, rescale: bool = False, scaling: float = 1.0) -> StateDict:
    """Breadcrumbs with TIES sign consensus (mergekit ``breadcrumbs_ties``; note mergekit's
    default ``normalize`` is False here, unlike ``ties``)."""
    return _gta(base, parents, weights, sparsify="outliers", consensus=True, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density, gamma=gamma)


def della(base, parents, weights=None, *, density: FloatOrList = 1.0, epsilon: FloatOrList = 0.15,
          normalize: bool = True, rescale: bool = True, scaling: float = 1.0, seed: int = 0) -> StateDict:
    """DELLA (Deep et al. 2024; mergekit ``della``): MagPrune, L1 rescale, TIES consensus."""
    return _gta(base, parents, weights, sparsify="della_magprune", consensus=True, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density, epsilon=epsilon, seed=seed)


def della_linear(base, parents, weights=None, *, density: FloatOrList = 1.0, epsilon: FloatOrList = 0.15,
                 normalize: bool = False, rescale: bool = True, scaling: float = 1.0, seed: int = 0) -> StateDict:
    """DELLA without sign consensus (mergekit ``della_linear``)."""
    return _gta(base, parents, weights, sparsify="della_magprune", consensus=False, normalize=normalize,
                rescale=rescale, scaling=scaling, density=density, epsilon=epsilon, seed=seed)


# ----------------------------------------------------------------------- linear / slerp


def linear(base, parents, weights=None, *, normalize: bool = True) -> StateDict:
    """Linear / model soup (Wortsman et al. 2022; mergekit ``linear``):
    sum_i w_i theta_i [/ sum_i w_i]. The base is not used (mergekit ignores it)."""
    _check_parents(parents)
    n = len(parents)
    w_all = per_parent(weights, n, "weights", 1.0)
    ref_sd = parents[0]
    out: StateDict = {}
    for name, ref in ref_sd.items():
        present = _gather(name, ref, parents)
        tensors = [t for _, t in present]
        if not ref.is_floating_point():
            out[name] = _copy_buffer(name, tensors)
            continue
        wd = work_dtype(ref)
        acc = torch.zeros(ref.shape, dtype=wd)
        total = 0.0
        for i, t in present:
            acc += w_all[i] * t.to(wd)
            total += w_all[i]
        if normalize:
            if total == 0:
                raise ValueError(f"linear: weights of the parents holding {name!r} sum to 0; "
                                 f"use normalize=False or other weights")
            acc = acc / total
        out[name] = acc.to(ref.dtype)
    return out


def _slerp_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor,
                  dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (flattened), mergekit 0.1.5 ``slerp``."""
    wd = work_dtype(v0)
    a = v0.reshape(-1).to(wd)
    b = v1.reshape(-1).to(wd)
    if a.numel() == 0:
        return v0.clone()
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t  # (anti)colinear: plain lerp
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return (ca * a + cb * b).reshape(v0.shape).to(v0.dtype)


def layer_gradient(values: Sequence[float], names: Iterable[str]) -> Callable[[str], float]:
    """mergekit's layer gradient (``config.evaluate_setting`` at the planner's ``t``) as each tensor's value: a tensor
    of encoder block ``b`` of a tower of ``L`` blocks (``block_tower``, among ``names``: the whole model's) sits at
    ``x = b / (L - 1)`` (1 for a single block), every other tensor (embeddings, final norms, head: mergekit's pre and
    post weights) at 0; the value is ``values`` interpolated piecewise-linearly at ``x`` over their positions."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("a layer gradient needs at least one value")
    depth: dict[str, int] = {}
    for name in names:
        found = block_tower(name)
        if found is not None:
            depth[found[0]] = max(depth.get(found[0], 0), found[1] + 1)

    def value(name: str) -> float:
        found = block_tower(name)
        x = 0.0 if found is None else (found[1] / (depth[found[0]] - 1) if depth[found[0]] > 1 else 1.0)
        scaled = x * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]

    return value


def slerp(base, parents, weights=None, *,
          t: float | Sequence[float] | Mapping[str, float] | Callable[[str], float] = 0.5,
          dot_threshold: float = 0.9995, eps: float = 1e-8) -> StateDict:
    """SLERP between two parents (mergekit ``slerp``): ``parents[0]`` is the t=0 end (mergekit's
    ``base_model``), ``parents[1]`` the t=1 end; each tensor is one flattened vector; when
    |cos| > ``dot_threshold`` it falls back to lerp. ``t`` may be per tensor (mapping or
    callable), or a list: mergekit's layer gradient over ``parents[0]``'s blocks (``layer_gradient``). ``base`` and
    ``weights`` are unused."""
    if len(parents) != 2:
        raise ValueError(f"slerp merges exactly two parents, got {len(parents)}")
    p0, p1 = parents
    if isinstance(t, Sequence):
        t = layer_gradient(t, p0.keys())
    out: StateDict = {}
    for name, v0 in p0.items():
        if name not in p1:
            out[name] = v0.clone()  # mergekit PASSTHROUGH_SINGLETON for optional weights
            continue
        v1 = p1[name]
        if v1.shape != v0.shape:
            raise ValueError(f"slerp: tensor {name!r} shapes differ: {tuple(v0.shape)} vs {tuple(v1.shape)}")
        if not v0.is_floating_point():
            out[name] = _copy_buffer(name, [v0, v1])
            continue
        tt = t(name) if callable(t) else (t[name] if isinstance(t, Mapping) else t)
        out[name] = _slerp_tensor(float(tt), v0, v1, dot_threshold, eps)
    return out


# ------------------------------------------------------------------------------- PCB


def _pcb_clamp(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """Per-row clamp to the sorted values at ``int(d*min_ratio)`` and ``int(d*(1-max_ratio)-1)``
    (duguodong7/pcb-merging ``clamp``)."""
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    lo = s[:, int(d * min_ratio)].unsqueeze(1)
    hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.clamp(x, lo, hi)


def _pcb_minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x))


def pcb(base, parents, weights=None, *, pcb_ratio: float = 0.1, scaling: float = 1.0,
        clamp_ratio: float = 0.0001) -> StateDict:
    """PCB-Merging (Du et al., NeurIPS 2024; ``PCB_merge`` of duguodong7/pcb-merging) over the
    concatenation of every floating tensor (as the original flattens the whole model):

    intra-balance exp(n * minmax(|tau_i|)^2), inter-balance tanh(tau_i * sum_j tau_j), their
    product is kept on its top ``pcb_ratio`` per task and min-max scaled to [0, 1] (scale_i);
    merged = base + scaling * sum_i w_i scale_i clip(tau_i) / max(sum_i scale_i, 1e-12), with
    |tau_i| clipped to its [0.01%, 99.99%] quantiles. ``weights`` are the per-task lambdas
    (the original searches them in [0.8, 1.3]; default 1.0)."""
    if base is None:
        raise ValueError("pcb needs the common base model (base=...)")
    _check_parents(parents)
    n = len(parents)
    lam = per_parent(weights, n, "weights", 1.0)
    names = [k for k, v in base.items() if v.is_floating_point()]
    for sd in parents:
        for k in names:
            _gather(k, base[k], [sd])
            if k not in sd:
                raise ValueError(f"pcb: parent lacks tensor {k!r} (PCB flattens whole models)")
    flat_base = torch.cat([base[k].reshape(-1).to(torch.float64) for k in names])
    tv = torch.stack([torch.cat([sd[k].reshape(-1).to(torch.float64) for k in names]) - flat_base
                      for sd in parents])  # (n, d)
    check_pcb_keeps(pcb_ratio, tv.shape[1])
    abs_c = _pcb_clamp(tv.abs(), clamp_ratio, clamp_ratio)
    clamped = torch.sign(tv) * abs_c
    self_pcb = torch.exp(n * _pcb_minmax(abs_c) ** 2)
    cross_pcb = torch.tanh(tv * tv.sum(0))
    task_pcb = self_pcb * cross_pcb
    scale = _pcb_minmax(_pcb_clamp(task_pcb, 1 - pcb_ratio, 0))
    lam_t = torch.tensor(lam, dtype=torch.float64).unsqueeze(1)
    merged = (lam_t * clamped * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)
    flat = flat_base + scaling * merged
    out: StateDict = {}
    off = 0
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = _copy_buffer(k, [v] + [sd[k] for sd in parents if k in sd])
            continue
        m = v.numel()
        out[k] = flat[off : off + m].reshape(v.shape).to(v.dtype)
        off += m
    return out


# ------------------------------------------------------------------ TALL-mask consensus


def consensus(base, parents, weights=None, *, k: int = 2, tall_mask_lambda: float = 0.6,
              scaling: float = 1.0) -> StateDict:
    """Consensus merging with TALL masks (Wang et al., ICML 2024; nik-dim/tall_masks), the
    task-arithmetic variant. TALL mask of task t: |tau_t| > lambda * |tau_sum - tau_t|, with
    tau_sum = sum_t tau_t unweighted (tall_masks' and FusionBench's ``generate_task_masks``): which
    entries a task owns does not depend on how much it is weighted, so uniform weights keep the same
    entries whatever their scale. An entry is kept if at least ``k`` tasks' masks hold it; merged =
    base + scaling * (consensus mask * sum_t w_t tau_t) — the weights only scale what is kept. The
    original picks lambda per task on validation data from {0.2,...,0.6}; dataless default 0.6
    (FusionBench's ``tall_mask_lambda``). k=2 drops "selfish" and "catastrophic" weights; k=0 is task
    arithmetic; k > N gives the base, as does k = N with lambda >= 1."""
    if base is None:
        raise ValueError("consensus needs the common base model (base=...)")
    _check_parents(parents)
    n = len(parents)
    w_all = per_parent(weights, n, "weights", 1.0)
    out: StateDict = {}
    for name, b in base.items():
        present = _gather(name, b, parents)
        kept = _unmerged(name, b, present)
        if kept is not None:
            out[name] = kept
            continue
        wd = work_dtype(b)
        b32 = b.to(wd)
        taus = [(i, t.to(wd) - b32) for i, t in present]
        total = sum(tau for _, tau in taus)
        count = torch.zeros(b.shape, dtype=wd)
        for _, tau in taus:
            count += (tau.abs() > tall_mask_lambda * (total - tau).abs()).to(wd)
        keep = (count >= k).to(wd)
        mtl = sum(w_all[i] * tau for i, tau in taus)
        out[name] = (b32 + scaling * keep * mtl).to(b.dtype)
    return out


# ------------------------------------------------------------ dataless Localize-and-Stitch


def check_stitch_keeps(sparsity: float, entries: int) -> None:
    """Refuse a `sparsity` that keeps no entry of a parent's `entries` task-vector entries (the merge would be the
    base): the threshold is the k-th largest magnitude, k = int(sparsity * entries), kept strictly above it."""
    if entries and int(sparsity * entries) <= 1:
        raise ValueError(f"density {sparsity:g} keeps none of each task vector's {entries:,} entries (the merge would "
                         f"be the base); give a density of at least 2/{entries:,} = {2 / entries:.3g}, "
                         f"{option_hint('density')}")


def check_pcb_keeps(pcb_ratio: float, entries: int) -> None:
    """Refuse a `pcb_ratio` that keeps none of a task vector's `entries` (the merge would be the base): the kept
    share's threshold is then the largest score."""
    if entries and int(entries * (1 - pcb_ratio)) >= entries - 1:
        raise ValueError(f"pcb_ratio {pcb_ratio:g} keeps none of each task vector's {entries:,} entries (the merge "
                         f"would be the base); give a pcb_ratio above 1/{entries:,} = {1 / entries:.3g}, "
                         f"{option_hint('pcb_ratio')}")


def localize_stitch(base, parents, weights=None, *, sparsity: float = 0.1,
                    exclude: Sequence[str] = ()) -> StateDict:
    """Dataless Localize-and-Stitch (He et al., TMLR 2025; yifei-he/Localize-and-Stitch
    ``Localizer.create_basepatch`` + ``Stitcher``). Per parent, over all floating tensors
    not in ``exclude``: threshold = the k-th largest |tau_i| with k = int(sparsity * total);
    mask_i = |tau_i| > threshold (strict, as the original). Stitch: where c parents' masks
    overlap each contributes 1/c; merged = base + sum_i w_i (mask_i / c) tau_i. ``weights``
    default to 1 (the original has none)."""
    if base is None:
        raise ValueError("localize_stitch needs the common base model (base=...)")
    _check_parents(parents)
    n = len(parents)
    w_all = per_parent(weights, n, "weights", 1.0)
    names = [k for k, v in base.items() if v.is_floating_point() and k not in set(exclude)]
    masks: list[dict[str, torch.Tensor]] = []
    taus: list[dict[str, torch.Tensor]] = []
    for sd in parents:
        tau = {}
        for k in names:
            _gather(k, base[k], [sd])
            if k in sd:
                tau[k] = sd[k].to(work_dtype(base[k])) - base[k].to(work_dtype(base[k]))
        taus.append(tau)
        flat = torch.cat([v.abs().reshape(-1) for v in tau.values()]) if tau else torch.zeros(0)
        kk = int(sparsity * flat.numel())
        check_stitch_keeps(sparsity, flat.numel())
        if kk <= 0:
            masks.append({name: torch.zeros_like(v, dtype=torch.bool) for name, v in tau.items()})
            continue
        thr = torch.topk(flat, kk).values.min()
        masks.append({name: v.abs() > thr for name, v in tau.items()})
    out: StateDict = {}
    for name, b in base.items():
        if name not in names:
            present = [sd[name] for sd in parents if name in sd]
            out[name] = _copy_buffer(name, [b] + present) if not b.is_floating_point() else b.clone()
            continue
        wd = work_dtype(b)
        count = torch.zeros(b.shape, dtype=wd)
        for m in masks:
            if name in m:
                count += m[name].to(wd)
        inv = torch.where(count > 0, 1.0 / torch.where(count > 0, count, 1), 0).to(wd)
        acc = b.to(wd).clone()
        for i in range(n):
            if name in taus[i]:
                acc += w_all[i] * masks[i][name].to(wd) * inv * taus[i][name]
        out[name] = acc.to(b.dtype)
    return out


# ------------------------------------------------------------------------------- layer swapping

#: An encoder block's tensors: `<prefix>.layer.<i>.<rest>` (BERT, RoBERTa) or `<prefix>.layers.<i>.<rest>` (ViT in
#: transformers 5, CLIP's towers) — the block naming of every architecture in `hf_mudsc.architectures`.
BLOCK_PATTERN = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The encoder block a tensor belongs to (None: embeddings, final norms, pooler, heads)."""
    found = BLOCK_PATTERN.search(name)
    return int(found.group(1)) if found else None


def block_tower(name: str) -> tuple[str, int] | None:
    """(tower, block) of a tensor of an encoder block: the tower is the first module of the name's part before the
    block list (`vision_model`, `text_model` in CLIP, `bert`, `model` for a bare model's top-level blocks), so a
    two-tower model's towers are told apart; None outside every block."""
    found = BLOCK_PATTERN.search(name)
    if not found:
        return None
    return name[:found.start()].split(".")[0] or "model", int(found.group(1))


def layer_swap(base, parents, weights=None, *, blocks: Mapping[int, int]) -> StateDict:
    """Layer swapping (Bandarkar et al. 2024, "Layer Swapping for Zero-Shot Cross-Lingual Transfer"; mergekit
    does it with ``slices`` + ``passthrough``): every tensor of encoder block ``b`` (``block_index``) is a copy of
    parent ``blocks[b]``'s; every other tensor (unlisted blocks, embeddings, final norms, head) is parent 0's.
    In a two-tower model (CLIP) block ``b`` of both towers is swapped. ``base`` and ``weights`` are unused."""
    _check_parents(parents)
    for block, index in blocks.items():
        if not 0 <= index < len(parents):
            raise ValueError(f"layer_swap: block {block} is assigned to parent {index}, but there are only "
                             f"{len(parents)} parents (0 to {len(parents) - 1})")
    out: StateDict = {}
    for name, ref in parents[0].items():
        block = block_index(name)
        source = parents[blocks.get(block, 0)] if block is not None else parents[0]
        if name not in source:
            raise ValueError(f"layer_swap: parent {blocks[block]} has no tensor {name!r}")
        tensor = source[name]
        if tensor.shape != ref.shape:
            raise ValueError(f"layer_swap: tensor {name!r} has shape {tuple(tensor.shape)} in parent "
                             f"{blocks[block]}, {tuple(ref.shape)} in parent 0")
        out[name] = tensor.clone()
    return out


# ---------------------------------------------------------------- RegMean / Fisher helpers


def regmean_solve(grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], scale: float = 0.95) -> torch.Tensor:
    """RegMean closed form for one Linear layer (Jin et al., ICLR 2023; FusionBench
    ``merging_with_regmean_weights``): with G_i' = G_i whose off-diagonal entries are
    multiplied by ``scale`` (``reduce_non_diagonal_ratio``), W^T = (sum G_i')^-1 sum G_i' W_i^T.
    ``grams[i]`` is (in, in); ``weights[i]`` is parent i's weight in torch's (out, in) layout;
    returns (out, in). Solved in float64 with ``torch.linalg.solve`` (FusionBench inverts)."""
    if len(grams) != len(weights) or not grams:
        raise ValueError("regmean_solve: need one Gram matrix per weight matrix")
    dtype = weights[0].dtype
    lhs = None
    rhs = None
    for G, W in zip(grams, weights):
        G = G.to(torch.float64)
        if G.shape[0] != G.shape[1] or G.shape[0] != W.shape[1]:
            raise ValueError(f"regmean_solve: Gram {tuple(G.shape)} does not match weight {tuple(W.shape)}")
        off = torch.full_like(G, float(scale))
        off.fill_diagonal_(1.0)
        Gp = G * off
        term = Gp @ W.to(torch.float64).T
        lhs = Gp if lhs is None else lhs + Gp
        rhs = term if rhs is None else rhs + term
    return torch.linalg.solve(lhs, rhs).T.contiguous().to(dtype)


def regmean(parents, grams: Mapping[str, Sequence[torch.Tensor]], weights=None, *, scale: float = 0.95) -> StateDict:
    """RegMean over a state dict: every ``<module>.weight`` whose module has Gram matrices in
    ``grams`` (module name -> one (in, in) Gram per parent) is solved by ``regmean_solve``;
    every other floating tensor is the weighted average (FusionBench: unweighted mean).
    Per-parent ``weights`` scale the Grams (w_i G_i) - equal weights reproduce FusionBench."""
    _check_parents(parents, 2)
    n = len(parents)
    w_all = per_parent(weights, n, "weights", 1.0)
    avg = linear(None, parents, w_all, normalize=True)
    out = dict(avg)
    for module, gs in grams.items():
        key = module + ".weight"
        if key not in parents[0]:
            raise ValueError(f"regmean: no tensor {key!r} for Gram module {module!r}")
        if len(gs) != n:
            raise ValueError(f"regmean: {module!r} has {len(gs)} Gram matrices for {n} parents")
        out[key] = regmean_solve([w * g.to(torch.float64) for w, g in zip(w_all, gs)],
                                 [sd[key] for sd in parents], scale)
    return out


def fisher_share(fisher: torch.Tensor, weight: float, floor: float) -> torch.Tensor:
    """Parent i's coefficient on each entry of a Fisher merge, ``w_i * max(F_i, floor)`` in float64: the floor keeps
    an entry no parent's data moves (F = 0 everywhere) at the weighted average instead of 0/0. Shared by
    `fisher_average` and the `fisher` method, which sums the shares parent by parent."""
    return float(weight) * fisher.to(torch.float64).clamp_min(float(floor))


def fisher_average(params: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                   weights: FloatOrList | None = None, epsilon: float = 1e-6) -> StateDict:
    """Fisher merging (Matena & Raffel, NeurIPS 2022): per entry, theta = sum_i w_i F~_i theta_i / sum_i w_i F~_i
    with F~_i = max(F_i, ``epsilon``) (`fisher_share`) — the paper's Fisher-weighted mean, every Fisher floored
    as the authors' code does with ``fisher_floor`` 1e-6 (``favor_target_model=False``; their default floors only
    the first model). ``weights`` are the paper's lambda_i (default 1 each). Not normalised: the authors'
    ``normalize_fishers`` and FusionBench's ``normalize_fisher_weight`` divide each model's coefficient by its
    Fisher's L2 norm, and FusionBench adds epsilon to every entry instead of flooring (docs/design.md §4.11,
    docs/research/same_base_facts.md §7)."""
    _check_parents(params)
    n = len(params)
    if len(fishers) != n:
        raise ValueError("fisher_average: need one Fisher dict per parent")
    w_all = per_parent(weights, n, "weights", 1.0)
    out: StateDict = {}
    for k, ref in params[0].items():
        if not ref.is_floating_point():
            out[k] = _copy_buffer(k, [p[k] for p in params])
            continue
        num = torch.zeros(ref.shape, dtype=torch.float64)
        den = torch.zeros(ref.shape, dtype=torch.float64)
        for i in range(n):
            if params[i][k].shape != ref.shape:
                raise ValueError(f"fisher_average: tensor {k!r} shapes differ")
            share = fisher_share(fishers[i][k], w_all[i], epsilon)
            num += share * params[i][k].to(torch.float64)
            den += share
        out[k] = (num / den).to(ref.dtype)
    return out
