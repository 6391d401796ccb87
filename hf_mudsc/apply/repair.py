"""REPAIR after matching (`refit="repair"`, docs/design.md §4.9): per merged unit, an affine renormalisation so the
merged model's per-unit mean and standard deviation on the calibration data equal the parents' — no Gram matrices.

A merge of models trained from different initializations fuses units that never saw each other's inputs: the
fused units' activations shrink and drift ("variance collapse", Jordan et al. 2022, REPAIR). REPAIR rescales
each repaired unit `u` of the merged model, `y' = (y − μ_m) · σ_t / σ_m + μ_t`, folded into the producing
module's weight row and bias (a Linear's row, a LayerNorm's γ and β: both are affine per output unit). The
targets `(μ_t, σ_t)` are the parents' per-unit statistics of the same module mapped into the merged basis by the
apply step's out-axis map (`hf_mudsc.apply.refit.target_maps`): each merged unit's target is the merge-weighted
mean over the units fused into it (its zip cluster, N parents). Layers are repaired in forward order, so a later
layer's statistics are measured on the already repaired inputs.

Memory is flat in the number of calibration samples (per repaired layer, two float64 vectors of its width: the
sum and the sum of squares of its outputs); the parents run once over the data, the merged model once per step
(finished blocks replayed from stored outputs, `hf_mudsc.apply.block_replay`). Which layers (`SCOPES`): measured
in docs/benchmarks/repair.md; the default `DEFAULT_SCOPE` is the best there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_mudsc.apply.block_replay import BlockReplay, Storage, find_chains
from hf_mudsc.apply.refit import capture_layers, forward_steps, non_finite_output, subset_batches, target_maps
from hf_mudsc.calibrate.layer_inputs import batch_to, norm_mask_key, padding_mask_key, token_rows
from hf_mudsc.errors import CalibrationError
from hf_mudsc.load.objects import whole_sequences
from hf_mudsc.options import AUTO
from hf_mudsc.progress import Progress
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import PermutationSpec

logger = logging.getLogger(__name__)

# Which modules' outputs are renormalised: "mlp" the MLP input layers (fc1 pre-activations: the Linear layers whose
# rows are a spec group with a config width, i.e. an MLP group), "mlp+ln" also every LayerNorm whose γ/β are spec
# members, "all" every Linear with a bias whose rows are spec members (q, k, v, o, fc1, fc2, pooler) and the
# LayerNorms. The classifier is never renormalised (its targets are per-task logits).
SCOPES = ("mlp", "mlp+ln", "all")
# Measured on the toy digit ViTs (5 pairs each, docs/benchmarks/repair.md), joint accuracy of mudsc zip + REPAIR:
# different init h64 mlp 36.6 / mlp+ln 39.1 / all 53.2 (none 32.9), h128 49.8 / 54.4 / 58.5 (none 45.2), same init
# h64 90.8 / 90.0 / 90.4 (none 90.6). "all" also renormalises the residual branches' outputs (o, fc2): in a
# transformer those add into the residual stream, and their collapsed variance is left untouched by fc1 and the
# LayerNorms alone.
DEFAULT_SCOPE = "all"
# `refit_samples="auto"`: examples REPAIR reads. Per-unit moments need far fewer than a least squares: 256 and 1024
# examples gave the same joint accuracy within 0.6 points on every pair (docs/benchmarks/repair.md), at a quarter
# of the cost.
AUTO_SAMPLES = 256
# A merged unit whose standard deviation is at most this (relative to the layer's largest) is constant on the
# data: only its mean is moved (a scale would divide by ~0).
CONSTANT_UNIT = 1e-12
_READ_AGAIN = ("repair: the calibration data gave {what} when read again (it is read once per repaired step); pass "
               "data that reads the same on every pass: a list of batches or a datasets.Dataset")


@dataclass(frozen=True)
class RepairedLayer:
    """One renormalised module: its units, the samples (tokens) behind its statistics and the scales applied."""

    name: str
    units: int
    samples: int
    scale_min: float
    scale_max: float
    mean_shift: float
    """Mean |μ_t − μ_m| over units, relative to the mean target standard deviation."""


@dataclass
class RepairReport:
    """What REPAIR did (attached to the merge report as `refit`, like `RefitReport`)."""

    scope: str = DEFAULT_SCOPE
    steps: list[list[str]] = field(default_factory=list)
    layers: list[RepairedLayer] = field(default_factory=list)
    examples: int = 0
    """Calibration examples (images, texts) read per pass."""
    samples: int | None = None
    """The example count used (`refit_samples="auto"` resolved; None: every example)."""
    seconds: float = 0.0
    chains: list[tuple[str, ...]] = field(default_factory=list)


class Moments:
    """Streamed per-unit first and second moments in float64 (sums: flat in samples)."""

    def __init__(self, width: int, device: torch.device | None = None) -> None:
        self.total = torch.zeros(width, dtype=torch.float64, device=device)
        self.squares = torch.zeros(width, dtype=torch.float64, device=device)
        self.samples = 0

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.to(device=self.total.device, dtype=torch.float64)
        self.total += rows.sum(dim=0)
        self.squares += (rows * rows).sum(dim=0)
        self.samples += len(rows)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.samples, 1)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (the statistic REPAIR matches)."""
        return (self.squares / max(self.samples, 1) - self.mean ** 2).clamp_min(0).sqrt()


