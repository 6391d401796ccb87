"""RegMean's closed form accumulated parent by parent, and RegMean++'s solve order (docs/design.md §4.11).

Used by the `regmean` / `regmean_plusplus` merge methods (`hf_mudsc/methods/data.py`), which stay torch-free at
import so `hf-mudsc merge --help` lists them without loading torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_mudsc.calibrate.layer_inputs import first_inputs

# A feature whose summed Gram diagonal is below this share of the largest carried no input energy: its weight
# column cannot change any output on the data, so it keeps the weighted average (the system is singular there).
DEAD_FEATURE = 1e-12
# A Cholesky pivot (the input energy of a feature that the features before it do not explain) at most this share of
# the feature's own energy: the feature is, to rounding, a combination of the others (two equal inputs, or fewer
# samples than features), so the system is singular although the factorisation went through on rounding noise, and
# its solve would split the fitted weight between those features by that noise. Such a system is solved as a singular
# one. With regmean_scale r < 1 every pivot is at least (1 - r) of its feature's energy, so only r near 1 reaches it.
# Rounding leaves pivots of 1e-17 to 1e-15 of the energy (float64); 1e-11 catches them with a margin while a system
# that is merely ill-conditioned (condition number up to ~1e11, which float64 still solves: the least-squares path
# gives the same answer ~25x slower) stays on Cholesky.
SINGULAR_PIVOT = 1e-11


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
        """The merged `(out, in)` weight; features without input energy keep `average`'s column, and a singular
        system takes the least-squares solution nearest `average`."""
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
        if int(info) == 0 and bool((factor.diagonal().square() > SINGULAR_PIVOT * lhs.diagonal()).all()):
            solution = torch.cholesky_solve(rhs, factor)
        else:
            # Singular (regmean_scale=1 with fewer samples than features or equal input features: Cholesky fails
            # or leaves a pivot at rounding level, `SINGULAR_PIVOT`): of the least-squares solutions, the one
            # closest to the weighted average — directions the data leaves free keep the average, as dead features
            # do. (The paper and FusionBench invert and define nothing here: this is hf_mudsc's choice.)
            start = average.detach().to(torch.float64).T
            solution = start + torch.linalg.lstsq(lhs, rhs - lhs @ start, driver="gelsd").solution
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
    return [name for name, _ in first_inputs(model, layers, batch)]

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


def write_parameters(model: nn.Module, values: Mapping[str, torch.Tensor], names: Iterable[str]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(values[name].to(params[name]))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
