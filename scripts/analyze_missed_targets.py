#!/usr/bin/env python
"""Why did two quality targets of issue 4 miss? Measurements on the benchmark's own pairs (not a test).

The quality benchmark (`scripts/benchmark_quality.py`) missed two targets on the toy ViTs (depth 2, 4 heads
at every width); this script measures the mechanism behind each, on exactly the benchmark's parents and
calibration data (its pair builders in `scripts/common.py`, its cached models reused, `hf_mudsc.merge` called with the
same options and seed, so every merge here is the benchmark's merge):

* `same_init` — same-init pairs (one ViT pretrained on all digits, two copies fine-tuned on a 5+5 split).
  The known-good unit correspondence of such a pair is the identity (unit i of A <-> unit i of B). For
  each method it reports the fraction of units merged with exactly their identity partner (per group kind
  residual / qk / v / mlp, per group, over all units) next to the merge's test accuracy; MuDSC's own
  objective for the solution found vs for the identity, and whether the identity survives one solver visit
  of each group; and, per group kind, how ambiguous each similarity is on its own (is the identity partner
  a unit's top-1 correlate? how collinear are a model's units: effective rank of its activations).
* `head_pairing` — different-init pairs. With `independent_heads=True` (the reference) the q/k group and
  the v group of an attention block are each given their own head pairing; the default shares one. It
  reports per width the fraction of attention blocks whose independent q/k and v head pairings disagree
  and how many heads differ (at the activation-only start and in the solved merges, zip and align), how
  decisive the head scores are, what a mismatch does to a model's attention output (its values mixed by
  another head's attention pattern), and the per-split joint-accuracy gain of the shared pairing.

Outputs (in `--out-dir`, default `bench_results/analysis/`): `missed_targets.json` (every pair's figures
and the summaries; rewritten after every pair) and `missed_targets.md` (tables). One JSON summary line is
printed, then the tables.

    python scripts/analyze_missed_targets.py                                 # both parts, widths 64 128 256
    python scripts/analyze_missed_targets.py --parts head_pairing --widths 64 --splits 2   # a quick look

Models missing from the benchmark's cache are trained (and cached) exactly as the benchmark would; the
unit matches read here come from `merged.merge_report.matches`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match, attention_head_scores, match, pair_attention_heads
from hf_mudsc.solve.similarity import WeightCorrelation
from hf_mudsc.testing.permute import recovered_fraction

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("same_init", "head_pairing")
KINDS = ("residual", "qk", "v", "mlp")

# Same-init: identity recovery along the activation -> weight axis (alpha is the weight share).
SAME_INIT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("activation_align (α=0)", {"method": "activation_align"}),
    ("mudsc align α=0.5", {"method": "mudsc", "matcher": "align", "alpha": 0.5}),
    ("mudsc align α=0.9", {"method": "mudsc", "matcher": "align", "alpha": 0.9}),
    ("weight_matching (α=1)", {"method": "weight_matching"}),
    ("mudsc zip α=0.5", {"method": "mudsc", "matcher": "zip", "alpha": 0.5}),
]
# Same-init merges whose MuDSC objective is compared with the identity's.
OBJECTIVE_METHODS = ("mudsc align α=0.5", "mudsc align α=0.9")
# Different-init: the benchmark's shared / independent head pairing rows.
HEAD_METHODS: list[tuple[str, dict[str, Any]]] = [
    (
        f"mudsc {matcher}{' indep-heads' if indep else ''}",
        {"method": "mudsc", "matcher": matcher, "alpha": 0.5, "independent_heads": indep},
    )
    for matcher in ("zip", "align")
    for indep in (False, True)
]
HEAD_OPTIONS = dict(HEAD_METHODS)
START = "start (activation only)"
MAX_ENUMERATED_HEADS = 8  # 8! = 40320 pairings per block


log = functools.partial(common.log, stream=sys.stderr)


def kind_of(group_name: str) -> str:
    for kind in ("qk", "v", "mlp"):
        if group_name.endswith(f".{kind}"):
            return kind
    return "residual"


def mean_std(values: Sequence[float]) -> dict[str, float]:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


# ------------------------------------------------------------------------------------------ measurements
def identity_fractions(matches: Sequence[Match | None], names: Sequence[str]) -> dict[str, float]:
    """Fraction of units merged with exactly their identity partner, per group kind and over all units."""
    hits = {kind: 0.0 for kind in (*KINDS, "all")}
    units = {kind: 0 for kind in (*KINDS, "all")}
    for found, name in zip(matches, names, strict=True):
        if found is None:
            continue
        n = found.cluster_of.numel() // 2
        hit = recovered_fraction(found, torch.arange(n)) * n
        for kind in (kind_of(name), "all"):
            hits[kind] += hit
            units[kind] += n
    return {kind: hits[kind] / units[kind] for kind in hits if units[kind]}


def top1_identity(similarity: torch.Tensor) -> tuple[float, float, float]:
    """(fraction of A units whose most similar B unit is their identity partner, mean identity similarity,
    mean best non-identity similarity) in the A x B block of a (2n, 2n) similarity."""
    n = similarity.shape[0] // 2
    block = similarity[:n, n:].to(torch.float64)
    diag = block.diagonal().clone()
    top1 = float((block.argmax(dim=1) == torch.arange(n)).double().mean())
    others = block.clone()
    others.fill_diagonal_(-float("inf"))
    return top1, float(diag.mean()), float(others.max(dim=1).values.mean())


def effective_rank_fraction(correlation: torch.Tensor) -> float:
    """Participation ratio (sum λ)² / sum λ² of a model's own unit correlation, over its width: near 1 when
    units vary independently, small when they are near-collinear (then correlation cannot tell them apart)."""
    n = correlation.shape[0] // 2
    fractions = []
    for block in (correlation[:n, :n], correlation[n:, n:]):
        eig = torch.linalg.eigvalsh(block.to(torch.float64)).clamp_min(0)
        fractions.append(float(eig.sum() ** 2 / (eig**2).sum().clamp_min(1e-30)) / n)
    return sum(fractions) / 2


def ambiguity(
    model_a: Any, model_b: Any, correlations: Sequence[torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per group kind (unit-weighted): top-1 identity rate, identity vs best-other similarity (activation and
    weight space) and the activations' effective-rank fraction.

    The weight correlation is taken with no matches applied to the neighbouring groups, which for a
    same-init pair is exactly its value at the identity solution.
    """
    spec = spec_for(model_a)
    params_a = {k: v.detach() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach() for k, v in model_b.named_parameters()}
    weights = WeightCorrelation(spec, params_a, params_b)
    no_maps = [None] * len(spec.groups)
    totals: dict[str, dict[str, float]] = {}
    for index, group in enumerate(spec.groups):
        entry = totals.setdefault(kind_of(group.name), {"units": 0.0})
        rank = effective_rank_fraction(correlations[index])
        figures = {"act_rank": rank, "act_rank_dims": rank * group.width}
        for space, similarity in (("act", correlations[index]), ("weight", weights(index, no_maps))):
            top1, ident, other = top1_identity(similarity)
            figures.update({f"{space}_top1": top1, f"{space}_identity": ident, f"{space}_best_other": other})
        for key, value in figures.items():
            entry[key] = entry.get(key, 0.0) + value * group.width
        entry["units"] += group.width
    return {
        kind: {k: v / entry["units"] for k, v in entry.items() if k != "units"}
        for kind, entry in totals.items()
    }


