"""`alpha="auto"` (docs/design.md §4.4): MuDSC's balance factor chosen without labels, by fidelity to the parents.

The statistics are collected once, on the calibration examples that are not held out (every `HOLDOUT_EVERY`-th
example of the stream is held out). For each α of `ALPHA_GRID` the method solves and applies (cheap next to the
statistics), and the merged model is scored on the held-out examples against its parents:

* with a classifier: the mean of each task's agreement (the argmax of the merged model's slice of that parent's
  classes against the parent's argmax) and the joint agreement (the merged model's joint decision against the
  ensemble's — each parent's softmax, concatenated, or averaged when the heads share one label set; a concatenated
  merged head decides by each task's softmax too, as log-probabilities, `classifier.per_task_log_probabilities`,
  the evaluation's rule);
* a multi-label head (problem_type "multi_label_classification", a sigmoid per label): the share of labels
  decided alike (logit > 0) and, for the log-likelihood, the per-label Bernoulli term; it takes part in no softmax
  decision (a shift of its logits flips labels that a softmax over them would not see);
* a regression head (one output, transformers' `num_labels=1`): its slice's outputs against the parent's,
  `exp(-relative squared error)` (`relative_squared_error`; a softmax over one logit is 1 for any output, so an
  argmax or log-probability agreement would score every model alike);
* without one (a bare encoder): the mean over parents of the linear CKA between the merged model's and the
  parent's example features (final hidden states averaged over the non-padding tokens) — basis-free, so a merged
  space that is any relabelling of a parent's scores as that parent; a dual encoder (CLIP) is scored on each
  tower's embeddings (image and text), the mean over the towers, so neither can break unseen.

The highest score wins; ties go to the α nearest 0.5. Measured on the toy digit ViTs (different inits, hidden 64,
5 pairs; docs/research/quality_probe.md §4): this unlabelled fidelity picked the α that labelled training accuracy
picks in 9 of 10 choices, +4.6 (zip) / +7.2 (align) joint points over α = 0.5.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_mudsc.apply.classifier import log_probabilities, per_task_log_probabilities
from hf_mudsc.calibrate.layer_inputs import run_forward

#: The balance factors `alpha="auto"` tries (the research's grid; the paper's default 0.5 in the middle).
ALPHA_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Every this-many-th calibration example is held out for scoring (20%); the rest feed the statistics.
HOLDOUT_EVERY = 5
_FEATURES = ("last_hidden_state", "image_embeds", "text_embeds", "pooler_output")
# A dual encoder's outputs (CLIP): one embedding per tower, each scored (a score of one tower cannot see the other).
_TOWERS = ("image_embeds", "text_embeds")


class RowSplit:
    """The rows of a re-readable batch stream whose example index `i` has `i % every == every - 1` (held out) or
    not (kept): the same rows on every read, whatever the batch sizes. Iterable any number of times."""

    def __init__(self, batches: Callable[[], Iterable[Mapping[str, Any]]], every: int, held_out: bool) -> None:
        self.batches, self.every, self.held_out = batches, every, held_out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start = 0
        for batch in self.batches():
            rows = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
            index = torch.arange(start, start + rows)
            keep = ((index % self.every == self.every - 1) == self.held_out).nonzero()[:, 0]
            start += rows
            if len(keep):
                yield {k: v.index_select(0, keep.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() > 0
                       and len(v) == rows else v for k, v in batch.items()}


def holdout_split(batches: Callable[[], Iterable[Mapping[str, Any]]], every: int = HOLDOUT_EVERY
                  ) -> tuple[RowSplit, RowSplit]:
    """(the examples the statistics use, the held-out examples) of a re-readable batch stream."""
    return RowSplit(batches, every, held_out=False), RowSplit(batches, every, held_out=True)


def _outputs(model: nn.Module, batches: Iterable[Mapping[str, Any]], mask_key: str | None
             ) -> tuple[torch.Tensor, bool, tuple[int, ...]]:
    """(logits `(N, classes)`, True, (classes,)) when the model has them, else (example features `(N, d)`, False,
    each tower's width): the final hidden states averaged over the non-padding tokens, or a dual encoder's image and
    text embeddings side by side (`_TOWERS`)."""
    parts = []
    is_logits = False
    widths: tuple[int, ...] = ()
    with torch.no_grad():
        for batch in batches:
            out = run_forward(model, batch)
            logits = getattr(out, "logits", None)
            if logits is not None:
                parts.append(logits.detach().to(torch.float64))
                is_logits, widths = True, (logits.shape[-1],)
                continue
            towers = [getattr(out, name) for name in _TOWERS if getattr(out, name, None) is not None]
            if len(towers) < len(_TOWERS):
                towers = [next(getattr(out, name) for name in _FEATURES if getattr(out, name, None) is not None)]
            pooled = []
            for features in towers:
                features = features.detach().to(torch.float64)
                if features.dim() == 3:
                    mask = batch.get(mask_key) if mask_key else None
                    weights = (mask.to(features) if mask is not None
                               and tuple(mask.shape) == tuple(features.shape[:2])
                               else torch.ones(features.shape[:2], dtype=features.dtype))[..., None]
                    features = (features * weights).sum(1) / weights.sum(1).clamp_min(1)
                pooled.append(features)
            widths = tuple(features.shape[-1] for features in pooled)
            parts.append(torch.cat(pooled, dim=1))
    # nothing held out: no rows
    return (torch.cat(parts) if parts else torch.zeros(0, 0, dtype=torch.float64)), is_logits, widths


def towers_cka(merged: torch.Tensor, merged_widths: Sequence[int], parent: torch.Tensor,
               parent_widths: Sequence[int]) -> float:
    """The mean over towers of `linear_cka` (`_outputs`' features side by side, each tower's width given)."""
    pairs = list(zip(torch.split(merged, list(merged_widths), dim=1), torch.split(parent, list(parent_widths), dim=1)))
    return sum(linear_cka(x, y) for x, y in pairs) / len(pairs)


def relative_squared_error(merged: torch.Tensor, parent: torch.Tensor) -> float:
    """`‖merged − parent‖² / ‖parent‖²` over the held-out examples: 0 for the parent's own outputs, scale-free so
    that parents whose outputs differ in size weigh alike."""
    return float((merged - parent).square().sum() / parent.square().sum().clamp_min(1e-12))


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two `(N, ·)` feature sets: invariant to rotations and scale of either, 1 for equal spaces."""
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (x.T @ y).square().sum()
    norm = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(cross / norm) if norm > 0 else 0.0


@dataclass(frozen=True)
class Agreement:
    """A merged model's agreement with its parents on the held-out examples (`FidelityScorer.agreement`): `score`,
    what `alpha="auto"` and the refit gate compare, and, for a concatenated head, each task's own term (head order),
    so the gate can see a change that buys one task with another (docs/design.md §4.9)."""

    score: float
    tasks: tuple[float, ...] | None = None
    # each task's term per held-out example (their means are `tasks`): what tells a task's real drop from noise
    examples: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)


