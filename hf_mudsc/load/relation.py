"""How two parents relate, from their weights alone — and whether one of them is protected against merging.

Cheap (no calibration, no matching solve) and architecture-free: it reads only the `PermutationSpec`.

Protection (MergeLock, "Model Unmerging"): a protected model has every attention head's q/k pair re-factored
by a random invertible `M` (W_q <- Mᵀ W_q, W_k <- M⁻¹ W_k) and its v/o pair by `N`. Its function is unchanged
but its head units correspond to nobody's, so a permutation merge with it collapses. Two signals:

1. *Factor imbalance* (one model): the head's product `W_qᵀ W_k` is what the model computes; the factors are
   a choice. Training keeps them balanced (gradient flow conserves `W_q W_qᵀ − W_k W_kᵀ`, which starts near 0
   for i.i.d. initialisations, and weight decay pushes to the balanced factorisation), so
   `‖W_q‖_F ‖W_k‖_F / ‖W_qᵀ W_k‖_*` (≥ 1, = 1 at perfect balance, blind to a per-head scalar) stays near 1:
   ≤ 1.17 on every model we measured. A random invertible `M` is ill-conditioned and drives it to 3–100+.
2. *Re-factored heads of a related pair* (two models): when the non-attention tensors show the parents are
   one model, a permuted copy or fine-tunes of one base, the per-head products agree while the factors do
   not. This also sees an orthogonal `M`, which (1) cannot.

See docs/design.md ("Protected parents") for the measurements and what cannot be detected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hf_mudsc.errors import UnmergeableModelError, option_hint, parent_label
from hf_mudsc.load.checks import check_finite, non_finite_refusal
from hf_mudsc.spec import Group, PermutationSpec

logger = logging.getLogger(__name__)

# Flat values per chunk of the relation check's float64 sums (2 MiB of float64 temporaries).
CHUNK_VALUES = 2**18

# A block whose median head factor imbalance exceeds this is protected: clean models measured <= 1.17 (random
# inits, trained toy ViTs, the real MiniLM), Gaussian MergeLock >= 3.
IMBALANCE_LIMIT = 2.0
# Relative distance of the weight matrices (identity alignment) below which the parents are fine-tunes of one base.
# Independent initialisations draw uncorrelated matrices of equal spread: ‖A−B‖/√(‖A‖‖B‖) ≈ √2 (measured 1.38–1.44 on
# trained different-seed ViTs of hidden 64–256, fresh ones too); one model is 0. The cut is where the matrices are
# as correlated as not (cosine 0.5 at equal norms): fine-tunes of one base measured 0.30–0.40 (the benchmark's
# same-init ViTs, fine-tuned hard), real fine-tunes far less.
SHARED_BASE_DISTANCE = 1.0
# Relative distance below which two tensors' sorted values are the same multiset (a permuted copy).
PERMUTED_TOLERANCE = 1e-5
# Re-factored heads of a related pair: the head factors differ by more than this (relative) ...
REFACTORED_FACTOR_DISTANCE = 0.2
# ... and more than this many times the distance of the products and of the other tensors.
REFACTORED_RATIO = 4.0


def attention_pairs(spec: PermutationSpec) -> list[tuple[Group, Group]]:
    """The (q/k group, v group) of every attention block: head-split groups sharing a head tie.

    The q/k group has only `out` members (the query and key projections); the v group has `out` members (the
    value projection) and `in` members (the output projection's columns).
    """
    pairs = []
    for indices in spec.head_ties().values():
        groups = [spec.groups[i] for i in indices]
        qk = [g for g in groups if g.num_heads > 1 and all(m.role == "out" for m in g.members)]
        v = [g for g in groups if g.num_heads > 1 and any(m.role == "in" for m in g.members)]
        if len(qk) == 1 and len(v) == 1:
            pairs.append((qk[0], v[0]))
    return pairs


def module_of(param: str) -> str:
    """`...q_proj.weight` -> `...q_proj`: the module a parameter belongs to."""
    return param.rsplit(".", 1)[0]


def head_factors(params: Mapping[str, torch.Tensor], qk: Group, v: Group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per head, the two factors of each head's bilinear maps: (W_q rows, W_k rows) and (W_v rows, W_oᵀ rows).

    Each factor is `(d_head, d_model)` in float64, so a head's product is `aᵀ b` (`W_qᵀ W_k`, `W_oᵀ`-side alike).
    """
    query, key = [
        m.param for m in qk.members
        if params[m.param].dim() == 2 and m.role == "out"
    ][:2]
    value = next(m for m in v.members if m.role == "out" and params[m.param].dim() == 2)
    output = next(m for m in v.members if m.role == "in")
    w_q, w_k = params[query].double(), params[key].double()
    w_v = params[value.param].double().movedim(value.axis, 0)
    w_o = params[output.param].double().movedim(output.axis, 0)
    g = qk.width // qk.num_heads
    pairs = []
    for head in range(qk.num_heads):
        rows = slice(head * g, (head + 1) * g)
        pairs.append((w_q[rows], w_k[rows]))
        pairs.append((w_v[rows], w_o[rows]))
    return pairs


def product_nuclear_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`‖aᵀ b‖_*` for head factors `a`, `b` of shape `(g, hidden)`, from a `(g, g)` matrix instead of the
    `(hidden, hidden)` product: with `aᵀ = Q_a R_a` and `bᵀ = Q_b R_b` (reduced QR), `aᵀ b = Q_a (R_a R_bᵀ) Q_bᵀ`
    has the singular values of `R_a R_bᵀ` (an SVD of a 384x384 product per head made the check take minutes)."""
    r_a = torch.linalg.qr(a.T.double(), mode="r").R
    r_b = torch.linalg.qr(b.T.double(), mode="r").R
    return torch.linalg.matrix_norm(r_a @ r_b.T, ord="nuc")


def factor_imbalance(params: Mapping[str, torch.Tensor], spec: PermutationSpec) -> dict[str, float]:
    """Per attention block (its q/k group's name), the median over its heads' q/k and v/o pairs of
    `‖a‖_F ‖b‖_F / ‖aᵀ b‖_*` (1 = balanced; a per-head scalar rescaling leaves it unchanged)."""
    scores = {}
    for qk, v in attention_pairs(spec):
        ratios = []
        for a, b in head_factors(params, qk, v):
            scale = a.norm() * b.norm()
            if not bool(torch.isfinite(scale)):  # NaN/inf weights: no QR/SVD of them (a LinAlgError traceback)
                ratios.append(float("inf"))  # out of balance; `parent_relation` refuses the values themselves
                continue
            ratios.append(float(scale / product_nuclear_norm(a, b).clamp_min(1e-30)))
        scores[qk.name] = float(torch.tensor(ratios).median())
    return scores


@dataclass(frozen=True)
class ParentRelation:
    """What the weights say about two parents (recorded in `config.mudsc["parent_relation"]`).

    `relation`: `same model` (every tensor equal), `permuted copy` (every tensor's values the same multiset),
    `shared base` (fine-tunes of one base: identity-aligned relative distance below `SHARED_BASE_DISTANCE`) or
    `independent`.
    `weight_distance`: ‖A − B‖ / √(‖A‖·‖B‖) over every weight matrix (two or more axes) of equal shape,
    unaligned (symmetric: the same whichever parent is A).
    `imbalance`: each parent's largest per-block head factor imbalance (see `factor_imbalance`).
    For N > 2 parents (`combined_relation`): the loosest pairwise relation with parent 0, the largest distance,
    one imbalance per parent; `farthest`: the parent at that distance (1 for two parents).
    """

    relation: str
    weight_distance: float
    imbalance: tuple[float, ...]
    farthest: int = 1

    def as_config(self) -> dict[str, object]:
        return {
            "relation": self.relation,
            "weight_distance": round(self.weight_distance, 6),
            "head_factor_imbalance": [round(x, 4) for x in self.imbalance],
        }


def sorted_values(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values in ascending order, as float64 (`sorted_in_own_dtype`, widened: widening is exact and
    monotonic, so the result equals sorting the float64 values)."""
    return sorted_in_own_dtype(tensor).double()


def sorted_in_own_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values in ascending order, flat, in its own dtype. Sorted by numpy where it can (its vectorised
    sort is several times faster than torch's on CPU; the relation check sorts every parameter of every parent)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype in (torch.float16, torch.float32, torch.float64) and flat.device.type == "cpu":
        return torch.from_numpy(np.sort(flat.numpy()))
    return flat.sort().values


def _chunked_sum_of_squares(a: torch.Tensor, b: torch.Tensor | None) -> float:
    """Σ(a − b)² (Σa² when `b` is None) in float64, over chunks of `CHUNK_VALUES` flat values: no float64 copy
    of a whole tensor is made."""
    total = 0.0
    for start in range(0, a.numel(), CHUNK_VALUES):
        x = a[start:start + CHUNK_VALUES].double()
        if b is not None:
            x = x - b[start:start + CHUNK_VALUES].double()  # not in place: `.double()` of float64 is the input
        total += float(torch.dot(x, x))
    return total


def squared_differences(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    """`(Σ(a − b)², Σ(sort(a) − sort(b))², Σa², Σb²)` in float64 for two tensors of one shape. The sorted copies stay
    in the tensors' dtype and the float64 sums are taken in chunks, so the comparison holds about twice the tensor's
    bytes (six float64 copies of BERT-base's word embeddings, 1.1 GB, were the peak of a linear merge)."""
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    identity = _chunked_sum_of_squares(flat_a, flat_b)
    norm_a, norm_b = _chunked_sum_of_squares(flat_a, None), _chunked_sum_of_squares(flat_b, None)
    sorted_a = sorted_in_own_dtype(flat_a)
    sorted_b = sorted_in_own_dtype(flat_b)
    return identity, _chunked_sum_of_squares(sorted_a, sorted_b), norm_a, norm_b


def unsorted_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    """`(Σ(a − b)², floor, Σa², Σb²)` in float64 for two tensors of one shape, without sorting: `floor` is a lower bound
    of the sorted distance `Σ(sort(a) − sort(b))²` — the least `‖a − πb‖²` over permutations π, which is at least
    `(‖a‖ − ‖b‖)²` (triangle inequality; norms ignore order) and `(Σa − Σb)²/n` (Cauchy-Schwarz on `a − πb`, whose
    sum ignores order)."""
    flat_a, flat_b = a.detach().reshape(-1), b.detach().reshape(-1)
    identity = _chunked_sum_of_squares(flat_a, flat_b)
    norm_a, norm_b = _chunked_sum_of_squares(flat_a, None), _chunked_sum_of_squares(flat_b, None)
    total_a, total_b = float(flat_a.sum(dtype=torch.float64)), float(flat_b.sum(dtype=torch.float64))
    floor = max((norm_a ** 0.5 - norm_b ** 0.5) ** 2, (total_a - total_b) ** 2 / max(flat_a.numel(), 1))
    return identity, floor, norm_a, norm_b


def sorted_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """`Σ(sort(a) − sort(b))²` in float64 (the sorted copies in the tensors' dtype, the sums in chunks)."""
    sorted_a = sorted_in_own_dtype(a.detach().reshape(-1))
    sorted_b = sorted_in_own_dtype(b.detach().reshape(-1))
    return _chunked_sum_of_squares(sorted_a, sorted_b)


class _Distance:
    """Sums of squared differences (identity and sorted alignment) over many tensors, relative to the geometric mean
    of both parents' squared norms (`norm`): the same figure whichever parent is given first (relative to A's norm
    alone, a pair of fine-tunes with unequal weight norms fell on either side of a cut by its order). The sorted sum
    may be left unknown (`sorted` None) with a lower bound of it (`floor`) that already decides every comparison with
    `PERMUTED_TOLERANCE` (`rules_out_permutation`)."""

    def __init__(self) -> None:
        self.identity = 0.0
        self.sorted: float | None = 0.0
        self.floor = 0.0
        self.norm_a = 0.0
        self.norm_b = 0.0

    @property
    def norm(self) -> float:
        return (self.norm_a * self.norm_b) ** 0.5

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Both sums of one pair of tensors, the sorted one exact (not mixed with `add_unsorted`)."""
        identity, sorted_value, norm_a, norm_b = squared_differences(a, b)
        self.identity += identity
        self.sorted = (self.sorted or 0.0) + sorted_value
        self.floor += sorted_value
        self.norm_a += norm_a
        self.norm_b += norm_b

    def add_unsorted(self, sums: tuple[float, float, float, float]) -> None:
        """`unsorted_sums` of one pair: the sorted sum is unknown until `add_sorted` has seen every pair."""
        self.identity += sums[0]
        self.floor += sums[1]
        self.norm_a += sums[2]
        self.norm_b += sums[3]
        self.sorted = None

    def add_sorted(self, value: float) -> None:
        self.sorted = (self.sorted or 0.0) + value

    def rules_out_permutation(self) -> bool:
        """Whether the floor alone puts the sorted distance above `PERMUTED_TOLERANCE` (with a factor 2 to spare for
        float64 rounding of the floor, far below it): no sort can then make the tensors a permuted copy."""
        return self.norm > 0 and self.floor / self.norm > 2 * PERMUTED_TOLERANCE ** 2

    def relative(self, aligned: str) -> float:
        if aligned == "identity":
            value = self.identity
        else:  # an unknown sorted sum is only asked where the floor rules a permutation out: the floor decides alike
            value = self.sorted if self.sorted is not None else self.floor
        return (value / self.norm) ** 0.5 if self.norm > 0 else 0.0


def _attention_params(spec: PermutationSpec) -> set[str]:
    return {m.param for qk, v in attention_pairs(spec) for m in (*qk.members, *v.members)}


def parent_relation(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                    spec: PermutationSpec, labels: Sequence[str] = ("A", "B"), *, check_values: bool = True,
                    base: str | None = None) -> tuple[ParentRelation, tuple[int, str] | None]:
    """The parents' relation, and — when a parent looks protected — which one (0 = A, 1 = B) and why, else None.

    `labels`: how the reason names the two parents. `check_values`: refuse a parent holding NaN or inf (`parent
    {label} has NaN ...`, its first such tensor in parent A's order), found from the sums this check takes of every
    tensor anyway (Σa² in float64 is finite exactly when `a` is), so no tensor is read again for it; the tensors
    not compared (a head of another shape, a tensor one parent lacks) are read for it alone. The merge's only NaN
    check of the parents: it runs before calibration, and for `auto` before any parent is loaded whole. Off for a
    base (`base_relations`); given the base's name (`base`: `params_a` is that base), the tensors of it compared —
    those a merge reads — are refused alike from the same sums, so `auto` refuses a corrupt base before it loads any
    parent whole (`pipeline._check_base` refuses it otherwise, in the same words)."""
    imbalance = []
    for side, params in enumerate((params_a, params_b)):
        blocks = factor_imbalance(params, spec)
        worst = max(blocks.items(), key=lambda item: item[1], default=("", 1.0))
        imbalance.append(worst[1])
        if worst[1] > IMBALANCE_LIMIT:
            if check_values:  # an inf weight is out of balance too: the attention tensors it was read from, refused
                check_finite({name: params[name] for name in params if name in _attention_params(spec)},
                             f"parent {labels[side]}")
            return ParentRelation("protected", float("nan"), (0.0, 0.0)), (side, (
                f"its attention heads are re-factored by random invertible maps (MergeLock-style "
                f"protection): in {worst[0]!r} the q/k and v/o weight factors are {worst[1]:.1f}x out of balance "
                f"(trained and freshly initialised models stay below {IMBALANCE_LIMIT})"
            ))
    attention = _attention_params(spec)
    # `matrices`: the tensors of two or more axes, whose values an initialisation draws. Norm weights (all 1) and
    # biases (all 0) start equal in every initialisation and would pull unrelated small models under the cut.
    whole, matrices, rest = _Distance(), _Distance(), _Distance()
    identical = True
    compared = []  # the names of the tensor pairs compared (not the tensors: a streamed parent is read one at a time)
    for name, a in params_a.items():
        b = params_b.get(name)
        if b is None or b.shape != a.shape:
            if check_values:
                check_finite({name: a}, f"parent {labels[0]}")
                if b is not None:
                    check_finite({name: b}, f"parent {labels[1]}")
            continue
        compared.append(name)
        identical = identical and bool(torch.equal(a, b))
        sums = unsorted_sums(a, b)
        if check_values and not (math.isfinite(sums[2]) and math.isfinite(sums[3])):
            for label, tensor in ((labels[0], a), (labels[1], b)):
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise non_finite_refusal(f"parent {label}", name)
        if base is not None and not math.isfinite(sums[2]) and a.is_floating_point() \
                and not bool(torch.isfinite(a).all()):  # sums[2] = Σa² in float64: finite exactly when `a` is
            raise non_finite_refusal(f"the base {base!r}", name)
        whole.add_unsorted(sums)
        if a.dim() >= 2:
            matrices.add_unsorted(sums)
            if name not in attention:
                rest.add_unsorted(sums)
    if check_values:
        seen = set(compared) | set(params_a)
        for name in (name for name in params_b if name not in seen):  # what only parent B holds
            check_finite({name: params_b[name]}, f"parent {labels[1]}")
    # The sorted sums (a sort of every tensor of both parents: most of this check's time) only where a permuted copy
    # is still possible: the floors of independent or same-base parents already rule it out, and decide alike.
    sort_whole = not identical and not whole.rules_out_permutation()
    sort_rest = rest.relative("identity") >= SHARED_BASE_DISTANCE and not rest.rules_out_permutation()
    for name in compared if sort_whole or sort_rest else ():
        a = params_a[name]
        in_rest = sort_rest and a.dim() >= 2 and name not in attention
        if sort_whole or in_rest:
            value = sorted_sum(a, params_b[name])
            if sort_whole:
                whole.add_sorted(value)
            if in_rest:
                rest.add_sorted(value)
    if identical:
        label, aligned = "same model", "identity"
    elif whole.relative("sorted") < PERMUTED_TOLERANCE:
        label, aligned = "permuted copy", "sorted"
    elif matrices.relative("identity") < SHARED_BASE_DISTANCE:
        label, aligned = "shared base", "identity"
    else:
        label, aligned = "independent", "identity"
    relation = ParentRelation(label, matrices.relative("identity"), (imbalance[0], imbalance[1]))
    # A related pair (judged on the tensors a lock leaves alone) whose heads compute the same products from
    # very different factors: one parent's heads were re-factored (e.g. by an orthogonal M).
    if rest.relative("identity") < SHARED_BASE_DISTANCE or rest.relative("sorted") < PERMUTED_TOLERANCE:
        aligned = "identity" if rest.relative("identity") < SHARED_BASE_DISTANCE else "sorted"
        factors, products = _Distance(), _Distance()
        for qk, v in attention_pairs(spec):
            pairs_a, pairs_b = head_factors(params_a, qk, v), head_factors(params_b, qk, v)
            factors.add(torch.cat([torch.cat(p) for p in pairs_a]), torch.cat([torch.cat(p) for p in pairs_b]))
            products.add(torch.stack([x.T @ y for x, y in pairs_a]), torch.stack([x.T @ y for x, y in pairs_b]))
        d_rest, d_factors, d_products = (rest.relative(aligned), factors.relative(aligned),
                                         products.relative(aligned))
        if d_factors > REFACTORED_FACTOR_DISTANCE and d_factors > REFACTORED_RATIO * max(d_rest, d_products):
            # Which one was re-factored: the less balanced one (B when they tie, e.g. under an orthogonal M).
            side = 0 if imbalance[0] > imbalance[1] else 1
            return relation, (side, (
                f"its attention heads are re-factored relative to parent {labels[1 - side]} "
                "(MergeLock-style protection): "
                f"the parents share their other weights (relative distance {d_rest:.2g}) and every head computes "
                f"the same product (distance {d_products:.2g}), but the q/k and v/o factors differ by {d_factors:.2g}"
            ))
    return relation, None


def check_mergeable(params_a: Mapping[str, torch.Tensor], params_b: Mapping[str, torch.Tensor],
                    spec: PermutationSpec, names: Sequence[str]) -> ParentRelation:
    """The parents' relation (logged); raises `UnmergeableModelError` naming a protected parent. No override:
    its owner asked not to be merged, and the merge would collapse anyway."""
    relation, protected = parent_relation(params_a, params_b, spec)
    if protected is not None:
        index, why = protected
        raise UnmergeableModelError(
            f"parent {'AB'[index]} ({names[index]}) is protected against merging and cannot be merged: {why}; "
            "merge an unprotected release of that model instead"
        )
    logger.info("parents: %s (relative weight distance %.3g; head factor imbalance %.3g / %.3g)",
                relation.relation, relation.weight_distance, *relation.imbalance)
    return relation


# From the closest relation to the loosest: N parents relate as loosely as their loosest pair. Ordered by whether
# the units line up: a permuted copy's line up with no one's (its units must be matched, as across initialisations),
# so it is looser than fine-tunes of one base, whose units stay where they are.
RELATION_ORDER = ("same model", "shared base", "permuted copy", "independent")


def combined_relation(relations: Sequence[ParentRelation]) -> ParentRelation:
    """The relation of N parents from each parent's relation to parent 0 (`relations[i - 1]` for parent i):
    the loosest label, the largest distance, parent 0's imbalance then each other parent's."""
    if len(relations) == 1:
        return relations[0]
    label = max((r.relation for r in relations), key=RELATION_ORDER.index)
    farthest = max(range(len(relations)), key=lambda index: relations[index].weight_distance)  # the first on a tie
    return ParentRelation(label, relations[farthest].weight_distance,
                          (relations[0].imbalance[0], *(r.imbalance[1] for r in relations)), farthest=farthest + 1)


def check_parents_mergeable(params: Sequence[Mapping[str, torch.Tensor]], spec: PermutationSpec,
                            names: Sequence[str]) -> ParentRelation:
    """`check_mergeable` for N >= 2 parents: each parent against parent 0 (a protected one is refused by its letter
    and name); the combined relation is logged and returned (two parents: exactly `check_mergeable`'s)."""
    if len(params) == 2:
        return check_mergeable(params[0], params[1], spec, names)
    relations = []
    for index in range(1, len(params)):
        relation, protected = parent_relation(params[0], params[index], spec,
                                              labels=(parent_label(0), parent_label(index)))
        if protected is not None:
            side, why = protected
            which = 0 if side == 0 else index
            raise UnmergeableModelError(
                f"parent {parent_label(which)} ({names[which]}) is protected against merging and cannot be merged: "
                f"{why}; merge an unprotected release of that model instead"
            )
        relations.append(relation)
    combined = combined_relation(relations)
    logger.info("%d parents: %s (largest relative weight distance to parent A %.3g; head factor imbalance %s)",
                len(params), combined.relation, combined.weight_distance,
                " / ".join(f"{x:.3g}" for x in combined.imbalance))
    return combined


def base_relations(base: Mapping[str, torch.Tensor], params: Sequence[Mapping[str, torch.Tensor]],
                   spec: PermutationSpec, *, name: str | None = None) -> list[ParentRelation]:
    """How each parent relates to the base (a fine-tune of it is `shared base`); the base is no parent, so it is
    not refused here as a protected one. Given the base's `name`, NaN/inf in the tensors of it a merge reads are
    refused from the sums taken anyway (`parent_relation(base=...)`)."""
    return [parent_relation(base, parent, spec, check_values=False, base=name)[0] for parent in params]


def base_is_a_parent(name: str, parents: Sequence[str], method: str, how: str) -> str:
    """The one line refusing a base that is parent(s) `parents` (letters) themselves (`how`: how that was found)."""
    which = f"parent {parents[0]}" if len(parents) == 1 else f"parents {', '.join(parents)}"
    return (f"the base {name} is {which} itself {how}: {method} reads task vectors from the base, and {which}'s is "
            f"0, so it would add nothing to the merge; pass the model the parents were fine-tuned from as "
            f"{option_hint('base')}, or a method that reads no base (e.g. method='linear', CLI: --method linear)")