def repair_layers(model: nn.Module, spec: PermutationSpec, scope: str = DEFAULT_SCOPE) -> list[str]:
    """The modules whose outputs `scope` renormalises (module order): see `SCOPES`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown REPAIR scope {scope!r}; choose one of {', '.join(SCOPES)}")
    head = spec.classifier.weight.removesuffix(".weight") if spec.classifier is not None else None
    names = []
    for name, module in model.named_modules():
        groups = _out_groups(spec, name)
        if name == head or not groups or getattr(module, "bias", None) is None:
            continue
        if isinstance(module, nn.Linear):
            if scope == "all" or any(spec.groups[index].width_key is not None for index in groups):
                names.append(name)
        elif isinstance(module, nn.LayerNorm) and scope != "mlp":
            names.append(name)
    return names


def _out_groups(spec: PermutationSpec, name: str) -> list[int]:
    """The groups whose units this module's weight rows produce (axis 0, role out)."""
    return [index for index, member in spec.axes_of(f"{name}.weight") if member.role == "out" and member.axis == 0]


def target_statistic(maps: Sequence[GroupMaps | None], group: int | None, values: Sequence[torch.Tensor],
                     shares: Sequence[float] | None = None) -> torch.Tensor:
    """Per merged unit, the merge-weighted mean of the parents' per-unit `values` over the units fused into it:
    `Σ_i merge_i v_i` (`target_maps`: the refit's targets, applied to statistics instead of outputs); for an
    unmatched group the (weighted) mean over the parents of unit i's values."""
    found = maps[group] if group is not None and group < len(maps) else None
    if found is None:
        if shares is not None:
            return sum(share * v for share, v in zip(shares, values, strict=True))
        return sum(values) / len(values)
    return sum(found.merge2[side].apply(v[None], -1)[0] for side, v in enumerate(values)) / len(values)


def _accumulate(model: nn.Module, spec: PermutationSpec, names: Sequence[str], batch: Mapping[str, Any],
                moments: Mapping[str, Moments], until: Iterable[str] = ()) -> None:
    """One forward of `batch`: each named module's first output (padding dropped) added to its moments; the
    forward stops once they are all known and the modules `until` have returned."""
    norms = {name for name in names if isinstance(model.get_submodule(name), nn.LayerNorm)}

    def add(name: str, output: torch.Tensor) -> None:
        key = (norm_mask_key if name in norms else padding_mask_key)(spec, f"{name}.weight")
        moments[name].update(token_rows(output, batch.get(key) if key else None))

    capture_layers(model, names, batch, "output", until=until, consume=add)


def renormalise(module: nn.Module, name: str, merged: Moments, mean_t: torch.Tensor, std_t: torch.Tensor
                ) -> RepairedLayer:
    """Fold `y' = (y − μ_m) · σ_t / σ_m + μ_t` per output unit into the module's weight rows and bias (in place)."""
    mean_m, std_m = merged.mean, merged.std
    constant = std_m <= CONSTANT_UNIT * max(float(std_m.max()), 1.0)
    scale = torch.where(constant, torch.ones_like(std_m), std_t / std_m.where(~constant, torch.ones_like(std_m)))
    weight = module.weight.detach().to(torch.float64)
    weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = (module.bias.detach().to(torch.float64) - mean_m) * scale + mean_t
    module.weight.copy_(weight.to(module.weight))
    module.bias.copy_(bias.to(module.bias))
    shift = float((mean_t - mean_m).abs().mean() / std_t.mean().clamp_min(CONSTANT_UNIT))
    return RepairedLayer(name, len(scale), merged.samples, float(scale.min()), float(scale.max()), shift)