#: A task counts as lower only where the held-out examples show it: a one-sided paired t-test at this level.
SIGNIFICANCE = 0.05


def tasks_below(chosen: Agreement, reference: Agreement) -> tuple[int, ...]:
    """The task indices (a parent's, unless a merged parent holds several) whose own term `chosen` has below
    `reference`'s on the same held-out examples — significantly (`SIGNIFICANCE`, a paired t-test over the examples'
    terms) when both carry them, else by the means.
    A few hundred held-out examples move a term by a few thousandths between two merges equally good on the task
    (measured: 0.001 while the test accuracy of the three tasks moved −1.2 … +1.2), which must not decide."""
    if chosen.tasks is None or reference.tasks is None:
        return ()
    lowered = []
    for i, (mine, theirs) in enumerate(zip(chosen.tasks, reference.tasks)):
        if mine >= theirs:
            continue
        if chosen.examples is None or reference.examples is None:
            lowered.append(i)
        elif significantly_lower(chosen.examples[i], reference.examples[i]):
            lowered.append(i)
    return tuple(lowered)


def significantly_lower(values: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether `values` are lower than `reference` (paired, one example each) beyond what their spread explains: a
    one-sided paired t-test (scipy) at `SIGNIFICANCE`; differences without spread are lower iff their mean is."""
    from scipy.stats import ttest_rel

    values, reference = values.detach().cpu().double(), reference.detach().cpu().double()
    differences = values - reference
    if len(differences) < 2 or float(differences.std()) == 0.0:
        return float(differences.mean()) < 0 if len(differences) else False
    return bool(ttest_rel(values.numpy(), reference.numpy(), alternative="less").pvalue < SIGNIFICANCE)


def example_terms(merged: torch.Tensor, parent: torch.Tensor, *, regression: bool, multi_label: bool) -> torch.Tensor:
    """Each held-out example's share of a task's agreement term (their mean is the term `agreement` reports): the
    softmax cross term `Σ_c p log q`, the per-label Bernoulli term, or minus the example's share of the relative
    squared error."""
    if regression:
        return -(merged - parent).square().sum(1) * len(parent) / parent.square().sum().clamp_min(1e-12)
    if multi_label:
        p = parent.sigmoid()
        return (p * F.logsigmoid(merged) + (1 - p) * F.logsigmoid(-merged)).sum(1)
    return (parent.softmax(1) * merged.log_softmax(1)).sum(1)


class FidelityScorer:
    """Scores merged models against the parents on held-out calibration examples (module docstring)."""

    def __init__(self, parents: Sequence[nn.Module], held_out: Iterable[Mapping[str, Any]], *,
                 task_sizes: Sequence[int] | None, mask_key: str | None = None,
                 task_parents: Sequence[int] | None = None) -> None:
        """`task_sizes`: each task's class count when the merged head is the parents' heads concatenated (in head
        order); None when the heads share one label set or there are no logits. `task_parents`: each task's parent
        (`classifier.head_tasks`: a merged parent holds several consecutive tasks); None: task i is parent i's."""
        self.held_out, self.mask_key, self.task_sizes = held_out, mask_key, task_sizes
        ends = [int(end) for end in itertools.accumulate(task_sizes or ())]
        self.task_ranges = list(zip([0, *ends[:-1]], ends))  # the concatenated head's slices, parent order
        outputs = [_outputs(parent, held_out, mask_key) for parent in parents]
        self.parents = [out for out, _, _ in outputs]
        self.owners = list(task_parents) if task_parents is not None and task_sizes else list(range(len(parents)))
        self.widths = [widths for _, _, widths in outputs]
        self.logits = all(is_logits for _, is_logits, _ in outputs)
        self.examples = len(self.parents[0])
        # transformers reads one output as a regression head (`num_labels=1` sets problem_type "regression").
        # One output is a regression unless the config says multi-label (a one-label sigmoid head).
        problem_types = [getattr(getattr(parent, "config", None), "problem_type", None) for parent in parents]
        self.regression = [self.logits and (kind == "regression" or (out.shape[-1] == 1
                                                                      and kind != "multi_label_classification"))
                           for kind, out in zip(problem_types, self.parents)]
        # A multi-label head decides each label by its own sigmoid (problem_type "multi_label_classification"):
        # scored per label, never through a softmax a shift of its logits would leave unchanged.
        self.multi_label = [self.logits and kind == "multi_label_classification" for kind in problem_types]
        # per task, what it is compared with: its parent's outputs, or its slice of a merged parent's
        self.targets = self._task_targets() if task_parents is not None and task_sizes else self.parents
        self.regression = [self.regression[owner] for owner in self.owners]
        self.multi_label = [self.multi_label[owner] for owner in self.owners]
        self.softmax_tasks = [not (regression or multi) for regression, multi in zip(self.regression,
                                                                                   self.multi_label)]
        kinds = [name for name, present in (
            ("log-probability agreement", any(self.softmax_tasks)),
            ("per-label Bernoulli log-likelihood", any(self.multi_label)),
            ("relative squared error (negated)", any(self.regression))) if present]
        features = ("linear CKA of the image and text embeddings (mean over the towers)"
                    if len(self.widths[0]) == len(_TOWERS) else "linear CKA of the features")
        self.measure = features if not self.logits else " and ".join(kinds)

    def _task_targets(self) -> list[torch.Tensor]:
        """Each task's parent outputs: a parent's whole output when it holds one task, else that task's slice."""
        targets, start = [], 0
        for task, (owner, size) in enumerate(zip(self.owners, self.task_sizes or ())):
            start = 0 if task == 0 or self.owners[task - 1] != owner else start
            whole = self.owners.count(owner) == 1
            targets.append(self.parents[owner] if whole else self.parents[owner][:, start:start + size])
            start += size
        return targets

    def features_score(self, out: torch.Tensor, widths: Sequence[int]) -> float:
        """The score of a merged model without logits: the mean over parents (and towers) of the linear CKA."""
        return sum(towers_cka(out, widths, parent, parent_widths)
                   for parent, parent_widths in zip(self.parents, self.widths)) / len(self.parents)

    def classification_columns(self, out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the merged head's columns of the single-label tasks, those parents' logits): what a whole-head
        softmax compares when regression or multi-label tasks share a concatenated head."""
        sizes = list(self.task_sizes or ())
        slices = torch.split(out, sizes, dim=1)
        keep = [i for i, softmax in enumerate(self.softmax_tasks) if softmax]
        return torch.cat([slices[i] for i in keep], dim=1), [self.targets[i] for i in keep]

    def __call__(self, merged: nn.Module) -> float:
        if self.examples == 0:
            return 0.0
        out, is_logits, widths = _outputs(merged, self.held_out, self.mask_key)
        if not (is_logits and self.logits):
            return self.features_score(out, widths)
        slices = torch.split(out, list(self.task_sizes), dim=1) if self.task_sizes else [out] * len(self.parents)
        agreements = [math.exp(-relative_squared_error(part, parent)) if regression
                      else float(((part > 0) == (parent > 0)).double().mean()) if multi
                      else float((part.argmax(1) == parent.argmax(1)).double().mean())
                      for part, parent, regression, multi in zip(slices, self.targets, self.regression,
                                                                 self.multi_label)]
        if all(self.softmax_tasks):  # the joint decision: only single-label classification heads have one
            if self.task_sizes:
                # log-probabilities: two confident tasks' float32 softmax maxima both round to 1.0 and tie
                ensemble = torch.cat([log_probabilities(target) for target in self.targets], dim=1)
                decided = per_task_log_probabilities(out, self.task_ranges)
            else:
                ensemble = sum(parent.softmax(1) for parent in self.parents) / len(self.parents)
                decided = out
            agreements.append(float((decided.argmax(1) == ensemble.argmax(1)).double().mean()))
        return sum(agreements) / len(agreements)

    def log_likelihood(self, merged: nn.Module) -> float:
        """The parents' log-probability agreement of `merged` on the held-out examples (`agreement`'s score)."""
        return self.agreement(merged).score

    def agreement(self, merged: nn.Module) -> Agreement:
        """The parents' log-probability agreement of `merged` on the held-out examples (higher is better, <= 0),
        with each task's own term when the head is the parents' heads concatenated.
        Per task: the mean over parents of `Σ_c p_i(c) log q_i(c)` (p_i: parent i's softmax, q_i: the merged
        softmax over parent i's slice of a concatenated head, or over the shared head) — the whole score for a
        shared head, half of it for a concatenated one (below). Continuous where argmax agreement ties
        (a few dozen held-out examples), and it scores what the refit aims at: the parents' predictions.

        A concatenated head is also used whole: a stock pipeline takes one softmax over all its labels (the raw
        joint rule, docs/design.md §6), which depends on each task's offset against the others — something the
        per-task terms cannot see (they are invariant to it). So its score is the mean of the per-task terms' mean
        and the whole-head term `Σ_c e(c) log q(c)`, with e one softmax over the parents' concatenated raw logits
        and q one over the merged head. Measured on 18 same-base MiniLM pairs it drops 4 refits more than the
        per-task score alone, all rightly, and decides as before on 30 toy pairs and 18 permuted MiniLM pairs
        (docs/benchmarks/gate_joint.md). Without logits: the mean linear CKA (`__call__`).

        A regression task (one output) has no softmax: its term is minus its relative squared error; a multi-label
        task's is the per-label Bernoulli log-likelihood (`example_terms`); the whole-head term covers
        the single-label tasks only (present when there are two or more)."""
        if self.examples == 0:
            return Agreement(0.0)
        out, is_logits, widths = _outputs(merged, self.held_out, self.mask_key)
        if not (is_logits and self.logits):
            return Agreement(self.features_score(out, widths))
        slices = torch.split(out, list(self.task_sizes), dim=1) if self.task_sizes else [out] * len(self.parents)
        examples = tuple(example_terms(part, parent, regression=regression, multi_label=multi)
                         for part, parent, regression, multi in zip(slices, self.targets, self.regression,
                                                                    self.multi_label))
        terms = [float(values.mean()) for values in examples]
        per_task = sum(terms) / len(terms)
        if not self.task_sizes:  # one shared head: the parents' terms score one output, not tasks of their own
            return Agreement(per_task)
        if self.softmax_tasks.count(True) < 2:
            return Agreement(per_task, tuple(terms), examples)
        columns, parents = self.classification_columns(out)
        ensemble = torch.cat(parents, dim=1).softmax(1)
        whole_head = float((ensemble * columns.log_softmax(1)).sum(1).mean())
        return Agreement((per_task + whole_head) / 2, tuple(terms), examples)


#: Digits of a fidelity as recorded (`config.mudsc["alpha_auto"]`) and compared: equal fractions of agreements summed
#: in another order differ in the last bit, which must not decide against the tie rule the curve shows.
FIDELITY_DIGITS = 6


def choose_alpha(scores: Mapping[float, float]) -> float:
    """The α with the highest fidelity as recorded (`FIDELITY_DIGITS`); among equal ones the α nearest 0.5 (then the
    smaller)."""
    recorded = {alpha: round(score, FIDELITY_DIGITS) for alpha, score in scores.items()}
    best = max(recorded.values())
    return min((alpha for alpha, score in recorded.items() if score == best),
               key=lambda a: (round(abs(a - 0.5), 9), a))


def unscored_alpha_warning(chosen: float) -> str:
    """What a merge says when alpha="auto" had no held-out example to score any α by (fewer than `HOLDOUT_EVERY`
    calibration examples): the α used is a default, not a measurement."""
    return (f"alpha='auto': no held-out calibration example (fewer than {HOLDOUT_EVERY} examples), so no alpha was "
            f"scored; alpha {chosen:g} used — give more calibration data or pass a number")


def parameters_digest(parameters: Mapping[str, torch.Tensor]) -> str:
    """A SHA-256 of named tensors (names, dtypes, shapes, bytes): equal digests, the same merged model."""
    digest = hashlib.sha256()
    for name in sorted(parameters):
        tensor = parameters[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def search_alpha(method: Any, context: Any, scorer: FidelityScorer, build: Callable[[dict], nn.Module],
                 grid: Sequence[float] = ALPHA_GRID) -> tuple[float, Any, dict[str, Any]]:
    """Merge with `method` at every α of `grid` (the statistics in `context` are shared), score each merge with
    `scorer`; returns (the chosen α, the `MethodResult` to return, the curve for `config.mudsc["alpha_auto"]`).

    The candidates are merges for scoring only (`context.candidate`): a unit-matching method solves them from the
    paper's start alone, and the chosen α is then solved again with every start (docs/design.md §4.4-4.5), so the
    merge returned never ends below its starts. When that merge differs from the candidate it is scored too: the
    curve holds the candidates' scores (`fidelity`, and the starts they ran) and the returned merge's.

    Only the best result so far is kept (each holds a full set of merged parameters). A merge equal, tensor for
    tensor, to one already scored (neighbouring α often give the same matches) takes that score without being
    built and run: the same model scores the same."""
    import dataclasses
    import logging

    from hf_mudsc.solve.loop import SolveCache

    logger = logging.getLogger(__name__)
    scores: dict[float, float] = {}
    results: dict[float, Any] = {}
    scored: dict[str, float] = {}  # parameters digest -> fidelity
    digests: dict[float, str] = {}
    candidate_starts: list[str] = []
    # The solves differ only in alpha: what does not depend on it is computed once (the same results, less time).
    cache = SolveCache()
    context = dataclasses.replace(context, solve_cache=cache)

    def at(alpha: float, candidate: bool) -> Any:
        return method.merge_parameters(dataclasses.replace(
            context, candidate=candidate, options=dataclasses.replace(context.options, alpha=float(alpha))))

    def score(result: Any) -> tuple[str, float]:
        key = parameters_digest(result.parameters)
        if key not in scored:
            scored[key] = scorer(build(result.parameters))
        return key, scored[key]

    for alpha in grid:
        result = at(alpha, candidate=True)
        candidate_starts += [name for name in getattr(result, "start_objectives", None) or ()
                             if name not in candidate_starts]
        digests[alpha], scores[alpha] = score(result)
        results[alpha] = result
        best = choose_alpha(scores)
        for other in [a for a in results if a != best]:
            del results[other]
        logger.info("alpha %.2f: held-out fidelity %.4f", alpha, scores[alpha])
    chosen = choose_alpha(scores)  # without a held-out example every score is 0: 0.5 (the merge warns)
    result = results.pop(chosen)
    returned_key, returned_score = digests[chosen], scores[chosen]
    if not getattr(result, "full", True):  # a cheaper candidate: the chosen α merged again in full
        del result
        cache.keep_alpha(float(chosen))
        result = at(chosen, candidate=False)
        returned_key, returned_score = score(result)
        logger.info("alpha %.2f merged with every start: held-out fidelity %.4f (%s the candidate)", chosen,
                    returned_score, "the same merge as" if returned_key == digests[chosen] else "differs from")
    scored = scorer.examples > 0  # else nothing was measured: no figure recorded (the refit gate records None alike)
    curve = {"grid": [float(a) for a in grid],
             "fidelity": [round(scores[a], FIDELITY_DIGITS) if scored else None for a in grid], "chosen": chosen,
             "held_out_examples": scorer.examples, "candidate_starts": candidate_starts,
             "returned_fidelity": round(returned_score, FIDELITY_DIGITS) if scored else None,
             "returned_is_candidate": returned_key == digests[chosen]}
    return chosen, result, curve
