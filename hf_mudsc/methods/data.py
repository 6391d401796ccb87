"""Same-base methods that read calibration data themselves: `regmean`, `regmean_plusplus` and `fisher`.

They run the parents on the calibration batches (`context.batches`, a fresh pass per call) instead of using the
unit-matching correlation statistics, keep the identity correspondence (fine-tunes of one base), and merge any
number of parents with per-parent `weights`. Definitions and sources: docs/design.md §4.10.

* `regmean` (Jin et al., ICLR 2023): each `nn.Linear` weight is the closed form `(Σ_i w_i G_i')⁻¹ Σ_i w_i G_i' W_i`
  (in torch's transposed layout), G_i the mean Gram of parent i's OWN inputs to that layer over every non-padding
  calibration token, G' its off-diagonal entries times `regmean_scale`; every other tensor (biases, norms,
  embeddings) is the weighted average. The Grams stream into float64 sums (memory flat in the number of samples),
  and each parent's Gram is folded into the system at once (memory flat in the number of parents).
* `regmean_plusplus` (RegMean++, Nguyen et al. 2025; FusionBench `regmean_plusplus`): the same closed form, solved
  block by block in forward order; the Linear inputs of block l are those of each parent's OWN block l fed the
  MERGED model's output of blocks < l (so later blocks see the merge's real inputs, and each block's layers
  still see their parent's own weights inside the block).
* `fisher` (Matena & Raffel, NeurIPS 2022): θ = Σ_i w_i F_i θ_i / Σ_i w_i F_i per entry, F_i the diagonal Fisher of
  parent i on the calibration data under its own predictive distribution (`hf_mudsc.calibrate.fisher`), floored at
  `fisher_epsilon`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hf_mudsc.errors import MergeInputError
from hf_mudsc.methods.registry import MergeMethod, MethodContext, MethodResult, register_method

if TYPE_CHECKING:
    from hf_mudsc.options import MergeOptions

logger = logging.getLogger(__name__)

PAPER_REGMEAN = "https://arxiv.org/abs/2212.09849"
PAPER_REGMEAN_PLUSPLUS = "https://arxiv.org/abs/2508.03121"
PAPER_FISHER = "https://arxiv.org/abs/2111.09832"
# A feature whose summed Gram diagonal is below this share of the largest carried no input energy: its weight
# column cannot change any output on the data, so it keeps the weighted average (the system is singular there).
DEAD_FEATURE = 1e-12
NO_EXAMPLES = ("the calibration data gave no examples (this method reads it once per parent, per block for "
               "regmean_plusplus); pass data that can be read more than once: a list of batches or a datasets.Dataset")


def parent_weights(options: MergeOptions, count: int) -> list[float]:
    """The `weights` option, one per parent (1 each when not given; merge() checks the length)."""
    weights = getattr(options, "weights", None)
    return [1.0] * count if weights is None else [float(w) for w in weights]


class RegMeanSystem:
    """`Σ_i w_i G_i'` and `Σ_i w_i G_i' W_iᵀ` of one Linear layer, parent by parent, then the least-squares solve."""

    def __init__(self, in_features: int, out_features: int) -> None:
        self.lhs = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rhs = torch.zeros(in_features, out_features, dtype=torch.float64)
        self.rows = 0

    def add(self, weight: float, gram: torch.Tensor, matrix: torch.Tensor, scale: float, rows: int) -> None:
        """Fold in one parent: its mean Gram `(in, in)`, its weight matrix `(out, in)`, off-diagonals times `scale`."""
        gram = gram.to(torch.float64).cpu()
        reduced = gram * scale
        reduced.diagonal().copy_(gram.diagonal())
        term = weight * reduced
        self.lhs += term
        self.rhs += term @ matrix.detach().to(torch.float64).cpu().T
        self.rows += rows

    def solve(self, average: torch.Tensor) -> torch.Tensor:
        """The merged `(out, in)` weight; features without input energy keep `average`'s column."""
        lhs, rhs = self.lhs.clone(), self.rhs.clone()
        diagonal = lhs.diagonal()
        dead = diagonal <= DEAD_FEATURE * float(diagonal.abs().max().clamp_min(0))
        if bool(dead.all()):
            return average.clone()
        if bool(dead.any()):
            lhs[dead, :] = 0
            lhs[:, dead] = 0
            lhs[dead, dead] = 1
            rhs[dead] = average.detach().to(torch.float64)[:, dead].T
        factor, info = torch.linalg.cholesky_ex(lhs)
        if int(info) == 0:
            solution = torch.cholesky_solve(rhs, factor)
        else:  # not positive definite (regmean_scale=1 with fewer tokens than features, negative weights)
            solution = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
        return solution.T.contiguous().to(average.dtype)


