"""An executable specification of the MuDSC reference implementation, for ViTForImageClassification.

This is a test oracle, deliberately written the slow and obvious way and independent of the library:
it imports nothing from hf_mudsc (no spec, similarity, matching, solver or apply code). It follows the
reference (zju-vipa/training_free_model_merging, homogeneous_tasks/mudsc.py, read for facts only) step by
step:

- its own group table for a transformers-5 ViT (residual stream first, then per block q/k, v, MLP);
- activations from its own hooks (residual at the classifier input, q/k at the k_proj output, v at the
  o_proj input, MLP at the fc2 input), every token a sample, population covariance in float64;
- its own dense Pearson correlations, computed as ``E[xxᵀ] − μμᵀ`` over ``sqrt(diag)`` clamped at 1e-7;
- matchers on dense 0/1 ``(2n, n)`` matrices with ``merge = P / (P.sum(0) + eps)``: Hungarian align and
  group align via scipy, and the plain greedy zip / group zip loop that deletes rows and columns and
  rescans the whole matrix with a flat argmax after every fusion;
- the solve loop with ``torch.Generator().manual_seed(0)`` and ``torch.randperm`` per sweep;
- the apply step by dense matrix products: ``out`` axes with ``2·merge_i``, ``in`` axes with ``U_i``.

Everything is float64 (the library design chose float64 for matching; the reference itself is float32).
Cost is O(n³) per zip, so keep widths small (≤ 64).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

REFERENCE_EPS = 1e-5  # the reference's merge normaliser: P / (P.sum(0) + 1e-5)
CLAMP = 1e-7
MAX_SWEEPS = 100
PATIENCE = 5

# method -> (uses activations, uses weights, iterates, fixed matcher or None)
METHODS = {
    "mudsc": (True, True, True, None),
    "zipit": (True, False, False, "zip"),
    "activation_align": (True, False, False, "align"),
    "weight_matching": (False, True, True, "align"),
}


# ------------------------------------------------------------------------------------------------
# Group table
# ------------------------------------------------------------------------------------------------
@dataclass
class RefGroup:
    """One unit space: members are (parameter, axis, role) with role "out" (produces) or "in" (consumes)."""

    name: str
    width: int
    heads: int
    members: list[tuple[str, int, str]]
    hook_module: str
    hook_where: str  # "input" or "output"


def vit_groups(model: torch.nn.Module) -> list[RefGroup]:
    """The reference's get_vit_perm, renamed to transformers 5's in-memory ViTForImageClassification."""
    config = model.config
    d, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    residual = [
        ("vit.embeddings.cls_token", 2, "out"),
        ("vit.embeddings.position_embeddings", 2, "out"),
        ("vit.embeddings.patch_embeddings.projection.weight", 0, "out"),
        ("vit.embeddings.patch_embeddings.projection.bias", 0, "out"),
    ]
    blocks = []
    for i in range(config.num_hidden_layers):
        layer = f"vit.layers.{i}"
        att = f"{layer}.attention"
        residual += [
            (f"{layer}.layernorm_before.weight", 0, "out"),
            (f"{layer}.layernorm_before.bias", 0, "out"),
            (f"{att}.q_proj.weight", 1, "in"),
            (f"{att}.k_proj.weight", 1, "in"),
            (f"{att}.v_proj.weight", 1, "in"),
            (f"{att}.o_proj.weight", 0, "out"),
            (f"{att}.o_proj.bias", 0, "out"),
            (f"{layer}.layernorm_after.weight", 0, "out"),
            (f"{layer}.layernorm_after.bias", 0, "out"),
            (f"{layer}.mlp.fc1.weight", 1, "in"),
            (f"{layer}.mlp.fc2.weight", 0, "out"),
            (f"{layer}.mlp.fc2.bias", 0, "out"),
        ]
        blocks += [
            RefGroup(f"{att}.qk", d, heads, [
                (f"{att}.q_proj.weight", 0, "out"), (f"{att}.q_proj.bias", 0, "out"),
                (f"{att}.k_proj.weight", 0, "out"), (f"{att}.k_proj.bias", 0, "out"),
            ], f"{att}.k_proj", "output"),
            RefGroup(f"{att}.v", d, heads, [
                (f"{att}.v_proj.weight", 0, "out"), (f"{att}.v_proj.bias", 0, "out"),
                (f"{att}.o_proj.weight", 1, "in"),
            ], f"{att}.o_proj", "input"),
            RefGroup(f"{layer}.mlp", inter, 1, [
                (f"{layer}.mlp.fc1.weight", 0, "out"), (f"{layer}.mlp.fc1.bias", 0, "out"),
                (f"{layer}.mlp.fc2.weight", 1, "in"),
            ], f"{layer}.mlp.fc2", "input"),
        ]
    residual += [
        ("vit.layernorm.weight", 0, "out"),
        ("vit.layernorm.bias", 0, "out"),
        ("classifier.weight", 1, "in"),
    ]
    return [RefGroup("residual", d, 1, residual, "classifier", "input"), *blocks]


def axes_of(groups: list[RefGroup]) -> dict[str, list[tuple[int, int, str]]]:
    """parameter -> [(group index, axis, role)]."""
    table: dict[str, list[tuple[int, int, str]]] = {}
    for gi, group in enumerate(groups):
        for name, axis, role in group.members:
            table.setdefault(name, []).append((gi, axis, role))
    return table


# ------------------------------------------------------------------------------------------------
# Correlations
# ------------------------------------------------------------------------------------------------
def pearson(rows: torch.Tensor) -> torch.Tensor:
    """Correlation of the rows of a (units, samples) float64 matrix, population statistics."""
    mean = rows.mean(dim=1)
    cov = rows @ rows.T / rows.shape[1] - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(0).sqrt()
    return cov / torch.outer(std, std).clamp_min(CLAMP)


def activation_correlations(model_a, model_b, groups: list[RefGroup], batches: list[dict]) -> list[torch.Tensor]:
    """Per group, the (2n, 2n) correlation of [A units; B units] over every hooked position."""
    captured: list[dict[int, torch.Tensor]] = [{}, {}]
    handles = []
    for mi, model in enumerate((model_a, model_b)):
        modules = dict(model.named_modules())
        for gi, group in enumerate(groups):
            def keep(value, mi=mi, gi=gi):
                captured[mi][gi] = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)

            if group.hook_where == "input":
                handles.append(modules[group.hook_module].register_forward_pre_hook(
                    lambda module, args, keep=keep: keep(args[0])))
            else:
                handles.append(modules[group.hook_module].register_forward_hook(
                    lambda module, args, output, keep=keep: keep(output)))
    sums = [torch.zeros(2 * g.width, dtype=torch.float64) for g in groups]
    outers = [torch.zeros(2 * g.width, 2 * g.width, dtype=torch.float64) for g in groups]
    counts = [0] * len(groups)
    try:
        with torch.no_grad():
            for batch in batches:
                for model in (model_a, model_b):
                    assert not model.training, "the oracle expects models in eval mode"
                    model(pixel_values=batch["pixel_values"])
                for gi in range(len(groups)):
                    x = torch.cat([captured[0][gi], captured[1][gi]], dim=1)  # (samples, 2n)
                    sums[gi] += x.sum(0)
                    outers[gi] += x.T @ x
                    counts[gi] += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    result = []
    for total, outer, count in zip(sums, outers, counts):
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        result.append(cov / torch.outer(std, std).clamp_min(CLAMP))
    return result


def contract(tensor: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Replace `axis` (size n) by matrixᵀ @ that axis, matrix (n, m): the axis becomes size m."""
    moved = tensor.transpose(axis, 0)
    shape = list(moved.shape)
    out = matrix.T @ moved.reshape(shape[0], -1)
    shape[0] = matrix.shape[1]
    return out.reshape(shape).transpose(0, axis)


