#!/usr/bin/env python
"""Should `refit="auto"` refit? Every candidate rule measured over many real text pairs and the toy digit ViTs.
(A benchmark, not a test; issue 12, docs/benchmarks/refit_text.md.)

Each pair is merged ONCE without the refit (`refit="none"`, the method `method="auto"` picks); from that merge and
its matches (`merge_report.matches`) the library's own refit (`hf_mudsc.apply.refit.refit_model`, what the
pipeline's refit step calls) builds

* `ridge` — the refit on all calibration examples (today's `refit="auto"`);
* `ridge80` — the refit on the calibration examples that are not held out (`hf_mudsc.apply.fidelity.holdout_split`:
  every 5th held out), which the held-out FIDELITY GATE compares with `none` on the held-out examples by two
  label-free scores: `agreement` (`FidelityScorer`: each task's argmax agreement with its parent and the joint
  argmax agreement with the ensemble) and `loglik` (the parents' log-probability agreement: the mean over tasks of
  Σ_c p_parent(c) log q_merged_slice(c), plus the same for the joint head against the ensemble's distribution
  — continuous, so 25 held-out sentences do not tie, and it is what the refit's targets aim at).

Rules scored per pair against the better of none / ridge on the test labels:
(a) gate — keep `ridge80` if its held-out score >= `none`'s, else `none` (`gate_loglik_tasks`: the log-probability
score without the whole-head term); (a') shifted gates `gate_cluster_logits` / `gate_cluster_embed`
(docs/benchmarks/gate_shifted.md) — the calibration examples k-means-clustered (8 clusters, seeded) on a label-free
feature (`logits`: the parents' softmaxes concatenated; `embed`: the parents' mean input embeddings), whole clusters
held out (~20 %), the refit `ridge_cluster_<feature>` fitted on the rest and kept if its held-out
`FidelityScorer.log_likelihood` >= `none`'s on the same clusters; each record's `test_loglik_tasks` is that score on the
TEST inputs (labels unused): what a gate whose held-out split were the test distribution would see;
(a'') raw-joint gates `gate_raw_joint` / `gate_tasks_raw_mean` (docs/benchmarks/gate_joint.md) — the every-5th split,
scored by the raw ensemble's agreement with the merged head's ONE softmax (`raw_joint_score`), or the mean of it and
the per-task score; `test_raw_joint` / `test_raw_mass` are that term and its task-mass part on the test inputs;
(b) shared basis — ridge only when `parents_shared_basis` < 0.5 (the refit report's score);
(c) today — always ridge after these methods.

Settings:
* text S (same base, no base given): MiniLM fine-tunes of `bench_same_base.py` (topic/intent/sentiment/tense,
  cached per seed), all 6 task pairs per seed; `method="auto"` (regmean) and `linear`; scored as
  `same_base_text_pairs.py` does (normalised: each task under its own fine-tuned head / the fine-tune's accuracy).
* text P (permuted basis): the same pairs with parent B's units permuted (`hf_mudsc.testing.permute`, seed 7; the
  fine-tune commutes with the permutation, `benchmark_quality.py`'s bert_permuted); `method="auto"` (mudsc zip);
  per task (argmax in the task's slice) and joint (each task's softmax, then the argmax over all classes — the
  library's evaluation rule since 2026-11-30; `joint_raw`: the argmax over the raw logits); ensemble: per-head
  softmax (and raw).
* toy diff / toy same: the quality benchmark's digit ViT pairs (`common.different_init_pair` / `same_init_pair`).

    python scripts/refit_text_pairs.py --settings text_s text_p --seeds 0 1 2 --threads 2 --out /tmp/refit_text.json
    python scripts/refit_text_pairs.py --settings toy_diff --widths 64 128 --splits 5 --out /tmp/refit_toy_diff.json
    python scripts/refit_text_pairs.py --settings toy_same --widths 64 128 256 --splits 5 --out /tmp/refit_toy_same.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from common import BENCH_CACHE, log, set_threads
from scipy.cluster.vq import kmeans2

import hf_mudsc
from hf_mudsc.apply.fidelity import FidelityScorer, holdout_split, tasks_below
from hf_mudsc.apply.refit import refit_model
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.layer_inputs import forward_inputs

SETTINGS = ("text_s", "text_p", "toy_diff", "toy_same")
#: The shifted (cluster) held-out splits: k-means on a label-free per-example feature, whole clusters held out.
CLUSTER_FEATURES = ("logits", "embed")
CLUSTERS = 8
CLUSTER_FRACTION = 0.2
#: The raw-joint gate candidates (docs/benchmarks/gate_joint.md): the score is the raw-joint term alone, or the mean
#: of today's per-task score and it.
JOINT_GATES = ("gate_raw_joint", "gate_tasks_raw_mean")
#: The per-task guard (docs/benchmarks/gate_task_guard.md): the library's gate (`gate_tasks_raw_mean`) and no task's
#: own log-probability agreement lower with the refit than without it.
GUARD_GATES = ("gate_task_guard",)
RULES = ("today", "gate_agreement", "gate_loglik", "gate_loglik_tasks", *JOINT_GATES, *GUARD_GATES, "shared_basis",
         "enough_data",
         *(f"gate_cluster_{f}" for f in CLUSTER_FEATURES))


@torch.no_grad()
def logits_of(model: Any, batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**dict(batch)).logits.double() for batch in batches])


def loglik_score(merged: torch.Tensor, parents: Sequence[torch.Tensor], *, whole_head: bool = True) -> float:
    """The parents' log-probability agreement of `merged` logits (concatenated heads, parent order): the mean over
    tasks of Σ_c p_parent(c) log q_slice(c), and (`whole_head`) the joint head under ONE softmax against the
    ensemble's concatenated per-head softmax divided by the number of parents; averaged over the terms (higher is
    better, 0 at most). Without the whole-head term it scores what the per-task joint rule uses: under that rule
    the whole-head term is the mean of the per-task terms plus a constant."""
    sizes = [p.shape[1] for p in parents]
    terms = [float((p.softmax(1) * q.log_softmax(1)).sum(1).mean())
             for p, q in zip(parents, torch.split(merged, sizes, dim=1))]
    if whole_head:
        ensemble = torch.cat([p.softmax(1) for p in parents], dim=1) / len(parents)
        terms.append(float((ensemble * merged.log_softmax(1)).sum(1).mean()))
    return sum(terms) / len(terms)


def task_terms(merged: torch.Tensor, parents: Sequence[torch.Tensor]) -> list[float]:
    """Each task's own term of `loglik_score` (`Σ_c p_parent(c) log q_slice(c)`, averaged over the examples)."""
    sizes = [p.shape[1] for p in parents]
    return [float((p.softmax(1) * q.log_softmax(1)).sum(1).mean())
            for p, q in zip(parents, torch.split(merged, sizes, dim=1))]