@dataclass(frozen=True)
class Unit:
    """Linear layers solved together; `own`: the parameters taken from the parent being measured (None = the whole
    parent model runs); `stop_after`: a module whose output ends each forward (nothing later is needed)."""

    layers: tuple[str, ...]
    own: tuple[str, ...] | None = None
    stop_after: str | None = None


def transformer_blocks(model: nn.Module) -> list[str]:
    """The blocks of every stack in the model: children of an `nn.ModuleList` that each hold an `nn.Linear`
    (outermost stacks only): `bert.encoder.layer.3`, `vit.layers.3`, CLIP's `text_model.encoder.layers.3`."""
    blocks: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(b + ".") for b in blocks):
            continue
        children = list(module.named_children())
        if children and all(any(isinstance(m, nn.Linear) for m in child.modules()) for _, child in children):
            blocks.extend(f"{name}.{child}" if name else child for child, _ in children)
    return blocks


def firing_order(model: nn.Module, layers: Sequence[str], batch: Mapping[str, Any]) -> list[str]:
    """`layers` in the order their forwards first run on `batch` (layers that never run are left out)."""
    from hf_mudsc.calibrate.layer_inputs import forward_inputs

    modules = dict(model.named_modules())
    fired: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in fired:
                fired.append(name)
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    try:
        with torch.no_grad():
            model(**forward_inputs(model, batch))
    finally:
        for handle in handles:
            handle.remove()
    return fired


def chained_units(model: nn.Module, layers: Sequence[str], batch: Mapping[str, Any],
                  parameters: Iterable[str]) -> list[Unit]:
    """RegMean++'s solve order: one unit per transformer block, in forward order; Linear layers outside every block
    (a pooler, a projection, the classifier) form one unit per consecutive run. Layers that never run are left out."""
    blocks = transformer_blocks(model)
    names = list(parameters)

    def block_of(layer: str) -> str | None:
        return next((b for b in blocks if layer.startswith(b + ".")), None)

    runs: list[tuple[str | None, list[str]]] = []
    for layer in firing_order(model, layers, batch):
        key = block_of(layer)
        if runs and runs[-1][0] == key:
            runs[-1][1].append(layer)
        else:
            runs.append((key, [layer]))
    units = []
    for key, run in runs:
        if key is not None:
            own = tuple(n for n in names if n.startswith(key + "."))
        else:
            own = tuple(n for n in names if n.rsplit(".", 1)[0] in run)
        units.append(Unit(tuple(run), own, key))
    return units


