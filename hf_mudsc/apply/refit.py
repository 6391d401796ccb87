"""Refit after matching (docs/design.md §4.9): every linear layer of the merged model, in forward order, by ridge
least squares toward the parents' outputs mapped into the merged basis — from calibration data only.

A permutation or zip merge of models trained from different initializations keeps each unit's weights but not
the function: the fused units never saw each other's inputs. The refit repairs that layer by layer (PLeaS,
RegMean++): a layer's inputs come from the merged model itself (earlier layers already refitted), its targets are
the parents' outputs of the same layer mapped by the apply step's out-axis map (each merged unit's target is the
mean output of the units fused into it), and the ridge pulls toward the matched weights. Measured on the toy
different-init digit ViTs: joint accuracy 33.6 -> 76.8 (ensemble 74.3), docs/research/quality_probe.md §2, §8.

Architecture-free: layers are found from the spec (a `nn.Linear` whose weight is a member of some group, or the
spec's classifier), ordered and grouped into steps by the order their forward hooks fire on one batch (layers fed
the same tensor form one step, share one pass and one Gram), and the padding mask is the one the spec's hooks
declare. Each pass starts after the blocks already final, replayed from their stored outputs
(`hf_mudsc.apply.block_replay`): the cost is linear in depth. Memory is flat in the number of calibration
samples: per layer a `(d+1)²` Gram and a `(d+1)×m` cross-Gram in float64, and per model one block output per
refit batch (bounded by `refit_samples`; beyond `block_replay.RAM_BYTES` in a temporary directory).
`refit="auto"` (the default) runs it after unit-matching methods, and after the same-base methods that read the
calibration data (regmean, regmean_plusplus, fisher) of equally weighted parents (`hf_mudsc.options.resolve_refit`).
With `refit_norms=True` the LayerNorms in spec groups join it, each a step of its own with a per-unit affine ridge
fit (`NormAccumulator`); off by default (docs/benchmarks/refit_layernorm.md: within ±0.11 joint on the toys).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_mudsc.apply.block_replay import BlockReplay, Storage, find_chains
from hf_mudsc.apply.classifier import parent_tasks
from hf_mudsc.blas import mirror_upper, syrk_upper, torch_thread_count
from hf_mudsc.calibrate.correlation import CLAMP
from hf_mudsc.calibrate.layer_inputs import (
    StopForward,
    batch_to,
    first_inputs,
    norm_mask_key,
    padding_mask_key,
    run_forward,
    token_rows,
)
from hf_mudsc.errors import CalibrationError, option_hint, parent_label
from hf_mudsc.load.checks import is_softmax_head
from hf_mudsc.load.objects import whole_sequences
from hf_mudsc.options import AUTO, MergeOptions
from hf_mudsc.progress import Progress
from hf_mudsc.solve.maps import AxisMap, GroupMaps
from hf_mudsc.solve.matchers import Match
from hf_mudsc.solve.similarity import weight_features
from hf_mudsc.spec import PermutationSpec

logger = logging.getLogger(__name__)

# Mean weight correlation of fused units at or above which the parents are taken to share one basis (then the
# matched heads are kept). Measured: same-init fine-tunes 0.94, different inits 0.20-0.22, a permuted copy 1.0.
SHARED_BASIS_THRESHOLD = 0.5
# Parents' layer outputs (as float32 targets: they come from float32 forwards) kept between the steps that use
# them, at most this many bytes: the parents then run once per chunk of consecutive steps (a whole transformer block
# or half of one) instead of once per step. Bounded by the refit's sample count, never by the calibration set's.
TARGET_CACHE_BYTES = 256 * 2**20
#: The resolved `refit` values this module runs (`refit_model`: the ridge refit, also the gate's before it decides),
#: each replaying the parents (`replayed_parents`: one sharing a module object with another runs as a deep copy).
#: REPAIR (`apply.repair`) reads each parent's moments as given and copies none.
REPLAYING_REFITS = ("ridge", "gate")
# Bytes per cached target element (float32).
_TARGET_BYTES = 4
# `refit_samples="auto"`: enough examples that every per-token layer's least squares has at least this many rows
# (tokens) per unknown (its d+1 inputs): ordinary least squares with n rows and p unknowns overfits by about
# p/(n-p) of the noise on unseen inputs, so 16 rows per unknown keep that near 7%. Clipped to [floor, cap]: the floor
# (the previous fixed default) keeps the per-example layers (pooler, classifier: one row per example) at least as
# well fed as before, the cap bounds the refit's cost (linear in examples) for models with few tokens per example.
AUTO_ROWS_PER_UNKNOWN = 16
AUTO_SAMPLES_FLOOR = 128
AUTO_SAMPLES_CAP = 1024
#: The examples `refit_samples="auto"` counts each layer's rows per example on (across batches, cut at this count).
AUTO_COUNT_EXAMPLES = 64
_READ_AGAIN = ("the calibration data gave no samples when read again (the refit reads it once per layer step); "
               "pass data that can be read more than once: a list of batches or a datasets.Dataset")


@dataclass(frozen=True)
class LayerFit:
    """One refitted layer: its accumulator shapes (independent of the number of samples), samples, λ, change."""

    name: str
    gram_shape: tuple[int, int]
    cross_shape: tuple[int, int]
    samples: int
    ridge: float
    relative_change: float


@dataclass
class RefitReport:
    """What the refit did, for logs, benchmarks and tests (attached to the merge report as `refit`)."""

    steps: list[list[str]] = field(default_factory=list)
    layers: list[LayerFit] = field(default_factory=list)
    shared_basis: float | None = None
    head_kept: bool = False
    examples: int = 0
    """Calibration examples (images, texts) read per pass."""
    samples: int | None = None
    """The sample count the refit used (`refit_samples="auto"` resolved; None: every example)."""
    seconds: float = 0.0
    chains: list[tuple[str, ...]] = field(default_factory=list)
    """Block chains replayed from stored outputs (`hf_mudsc.apply.block_replay`); empty: every pass ran the model."""
    stored_bytes: int = 0
    """Most bytes of stored block outputs held in RAM at once (bounded by the refit's samples)."""
    stored_files: int = 0
    """Stored block outputs written to a temporary directory (beyond `block_replay.RAM_BYTES`; removed after)."""
    parent_passes: int = 0
    """Passes of each parent over the refit's data: one per chunk of steps whose targets fit `TARGET_CACHE_BYTES`
    (the merged model makes one per step)."""
    warnings: list[str] = field(default_factory=list)
    """What the merge's warnings should carry (a parent copied for the refit: `replayed_parents`)."""


class RidgeAccumulator:
    """Streamed `G = X̃ᵀX̃` and one `H_i = X̃ᵀY_i` per layer fed the same input (X̃ = [X, 1] with a bias), in
    float64: flat in samples. Layers that share their input (q, k, v) share one Gram and one factorisation.

    On the CPU the Gram is a symmetric rank-k update (BLAS `dsyrk`: one triangle, half the multiply-adds of
    `X̃ᵀX̃`, the same float64 sums), mirrored once when read; it is most of the refit's arithmetic (the fc2
    layers' `(4h+1)²` Grams)."""

    def __init__(self, in_features: int, out_features: int | Sequence[int], bias: bool,
                 device: torch.device | None = None) -> None:
        size = in_features + int(bias)
        widths = [out_features] if isinstance(out_features, int) else list(out_features)
        self.bias = bias
        self._gram = torch.zeros(size, size, dtype=torch.float64, device=device)
        self._upper_only = False  # only the upper triangle of `_gram` is summed so far (dsyrk)
        self.crosses = [torch.zeros(size, width, dtype=torch.float64, device=device) for width in widths]
        self.samples = 0
        self._factor: tuple[torch.Tensor, torch.Tensor | None, float, float] | None = None

    @property
    def gram(self) -> torch.Tensor:
        """`X̃ᵀX̃` (symmetric)."""
        if self._upper_only:
            mirror_upper(self._gram)
            self._upper_only = False
        return self._gram

    @property
    def cross(self) -> torch.Tensor:
        """The first (or only) layer's cross-Gram."""
        return self.crosses[0]

    def update(self, inputs: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor]) -> None:
        x = torch.empty(len(inputs), self._gram.shape[0], dtype=torch.float64, device=self._gram.device)
        x[:, :inputs.shape[1]] = inputs
        if self.bias:
            x[:, -1] = 1.0
        if x.device.type == "cpu" and len(x):
            syrk_upper(self._gram, x)
            self._upper_only = True
        else:
            self.gram.addmm_(x.T, x)
        for cross, target in zip(self.crosses, [targets] if isinstance(targets, torch.Tensor) else targets,
                                 strict=True):
            cross.addmm_(x.T, target.to(device=x.device, dtype=torch.float64))
        self.samples += len(x)
        self._factor = None

    def solve(self, weight: torch.Tensor, bias: torch.Tensor | None, lambda_rel: float, index: int = 0,
              ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """argmin ‖X̃W̃ − Y_index‖² + λ‖W̃ − W̃⁰‖² with λ = lambda_rel · mean diag(XᵀX): (weight, bias, λ)."""
        d = weight.shape[1]
        start = weight.detach().T.to(device=self.gram.device, dtype=torch.float64)
        if self.bias:
            start = torch.cat([start, bias.detach().to(start)[None]], dim=0)
        if self._factor is None or self._factor[2] != lambda_rel:
            energy = float(self.gram.diagonal()[:d].mean()) if d else 0.0
            ridge = lambda_rel * energy if energy > 0 else lambda_rel  # no input energy: W̃ = W̃⁰ for any λ > 0
            system = self.gram + ridge * torch.eye(len(self.gram), dtype=torch.float64, device=self.gram.device)
            factor, info = torch.linalg.cholesky_ex(system)
            self._factor = (system, factor if int(info) == 0 else None, lambda_rel, ridge)
        system, factor, _, ridge = self._factor
        right = self.crosses[index] + ridge * start
        try:
            solution = torch.cholesky_solve(right, factor) if factor is not None else torch.linalg.solve(system,
                                                                                                         right)
        except torch.linalg.LinAlgError:  # a ridge below float64's resolution of a rank-deficient Gram
            raise SingularRefitError(f"{self.samples} rows for {len(self.gram)} inputs") from None
        return solution[:d].T, (solution[d] if self.bias else None), ridge


def _check_finite(flags: Sequence[tuple[str, int, torch.Tensor]]) -> None:
    """Refuse, in the refit's first pass, parents' layer outputs that are infinite or NaN (`non_finite_output`).
    `flags`: (layer, parent index, whether its output is all finite) for one batch, read back at once (one device
    sync a batch, not one per layer and parent); the first non-finite one is named."""
    if not flags:
        return
    device = flags[0][2].device
    if bool(torch.stack([flag.to(device) for _, _, flag in flags]).all()):
        return
    for name, index, flag in flags:
        if not bool(flag):
            raise non_finite_output(name, index)


def non_finite_output(name: str, index: int) -> CalibrationError:
    """The refusal of a parent's layer output that is infinite or NaN on the calibration data: its float32 forward
    overflowed (values far beyond what the parents were trained on, e.g. 1e20) and every statistic and refitted
    weight would be NaN — refused only at the end, as if the merge's options had overflowed. Said in the refit's
    (and REPAIR's) first pass, naming the data and the fix."""
    return CalibrationError(
        f"refit: parent {parent_label(index)}'s output of layer {name!r} is infinite or NaN on the calibration data: "
        "the data holds infinite or NaN values, or values too large for float32 activations (the refit's statistics "
        "are computed from them); pass calibration data scaled as the parents were trained on (e.g. through their "
        "processor), or check that parent's weights")


def _default_lambda() -> float:
    return next(f.default for f in dataclasses.fields(MergeOptions) if f.name == "refit_lambda")


class SingularRefitError(CalibrationError):
    """A layer's ridge system is singular: `refit_lambda` is too small to regularise the calibration data's Gram."""


class NormAccumulator:
    """Streamed per-unit sums of one LayerNorm's affine refit (`refit_norms`), in float64: flat in samples.

    A LayerNorm's output is `γ ⊙ x̂ + β` with `x̂` its normalised input, so each unit j is a one-input ridge
    regression of its target `t_j` on `x̂_j`: the sums `Σx̂_j², Σx̂_j, Σx̂_j t_j, Σt_j` and the row count are all it
    needs. `x̂` is computed by the module's own normalisation (`F.layer_norm` without the affine, its eps), so a
    target that is `γ⁰x̂ + β⁰` gives back `γ⁰, β⁰` (the permuted-copy fixed point)."""

    def __init__(self, module: nn.LayerNorm, device: torch.device | None = None) -> None:
        width = module.normalized_shape[0]
        self.shape = tuple(module.normalized_shape)
        self.eps = module.eps
        self.bias = module.bias is not None
        self.sums = torch.zeros(4, width, dtype=torch.float64, device=device)  # Σx̂², Σx̂, Σx̂t, Σt per unit
        self.samples = 0

    def update(self, inputs: torch.Tensor, targets: torch.Tensor | Sequence[torch.Tensor]) -> None:
        (target,) = [targets] if isinstance(targets, torch.Tensor) else targets
        normalised = nn.functional.layer_norm(inputs, self.shape, None, None, self.eps).to(torch.float64)
        target = target.to(device=normalised.device, dtype=torch.float64)
        self.sums += torch.stack([(normalised * normalised).sum(0), normalised.sum(0),
                                  (normalised * target).sum(0), target.sum(0)]).to(self.sums.device)
        self.samples += len(normalised)

    def solve(self, weight: torch.Tensor, bias: torch.Tensor | None, lambda_rel: float,
              ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Per unit, argmin Σ(γx̂ + β − t)² + λ((γ − γ⁰)² + (β − β⁰)²) with λ = lambda_rel · mean_j Σx̂_j² (the
        linear layers' rule, `RidgeAccumulator.solve`, for a diagonal layer): (γ, β, λ)."""
        squares, total, cross, target = self.sums
        gamma0 = weight.detach().to(self.sums)
        energy = float(squares.mean())
        ridge = lambda_rel * energy if energy > 0 else lambda_rel
        if not self.bias:
            return (cross + ridge * gamma0) / (squares + ridge), None, ridge
        beta0 = bias.detach().to(self.sums)
        a, b, c = squares + ridge, total, self.samples + ridge
        right_gamma, right_beta = cross + ridge * gamma0, target + ridge * beta0
        determinant = a * c - b * b  # > 0: Cauchy-Schwarz gives Σx̂² · n >= (Σx̂)², and λ > 0
        return (c * right_gamma - b * right_beta) / determinant, (a * right_beta - b * right_gamma) / determinant, ridge


def refit_layers(model: nn.Module, spec: PermutationSpec, *, norms: bool = False) -> list[str]:
    """The layers the refit rewrites (module order): every `nn.Linear` whose weight is in some spec group, and the
    spec's classifier; with `norms`, also every affine `nn.LayerNorm` over the last axis whose weight is in some
    group (`refit_norms`: the per-unit affine refit, `NormAccumulator`)."""
    head = _classifier_module(spec)
    return [name for name, module in model.named_modules()
            if (isinstance(module, nn.Linear) and (spec.axes_of(f"{name}.weight") or name == head))
            or (norms and _is_refit_norm(module) and spec.axes_of(f"{name}.weight"))]


def _is_refit_norm(module: nn.Module) -> bool:
    """An `nn.LayerNorm` with a per-unit affine over its input's last axis (what `NormAccumulator` fits)."""
    return (isinstance(module, nn.LayerNorm) and module.weight is not None
            and len(module.normalized_shape) == 1)


def _classifier_module(spec: PermutationSpec) -> str | None:
    return spec.classifier.weight.removesuffix(".weight") if spec.classifier is not None else None


def forward_steps(model: nn.Module, layers: Sequence[str], batch: Mapping[str, Any]) -> list[list[str]]:
    """`layers` in the order their forwards run on `batch`, grouped into steps of layers fed the same tensor."""
    fired = first_inputs(model, layers, batch)
    seen = {name for name, _ in fired}
    modules = dict(model.named_modules())
    steps: list[list[str]] = []
    previous: torch.Tensor | None = None
    for name, tensor in fired:
        # A LayerNorm is a step of its own: its fit (per unit) shares nothing with a linear layer's Gram.
        alone = _is_refit_norm(modules[name]) or (steps and _is_refit_norm(modules[steps[-1][0]]))
        if steps and tensor is previous and not alone:
            steps[-1].append(name)
        else:
            steps.append([name])
        previous = tensor
    missing = [name for name in layers if name not in seen]
    if missing:
        logger.warning("refit: %d layer(s) (linear or LayerNorm) never ran on the calibration data and are kept: %s",
                       len(missing), ", ".join(missing))
    return steps


def shared_basis_score(spec: PermutationSpec, params_a: Mapping[str, torch.Tensor],
                       params_b: Mapping[str, torch.Tensor], matches: Sequence[Match | None], *,
                       other: int = 1) -> float | None:
    """Mean over groups of the weight-space Pearson correlation between parent 0's units and parent `other`'s
    fused with them (`params_a` is parent 0's, `params_b` parent `other`'s; two parents: A and B).

    Each unit's weight row is its `Z_i` row (docs/design.md §4.3: every non-ignored member, other axes mapped into
    their merged spaces by the final matches), centred over its columns; each unit of parent 0 scores the mean
    correlation with the parent-`other` units fused with it, 0 when none is (a zip may fuse within one parent);
    a group's value is the mean over parent 0's units; a group without a match pairs unit i with unit i (what
    averaging fuses). Invariant to unit permutations. None when no group has weights to compare (e.g. only a
    concatenated classifier).
    """
    maps = [GroupMaps.from_match(found) if found is not None else None for found in matches]
    values: list[torch.Tensor] = []
    for index, group in enumerate(spec.groups):
        if all(member.ignore for member in group.members):
            continue
        rows = [weight_features(spec, index, params, side, maps)
                for side, params in ((0, params_a), (other, params_b))]
        rows = [r - r.mean(dim=1, keepdim=True) for r in rows]
        rows = [r / r.norm(dim=1, keepdim=True).clamp_min(CLAMP) for r in rows]
        found = matches[index]
        n = group.width
        if found is None:
            pairs = torch.arange(n)[:, None].expand(n, 2)
        else:
            clusters = found.cluster_of.cpu()
            pairs = (clusters[:n, None] == clusters[None, other * n:(other + 1) * n]).nonzero()
        # Per unit of parent 0: the mean correlation with its partners, 0 without one — zip on different inits
        # may fuse nearly every unit within its own parent, and a handful of cross pairs is no evidence.
        correlation = (rows[0][pairs[:, 0]] * rows[1][pairs[:, 1]]).sum(dim=1)
        total = torch.zeros(n, dtype=correlation.dtype).index_add_(0, pairs[:, 0], correlation)
        count = torch.zeros(n, dtype=correlation.dtype).index_add_(0, pairs[:, 0], torch.ones_like(correlation))
        values.append((total / count.clamp_min(1)).mean())
    return float(torch.stack(values).mean()) if values else None


def parents_shared_basis(spec: PermutationSpec, parents: Sequence[nn.Module],
                         matches: Sequence[Match | None]) -> float | None:
    """The shared-basis score of N parents: the lowest `shared_basis_score` of parent j against parent 0.

    The minimum, not the mean: keeping the matched concatenated head is right only if EVERY parent's head reads
    the merged features (parent 0's basis, which the merged units follow); one parent from another init makes its
    slice of the head uncalibrated against the others, and a mean (e.g. a permuted copy at 1.0 and another init
    at 0.2 -> 0.6) would hide it. Against parent 0 only: N - 1 scores, linear in parents. Two parents: the score
    of B against A.
    """
    params = [{k: v.detach().cpu() for k, v in parent.named_parameters()} for parent in parents]
    scores = [shared_basis_score(spec, params[0], params[j], matches, other=j) for j in range(1, len(params))]
    known = [score for score in scores if score is not None]
    return min(known) if known else None


def capture_layers(model: nn.Module, names: Sequence[str], batch: Mapping[str, Any], where: str,
                   until: Iterable[str] = (), consume: Callable[[str, torch.Tensor], None] | None = None
                   ) -> dict[str, torch.Tensor]:
    """The first input (`where="input"`) or output of each named module on `batch`; the forward stops once they are
    known (an input before its module runs) and the modules `until` have returned (blocks whose outputs the pass
    stores for later passes). With `consume`, each tensor is handed to `consume(name, tensor)` as it is known
    instead of kept (REPAIR's moments: one layer's output alive at a time); the returned dict is then empty."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    waiting = set(until)

    def done() -> None:
        if len(seen) == len(names) and not waiting:
            raise StopForward

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: Any = None) -> None:
            if name not in seen:
                seen.add(name)
                value = (args[0] if where == "input" else output).detach()
                if consume is None:
                    captured[name] = value
                else:
                    consume(name, value)
                done()
        return record

    def returned(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            waiting.discard(name)
            done()
        return record

    # An input is known before its module runs (a forward pre-hook): the pass stops before computing it.
    handles = [modules[name].register_forward_pre_hook(hook(name)) if where == "input"
               else modules[name].register_forward_hook(hook(name)) for name in names]
    handles += [modules[name].register_forward_hook(returned(name)) for name in waiting]
    try:
        run_forward(model, batch)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def replayed_parents(parents: Sequence[nn.Module]) -> tuple[list[nn.Module], list[int], list[str]]:
    """The models the refit runs for `parents`, one block replay each, and each parent's index among them. A replay
    hooks and replaces the forwards of its model's modules for a whole pass, every parent's at once, so no two of
    them may hold one module object: a parent holding the same modules under the same names as an earlier one (the
    same object passed twice, a shallow copy) is run once for both (the same outputs); one holding only some module
    of an earlier one (two heads on one backbone object) is run as a deep copy, made for the refit only (its memory
    once more, said in the warnings returned third; `copied_for_refit` names them without copying, for the dry
    run's estimate)."""
    runs: list[nn.Module] = []
    slots = []
    said: list[str] = []
    for index, (parent, (same, shared)) in enumerate(zip(parents, _sharing(parents))):
        if same is not None:
            slots.append(slots[same])
            continue
        if shared is not None:
            name, owner, owner_name = shared
            said.append(f"refit: parent {parent_label(index)} shares module {name!r}"
                        f"{f' (its {owner_name!r})' if owner_name != name else ''} with parent {parent_label(owner)} "
                        f"(one object in both); the refit runs a copy of parent {parent_label(index)} (its memory "
                        "once more) — pass copy.deepcopy(...) of it to merge to run without one")
            parent = copy.deepcopy(parent)
        slots.append(len(runs))
        runs.append(parent)
    return runs, slots, said


def copied_for_refit(parents: Sequence[nn.Module]) -> list[int]:
    """The indexes of the `parents` the refit runs as a deep copy (`replayed_parents`): each holds its memory once
    more while the refit runs."""
    return [index for index, (same, shared) in enumerate(_sharing(parents)) if same is None and shared is not None]


def _sharing(parents: Sequence[nn.Module]) -> list[tuple[int | None, tuple[str, int, str] | None]]:
    """Per parent: the index of an earlier parent holding the same modules under the same names (run once for both),
    else None; and, when it holds only some module of an earlier one, (its name, that parent's index, its name
    there), else None."""
    keys: list[tuple] = []
    first: list[int] = []  # the parent index of each distinct key
    held: dict[int, tuple[int, str]] = {}  # id of a module holding weights -> (parent index, its name there)
    found: list[tuple[int | None, tuple[str, int, str] | None]] = []
    for index, parent in enumerate(parents):
        named = [(name, module) for name, module in parent.named_modules() if name]
        key = (type(parent), tuple((name, id(module)) for name, module in named),
               tuple(id(t) for t in (*parent.parameters(recurse=False), *parent.buffers(recurse=False))))
        if key in keys:
            found.append((first[keys.index(key)], None))
            continue
        weighted = [(name, module) for name, module in named
                    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None]
        shared = next(((name, *held[id(module)]) for name, module in weighted if id(module) in held), None)
        if shared is None:
            for name, module in weighted:
                held.setdefault(id(module), (index, name))
        found.append((None, shared))
        keys.append(key)
        first.append(index)
    return found


def refit_model(
    merged: nn.Module,
    parents: Sequence[nn.Module],
    spec: PermutationSpec,
    matches: Sequence[Match | None],
    batches: Callable[[], Iterable[Mapping[str, Any]]],
    *,
    concatenate_classifier: bool = False,
    lambda_rel: float = MergeOptions.refit_lambda,  # the option's one declared default
    samples: int | str | None = MergeOptions.refit_samples,
    seed: int = 0,
    total: int | None = None,
    keep_head: bool | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    norms: bool = MergeOptions.refit_norms,
) -> RefitReport:
    """Refit `merged`'s linear layers (and with `norms` its LayerNorms' affines) in place (docs/design.md §4.9);
    returns what was done.

    Args:
        merged: the merged model (parent 0's structure), modified in place.
        parents: the N >= 2 parents in merge order, never modified (moved to `device` for the forwards and back).
        spec, matches: the parents' spec and one match per group over all N parents (None: unmatched, i.e.
            identity maps).
        batches: returns a fresh iterable of model-input batches on each call (one pass per step).
        concatenate_classifier: the merged head is every parent's rows in parent order: its target is each
            parent's logits centred per task — unless the parents share a basis (`parents_shared_basis` >= 0.5)
            or `keep_head=True`, when the matched head is kept: it already reads the merged features and keeps
            the heads comparable.
        lambda_rel: ridge strength relative to each layer's mean input energy.
        samples: examples the refit reads ("auto": `auto_refit_samples` of the layers' shapes) — a subset of the
            calibration data chosen by a shuffle seeded with `seed` (every example when None or when the data holds
            no more); `total`: how many examples `batches` yields, if known (else one counting pass reads it).
        weights: the merge's per-parent weights (`MergeOptions.weights`; None: equal): a body layer's target is
            then each merged unit's weighted cluster mean, `Σ_u w̄_p(u) Y_u / Σ_u w̄_p(u)`, and an unmatched
            layer's `Σ_i w̄_i Y_i` — the apply step's own weighting (`apply_matches_weighted`).
        norms: also refit every LayerNorm in a spec group, in forward order with the linear layers (`refit_norms`;
            per unit, `NormAccumulator`), toward the parents' LayerNorm outputs mapped like a body layer's.
    """
    started = time.perf_counter()
    report = RefitReport()
    target = torch.device(device) if device is not None else None
    # The models run (a parent sharing modules with another is run once or copied) and each parent's among them.
    runs, slots, report.warnings = replayed_parents(parents)
    for text in report.warnings:
        logger.warning("%s", text)
    homes = [_home(model) for model in (merged, *runs)]
    was_training = [model.training for model in (merged, *runs)]
    head = _classifier_module(spec)
    if concatenate_classifier and head is not None:
        if keep_head is None:
            head_spec = spec.without_weight_similarity([spec.classifier.weight])
            report.shared_basis = parents_shared_basis(head_spec, parents, matches)
            keep_head = report.shared_basis is not None and report.shared_basis >= SHARED_BASIS_THRESHOLD
        report.head_kept = bool(keep_head)
    maps, shares = target_maps(matches, weights, len(parents))
    centred = [is_softmax_head(parent.config) if hasattr(parent, "config") else True for parent in parents]
    splits = [held_task_sizes(parent.config) if hasattr(parent, "config") else None for parent in parents]
    modules = dict(merged.named_modules())
    layers = [name for name in refit_layers(merged, spec, norms=norms) if not (report.head_kept and name == head)]
    try:
        for model in (merged, *runs):
            model.eval()
            if target is not None:
                model.to(target)
        # The Gram's BLAS (scipy's, `syrk_upper`) uses as many threads as torch does.
        with torch.no_grad(), torch_thread_count(), whole_sequences((merged, *runs)):
            if not layers:
                return report
            if samples == AUTO:
                samples = _auto_samples(merged, spec, [name for name in layers
                                                       if isinstance(modules[name], nn.Linear)], batches, target)
            report.samples = samples
            batches = subset_batches(batches, samples, seed=seed, total=total)
            first = next(iter(batches()), None)
            if first is None:
                raise CalibrationError(f"refit: {_READ_AGAIN}")
            first = batch_to(first, target)
            report.steps = forward_steps(merged, layers, first)
            chains = find_chains(merged, [name for step in report.steps for name in step], first)
            del first
            storage = Storage()
            # The merged model also replays the finished parts of the block it refits (its 4 steps per block).
            # One replay (its hooks, its stored outputs) per model run (`replayed_parents`): two replays hooking one
            # module object returned one's stored outputs inside the other's pass.
            replays = [BlockReplay(merged, chains, storage, units=True),
                       *(BlockReplay(model, chains, storage, units=True) for model in runs)]
            bar = Progress(total=len(report.steps), desc="refit", unit="steps", enabled=progress)
            tokens = 0  # samples (tokens) per pass, known after the first step: sizes the target cache
            position = 0
            finished = 0  # layers refitted so far (forward order): the blocks before them are replayed
            try:
                while position < len(report.steps):
                    chunk = _next_chunk(report.steps, position, modules, tokens)
                    # One parents' pass for the whole chunk: each layer's target, per batch, kept until its step
                    # runs.
                    cached: dict[str, list[torch.Tensor]] = {name: [] for step in chunk for name in step}
                    names = [name for step in chunk for name in step]
                    # The parents never change: a block whose layers all end in this chunk is final for them now.
                    # Unless nothing follows, the pass runs on to its end and stores its output, so the next chunk
                    # starts after it (each parent block computes in its chunks' passes, not in 5).
                    done = finished + len(names) if position + len(chunk) < len(report.steps) else finished
                    with contextlib.ExitStack() as passes:
                        for replay in replays[1:]:
                            passes.enter_context(replay.run(done))
                        for number, batch in enumerate(batches()):
                            batch = batch_to(batch, target)
                            if position == 0:
                                report.examples += _batch_rows(batch)
                            outputs = []
                            for parent, replay in zip(runs, replays[1:], strict=True):
                                replay.batch(number)
                                outputs.append(capture_layers(parent, names, batch, "output", until=replay.storing))
                            outputs = [outputs[slot] for slot in slots]
                            finite = []
                            for name in names:
                                mask = _mask(spec, name, batch, norm=_is_refit_norm(modules[name]))
                                # Computed and kept in float32 (the parents' own precision; a float64 round trip
                                # changed a target by at most 1 ulp and took twice the time).
                                ys = [token_rows(out[name], mask).to(torch.float32) for out in outputs]
                                finite += [(name, index, torch.isfinite(y).all()) for index, y in enumerate(ys)]
                                cached[name].append(_target(spec, maps, name, name == head and concatenate_classifier,
                                                            ys, shares, centred, splits))
                            _check_finite(finite)
                            del outputs
                    report.parent_passes += 1
                    if position == 0 and samples is not None and report.examples < samples:
                        logger.info("refit: the data holds %d examples, fewer than the %d refit_samples asks for: all "
                                    "%d are used", report.examples, samples, report.examples)
                    for step in chunk:
                        accumulators = _step_accumulators(spec, modules, step, target)
                        with replays[0].run(finished):
                            for number, batch in enumerate(batches()):
                                batch = batch_to(batch, target)
                                replays[0].batch(number)
                                # The layers of one accumulator share their input: the first one's is read,
                                # and the pass stops before it runs.
                                firsts = [members[0] for _, members in accumulators]
                                inputs = capture_layers(merged, firsts, batch, "input")
                                for accumulator, members in accumulators:
                                    if any(number >= len(cached[name]) for name in members):
                                        raise CalibrationError(f"refit: the calibration data gave more batches "
                                                               f"when read again; {_READ_AGAIN}")
                                    first_name = members[0]
                                    mask = _mask(spec, first_name, batch, norm=_is_refit_norm(modules[first_name]))
                                    accumulator.update(token_rows(inputs[first_name], mask),
                                                       [cached[name][number] for name in members])
                        empty = [name for accumulator, members in accumulators for name in members
                                 if accumulator.samples == 0]
                        if empty:  # e.g. a stream that cannot be read twice: never leave a layer silently unfitted
                            raise CalibrationError(f"refit: no samples for {', '.join(empty)}; {_READ_AGAIN}")
                        for accumulator, members in accumulators:
                            tokens = max(tokens, accumulator.samples)
                            for index, name in enumerate(members):
                                report.layers.append(_write(modules[name], name, accumulator, index, lambda_rel))
                                del cached[name]
                        finished += len(step)
                        bar.update(1)
                    position += len(chunk)
            finally:  # the bar too: a Ctrl-C's exit line then gets a line of its own
                bar.close()
                for replay in replays:
                    replay.close()
                storage.close()
                report.chains = [chain.blocks for chain in chains]
                report.stored_bytes, report.stored_files = storage.ram_peak, storage.files
    finally:
        for model, home, training in zip((merged, *runs), homes, was_training):
            if target is not None and home is not None:
                model.to(home)
            model.train(training)
    report.seconds = time.perf_counter() - started
    norms_done = sum(_is_refit_norm(modules[fit.name]) for fit in report.layers)
    logger.info("refit %d linear layers%s in %d steps (%.1f s)%s", len(report.layers) - norms_done,
                f" and {norms_done} LayerNorms" if norms_done else "", len(report.steps),
                report.seconds, "; matched head kept (shared basis)" if report.head_kept else "")
    return report


def auto_refit_samples(layers: Iterable[tuple[int, float]]) -> int:
    """The examples `refit_samples="auto"` reads, from each refit layer's (unknowns d+1, rows per example): enough
    that every per-token layer (more than one row per example) has `AUTO_ROWS_PER_UNKNOWN` rows per unknown, within
    [`AUTO_SAMPLES_FLOOR`, `AUTO_SAMPLES_CAP`]. Per-example layers (pooler, classifier) do not raise it: at one row
    per example they would ask for thousands of forwards; the floor and the ridge toward the matched weights hold
    them."""
    need = [math.ceil(AUTO_ROWS_PER_UNKNOWN * unknowns / rows) for unknowns, rows in layers if rows > 1]
    return min(max([AUTO_SAMPLES_FLOOR, *need]), AUTO_SAMPLES_CAP)


def _auto_samples(merged: nn.Module, spec: PermutationSpec, layers: Sequence[str],
                  batches: Callable[[], Iterable[Mapping[str, Any]]], device: torch.device | None) -> int:
    """`auto_refit_samples` of the refit layers, their rows per example counted on the first `AUTO_COUNT_EXAMPLES`
    calibration examples (padding dropped as in the fit), read across as many batches as they span and cut at that
    count: the same examples give the same count however they are batched (the first batch alone did not)."""
    modules = dict(merged.named_modules())
    examples, rows = 0, {}
    for batch in batches():
        if examples >= AUTO_COUNT_EXAMPLES:
            break
        size = _batch_rows(batch)
        if size == 0:
            continue
        take = min(size, AUTO_COUNT_EXAMPLES - examples)
        if take < size:
            batch = {k: v[:take] if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == size else v
                     for k, v in batch.items()}
        batch = batch_to(batch, device)
        for name, tensor in first_inputs(merged, layers, batch):  # the layers that run, in forward order
            rows[name] = rows.get(name, 0) + len(token_rows(tensor, _mask(spec, name, batch)))
        examples += take
    if examples == 0:
        raise CalibrationError(f"refit: {_READ_AGAIN}")
    shapes = [(modules[name].in_features + int(modules[name].bias is not None), count / examples)
              for name, count in rows.items()]
    chosen = auto_refit_samples(shapes)
    logger.info("refit_samples='auto': up to %d examples (%d rows per unknown of the widest per-token layer, within "
                "[%d, %d])", chosen, AUTO_ROWS_PER_UNKNOWN, AUTO_SAMPLES_FLOOR, AUTO_SAMPLES_CAP)
    return chosen


def _mask(spec: PermutationSpec, name: str, batch: Mapping[str, Any], norm: bool = False) -> torch.Tensor | None:
    key = (norm_mask_key if norm else padding_mask_key)(spec, f"{name}.weight")
    return batch.get(key) if key else None


def _next_chunk(steps: Sequence[Sequence[str]], position: int, modules: Mapping[str, nn.Module],
                tokens: int) -> list[Sequence[str]]:
    """The steps from `position` whose targets fit `TARGET_CACHE_BYTES` together (at least one step). Before the
    first step has run the token count is unknown: the first chunk is that step alone."""
    chunk = [steps[position]]
    if tokens == 0:
        return chunk
    size = sum(_out_width(modules[name]) for name in steps[position]) * tokens * _TARGET_BYTES
    for step in steps[position + 1:]:
        size += sum(_out_width(modules[name]) for name in step) * tokens * _TARGET_BYTES
        if size > TARGET_CACHE_BYTES:
            break
        chunk.append(step)
    return chunk


def _out_width(module: nn.Module) -> int:
    """Output units of a refit layer (a linear layer's out_features, a LayerNorm's width)."""
    return module.out_features if isinstance(module, nn.Linear) else module.weight.numel()


def subset_batches(batches: Callable[[], Iterable[Mapping[str, Any]]], samples: int | None, *, seed: int = 0,
                   total: int | None = None) -> Callable[[], Iterable[Mapping[str, Any]]]:
    """`batches` restricted to `samples` examples chosen by a shuffle seeded with `seed` (kept in stream order).

    Every batch keeps only its chosen rows (tensors whose first axis is the batch's examples), so any re-readable
    stream — a list of batches, a dataset — gives the same subset on every read. `total`: the stream's example
    count when known; otherwise one pass counts it. Returns `batches` itself when every example is chosen.
    """
    if samples is None:
        return batches
    if total is None:
        total = sum(_batch_rows(batch) for batch in batches())
    if samples >= total:
        return batches
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:samples]] = True

    def subset() -> Iterable[Mapping[str, Any]]:
        start = 0
        for batch in batches():
            rows = _batch_rows(batch)
            keep = chosen[start:start + rows].nonzero()[:, 0]
            start += rows
            if len(keep):
                yield {k: v.index_select(0, keep) if isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == rows
                       else v for k, v in batch.items()}
    return subset


def _batch_rows(batch: Mapping[str, Any]) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def target_maps(matches: Sequence[Match | None], weights: Sequence[float] | None, num_parents: int,
                ) -> tuple[list[GroupMaps | None], list[float] | None]:
    """Per group, the out-axis maps `_target` applies (parent i's `merge2[i]`, averaged over the N parents), and
    the parents' normalised weights `w̄` (None when equal).

    Equal weights: the apply step's `N·merge_i` (`GroupMaps.from_match`; two parents: `2·merge_i`), the code path
    of two parents. Unequal: unit u of parent i weighs `N · w̄_i / Σ_{v ∈ c(u)} w̄_p(v)`, so the mean over parents
    is each merged unit's weighted cluster mean (`apply_matches_weighted`'s out weight, times `N · w̄_i`)."""
    if weights is None or len(set(map(float, weights))) <= 1:
        return [GroupMaps.from_match(found) if found is not None else None for found in matches], None
    if len(weights) != num_parents:
        raise ValueError(f"{len(weights)} weights for {num_parents} parents")
    total = float(sum(weights))
    shares = [float(w) / total for w in weights]
    maps: list[GroupMaps | None] = []
    for found in matches:
        if found is None:
            maps.append(None)
            continue
        clusters = found.cluster_of.cpu()
        n = clusters.numel() // num_parents
        unit_share = torch.tensor(shares, dtype=torch.float64).repeat_interleave(n)
        cluster_share = torch.zeros(found.num_merged, dtype=torch.float64).index_add_(0, clusters, unit_share)
        weight = num_parents * unit_share / cluster_share[clusters]
        rows = [slice(i * n, (i + 1) * n) for i in range(num_parents)]
        maps.append(GroupMaps(merge2=tuple(AxisMap(clusters[r], weight[r], found.num_merged) for r in rows),
                              unmerge=tuple(AxisMap(clusters[r], torch.ones(n, dtype=torch.float64),
                                                    found.num_merged) for r in rows)))
    return maps, shares


def held_task_sizes(config: Any) -> list[int] | None:
    """The sizes of the tasks a merged parent's head holds (`classifier.parent_tasks`), each centred on its own in
    the head's target; None for a parent of one task (centred whole, as before)."""
    sizes = [len(labels) for _, labels in parent_tasks(config)]
    return sizes if len(sizes) > 1 else None


def head_target(outputs: Sequence[torch.Tensor], centred: Sequence[bool] | None = None,
                splits: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """A concatenated head's target: each parent's logits centred per task, `[z_A − mean_row(z_A), ...]`.

    Measured against raw logits, per-task log-probabilities (the ensemble's own decision rule: least squares
    chases their large negative tails), floored log-probabilities and probabilities in docs/research/width_gap.md
    §2: none beat the centred logits on the mean over pairs. `centred[i]` False keeps parent i's outputs raw: only
    a softmax ignores a shift (`is_softmax_head`), and a one-output regression slice centred is zero."""
    keep = centred if centred is not None else [True] * len(outputs)
    parts = splits if splits is not None else [None] * len(outputs)
    return torch.cat([torch.cat([z - z.mean(dim=1, keepdim=True) for z in torch.split(y, list(split), dim=1)], dim=1)
                      if centre and split is not None and sum(split) == y.shape[1]
                      else y - y.mean(dim=1, keepdim=True) if centre else y
                      for y, centre, split in zip(outputs, keep, parts, strict=True)], dim=1)


def _target(spec: PermutationSpec, maps: Sequence[GroupMaps | None], name: str, concatenated_head: bool,
            outputs: Sequence[torch.Tensor], shares: Sequence[float] | None = None,
            centred: Sequence[bool] | None = None,
            splits: Sequence[Sequence[int] | None] | None = None) -> torch.Tensor:
    """The layer's target in the merged basis: per-task centred logits for a concatenated head (parent order; raw
    outputs for the parents `centred` marks False),
    else the mean over the N parents of their outputs mapped by the apply step's out-axis map (`N·merge_i`, so
    `Σ_i merge_i Y_i`: each merged unit's cluster mean; `target_maps`), or `Σ_i w̄_i Y_i` for an unmatched layer
    of a weighted merge."""
    if concatenated_head:
        return head_target(outputs, centred, splits)
    out_group = next((index for index, member in spec.axes_of(f"{name}.weight")
                      if member.role == "out" and member.axis % 2 == 0), None)
    found = maps[out_group] if out_group is not None else None
    if found is None:
        if shares is not None:
            return sum(share * y for share, y in zip(shares, outputs, strict=True))
        return sum(outputs) / len(outputs)
    return sum(found.merge2[side].apply(y, -1) for side, y in enumerate(outputs)) / len(outputs)


def _step_accumulators(spec: PermutationSpec, modules: Mapping[str, nn.Module], step: Sequence[str],
                       device: torch.device | None,
                       ) -> list[tuple[RidgeAccumulator | NormAccumulator, list[str]]]:
    """One accumulator per set of the step's layers with the same input rows (same bias flag and padding mask, in
    step order): they share one Gram `X̃ᵀX̃` — computed once instead of once per layer, the same numbers. A
    LayerNorm (a step of its own, `forward_steps`) gets its per-unit `NormAccumulator`."""
    if len(step) == 1 and _is_refit_norm(modules[step[0]]):
        return [(NormAccumulator(modules[step[0]], device), list(step))]
    groups: dict[tuple[bool, str | None], list[str]] = {}
    for name in step:
        groups.setdefault((modules[name].bias is not None, padding_mask_key(spec, f"{name}.weight")), []).append(name)
    return [(RidgeAccumulator(modules[members[0]].in_features, [modules[n].out_features for n in members], bias,
                              device), members) for (bias, _), members in groups.items()]


def _write(module: nn.Linear | nn.LayerNorm, name: str, accumulator: RidgeAccumulator | NormAccumulator,
           index: int, lambda_rel: float) -> LayerFit:
    if isinstance(accumulator, NormAccumulator):
        weight, bias, ridge = accumulator.solve(module.weight, module.bias, lambda_rel)
        shapes = (tuple(accumulator.sums[:2].T.shape), tuple(accumulator.sums[2:].T.shape))
    else:
        try:
            weight, bias, ridge = accumulator.solve(module.weight, module.bias, lambda_rel, index)
        except SingularRefitError as error:
            raise CalibrationError(
                f"refit: the least squares of layer {name!r} is singular at refit_lambda={lambda_rel:g} ({error}); "
                f"raise {option_hint('refit_lambda')} (default {_default_lambda():g}) or pass more varied calibration "
                "data") from None
        shapes = (tuple(accumulator.gram.shape), tuple(accumulator.crosses[index].shape))
    before = torch.cat([module.weight.detach().to(torch.float64).flatten(),
                        *([module.bias.detach().to(torch.float64)] if module.bias is not None else [])])
    module.weight.copy_(weight.to(module.weight))
    if bias is not None:
        module.bias.copy_(bias.to(module.bias))
    after = torch.cat([weight.flatten(), *([bias] if bias is not None else [])]).to(before)
    change = float((after - before).norm() / before.norm().clamp_min(CLAMP))
    return LayerFit(name, *shapes, accumulator.samples, ridge, change)


def _home(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    return devices.pop() if len(devices) == 1 else None