def raw_joint_score(merged: torch.Tensor, parents: Sequence[torch.Tensor]) -> float:
    """The joint decision under the RAW rule (the argmax over the concatenated logits, a stock pipeline's): the
    parents' raw ensemble — ONE softmax over the parents' concatenated raw logits — against the merged model's ONE
    softmax over its whole concatenated head, `Σ_c p_ens_raw(c) log q_merged_raw(c)` averaged over the examples
    (higher is better, <= 0). Unlike the whole-head term of `loglik_score` (the per-head softmaxes / N, which the
    per-task terms already determine), it changes when a task's slice shifts against the others: it sees the
    cross-head calibration that the refit's per-task centred head targets drop."""
    ensemble = torch.cat(list(parents), dim=1).softmax(1)
    return float((ensemble * merged.log_softmax(1)).sum(1).mean())


def raw_mass_score(merged: torch.Tensor, parents: Sequence[torch.Tensor]) -> float:
    """The cross-head part of `raw_joint_score`: with P_t / Q_t the raw ensemble's / the merged model's softmax mass on
    task t's slice, `Σ_t P_t log Q_t` (<= 0). `raw_joint_score` = this + `Σ_t P_t Σ_{c∈t} p(c|t) log q(c|t)` (the
    within-slice terms weighted by the ensemble's task mass), so this is how well the merged head says WHICH task's
    labels an input belongs to — the cross-head calibration the raw rule relies on."""
    sizes = [p.shape[1] for p in parents]
    mass_ens = torch.stack([part.sum(1) for part in torch.split(torch.cat(list(parents), 1).softmax(1), sizes, 1)], 1)
    log_mass = torch.stack([part.logsumexp(1) for part in torch.split(merged.log_softmax(1), sizes, 1)], 1)
    return float((mass_ens * log_mass).sum(1).mean())


def joint_gate_scores(merged: torch.Tensor, parents: Sequence[torch.Tensor]) -> dict[str, float]:
    """The gate candidates' scores of one model's logits: `tasks` (today's: the mean over tasks), `raw_joint`, and
    their mean `tasks_raw_mean`."""
    tasks = loglik_score(merged, parents, whole_head=False)
    raw = raw_joint_score(merged, parents)
    return {"tasks": tasks, "raw_joint": raw, "tasks_raw_mean": (tasks + raw) / 2}


class MaskSplit:
    """The rows of a re-readable batch stream whose example index is (held_out=True) or is not in `held`: the
    same rows on every read, whatever the batch sizes (`fidelity.RowSplit`'s contract, any row set)."""

    def __init__(self, batches: Callable[[], Iterable[Mapping[str, Any]]], held: torch.Tensor,
                 held_out: bool) -> None:
        self.batches, self.held, self.held_out = batches, held, held_out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = 0
        for batch in self.batches():
            rows = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            keep = (self.held[start:start + rows] == self.held_out).nonzero()[:, 0]
            start += rows
            if len(keep):
                yield {k: v.index_select(0, keep.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() > 0
                       and len(v) == rows else v for k, v in batch.items()}


@torch.no_grad()
def example_features(parents: Sequence[Any], batches: Iterable[Mapping[str, Any]], kind: str) -> np.ndarray:
    """One label-free row per calibration example (one pass): `logits` — each parent's softmax, concatenated (what
    the parents decide); `embed` — each parent's input embedding averaged over the non-padding tokens / patches,
    L2-normalised per parent, concatenated (what the input is made of: words / pixels)."""
    rows = []
    for batch in batches:
        parts = []
        for parent in parents:
            parent.eval()
            if kind == "logits":
                parts.append(parent(**forward_inputs(parent, batch)).logits.double().softmax(1))
                continue
            key = "input_ids" if "input_ids" in batch else "pixel_values"
            emb = parent.get_input_embeddings()(batch[key]).double()
            mask = batch.get("attention_mask") if key == "input_ids" else None
            weights = (mask.double() if mask is not None else torch.ones(emb.shape[:2], dtype=emb.dtype))[..., None]
            mean = (emb * weights).sum(1) / weights.sum(1).clamp_min(1)
            parts.append(mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-12))
        rows.append(torch.cat(parts, 1))
    return torch.cat(rows).numpy()