def _write(model: nn.Module, values: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(values[name].to(params[name]))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass(frozen=True)
class RegMeanMethod(MergeMethod):
    """RegMean, or with `chained` RegMean++ (module docstring)."""

    chained: bool = False
    num_parents: int | None = None
    needs_data: bool = True

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        return {"weights": options.weights, "regmean_scale": options.regmean_scale}

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        from hf_mudsc.calibrate.layer_inputs import collect_grams, linear_layers, padding_mask_key
        from hf_mudsc.solve.task_vectors import linear

        parents = list(context.parents)
        weights = parent_weights(context.options, len(parents))
        scale = float(context.options.regmean_scale)
        merged = linear(None, parents, weights, normalize=True)  # every tensor; Linear weights are solved below
        first = context.models[0]
        # Only layers whose weight the method merges (a concatenated classifier is left to the pipeline).
        layers = [name for name in linear_layers(first) if f"{name}.weight" in parents[0]]
        modules = dict(first.named_modules())
        mask_keys = {name: padding_mask_key(context.spec, f"{name}.weight") for name in layers}
        working: nn.Module | None = None
        if self.chained:
            batch = next(iter(context.batches()), None)
            working = copy.deepcopy(first).eval()
            _write(working, merged, [n for n in merged if n in dict(working.named_parameters())])
            if batch is None:
                raise MergeInputError(f"{self.name}: {NO_EXAMPLES}")
            units = chained_units(working, layers, batch, merged)
            unreached = [name for name in layers if not any(name in unit.layers for unit in units)]
            if unreached:
                logger.warning("%s: %d linear layer(s) never ran on the calibration data; their weights are the "
                               "weighted average: %s", self.name, len(unreached), ", ".join(unreached))
        else:
            units = [Unit(tuple(layers))]
        device = torch.device(context.device)
        examples = 0
        for unit in units:
            systems = {name: RegMeanSystem(modules[name].in_features, modules[name].out_features)
                       for name in unit.layers}
            for index, parent in enumerate(parents):
                if working is None:
                    model = context.models[index]
                else:
                    _write(working, parent, unit.own or ())
                    model = working
                home = _device_of(model)
                training = model.training
                try:
                    model.eval().to(device)
                    grams, examples = collect_grams(model, unit.layers, context.batches, mask_keys=mask_keys,
                                                    stop_after=unit.stop_after, device=device)
                finally:
                    model.to(home).train(training)
                if not examples:
                    raise MergeInputError(f"{self.name}: {NO_EXAMPLES}")
                for name in unit.layers:
                    systems[name].add(weights[index], grams[name].mean(), parent[f"{name}.weight"], scale,
                                      grams[name].rows)
            for name in unit.layers:
                key = f"{name}.weight"
                if systems[name].rows == 0:
                    logger.warning("%s: layer %s received no calibration inputs; its weight is the weighted "
                                   "average", self.name, name)
                    continue
                merged[key] = systems[name].solve(merged[key])
            if working is not None:
                _write(working, merged, unit.own or ())
        return MethodResult(parameters=merged, matches=[None] * len(context.spec.groups),
                            calibration_examples=examples)


@dataclass(frozen=True)
class FisherMethod(MergeMethod):
    """Fisher-weighted averaging (module docstring)."""

    num_parents: int | None = None
    needs_data: bool = True

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        return {"weights": options.weights, "fisher_epsilon": options.fisher_epsilon}

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        from hf_mudsc.calibrate.fisher import diagonal_fisher

        parents = list(context.parents)
        weights = parent_weights(context.options, len(parents))
        floor = float(context.options.fisher_epsilon)
        names = [name for name, value in parents[0].items() if value.is_floating_point()]
        numerator = {name: torch.zeros(parents[0][name].shape, dtype=torch.float64) for name in names}
        denominator = {name: torch.zeros(parents[0][name].shape, dtype=torch.float64) for name in names}
        device = torch.device(context.device)
        examples = 0
        for index, (parent, model) in enumerate(zip(parents, context.models)):
            home = _device_of(model)
            try:
                model.to(device)
                fisher, examples = diagonal_fisher(model, context.batches, names, device=device,
                                                   progress=context.progress)
            finally:
                model.to(home)
            if not examples:
                raise MergeInputError(f"{self.name}: {NO_EXAMPLES}")
            for name in names:
                share = weights[index] * fisher[name].clamp_min(floor)
                numerator[name] += share * parent[name].to(torch.float64)
                denominator[name] += share
        parameters = {name: value.clone() for name, value in parents[0].items()}
        for name in names:
            parameters[name] = (numerator[name] / denominator[name]).to(parents[0][name].dtype)
        return MethodResult(parameters=parameters, matches=[None] * len(context.spec.groups),
                            calibration_examples=examples)


REGMEAN = register_method(RegMeanMethod(
    name="regmean",
    pretty_name="RegMean (regression mean)",
    paper=PAPER_REGMEAN,
    description="Each linear layer solved in closed form from every parent's input Gram matrices on the calibration "
    "data; other tensors averaged. For fine-tunes of one base.",
))
REGMEAN_PLUSPLUS = register_method(RegMeanMethod(
    name="regmean_plusplus",
    pretty_name="RegMean++ (regression mean, merged-model inputs)",
    paper=PAPER_REGMEAN_PLUSPLUS,
    description="RegMean solved block by block, each block's inputs taken from the merged model's earlier blocks. "
    "For fine-tunes of one base.",
    chained=True,
))
FISHER = register_method(FisherMethod(
    name="fisher",
    pretty_name="Fisher merging",
    paper=PAPER_FISHER,
    description="Each parameter averaged with the weights of every parent's diagonal Fisher information on the "
    "calibration data (no labels needed). For fine-tunes of one base.",
))