@dataclass
class Mats:
    """One group's matching: merge2 = 2·P/(P.sum(0)+eps), unmerge = P, both (2n, n); and the match value."""

    merge2: torch.Tensor
    unmerge: torch.Tensor
    value: float
    head_pairing: list[int] | None = None
    clusters: list[tuple[int, ...]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # zip budget exhaustions, so tests can see they happened

    def block(self, which: str, model: int) -> torch.Tensor:
        full = self.merge2 if which == "merge2" else self.unmerge
        n = full.shape[0] // 2
        return full[model * n:(model + 1) * n]


def weight_correlation(gi: int, groups: list[RefGroup], table, params: list[dict], mats: dict[int, Mats]):
    """Pearson of the rows of [Z_A; Z_B]; other axes of a member mapped by the groups already matched."""
    group = groups[gi]
    features = []
    for model in (0, 1):
        blocks = []
        for name, axis, _role in group.members:
            w = params[model][name].to(torch.float64)
            for gj, other_axis, other_role in table[name]:
                if other_axis == axis or gj not in mats:
                    continue
                # The reference's rule: an in-member of the other group uses its 2·merge, an out-member its U.
                matrix = mats[gj].block("merge2" if other_role == "in" else "unmerge", model)
                w = contract(w, other_axis, matrix)
            blocks.append(w.transpose(axis, 0).reshape(group.width, -1))
        features.append(torch.cat(blocks, dim=1))
    return pearson(torch.cat(features, dim=0))


# ------------------------------------------------------------------------------------------------
# Matchers
# ------------------------------------------------------------------------------------------------
def _finish(p: torch.Tensor, value: float, eps: float, pairing=None, events=()) -> Mats:
    merge = p / (p.sum(dim=0, keepdim=True) + eps)
    clusters = [tuple(torch.nonzero(p[:, j]).flatten().tolist()) for j in range(p.shape[1])]
    return Mats(merge2=2 * merge, unmerge=p, value=value, head_pairing=pairing, clusters=clusters,
                events=list(events))


def _hungarian(block: torch.Tensor) -> tuple[np.ndarray, float]:
    arr = block.numpy()
    rows, cols = linear_sum_assignment(arr, maximize=True)
    assert (rows == np.arange(len(rows))).all()
    return cols, float(arr[rows, cols].mean())


def _head_pairing(sims: torch.Tensor, n: int, k: int) -> tuple[list[int], np.ndarray, list[float]]:
    """Hungarian per (A head, B head) block -> score; Hungarian on the k×k scores pairs the heads."""
    g = n // k
    scores = np.empty((k, k))
    cols = np.empty((k, k, g), dtype=np.int64)
    for j in range(k):
        for h in range(k):
            cols[j, h], scores[j, h] = _hungarian(sims[j * g:(j + 1) * g, n + h * g:n + (h + 1) * g])
    partner, _ = _hungarian(torch.from_numpy(scores))
    return [int(h) for h in partner], cols, [float(scores[j, partner[j]]) for j in range(k)]


def align(sims: torch.Tensor, heads: int, eps: float) -> Mats:
    n = sims.shape[0] // 2
    if heads == 1:
        partner, value = _hungarian(sims[:n, n:])
        pairing = None
    else:
        g = n // heads
        pairing, cols, paired_scores = _head_pairing(sims, n, heads)
        partner = np.concatenate([cols[j, pairing[j]] + pairing[j] * g for j in range(heads)])
        value = sum(paired_scores) / heads
    p = torch.zeros(2 * n, n, dtype=torch.float64)
    for m in range(n):
        p[m, m] = 1.0
        p[n + int(partner[m]), m] = 1.0
    return _finish(p, value, eps, pairing)


def _delete(t: torch.Tensor, index: int, dim: int) -> torch.Tensor:
    return torch.cat([t.narrow(dim, 0, index), t.narrow(dim, index + 1, t.shape[dim] - index - 1)], dim=dim)


def zip_match(sims: torch.Tensor, heads: int, decay: float, budget_factor: float, eps: float) -> Mats:
    """The reference's greedy zip (heads == 1) or group zip (heads > 1), literally: one global matrix,
    flat argmax, delete the fused column then row, budgets by the labels of the lower index."""
    if decay <= 0:
        raise ValueError("this oracle covers decay > 0 only")
    total = sims.shape[0]
    n = total // 2
    g = n // heads
    s = sims.clone().to(torch.float64)
    s.fill_diagonal_(-float("inf"))
    p = torch.eye(total, dtype=torch.float64)
    model = torch.tensor([0] * n + [1] * n)
    head = torch.arange(total) // g  # A heads 0..k-1, B heads k..2k-1
    model_budget = [int((n // 2) * budget_factor + 1e-4)] * 2
    head_budget = [int(n // (2 * heads) + 1e-4)] * (2 * heads)  # b_group = 1 in the reference
    pairing = None
    if heads == 1:
        rounds: list[tuple[list[int] | None, int]] = [(None, n)]
    else:
        pairing, _, _ = _head_pairing(s, n, heads)
        rounds = [([j, heads + pairing[j]], g) for j in range(heads)]
    picks: list[float] = []
    events: list[str] = []
    for round_heads, steps in rounds:
        if round_heads is None:
            mask = torch.zeros_like(s)
        else:
            inside = (head == round_heads[0]) | (head == round_heads[1])
            mask = torch.full_like(s, -float("inf"))
            mask[inside[:, None] & inside[None, :]] = 0.0
        for _ in range(steps):
            flat = int((s + mask).reshape(-1).argmax())
            first, second = flat // s.shape[1], flat % s.shape[1]
            picks.append(float(s[second, first]))
            lo, hi = min(first, second), max(first, second)
            p[:, lo] += p[:, hi]
            p = _delete(p, hi, 1)
            s[:, lo] = torch.minimum(s[:, lo], s[:, hi]) * decay
            s, mask = _delete(s, hi, 1), _delete(mask, hi, 1)
            s[lo, :] = torch.minimum(s[lo, :], s[hi, :]) * decay
            s, mask = _delete(s, hi, 0), _delete(mask, hi, 0)
            same_model = bool(model[lo] == model[hi])
            model = _delete(model, hi, 0)
            if same_model:
                label = int(model[lo])
                model_budget[label] -= 1
                if model_budget[label] <= 0:
                    events.append(f"model {label} budget exhausted")
                    sel = model == label
                    s[sel[:, None] & sel[None, :]] = -float("inf")
            if heads > 1:
                same_head = bool(head[lo] == head[hi])
                head = _delete(head, hi, 0)
                if same_head:
                    label = int(head[lo])
                    head_budget[label] -= 1
                    if head_budget[label] <= 0:
                        events.append(f"head {label} budget exhausted")
                        sel = head == label
                        s[sel[:, None] & sel[None, :]] = -float("inf")
    if heads > 1:
        order = [h for j in range(heads) for h in (j, heads + pairing[j])]
        p = torch.cat([p[:, head == h] for h in order], dim=1)
    return _finish(p, sum(picks) / len(picks), eps, pairing, events)


def match(sims: torch.Tensor, heads: int, matcher: str, decay: float, budget: float, eps: float) -> Mats:
    if matcher == "align":
        return align(sims, heads, eps)
    return zip_match(sims, heads, decay, budget, eps)


# ------------------------------------------------------------------------------------------------
# Solve and apply
# ------------------------------------------------------------------------------------------------
@dataclass
class OracleResult:
    state_dict: dict[str, torch.Tensor]
    mats: dict[int, Mats]
    groups: list[RefGroup]
    history: list[float]


def solve(groups, table, params, act, *, uses_act, iterate, alpha, matcher, decay, budget,
          eps, seed: int = 0) -> tuple[dict[int, Mats], list[float]]:
    mats: dict[int, Mats] = {}
    if uses_act:  # initial matching on activations alone; its values never count
        for gi, group in enumerate(groups):
            mats[gi] = match(act[gi], group.heads, matcher, decay, budget, eps)
    if not iterate:
        return mats, []
    generator = torch.Generator()
    generator.manual_seed(seed)
    values = {gi: 0.0 for gi in range(len(groups))}
    best: dict[int, Mats] | None = None
    best_objective = 0.0
    stalls = 0
    history = []
    for _ in range(MAX_SWEEPS):
        for gi in torch.randperm(len(groups), generator=generator).tolist():
            sims = weight_correlation(gi, groups, table, params, mats)
            if uses_act:
                sims = sims * alpha + act[gi] * (1 - alpha)
            mats[gi] = match(sims, groups[gi].heads, matcher, decay, budget, eps)
            values[gi] = mats[gi].value
        objective = sum(values.values()) / len(values)
        history.append(objective)
        if best is not None and best_objective >= objective:
            stalls += 1
            if stalls >= PATIENCE:
                break
            mats = dict(best)
        else:
            stalls = 0
            best = dict(mats)
            best_objective = objective
    assert best is not None
    return best, history


def apply(groups, table, params: list[dict], mats: dict[int, Mats]) -> dict[str, torch.Tensor]:
    merged = {}
    for name in params[0]:
        transformed = []
        for model in (0, 1):
            w = params[model][name].to(torch.float64)
            for gi, axis, role in table.get(name, []):
                w = contract(w, axis, mats[gi].block("unmerge" if role == "in" else "merge2", model))
            transformed.append(w)
        merged[name] = (transformed[0] + transformed[1]) / 2
    return merged


def reference_merge(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    batches: list[dict] | None,
    *,
    method: str = "mudsc",
    matcher: str = "zip",
    alpha: float = 0.5,
    zip_decay: float = 0.5,
    zip_budget: float = 1.0,
    eps: float = REFERENCE_EPS,
    act: list[torch.Tensor] | None = None,
) -> OracleResult:
    """Merge two ViTForImageClassification models the reference's way; returns the float64 state dict.

    `eps` is the merge normaliser (the reference's 1e-5; 0 gives the exact average). `act` may pass
    precomputed activation correlations (from :func:`activation_correlations`) to save forward passes.
    """
    uses_act, _uses_weights, iterate, fixed = METHODS[method]
    matcher = fixed or matcher
    groups = vit_groups(model_a)
    table = axes_of(groups)
    params = [{k: v.detach() for k, v in m.named_parameters()} for m in (model_a, model_b)]
    if uses_act and act is None:
        act = activation_correlations(model_a, model_b, groups, batches)
    mats, history = solve(groups, table, params, act, uses_act=uses_act,
                          iterate=iterate, alpha=alpha if method == "mudsc" else 1.0, matcher=matcher,
                          decay=zip_decay, budget=zip_budget, eps=eps)
    return OracleResult(apply(groups, table, params, mats), mats, groups, history)