def cluster_holdout(features: np.ndarray, *, clusters: int = CLUSTERS, fraction: float = CLUSTER_FRACTION,
                    seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(held-out mask, cluster labels): k-means (seeded k-means++) on the rows, then whole clusters in a seeded
    random order held out until they hold >= `fraction` of the examples; a cluster that would take the held-out
    part past 1.5 × `fraction` is skipped, so the refit keeps about the same share of the data as the every-5th
    split's (80 %) and the two gates differ in WHICH examples are held out, not how many."""
    _, labels = kmeans2(features, clusters, minit="++", seed=seed)
    order = np.random.default_rng(seed).permutation(clusters)
    held = np.zeros(len(features), dtype=bool)
    for c in order:
        size = int((labels == c).sum())
        if size == 0 or held.sum() + size > 1.5 * fraction * len(features):
            continue
        held |= labels == c
        if held.sum() >= fraction * len(features):
            break
    return torch.from_numpy(held), labels


def refits(parents: Sequence[Any], calibration: list[dict[str, Any]], *, shifted: bool = True,
           **merge_kwargs: Any) -> dict[str, Any]:
    """none / ridge / ridge80 merges of `parents` and the held-out gate's scores (`shifted`: also the cluster
    gates of gate_shifted.md)."""
    start = time.perf_counter()
    merged = hf_mudsc.merge(list(parents), calibration, refit="none", progress=False, **merge_kwargs)
    seconds = {"merge": time.perf_counter() - start}
    spec = spec_for(parents[0])
    matches = merged.merge_report.matches
    concatenate = merged.config.num_labels != parents[0].config.num_labels

    def refitted(batches: Callable[[], Iterable[Mapping[str, Any]]]) -> tuple[Any, Any]:
        model = copy.deepcopy(merged)
        report = refit_model(model, parents, spec, matches, batches, concatenate_classifier=concatenate, seed=0)
        return model, report

    start = time.perf_counter()
    ridge, report = refitted(lambda: iter(calibration))
    seconds["refit"] = time.perf_counter() - start
    kept, held = holdout_split(lambda: iter(calibration))
    ridge80, _ = refitted(lambda: iter(kept))
    start = time.perf_counter()
    scorer = FidelityScorer(parents, held, task_sizes=[p.config.num_labels for p in parents] if concatenate else None,
                            mask_key="attention_mask")
    parent_logits = [logits_of(p, held) for p in parents]
    gate = {"held_out": scorer.examples}
    for name, model in (("none", merged), ("ridge80", ridge80)):
        gate[f"agreement_{name}"] = scorer(model)
        held_logits = logits_of(model, held)
        gate[f"loglik_{name}"] = loglik_score(held_logits, parent_logits)
        gate[f"loglik_tasks_{name}"] = loglik_score(held_logits, parent_logits, whole_head=False)
        gate[f"task_terms_{name}"] = task_terms(held_logits, parent_logits) if concatenate else None
        if concatenate:  # one shared label set has no joint term: the candidates equal today's score
            gate[f"raw_joint_{name}"] = raw_joint_score(held_logits, parent_logits)
            gate[f"raw_mass_{name}"] = raw_mass_score(held_logits, parent_logits)
    if concatenate:  # the library's per-task guard: the tasks the refit lowers significantly (fidelity.tasks_below)
        gate["lowered_tasks"] = list(tasks_below(scorer.agreement(ridge80), scorer.agreement(merged)))
    if concatenate:  # plain averaging's held-out terms: what a default that never loses to averaging compares with
        linear_logits = logits_of(hf_mudsc.merge(list(parents), calibration, method="linear", progress=False), held)
        gate["task_terms_linear"] = task_terms(linear_logits, parent_logits)
        gate["loglik_tasks_linear"] = loglik_score(linear_logits, parent_logits, whole_head=False)
        gate["raw_joint_linear"] = raw_joint_score(linear_logits, parent_logits)
    seconds["gate"] = time.perf_counter() - start
    models = {"none": merged, "ridge": ridge, "ridge80": ridge80}
    # The shifted splits: whole k-means clusters held out; the refit on the rest against none on those clusters,
    # by the library's gate score (`FidelityScorer.log_likelihood`, the mean over tasks).
    for kind in CLUSTER_FEATURES if shifted else ():
        start = time.perf_counter()
        held_mask, labels = cluster_holdout(example_features(parents, calibration, kind))
        kept_c = MaskSplit(lambda: iter(calibration), held_mask, held_out=False)
        held_c = MaskSplit(lambda: iter(calibration), held_mask, held_out=True)
        name = f"ridge_cluster_{kind}"
        models[name], _ = refitted(lambda kept_c=kept_c: iter(kept_c))
        scorer_c = FidelityScorer(parents, held_c, mask_key="attention_mask",
                                  task_sizes=[p.config.num_labels for p in parents] if concatenate else None)
        gate[f"cluster_{kind}_held_out"] = scorer_c.examples
        gate[f"cluster_{kind}_sizes"] = np.bincount(labels, minlength=CLUSTERS).tolist()
        gate[f"cluster_{kind}_none"] = scorer_c.log_likelihood(merged)
        gate[f"cluster_{kind}_refit"] = scorer_c.log_likelihood(models[name])
        # ridge80 on the same clusters too (it saw 4 of 5 of their rows): what seeing the cluster buys.
        gate[f"cluster_{kind}_ridge80"] = scorer_c.log_likelihood(ridge80)
        seconds[f"cluster_{kind}"] = time.perf_counter() - start
    return {"models": models, "gate": gate,
            "shared_basis": report.shared_basis, "method": merged.config.mudsc["method"],
            "refit_examples": report.examples, "refit_samples": report.samples,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def task_scores(model: Any, parents: Sequence[Any], tests: Sequence[tuple[dict, torch.Tensor]]) -> dict[str, float]:
    """Per-task (argmax in the task's slice of the concatenated head) and joint accuracy, %: `joint` by each task's
    softmax, concatenated (`hf_mudsc.joint_predictions`, the library's evaluation rule), `joint_raw` by the argmax
    over the raw concatenated logits."""
    sizes = [p.config.num_labels for p in parents]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    ranges = {f"task_{k}": [offsets[k], offsets[k] + sizes[k]] for k in range(len(sizes))}
    out, joint_hits, raw_hits, total = {}, 0, 0, 0
    for k, (inputs, labels) in enumerate(tests):
        z = logits_of(model, [inputs])
        part = z[:, offsets[k]:offsets[k] + sizes[k]]
        out[f"task_{k}"] = 100 * float((part.argmax(1) == labels).double().mean())
        joint_hits += int((hf_mudsc.joint_predictions(z, ranges) == labels + offsets[k]).sum())
        raw_hits += int((z.argmax(1) == labels + offsets[k]).sum())
        total += len(labels)
    out["joint"] = 100 * joint_hits / total
    out["joint_raw"] = 100 * raw_hits / total
    return out


def test_fidelity(models: Mapping[str, Any], parents: Sequence[Any],
                  tests: Sequence[tuple[dict, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """The gate's own score (the parents' log-probability agreement, mean over tasks) and the raw-joint term
    (`raw_joint_score`) measured on the TEST inputs (labels unused): what a gate with a held-out split exactly like
    the test distribution would see."""
    parent_logits = [torch.cat([logits_of(p, [inputs]) for inputs, _ in tests]) for p in parents]
    merged = {name: torch.cat([logits_of(model, [inputs]) for inputs, _ in tests])
              for name, model in models.items() if name in ("none", "ridge", "ridge80")}
    return {"test_loglik_tasks": {name: loglik_score(z, parent_logits, whole_head=False) for name, z in merged.items()},
            "test_raw_joint": {name: raw_joint_score(z, parent_logits) for name, z in merged.items()},
            "test_raw_mass": {name: raw_mass_score(z, parent_logits) for name, z in merged.items()}}


def ensemble_scores(parents: Sequence[Any], tests: Sequence[tuple[dict, torch.Tensor]]) -> dict[str, float]:
    sizes = [p.config.num_labels for p in parents]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    out, joint_hits, raw_hits, total = {}, 0, 0, 0
    for k, (inputs, labels) in enumerate(tests):
        z = [logits_of(p, [inputs]) for p in parents]
        out[f"task_{k}"] = 100 * float((z[k].argmax(1) == labels).double().mean())
        joint_hits += int((torch.cat([x.softmax(1) for x in z], 1).argmax(1) == labels + offsets[k]).sum())
        raw_hits += int((torch.cat(z, 1).argmax(1) == labels + offsets[k]).sum())
        total += len(labels)
    out["joint"] = 100 * joint_hits / total
    out["joint_raw"] = 100 * raw_hits / total
    return out


def decisions(run: dict[str, Any]) -> dict[str, str]:
    """Each rule's choice ("none" / "ridge"; the gate's "ridge" is the refit on the kept examples, `ridge80`)."""
    gate = run["gate"]
    basis = run["shared_basis"]
    return {
        "today": "ridge",
        "gate_agreement": "ridge80" if gate["agreement_ridge80"] >= gate["agreement_none"] else "none",
        "gate_loglik": "ridge80" if gate["loglik_ridge80"] >= gate["loglik_none"] else "none",
        **({"gate_loglik_tasks": "ridge80" if gate["loglik_tasks_ridge80"] >= gate["loglik_tasks_none"] else "none"}
           if "loglik_tasks_ridge80" in gate else {}),  # records before 2026-11-30 have no per-task-only score
        **({"gate_raw_joint": "ridge80" if gate["raw_joint_ridge80"] >= gate["raw_joint_none"] else "none",
            "gate_tasks_raw_mean": "ridge80" if gate["loglik_tasks_ridge80"] + gate["raw_joint_ridge80"]
            >= gate["loglik_tasks_none"] + gate["raw_joint_none"] else "none"}
           if "raw_joint_ridge80" in gate else {}),  # records before gate_joint.md have no raw-joint term
        **({"gate_task_guard": "ridge80" if gate["loglik_tasks_ridge80"] + gate["raw_joint_ridge80"]
            >= gate["loglik_tasks_none"] + gate["raw_joint_none"]
            and not (gate["lowered_tasks"] if "lowered_tasks" in gate
                     else [n for r, n in zip(gate["task_terms_ridge80"], gate["task_terms_none"]) if r < n])
            else "none"}
           if gate.get("task_terms_ridge80") else {}),  # records before gate_task_guard.md have no per-task terms
        **{f"gate_cluster_{kind}": f"ridge_cluster_{kind}"
           if gate[f"cluster_{kind}_refit"] >= gate[f"cluster_{kind}_none"] else "none"
           for kind in CLUSTER_FEATURES if f"cluster_{kind}_refit" in gate},
        # A merge without a concatenated head has no score: the rule then refits (shared basis unknown).
        "shared_basis": "none" if basis is not None and basis >= 0.5 else "ridge",
        # (d) enough data: the calibration holds the examples `refit_samples="auto"` asks for (16 token rows per
        # unknown of the widest per-token layer, within [128, 1024]), so the least squares is not data-starved.
        "enough_data": "ridge" if run["refit_samples"] is None or run["refit_examples"] >= run["refit_samples"]
        else "none",
    }


def record(run: dict[str, Any], figures: dict[str, dict[str, float]], key: str) -> dict[str, Any]:
    """One pair's record: every model's figures, each rule's choice and figure `key`, the oracle (the better of
    none / ridge on `key`)."""
    chosen = decisions(run)
    best = max(figures["none"][key], figures["ridge"][key])
    return {"figures": figures, "gate": {k: round(v, 6) if isinstance(v, float)
                                         else [round(x, 6) for x in v] if isinstance(v, list) else v
                                         for k, v in run["gate"].items()},
            "shared_basis": run["shared_basis"], "method": run["method"], "seconds": run["seconds"],
            "refit_examples": run["refit_examples"], "refit_samples": run["refit_samples"],
            "choice": chosen, "rule": {rule: figures[choice][key] for rule, choice in chosen.items()},
            "oracle": best}


# ------------------------------------------------------------------------------------------------ settings
def text_pairs(args: argparse.Namespace, permuted: bool) -> list[dict[str, Any]]:
    from bench_same_base import backbone_of, batched_accuracy, normalised, text_setting

    from hf_mudsc.testing.permute import permute_model, random_permutations

    settings = argparse.Namespace(text_layers=6, text_epochs=3, text_lr=1e-4, max_length=16,
                                  calibration_samples=args.calibration_samples or 128,
                                  quick=False, cache_dir=str(BENCH_CACHE / "same_base"))
    records = []
    for seed in args.seeds:
        setting = text_setting(settings, seed)
        own = [batched_accuracy(p, inputs, labels) for p, (inputs, labels) in zip(setting.parents, setting.test)]
        for i, j in itertools.combinations(range(len(setting.parents)), 2):
            if args.pairs and f"{i},{j}" not in args.pairs:
                continue
            parents = [setting.parents[i], setting.parents[j]]
            tests = [setting.test[i], setting.test[j]]
            name = f"seed {seed} {setting.tasks[i]}+{setting.tasks[j]}"
            if permuted:
                spec = spec_for(parents[1])
                parents[1] = permute_model(parents[1], spec, random_permutations(spec, seed=7))
                run = refits(parents, setting.calibration, shifted=args.shifted)
                figures = {label: task_scores(model, parents, tests) for label, model in run["models"].items()}
                figures["ensemble"] = ensemble_scores(parents, tests)
                entry = record(run, figures, "joint")
                entry.update(test_fidelity(run["models"], parents, tests))
            else:
                run = refits(parents, setting.calibration, shifted=args.shifted)
                linear = hf_mudsc.merge(parents, setting.calibration, method="linear", progress=False)
                figures = {}
                for label, model in {**run["models"], "linear": linear}.items():
                    backbone = backbone_of(model)
                    accuracies = []
                    for model_index, parent in zip((i, j), parents):
                        inputs, labels = setting.test[model_index]
                        saved = {k: v.clone() for k, v in parent.state_dict().items()}
                        parent.load_state_dict(backbone, strict=False)
                        accuracies.append(batched_accuracy(parent, inputs, labels))
                        parent.load_state_dict(saved)
                    figures[label] = {"task_0": 100 * accuracies[0], "task_1": 100 * accuracies[1],
                                      "normalised": normalised(accuracies, [own[i], own[j]])}
                    joint = task_scores(model, parents, tests)
                    figures[label].update({"joint": joint["joint"], "joint_raw": joint["joint_raw"]})
                entry = record(run, figures, "normalised")
                entry.update(test_fidelity(run["models"], parents, tests))
            entry["pair"] = name
            log(f"{'P' if permuted else 'S'} {name}: " + ", ".join(
                f"{label} {fig['joint' if permuted else 'normalised']:.3f}" for label, fig in figures.items())
                + f" | gate {entry['gate']} | basis {entry['shared_basis']} | {entry['seconds']}")
            records.append(entry)
            checkpoint(args, "text_p" if permuted else "text_s", records)
    return records


def checkpoint(args: argparse.Namespace, name: str, records: Sequence[dict[str, Any]]) -> None:
    """Every finished pair's record on disk (`--out` + `.partial`), so a long run can be read while it runs."""
    if args.out:
        with open(f"{args.out}.{name}.partial", "w", encoding="utf-8") as handle:
            json.dump(list(records), handle, indent=1, default=str)


def toy_pairs(args: argparse.Namespace, same_init: bool) -> list[dict[str, Any]]:
    from common import different_init_pair, pair_settings, random_class_splits, same_init_pair

    settings = pair_settings()
    records = []
    splits = random_class_splits(args.splits)
    for width in args.widths:
        for index, classes in enumerate(splits):
            build = same_init_pair if same_init else different_init_pair
            model_a, model_b, pair_splits, calibration = build(settings, width, index, classes)
            if args.calibration_samples:  # the first N calibration images (batches of 64)
                pool = torch.cat([batch["pixel_values"] for batch in calibration])[:args.calibration_samples]
                calibration = [{"pixel_values": pool[i:i + 64]} for i in range(0, len(pool), 64)]
            parents = [model_a, model_b]
            tests = [(dict(pixel_values=t.test_pixel_values), t.test_labels) for t in pair_splits.tasks]
            run = refits(parents, calibration, batch_size=64, shifted=args.shifted)
            figures = {label: task_scores(model, parents, tests) for label, model in run["models"].items()}
            figures["ensemble"] = ensemble_scores(parents, tests)
            if same_init:
                figures["linear"] = task_scores(hf_mudsc.merge(parents, calibration, method="linear", progress=False),
                                                parents, tests)
            entry = record(run, figures, "joint")
            entry.update(test_fidelity(run["models"], parents, tests))
            entry["pair"] = f"h{width} split {index} {classes}"
            entry["width"] = width
            log(f"{'same' if same_init else 'diff'} {entry['pair']}: " + ", ".join(
                f"{label} {fig['joint']:.1f}" for label, fig in figures.items())
                + f" | choice {entry['choice']} | basis {entry['shared_basis']}")
            records.append(entry)
            checkpoint(args, "toy_same" if same_init else "toy_diff", records)
    return records


def summary(records: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean ± std over pairs of every model's `key`, every rule's, the oracle's; how often each rule picked the
    better of none / ridge (ridge80 counted as ridge)."""
    def stats(values: Sequence[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)}

    out: dict[str, Any] = {"models": {}, "rules": {}}
    for label in records[0]["figures"]:
        out["models"][label] = stats([r["figures"][label][key] for r in records])
    oracle = [max(r["figures"]["none"][key], r["figures"]["ridge"][key]) for r in records]
    for rule in (rule for rule in RULES if rule in decisions(records[0])):  # older records: fewer gates
        choices = [decisions(r)[rule] for r in records]
        out["rules"][rule] = stats([r["figures"][c][key] for r, c in zip(records, choices)])
        out["rules"][rule]["right"] = sum(r["figures"]["ridge" if c != "none" else "none"][key] == best
                                          for r, c, best in zip(records, choices, oracle))
        out["rules"][rule]["kept_refit"] = sum(c != "none" for c in choices)
    out["rules"]["oracle"] = stats(oracle)
    return out


def table(name: str, result: dict[str, Any], key: str) -> str:
    lines = [f"{name} ({key}, mean ± std over {result['models']['none']['n']} pairs)"]
    for label, s in result["models"].items():
        lines.append(f"  {label:<16} {s['mean']:8.3f} ± {s['std']:.3f}")
    for label, s in result["rules"].items():
        extra = f"  (right {s['right']}, refit kept {s['kept_refit']})" if "right" in s else ""
        lines.append(f"  rule {label:<14} {s['mean']:6.3f} ± {s['std']:.3f}{extra}")
    return "\n".join(lines)


def key_joint(records: Sequence[dict[str, Any]]) -> bool:
    """Whether the records' main figure is not the joint one (then a joint table follows)."""
    return "normalised" in records[0]["figures"]["none"]


def markdown(name: str, records: Sequence[dict[str, Any]], key: str) -> str:
    """The docs page's tables of one setting: every pair, then mean ± std of every model and rule."""
    labels = list(records[0]["figures"])
    clusters = [kind for kind in CLUSTER_FEATURES if f"cluster_{kind}_refit" in records[0]["gate"]]
    shifted = "".join(f" cluster {kind}: none / refit (held out) | keeps |" for kind in clusters)
    tested = "test_loglik_tasks" in records[0]
    shifted += " test inputs loglik none / ridge80 |" if tested else ""
    lines = [f"| pair | {' | '.join(labels)} | held-out loglik none / refit | shared basis | gate keeps |{shifted}",
             "|---|" + "---:|" * (len(labels) + 3 + 2 * len(clusters) + tested)]
    digits = 3 if key == "normalised" else 1
    for r in records:
        gate = r["gate"]
        basis = "–" if r["shared_basis"] is None else f"{r['shared_basis']:.3f}"
        lines.append(f"| {r['pair']} | " + " | ".join(f"{r['figures'][label][key]:.{digits}f}" for label in labels)
                     + f" | {gate['loglik_none']:.3f} / {gate['loglik_ridge80']:.3f} | {basis} | "
                     + ("yes" if decisions(r)["gate_loglik"] != "none" else "no") + " |"
                     + "".join(f" {gate[f'cluster_{kind}_none']:.3f} / {gate[f'cluster_{kind}_refit']:.3f}"
                               f" ({gate[f'cluster_{kind}_held_out']}) | "
                               + ("yes" if decisions(r)[f"gate_cluster_{kind}"] != "none" else "no") + " |"
                               for kind in clusters)
                     + (f" {r['test_loglik_tasks']['none']:.3f} / {r['test_loglik_tasks']['ridge80']:.3f} |"
                        if tested else ""))
    result = summary(records, key)
    lines += ["", f"| {name}: mean ± std over {len(records)} pairs ({key}) | value | right (of {len(records)}) "
              "| refit kept |", "|---|---:|---:|---:|"]
    for label, s in result["models"].items():
        lines.append(f"| {label} | {s['mean']:.{digits}f} ± {s['std']:.{digits}f} | | |")
    for label, s in result["rules"].items():
        right = s.get("right", "")
        lines.append(f"| rule: {label} | {s['mean']:.{digits}f} ± {s['std']:.{digits}f} | {right} | "
                     f"{s.get('kept_refit', '')} |")
    return "\n".join(lines)

#: The gates compared in gate_joint.md: today's (per-task score) and the two raw-joint candidates.
JOINT_TABLE_GATES = {"gate_loglik_tasks": "today's gate (per-task score)", "gate_raw_joint": "raw-joint term only",
                     "gate_tasks_raw_mean": "mean of both"}


def joint_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The figures a setting is judged on: normalised accuracy (text S), then joint under each rule."""
    return [*(["normalised"] if "normalised" in records[0]["figures"]["none"] else []), "joint", "joint_raw"]


def joint_summary_markdown(settings: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """gate_joint.md's summary: per setting and figure, every gate's mean ± std, how often it picked the better of
    none / ridge ("right") and how often it kept the refit; none, ridge and the oracle for reference."""
    def cell(s: Mapping[str, float], digits: int) -> str:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    lines = ["| setting | figure | none | ridge | oracle | " + " | ".join(JOINT_TABLE_GATES.values()) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(JOINT_TABLE_GATES)]
    for name, records in settings.items():
        for key in joint_keys(records):
            result = summary(records, key)
            digits = 3 if key == "normalised" else 1
            gates = [f"{cell(result['rules'][g], digits)} (right {result['rules'][g]['right']}, kept "
                     f"{result['rules'][g]['kept_refit']})" for g in JOINT_TABLE_GATES]
            lines.append(f"| {name} ({len(records)}) | {key} | {cell(result['models']['none'], digits)} | "
                         f"{cell(result['models']['ridge'], digits)} | {cell(result['rules']['oracle'], digits)} | "
                         + " | ".join(gates) + " |")
    return "\n".join(lines)


def joint_margins_markdown(settings: Mapping[str, Sequence[dict[str, Any]]]) -> str:
    """Each score's margin ridge80 − none, mean over pairs (and on how many pairs it is >= 0, i.e. prefers the
    refit), held out and on the test inputs; then on how many pairs ridge80 is >= none on the test figures."""
    def margin(pairs: Sequence[tuple[float, float]]) -> str:
        diffs = [refit - none for none, refit in pairs]
        return f"{statistics.fmean(diffs):+.3f} ({sum(d >= 0 for d in diffs)} of {len(diffs)})"

    lines = ["| setting | per-task score, held out | raw-joint term, held out | mean of both, held out | "
             "task-mass part, held out | per-task score, test inputs | raw-joint term, test inputs | task-mass part, "
             "test inputs | ridge80 ≥ none: per-task joint | ridge80 ≥ none: raw joint |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, records in settings.items():
        gates = [r["gate"] for r in records]
        tasks = [(g["loglik_tasks_none"], g["loglik_tasks_ridge80"]) for g in gates]
        raw = [(g["raw_joint_none"], g["raw_joint_ridge80"]) for g in gates]
        both = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(tasks, raw)]
        test_tasks = [(r["test_loglik_tasks"]["none"], r["test_loglik_tasks"]["ridge80"]) for r in records]
        test_raw = [(r["test_raw_joint"]["none"], r["test_raw_joint"]["ridge80"]) for r in records]
        better = {key: sum(r["figures"]["ridge80"][key] >= r["figures"]["none"][key] for r in records)
                  for key in ("joint", "joint_raw")}
        has_mass = "raw_mass_none" in gates[0]  # recorded since the text P run of gate_joint.md
        mass = margin([(g["raw_mass_none"], g["raw_mass_ridge80"]) for g in gates]) if has_mass else "–"
        test_mass = (margin([(r["test_raw_mass"]["none"], r["test_raw_mass"]["ridge80"]) for r in records])
                     if has_mass else "–")
        lines.append(f"| {name} | {margin(tasks)} | {margin(raw)} | {margin(both)} | {mass} | {margin(test_tasks)} | "
                     f"{margin(test_raw)} | {test_mass} | {better['joint']} of {len(records)} | "
                     f"{better['joint_raw']} of {len(records)} |")
    return "\n".join(lines)


def joint_pairs_markdown(name: str, records: Sequence[dict[str, Any]]) -> str:
    """gate_joint.md's per-pair table of one setting: the figures (per-task joint / raw joint; text S also
    normalised), the held-out scores of none / ridge80, each gate's choice, the scores on the test inputs."""
    norm = "normalised" in records[0]["figures"]["none"]
    labels = [label for label in ("none", "ridge", "ridge80", "ensemble", "linear") if label in records[0]["figures"]]
    head = " | ".join(f"{label} {'norm / ' if norm else ''}joint / raw" for label in labels)
    lines = [f"| pair | {head} | held out per-task none / ridge80 | held out raw-joint none / ridge80 | keeps: "
             "today / raw-joint / mean | test per-task none / ridge80 | test raw-joint none / ridge80 | held out "
             "task mass none / ridge80 | test task mass none / ridge80 |",
             "|---|" + "---:|" * (len(labels) + 7)]
    for r in records:
        figures, gate, chosen = r["figures"], r["gate"], decisions(r)
        cells = [(f"{figures[label]['normalised']:.3f} / " if norm and "normalised" in figures[label] else
                  ("– / " if norm else "")) + f"{figures[label]['joint']:.1f} / {figures[label]['joint_raw']:.1f}"
                 for label in labels]
        keeps = " / ".join("yes" if chosen[g] != "none" else "no" for g in JOINT_TABLE_GATES)
        lines.append(f"| {r['pair']} | " + " | ".join(cells)
                     + f" | {gate['loglik_tasks_none']:.3f} / {gate['loglik_tasks_ridge80']:.3f}"
                     + f" | {gate['raw_joint_none']:.3f} / {gate['raw_joint_ridge80']:.3f} | {keeps}"
                     + f" | {r['test_loglik_tasks']['none']:.3f} / {r['test_loglik_tasks']['ridge80']:.3f}"
                     + f" | {r['test_raw_joint']['none']:.3f} / {r['test_raw_joint']['ridge80']:.3f}"
                     + (f" | {gate['raw_mass_none']:.3f} / {gate['raw_mass_ridge80']:.3f} | "
                        f"{r['test_raw_mass']['none']:.3f} / {r['test_raw_mass']['ridge80']:.3f} |"
                        if "raw_mass_none" in gate else " | – | – |"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["text_s", "text_p"], choices=SETTINGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="text: the fine-tunes' seeds")
    parser.add_argument("--pairs", nargs="*", default=None, help="text: only these task pairs, e.g. 0,1 2,3")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="toys: hidden sizes")
    parser.add_argument("--splits", type=int, default=5, help="toys: class splits per width")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="calibration examples (text: drawn as bench_same_base draws them, default 128; toys: "
                             "the first N of the pair's calibration images, default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-shifted", dest="shifted", action="store_false",
                        help="skip the cluster gates of gate_shifted.md (two more refits per pair)")
    parser.add_argument("--out", default=None, help="write every pair's figures and the summary here (JSON)")
    parser.add_argument("--markdown", nargs="+", default=None, metavar="SETTING=JSON",
                        help="print the docs tables of finished runs instead (e.g. text_s=/tmp/rt_s.json.text_s.partial"
                             " — a --out file or its per-setting .partial) and exit")
    parser.add_argument("--markdown-joint", nargs="+", default=None, metavar="SETTING=JSON",
                        help="print gate_joint.md's tables (the raw-joint gate candidates) of finished runs and exit")
    args = parser.parse_args(argv)
    if args.markdown_joint:
        loaded = {}
        for item in args.markdown_joint:
            name, path = item.split("=", 1)
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            loaded[name] = data["records"][name] if isinstance(data, dict) else data
        print(f"{joint_summary_markdown(loaded)}\n\n{joint_margins_markdown(loaded)}\n")
        for name, records in loaded.items():
            print(f"### {name}\n\n{joint_pairs_markdown(name, records)}\n")
        return {}
    if args.markdown:
        keys = {"text_s": "normalised", "text_p": "joint", "toy_diff": "joint", "toy_same": "joint"}
        for item in args.markdown:
            name, path = item.split("=", 1)
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            records = data["records"][name] if isinstance(data, dict) else data
            print(f"### {name}\n\n{markdown(name, records, keys[name])}\n")
            if name != "text_p" and key_joint(records):
                print(markdown(name + " (joint)", records, "joint") + "\n")
        return {}
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    result: dict[str, Any] = {"args": vars(args), "records": {}, "summary": {}}
    keys = {"text_s": "normalised", "text_p": "joint", "toy_diff": "joint", "toy_same": "joint"}
    for name in args.settings:
        if name.startswith("text"):
            records = text_pairs(args, permuted=name == "text_p")
        else:
            records = toy_pairs(args, same_init=name == "toy_same")
        result["records"][name] = records
        result["summary"][name] = summary(records, keys[name])
        if name in ("text_s", "toy_same", "toy_diff", "text_p"):
            result["summary"][name + " (joint)"] = summary(records, "joint")
            result["summary"][name + " (joint_raw)"] = summary(records, "joint_raw")
        print(table(name, result["summary"][name], keys[name]), flush=True)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=1, default=str)
    print(json.dumps({name: {rule: round(s["mean"], 4) for rule, s in value["rules"].items()}
                      for name, value in result["summary"].items()}))
    return result


if __name__ == "__main__":
    main()