def dual_space_similarities(
    model_a: Any,
    model_b: Any,
    correlations: Sequence[torch.Tensor],
    matches: Sequence[Match | None] | None,
    alpha: float,
) -> list[torch.Tensor]:
    """Every group's MuDSC similarity α·C_w + (1-α)·C_act with the neighbouring groups mapped by `matches`
    (None: the identity correspondence, whose maps leave every axis as it is)."""
    spec = spec_for(model_a)
    params_a = {k: v.detach() for k, v in model_a.named_parameters()}
    params_b = {k: v.detach() for k, v in model_b.named_parameters()}
    weights = WeightCorrelation(spec, params_a, params_b)
    maps: list[GroupMaps | None] = [None] * len(spec.groups)
    if matches is not None:
        maps = [None if m is None else GroupMaps.from_match(m) for m in matches]
    return [
        alpha * weights(index, maps).to(torch.float64) + (1 - alpha) * correlations[index]
        for index in range(len(spec.groups))
    ]


def matched_values(
    similarities: Sequence[torch.Tensor], matches: Sequence[Match | None] | None
) -> list[float]:
    """Each group's mean similarity over its matched (A unit, B unit) pairs: the solver's per-group value for
    an alignment (`matches` None: the identity pairs)."""
    values = []
    for index, similarity in enumerate(similarities):
        n = similarity.shape[0] // 2
        if matches is None:
            values.append(float(similarity[:n, n:].diagonal().mean()))
            continue
        pairs = [c for c in matches[index].clusters() if len(c) == 2 and c[0] < n <= c[1]]
        values.append(statistics.fmean(float(similarity[a, b]) for a, b in pairs))
    return values


def identity_stability(model_a: Any, similarities: Sequence[torch.Tensor]) -> dict[str, float]:
    """Start at the identity and re-match each group once, as a solver visit would (align; the q/k and v
    groups of a block on one shared head pairing): the fraction of each group's units that stay with their
    identity partner. Below 1: the identity is not a fixed point of MuDSC's coordinate ascent at this α."""
    spec = spec_for(model_a)
    kept: dict[str, float] = {}
    for members in [[i] for i, g in enumerate(spec.groups) if g.head_tie is None] + list(
        spec.head_ties().values()
    ):
        heads = spec.groups[members[0]].num_heads
        pairing = None
        if heads > 1:
            pairing = pair_attention_heads(sum(attention_head_scores(similarities[m], heads) for m in members))
        for m in members:
            found = match(similarities[m], matcher="align", num_heads=heads, head_pairing=pairing)
            group = spec.groups[m]
            kept[group.name] = recovered_fraction(found, torch.arange(group.width))
    return {g.name: kept[g.name] for g in spec.groups}