def repair_model(
    merged: nn.Module,
    parents: Sequence[nn.Module],
    spec: PermutationSpec,
    matches: Sequence[Match | None],
    batches: Callable[[], Iterable[Mapping[str, Any]]],
    *,
    scope: str = DEFAULT_SCOPE,
    samples: int | str | None = AUTO,
    seed: int = 0,
    total: int | None = None,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> RepairReport:
    """Renormalise `merged`'s `scope` layers in place, in forward order (module docstring); returns what was done.

    Args:
        merged: the merged model (parent 0's structure), modified in place.
        parents: the N >= 2 parents in merge order, never modified (moved to `device` for the forwards and back).
        spec, matches: the parents' spec and one match per group over all N parents (None: unmatched).
        batches: returns a fresh iterable of model-input batches on each call (one pass per step).
        samples: examples read ("auto": `AUTO_SAMPLES`, moments need no more; None: all), a subset chosen by a
            shuffle seeded with `seed`; `total`: how many examples `batches` yields, if known.
        weights: the merge's per-parent weights (None: equal): each target is then the weighted cluster mean.
    """
    started = time.perf_counter()
    report = RepairReport(scope=scope)
    target = torch.device(device) if device is not None else None
    models = (merged, *parents)
    homes = [_home(model) for model in models]
    was_training = [model.training for model in models]
    maps, shares = target_maps(matches, weights, len(parents))
    modules = dict(merged.named_modules())
    layers = repair_layers(merged, spec, scope)
    try:
        for model in models:
            model.eval()
            if target is not None:
                model.to(target)
        with torch.no_grad(), whole_sequences(models):
            if not layers:
                return report
            report.samples = AUTO_SAMPLES if samples == AUTO else samples
            batches = subset_batches(batches, report.samples, seed=seed, total=total)
            first = next(iter(batches()), None)
            if first is None:
                raise CalibrationError(_READ_AGAIN.format(what="no samples"))
            first = batch_to(first, target)
            report.steps = forward_steps(merged, layers, first)
            order = [name for step in report.steps for name in step]
            chains = find_chains(merged, order, first)
            report.chains = [chain.blocks for chain in chains]
            del first
            # The targets: every parent once over the data, every repaired layer's moments at once.
            # Each model's own widths: a size budget widens the merged MLP beyond the parents'.
            parent_moments = [{name: Moments(parent.get_submodule(name).weight.shape[0], target) for name in order}
                              for parent in parents]
            for batch in batches():
                batch = batch_to(batch, target)
                report.examples += _batch_rows(batch)
                for parent, moments in zip(parents, parent_moments):
                    _accumulate(parent, spec, order, batch, moments)
            for index, moments in enumerate(parent_moments):  # overflowed forwards: the data's fault, said now
                for name in order:
                    if not bool(torch.isfinite(moments[name].total).all() and torch.isfinite(moments[name].squares)
                                .all()):
                        raise non_finite_output(name, index)
            storage = Storage()
            replay = BlockReplay(merged, chains, storage, units=True)  # a pass per step: units pay off
            bar = Progress(total=len(report.steps), desc="repair", unit="steps", enabled=progress)
            finished = 0
            try:
                for step in report.steps:
                    moments = {name: Moments(modules[name].weight.shape[0], target) for name in step}
                    with replay.run(finished):
                        for number, batch in enumerate(batches()):
                            replay.batch(number)
                            _accumulate(merged, spec, step, batch_to(batch, target), moments, until=replay.storing)
                    for name in step:
                        if moments[name].samples != parent_moments[0][name].samples:
                            raise CalibrationError(_READ_AGAIN.format(what="other samples"))
                        groups = _out_groups(spec, name)
                        group = groups[0] if groups else None
                        mean_t = target_statistic(maps, group, [m[name].mean for m in parent_moments], shares)
                        std_t = target_statistic(maps, group, [m[name].std for m in parent_moments], shares)
                        report.layers.append(renormalise(modules[name], name, moments[name], mean_t, std_t))
                    finished += len(step)
                    bar.update(1)
            finally:  # the bar too: a Ctrl-C's exit line then gets a line of its own
                bar.close()
                replay.close()
                storage.close()
    finally:
        for model, home, training in zip(models, homes, was_training):
            if target is not None and home is not None:
                model.to(home)
            model.train(training)
    report.seconds = time.perf_counter() - started
    logger.info("REPAIR (%s): %d layers in %d steps on %d examples (%.1f s)", scope, len(report.layers),
                len(report.steps), report.examples, report.seconds)
    return report


def _batch_rows(batch: Mapping[str, Any]) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _home(model: nn.Module) -> torch.device | None:
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    return devices.pop() if len(devices) == 1 else None


__all__ = ["AUTO_SAMPLES", "DEFAULT_SCOPE", "SCOPES", "Moments", "RepairReport", "RepairedLayer", "renormalise",
           "repair_layers", "repair_model", "target_statistic"]