def head_pairings(matches: Sequence[Match | None], names: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """Attention block -> {"qk": pairing, "v": pairing} (partner B head of each A head)."""
    blocks: dict[str, dict[str, list[int]]] = {}
    for found, name in zip(matches, names, strict=True):
        kind = kind_of(name)
        if kind in ("qk", "v") and found is not None and found.head_pairing is not None:
            blocks.setdefault(name.rsplit(".", 1)[0], {})[kind] = list(found.head_pairing)
    return blocks


def activation_correlations(model_a: Any, model_b: Any, calibration: list[dict]) -> list[torch.Tensor]:
    """Every group's (2n, 2n) activation correlation, as `hf_mudsc.merge` measures it."""
    spec = spec_for(model_a)
    return [
        acc.finalize().to(torch.float64)
        for acc in collect_statistics(model_a, model_b, spec, calibration, progress=False)
    ]


def pairing_score(scores: np.ndarray, pairing: Sequence[int]) -> float:
    """Mean head score of a pairing (what `pair_attention_heads` maximises, per head)."""
    return float(np.mean([scores[j, p] for j, p in enumerate(pairing)]))


def head_score_stats(scores_qk: np.ndarray, scores_v: np.ndarray) -> dict[str, Any]:
    """How decisive one block's head scores are, and what one shared pairing costs each group.

    Per group: contrast = best pairing's mean score minus the average over all pairings (= the mean of all
    entries); margin = best minus second-best pairing (enumerated, so only up to MAX_ENUMERATED_HEADS heads;
    NaN beyond); sharing cost = its own best pairing minus the pairing that is best on the sum of both
    groups' scores (the default's shared pairing).
    """
    out: dict[str, Any] = {}
    shared = pair_attention_heads(scores_qk + scores_v)
    for kind, scores in (("qk", scores_qk), ("v", scores_v)):
        own = pair_attention_heads(scores)
        best = pairing_score(scores, own)
        margin = float("nan")
        if 1 < len(scores) <= MAX_ENUMERATED_HEADS:
            values = sorted(pairing_score(scores, p) for p in itertools.permutations(range(len(scores))))
            margin = values[-1] - values[-2]
        out[kind] = {
            "pairing": list(own),
            "contrast": best - float(scores.mean()),
            "margin": margin,
            "sharing_cost": best - pairing_score(scores, shared),
        }
    out["shared_pairing"] = list(shared)
    return out


def block_head_scores(
    model_a: Any,
    model_b: Any,
    correlations: Sequence[torch.Tensor],
    matches: Sequence[Match | None] | None,
    alpha: float,
) -> dict[str, dict[str, Any]]:
    """Head score statistics of every attention block: under a merge's final matches (the dual-space
    similarity the solver sees when it visits the block), or at the activation-only start (`matches` None,
    `alpha` 0)."""
    spec = spec_for(model_a)
    similarities = dual_space_similarities(model_a, model_b, correlations, matches, alpha)
    scores: dict[str, dict[str, np.ndarray]] = {}
    for group, similarity in zip(spec.groups, similarities, strict=True):
        kind = kind_of(group.name)
        if kind in ("qk", "v"):
            block = group.name.rsplit(".", 1)[0]
            scores.setdefault(block, {})[kind] = attention_head_scores(similarity, group.num_heads)
    return {block: head_score_stats(s["qk"], s["v"]) for block, s in scores.items()}


def differing_heads(pairings: dict[str, list[int]]) -> int:
    """A heads whose q/k partner is not their v partner."""
    return sum(int(a != b) for a, b in zip(pairings["qk"], pairings["v"], strict=True))


def attention_heads(model: Any, block: str, calibration: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head attention probabilities (N, H, T, T) and values (N, H, T, d) of one attention block.

    Recomputed from the q/k/v projection outputs (softmax(q kᵀ / √d), as ViT's eager attention does) and
    checked against the output projection's input, so the mixing of values by patterns is the model's own.
    """
    attention = model.get_submodule(block)
    store: dict[str, list[torch.Tensor]] = {"q_proj": [], "k_proj": [], "v_proj": [], "o_in": []}
    hooks = [
        getattr(attention, name).register_forward_hook(
            lambda _m, _i, out, name=name: store[name].append(out.detach())
        )
        for name in ("q_proj", "k_proj", "v_proj")
    ]
    hooks.append(attention.o_proj.register_forward_hook(lambda _m, inp, _o: store["o_in"].append(inp[0])))
    try:
        with torch.no_grad():
            for batch in calibration:
                model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    q, k, v, o_in = (torch.cat(store[name]) for name in ("q_proj", "k_proj", "v_proj", "o_in"))
    count, tokens, width = q.shape
    heads = model.config.num_attention_heads
    dim = width // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(count, tokens, heads, dim).transpose(1, 2).to(torch.float64)

    q, k, v = split(q), split(k), split(v)
    probs = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1)
    recomputed = (probs @ v).transpose(1, 2).reshape(count, tokens, width)
    if not torch.allclose(recomputed, o_in.to(torch.float64), atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{block}: recomputed attention does not match the model's (not eager attention?)")
    return probs, v


def pattern_swap_error(
    probs: torch.Tensor, values: torch.Tensor, qk_pairing: Sequence[int], v_pairing: Sequence[int]
) -> float:
    """Relative RMS change of one model's head outputs when, for every j, the values of head v[j] are mixed
    by the attention pattern of head qk[j] instead of their own: what a q/k vs v head-pairing mismatch does
    to that model's share of the merged heads (0 when the two pairings agree)."""
    changed = total = 0.0
    for qk_head, v_head in zip(qk_pairing, v_pairing, strict=True):
        own = probs[:, v_head] @ values[:, v_head]
        changed += float(((probs[:, qk_head] @ values[:, v_head] - own) ** 2).sum())
        total += float((own**2).sum())
    return (changed / total) ** 0.5


def head_diversity(probs: torch.Tensor, values: torch.Tensor) -> float:
    """Mean pattern-swap error of mismatching one head with another (all ordered pairs of distinct heads):
    how different a model's heads' attention patterns are, in terms of what they do to the values."""
    heads = probs.shape[1]
    errors = [
        pattern_swap_error(probs[:, [p, q]], values[:, [p, q]], [0], [1])
        for p in range(heads)
        for q in range(heads)
        if p != q
    ]
    return statistics.fmean(errors)


def merge_and_score(
    model_a: Any,
    model_b: Any,
    calibration: list[dict],
    splits: Any,
    methods: Sequence[tuple[str, dict]],
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Merge with each method exactly as the benchmark does; return the merged models and test scores."""
    merged = {
        label: hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False, **options)
        for label, options in methods
    }
    tests = common.digit_tasks(splits, "test")
    result = evaluate_merge(merged, [model_a, model_b], tests, progress=False)
    tasks = list(tests)
    scores = {}
    for label in [*merged, "parent_a", "parent_b", "ensemble"]:
        scores[label] = {
            "task_a": result.score(label, tasks[0]),
            "task_b": result.score(label, tasks[1]),
            "average": result.score(label, "average"),
            "joint": result.score(label, "joint"),
        }
    return merged, scores


# ------------------------------------------------------------------------------------------------- pairs
def run_same_init(
    bargs: argparse.Namespace, width: int, index: int, classes: Any
) -> dict[str, Any]:
    model_a, model_b, splits, calibration = common.same_init_pair(bargs, width, index, classes)
    names = [g.name for g in spec_for(model_a).groups]
    merged, scores = merge_and_score(model_a, model_b, calibration, splits, SAME_INIT_METHODS)
    rows: dict[str, Any] = {}
    for label, model in merged.items():
        matches = model.merge_report.matches
        rows[label] = {
            **scores[label],
            "identity": identity_fractions(matches, names),
            "identity_per_group": {
                name: recovered_fraction(m, torch.arange(m.cluster_of.numel() // 2))
                for name, m in zip(names, matches, strict=True)
            },
            "sweeps": model.merge_report.sweeps,
        }
    for label in ("parent_a", "parent_b", "ensemble"):
        rows[label] = scores[label]
    correlations = activation_correlations(model_a, model_b, calibration)
    objective: dict[str, Any] = {}
    for label in OBJECTIVE_METHODS:
        alpha = dict(SAME_INIT_METHODS)[label]["alpha"]
        matches = merged[label].merge_report.matches
        at_identity = dual_space_similarities(model_a, model_b, correlations, None, alpha)
        found = matched_values(
            dual_space_similarities(model_a, model_b, correlations, matches, alpha), matches
        )
        objective[label] = {
            "alpha": alpha,
            "found": found,
            "identity": matched_values(at_identity, None),
            "identity_stability": identity_stability(model_a, at_identity),
        }
    return {"rows": rows, "ambiguity": ambiguity(model_a, model_b, correlations), "objective": objective}


def run_head_pairing(
    bargs: argparse.Namespace, width: int, index: int, classes: Any
) -> dict[str, Any]:
    model_a, model_b, splits, calibration = common.different_init_pair(bargs, width, index, classes)
    names = [g.name for g in spec_for(model_a).groups]
    merged, scores = merge_and_score(model_a, model_b, calibration, splits, HEAD_METHODS)
    correlations = activation_correlations(model_a, model_b, calibration)
    start = block_head_scores(model_a, model_b, correlations, None, 0.0)
    pairings: dict[str, Any] = {
        START: {block: {k: stats[k]["pairing"] for k in ("qk", "v")} for block, stats in start.items()}
    }
    score_stats: dict[str, Any] = {START: start}
    for label, model in merged.items():
        pairings[label] = head_pairings(model.merge_report.matches, names)
        if "indep" in label:
            alpha = HEAD_OPTIONS[label]["alpha"]
            score_stats[label] = block_head_scores(
                model_a, model_b, correlations, model.merge_report.matches, alpha
            )
    # What each pairing's q/k vs v mismatch does to B's half of every merged head (B's head indices).
    mismatch: dict[str, Any] = {}
    for block in pairings[START]:
        probs, values = attention_heads(model_b, block, calibration)
        mismatch[block] = {
            "diversity": head_diversity(probs, values),
            **{
                label: pattern_swap_error(probs, values, found[block]["qk"], found[block]["v"])
                for label, found in pairings.items()
            },
        }
    return {
        "rows": scores,
        "pairings": pairings,
        "head_scores": score_stats,
        "mismatch": mismatch,
        "num_heads": model_a.config.num_attention_heads,
    }


# ------------------------------------------------------------------------------------------- summaries
def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for part in PARTS:
        for width in sorted({r["width"] for r in records if r["part"] == part}):
            recs = [r for r in records if r["part"] == part and r["width"] == width]
            summary.setdefault(part, {})[str(width)] = (
                summarise_same_init(recs) if part == "same_init" else summarise_heads(recs)
            )
    if summary.get("head_pairing"):
        summary["head_pairing_correlation"] = mismatch_gain_correlation(summary["head_pairing"])
    return summary


def mismatch_gain_correlation(heads: dict[str, Any]) -> dict[str, Any]:
    """Spearman correlation, over every pair of every width, between the independent pairing's mismatch
    error and the joint-accuracy gain of sharing (pooled over widths, so width is a confounder)."""
    from scipy.stats import spearmanr

    out = {}
    for matcher in ("zip", "align"):
        errors = [x for table in heads.values() for x in table["gain"][matcher]["mismatch_error_per_pair"]]
        gains = [x for table in heads.values() for x in table["gain"][matcher]["gain_per_pair"]]
        if len(errors) == len(gains) and len(errors) > 2:
            result = spearmanr(errors, gains)
            out[matcher] = {"spearman": float(result.statistic), "p": float(result.pvalue), "n": len(errors)}
    return out


def summarise_same_init(recs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": len(recs), "methods": {}, "ambiguity": {}}
    for label in [*(m for m, _ in SAME_INIT_METHODS), "parent_a", "parent_b", "ensemble"]:
        rows = [r["rows"][label] for r in recs]
        entry = {
            fig: mean_std([row[fig] for row in rows])
            for fig in ("average", "joint")
            if all(row.get(fig) is not None for row in rows)
        }
        if "identity" in rows[0]:
            entry["identity"] = {
                kind: mean_std([row["identity"][kind] for row in rows]) for kind in rows[0]["identity"]
            }
            entry["identity_per_group"] = {
                name: mean_std([row["identity_per_group"][name] for row in rows])
                for name in rows[0]["identity_per_group"]
            }
        out["methods"][label] = entry
    out["objective"] = {}
    for label in OBJECTIVE_METHODS:
        objectives = [r["objective"][label] for r in recs if "objective" in r]
        if not objectives:
            continue
        out["objective"][label] = {
            "alpha": objectives[0]["alpha"],
            "found": mean_std([statistics.fmean(o["found"]) for o in objectives]),
            "identity": mean_std([statistics.fmean(o["identity"]) for o in objectives]),
            "identity_stability": {
                name: mean_std([o["identity_stability"][name] for o in objectives])
                for name in objectives[0]["identity_stability"]
            },
        }
    for kind in KINDS:
        out["ambiguity"][kind] = {
            key: mean_std([r["ambiguity"][kind][key] for r in recs]) for key in recs[0]["ambiguity"][kind]
        }
    return out


def summarise_heads(recs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": len(recs), "num_heads": recs[0]["num_heads"], "pairings": {}, "gain": {}}
    for label in recs[0]["pairings"]:
        counts = [differing_heads(b) for r in recs for b in r["pairings"][label].values()]
        per_pair = [sum(differing_heads(b) for b in r["pairings"][label].values()) for r in recs]
        out["pairings"][label] = {
            "blocks": len(counts),
            "blocks_disagreeing": sum(c > 0 for c in counts),
            "fraction_disagreeing": sum(c > 0 for c in counts) / len(counts),
            "mean_heads_differing": statistics.fmean(counts),
            "heads_differing_per_block": counts,
            "heads_differing_per_pair": per_pair,
        }
    for label in recs[0]["head_scores"]:
        stats = [b for r in recs for b in r["head_scores"][label].values()]
        entry = {
            f"{fig}_{kind}": mean_std([b[kind][fig] for b in stats])
            for fig in ("contrast", "margin", "sharing_cost")
            for kind in ("qk", "v")
        }
        if label != START:
            entry["blocks_same_as_start"] = sum(
                r["pairings"][label][block] == r["pairings"][START][block]
                for r in recs
                for block in r["pairings"][label]
            )
        out["pairings"][label]["head_scores"] = entry
    layers: dict[str, dict[str, list[float]]] = {}
    for r in recs:
        for block, entry in r.get("mismatch", {}).items():
            for key, value in entry.items():
                layers.setdefault(block, {}).setdefault(key, []).append(value)
    out["mismatch"] = {
        block: {key: mean_std(values) for key, values in entry.items()} for block, entry in layers.items()
    }
    for matcher in ("zip", "align"):
        gains = [
            r["rows"][f"mudsc {matcher}"]["joint"] - r["rows"][f"mudsc {matcher} indep-heads"]["joint"]
            for r in recs
        ]
        differing = out["pairings"][f"mudsc {matcher} indep-heads"]["heads_differing_per_pair"]
        out["gain"][matcher] = {
            "joint_shared": mean_std([r["rows"][f"mudsc {matcher}"]["joint"] for r in recs]),
            "joint_indep": mean_std([r["rows"][f"mudsc {matcher} indep-heads"]["joint"] for r in recs]),
            "gain": mean_std(gains),
            "gain_per_pair": gains,
            "heads_differing_per_pair": differing,
            "mismatch_error_per_pair": [
                statistics.fmean(b[f"mudsc {matcher} indep-heads"] for b in r["mismatch"].values())
                for r in recs
                if r.get("mismatch")
            ],
        }
    return out


# -------------------------------------------------------------------------------------------- rendering
def pct(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "–"
    if entry["n"] > 1:
        return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
    return f"{100 * entry['mean']:.1f}"


def ratio(entry: dict[str, float]) -> str:
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}" if entry["n"] > 1 else f"{entry['mean']:.2f}"


def dims(entry: dict[str, float] | None) -> str:
    return "–" if entry is None else f"{entry['mean']:.1f}"


def num(entry: dict[str, float]) -> str:
    return f"{entry['mean']:.3f}"


def same_init_tables(same: dict[str, Any]) -> list[str]:
    lines = [
        "## Same-init pairs: how often each method keeps the identity correspondence",
        "",
        "Identity: A unit i merged with exactly B unit i, the known-good correspondence of a same-init pair "
        "(% of units, mean ± std over pairs). Accuracy: test, in %.",
        "",
        "| hidden | method | residual | qk | v | mlp | all units | per-task avg | joint |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for width, table in same.items():
        for label, entry in table["methods"].items():
            ident = entry.get("identity", {})
            lines.append(
                f"| {width} | {label} | "
                + " | ".join(pct(ident.get(k)) for k in (*KINDS, "all"))
                + f" | {pct(entry.get('average'))} | {pct(entry.get('joint'))} |"
            )
    first = next(iter(same.values()))["methods"]["mudsc align α=0.5"]["identity_per_group"]
    short = {name: name.replace("vit.layers.", "L").replace(".attention", "") for name in first}
    lines += [
        "",
        "Identity per group (% of units; L0 = first block, L1 = second; residual = the final CLS stream), "
        "mean over pairs:",
        "",
        "| hidden | method | " + " | ".join(short.values()) + " |",
        "|---:|---|" + "---:|" * len(short),
    ]
    for width, table in same.items():
        for label in ("activation_align (α=0)", "mudsc align α=0.5"):
            groups = table["methods"][label]["identity_per_group"]
            lines.append(
                f"| {width} | {label} | "
                + " | ".join(f"{100 * groups[name]['mean']:.0f}" for name in short)
                + " |"
            )
    if any(table.get("objective") for table in same.values()):
        lines += [
            "",
            "MuDSC's own objective (L = mean over groups of the mean dual-space similarity of the matched "
            "pairs, the quantity the solver maximises) for the solution it found vs for the identity; and, "
            "starting from the identity, the % of each group's units still matched to their identity partner "
            "after one solver visit of that group (100 everywhere = the identity is a fixed point). Mean "
            "over pairs.",
            "",
            "| hidden | merge | L found | L identity | "
            + " | ".join(f"kept: {name}" for name in short.values())
            + " |",
            "|---:|---|---:|---:|" + "---:|" * len(short),
        ]
        for width, table in same.items():
            for label, entry in table.get("objective", {}).items():
                kept = entry["identity_stability"]
                lines.append(
                    f"| {width} | {label} | {entry['found']['mean']:.3f} | {entry['identity']['mean']:.3f} | "
                    + " | ".join(f"{100 * kept[name]['mean']:.0f}" for name in short)
                    + " |"
                )
    lines += [
        "",
        "Each similarity on its own: top-1 = % of A units whose most similar B unit is the identity "
        "partner; identity / best other = mean similarity to the identity partner vs to the most similar "
        "other B unit; eff. rank = participation ratio (Σλ)²/Σλ² of a model's own activation correlation, "
        "as % of the group's width and in units (small: units are near-collinear, so activation "
        "correlation cannot single out a partner). Weight similarity with no neighbouring matches applied "
        "(= its value at the identity solution).",
        "",
        "| hidden | group | act top-1 | act identity / best other | act eff. rank (% of width) "
        "| act eff. rank (units) | weight top-1 | weight identity / best other |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for width, table in same.items():
        for kind in KINDS:
            a = table["ambiguity"][kind]
            lines.append(
                f"| {width} | {kind} | {pct(a['act_top1'])} | {num(a['act_identity'])} / "
                f"{num(a['act_best_other'])} | {pct(a['act_rank'])} | {dims(a.get('act_rank_dims'))} | "
                f"{pct(a['weight_top1'])} | "
                f"{num(a['weight_identity'])} / {num(a['weight_best_other'])} |"
            )
    return [*lines, ""]


def head_tables(heads: dict[str, Any]) -> list[str]:
    lines = [
        "## Different-init pairs: do the independent q/k and v head pairings disagree?",
        "",
        "Per attention block (2 per pair), the q/k group's head pairing vs the v group's. Heads differing: A "
        "heads whose q/k partner is not their v partner (two independent random pairings of k heads differ "
        "in k - 1 heads on average). The shared rows are a sanity check (always 0).",
        "",
        "| hidden | heads | pairing from | blocks disagreeing | heads differing / block | per block |",
        "|---:|---:|---|---:|---:|---|",
    ]
    for width, table in heads.items():
        for label, entry in table["pairings"].items():
            lines.append(
                f"| {width} | {table['num_heads']} | {label} | "
                f"{entry['blocks_disagreeing']}/{entry['blocks']} "
                f"({100 * entry['fraction_disagreeing']:.0f}%) | {entry['mean_heads_differing']:.2f} | "
                f"{' '.join(map(str, entry['heads_differing_per_block']))} |"
            )
    lines += [
        "",
        "How decisive the head scores are (score = mean Hungarian-matched similarity of a head pair; a "
        "pairing's score = mean over its head pairs; mean over blocks): contrast = best pairing minus the "
        "average pairing, margin = best minus second best, sharing cost = a group's best pairing minus "
        "the shared pairing (best on the sum of both groups). Start: activation correlation; indep-heads "
        "rows: the dual-space similarity (α = 0.5) under that merge's final matches.",
        "",
        "| hidden | scores of | qk contrast | v contrast | qk margin | v margin | qk sharing cost "
        "| v sharing cost | blocks same as start |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for width, table in heads.items():
        for label, entry in table["pairings"].items():
            h = entry.get("head_scores")
            if h is None:
                continue
            same = h.get("blocks_same_as_start")
            same_text = "–" if same is None else f"{same}/{entry['blocks']}"
            lines.append(
                f"| {width} | {label} | {num(h['contrast_qk'])} | {num(h['contrast_v'])} | "
                f"{num(h['margin_qk'])} | {num(h['margin_v'])} | {num(h['sharing_cost_qk'])} | "
                f"{num(h['sharing_cost_v'])} | {same_text} |"
            )
    lines += [
        "",
        "What a q/k vs v mismatch does (model B's heads, which carry the mismatch in a merged head): "
        "mismatch error = relative RMS change of B's head outputs when each head's values are mixed by the "
        "attention pattern of its q/k partner instead of its own (0 = harmless); head diversity = the same "
        "error for one head swapped with another, averaged over all head pairs (how distinct B's heads are). "
        "Mean ± std over pairs, per attention block.",
        "",
        "| hidden | block | head diversity | mismatch: start | mismatch: zip indep-heads "
        "| mismatch: align indep-heads |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for width, table in heads.items():
        for block, entry in table.get("mismatch", {}).items():
            lines.append(
                f"| {width} | {block} | {ratio(entry['diversity'])} | {ratio(entry[START])} | "
                f"{ratio(entry['mudsc zip indep-heads'])} | {ratio(entry['mudsc align indep-heads'])} |"
            )
    lines += [
        "",
        "Joint test accuracy (%) with the shared vs the independent head pairing, and the per-pair gain "
        "(points) next to the number of heads whose independent q/k and v partners differ in that "
        "pair (both blocks) and that pairing's mismatch error (mean of both blocks).",
        "",
        "| hidden | matcher | shared | independent | gain | gain per pair | heads differing per pair "
        "| mismatch error per pair |",
        "|---:|---|---:|---:|---:|---|---|---|",
    ]
    for width, table in heads.items():
        for matcher, g in table["gain"].items():
            per_pair = " ".join(f"{100 * x:+.1f}" for x in g["gain_per_pair"])
            lines.append(
                f"| {width} | {matcher} | {pct(g['joint_shared'])} | {pct(g['joint_indep'])} | "
                f"{100 * g['gain']['mean']:+.1f} | {per_pair} | "
                f"{' '.join(map(str, g['heads_differing_per_pair']))} | "
                f"{' '.join(f'{x:.2f}' for x in g['mismatch_error_per_pair'])} |"
            )
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Missed quality targets: measurements",
        "",
        "Produced by: " + "; then ".join(f"`{c}`" for c in result["commands"]),
        "",
    ]
    if result["summary"].get("same_init"):
        lines += same_init_tables(result["summary"]["same_init"])
    if result["summary"].get("head_pairing"):
        lines += head_tables(result["summary"]["head_pairing"])
        for matcher, c in result["summary"].get("head_pairing_correlation", {}).items():
            lines.append(
                f"Pooled over all pairs and widths, {matcher}: Spearman correlation of mismatch error and "
                f"gain {c['spearman']:+.2f} (p = {c['p']:.3f}, n = {c['n']}; width is a confounder)."
            )
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--same-init-widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="different-init widths of the head-pairing part",
    )
    parser.add_argument("--splits", type=int, default=5, help="the benchmark's first N 5+5 class splits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    parser.add_argument(
        "--cache-dir", default=None, help="the benchmark's model cache (default: the benchmark's)"
    )
    parser.add_argument("--out-dir", default="bench_results/analysis")
    parser.add_argument("--resume", action="store_true", help="keep the pairs already in OUT_DIR's JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    common.set_threads(args.threads)
    # The benchmark's pair settings (epochs, fine-tuning, calibration size), only the cache may differ.
    bargs = common.pair_settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "missed_targets.json"
    command = "python scripts/analyze_missed_targets.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {
        "command": command.strip(),
        "commands": [command.strip()],
        "threads": args.threads,
        "torch": torch.__version__,
        "hf_mudsc": hf_mudsc.__version__,
        "records": [],
        "summary": {},
    }
    if args.resume and json_path.is_file():
        previous = json.loads(json_path.read_text())
        result["records"] = previous["records"]
        result["commands"] = [*previous.get("commands", [previous["command"]]), command.strip()]
    done = {(r["part"], r["width"], r["split"]) for r in result["records"]}
    splits = common.random_class_splits(args.splits)
    jobs = [
        ("head_pairing", w, i)
        for w in args.widths
        for i in range(len(splits))
        if "head_pairing" in args.parts
    ]
    jobs += [
        ("same_init", w, i)
        for w in args.same_init_widths
        for i in range(len(splits))
        if "same_init" in args.parts
    ]
    start_all = time.perf_counter()
    for part, width, index in jobs:
        if (part, width, index) in done:
            continue
        log(f"{part}: hidden {width}, split {index} {splits[index]}")
        start = time.perf_counter()
        runner = run_same_init if part == "same_init" else run_head_pairing
        entry = runner(bargs, width, index, splits[index])
        result["records"].append(
            {
                "part": part,
                "width": width,
                "split": index,
                "classes": [list(c) for c in splits[index]],
                "seconds": round(time.perf_counter() - start, 1),
                **entry,
            }
        )
        result["summary"] = summarise(result["records"])
        common.write_json(json_path, result)
        log(f"  done in {time.perf_counter() - start:.0f} s")
    result["summary"] = summarise(result["records"])
    result["seconds"] = round(time.perf_counter() - start_all, 1)
    common.write_json(json_path, result)
    text = markdown(result)
    (out / "missed_targets.md").write_text(text, encoding="utf-8")
    line: dict[str, Any] = {
        "benchmark": "missed_targets",
        "json": str(json_path),
        "seconds": result["seconds"],
    }
    for width, table in result["summary"].get("same_init", {}).items():
        entry = table["methods"]["mudsc align α=0.5"]["identity"]
        line[f"same_init/h{width}/mudsc_align_identity"] = {k: round(v["mean"], 4) for k, v in entry.items()}
    for width, table in result["summary"].get("head_pairing", {}).items():
        for matcher in ("zip", "align"):
            entry = table["pairings"][f"mudsc {matcher} indep-heads"]
            line[f"head_pairing/h{width}/{matcher}"] = {
                "fraction_disagreeing": round(entry["fraction_disagreeing"], 3),
                "mean_heads_differing": round(entry["mean_heads_differing"], 3),
                "gain": round(table["gain"][matcher]["gain"]["mean"], 4),
            }
    print(json.dumps(line))
    print(text)
    return result


if __name__ == "__main__":
    main()
