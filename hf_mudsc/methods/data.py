"""Same-base methods that read calibration data themselves: `regmean`, `regmean_plusplus` and `fisher`.

They run the parents on the calibration batches (`context.batches`, a fresh pass per call) instead of using the
unit-matching correlation statistics, keep the identity correspondence (fine-tunes of one base), and merge any
number of parents with per-parent `weights`. Definitions and sources: docs/design.md §4.11.

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
  `fisher_epsilon` (`max`, every parent; no normalisation): `hf_mudsc.solve.task_vectors.fisher_average`'s
  definition, summed one parent at a time.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_mudsc.errors import MergeInputError
from hf_mudsc.methods.registry import MergeMethod, MethodContext, MethodResult, PassFacts, register_method
from hf_mudsc.progress import Progress

if TYPE_CHECKING:
    from hf_mudsc.options import MergeOptions

logger = logging.getLogger(__name__)

PAPER_REGMEAN = "https://arxiv.org/abs/2212.09849"
PAPER_REGMEAN_PLUSPLUS = "https://arxiv.org/abs/2508.03121"
PAPER_FISHER = "https://arxiv.org/abs/2111.09832"
# The dry run's cost of one class's gradient of one example and its squared sum, per parameter, in matmul FLOPs: a
# dense gradient of every parameter (the embedding tables too) and a fused multiply-add into its sum, memory-bound.
# Measured on MiniLM with a 3-class head, one thread: ~4 ns per parameter and class (10.9 s for one parent's pass
# over 32 examples, of which the forwards and backwards are ~2 s) at 117 GFLOP/s matmul (docs/design.md, "Dry run").
FISHER_FLOPS_PER_PARAMETER = 500.0
NO_EXAMPLES = ("the calibration data gave no examples (this method reads it once per parent, per block for "
               "regmean_plusplus); pass data that can be read more than once: a list of batches or a datasets.Dataset")


def parent_weights(options: MergeOptions, count: int) -> list[float]:
    """The `weights` option, one per parent (1 each when not given; merge() checks the length)."""
    weights = getattr(options, "weights", None)
    return [1.0] * count if weights is None else [float(w) for w in weights]


def check_shares(name: str, options: MergeOptions) -> None:
    """Refuse weights that are no shares: RegMean minimises sum_i w_i ||X_i W - X_i W_i||^2 (a negative weight asks
    for a maximum; all zero, nothing to fit) and Fisher averages with w_i F_i (negative ones can cancel to 0/0)."""
    from hf_mudsc.errors import option_hint

    weights = options.weights
    if weights is not None and (any(not w >= 0 for w in weights) or not sum(weights) > 0):
        raise MergeInputError(f"{option_hint('weights')} of {name} must be >= 0 with a positive sum (each parent's "
                              f"share; 0 leaves a parent out), got {list(weights)}")


@dataclass(frozen=True)
class RegMeanMethod(MergeMethod):
    """RegMean, or with `chained` RegMean++ (module docstring)."""

    chained: bool = False
    num_parents: int | None = None
    needs_data: bool = True

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        return {"weights": options.weights, "regmean_scale": options.regmean_scale}

    def data_pass_flops(self, facts: PassFacts, parents: int) -> float:
        """Each parent's forward and every linear layer's float64 input Gram; chained (RegMean++), each parent runs
        from the input up to block l for every block l, `(blocks + 1) / 2` forwards (no block is replayed)."""
        forwards = (facts.blocks + 1) / 2 if self.chained else 1.0
        return parents * (forwards * facts.forward + facts.grams)

    def working_bytes(self, facts: PassFacts, parents: int) -> float:
        """The weighted average of every tensor (float32), each solved layer's float64 system (`in x in` and
        `in x out`: `RegMeanSystem`) and one parent's float64 `in x in` Grams (`collect_grams`; a parent's are
        freed once folded into the systems, before the next parent's pass). RegMean holds every layer's at once
        (flat in the number of parents); RegMean++ holds one unit's (a block, or the layers outside every block)
        and a working copy of parent A."""
        systems: dict[int | None, float] = {}
        grams: dict[int | None, float] = {}
        for inputs, outputs, block in facts.layers:
            key = block if self.chained else 0
            systems[key] = systems.get(key, 0.0) + 8.0 * inputs * (inputs + outputs)
            grams[key] = grams.get(key, 0.0) + 8.0 * inputs * inputs
        units = list(systems)
        if self.chained:  # the blocks in order, then the layers outside every block (`chained_units`)
            units = [key for key in units if key is not None] + [key for key in units if key is None]
        peak = max(systems[unit] + grams[unit] for unit in units) if units else 0.0
        return (8.0 if self.chained else 4.0) * facts.parameters + peak

    def check_options(self, options: MergeOptions, num_parents: int) -> None:
        check_shares(self.name, options)

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        import torch

        from hf_mudsc.calibrate.layer_inputs import collect_grams, linear_layers, padding_mask_key
        from hf_mudsc.heap import release_free_heap
        from hf_mudsc.solve.regmean import RegMeanSystem, Unit, chained_units, device_of, write_parameters
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
        working = None
        if self.chained:
            batch = next(iter(context.batches()), None)
            working = copy.deepcopy(first).eval()
            write_parameters(working, merged, [n for n in merged if n in dict(working.named_parameters())])
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
        with Progress(desc=self.name, unit="passes", total=len(units) * len(parents),
                      enabled=context.progress) as bar:
            for unit in units:
                systems = {name: RegMeanSystem(modules[name].in_features, modules[name].out_features)
                           for name in unit.layers}
                for index, parent in enumerate(parents):
                    if working is None:
                        model = context.models[index]
                    else:
                        write_parameters(working, parent, unit.own or ())
                        model = working
                    home = device_of(model)
                    training = model.training
                    try:
                        model.eval().to(device)
                        grams, examples = collect_grams(model, unit.layers, context.batches, mask_keys=mask_keys,
                                                        stop_after=unit.stop_after, device=device)
                    finally:
                        model.to(home).train(training)
                    bar.update()
                    if not examples:
                        raise MergeInputError(f"{self.name}: {NO_EXAMPLES}")
                    for name in unit.layers:
                        systems[name].add(weights[index], grams[name].mean(), parent[f"{name}.weight"], scale,
                                          grams[name].rows)
                    del grams  # folded into the systems: freed before the next parent's pass accumulates its own,
                    release_free_heap()  # and handed back (glibc would keep the pages: measured +0.6 GB on BERT-base)
                for name in unit.layers:
                    key = f"{name}.weight"
                    if systems[name].rows == 0:
                        logger.warning("%s: layer %s received no calibration inputs; its weight is the weighted "
                                       "average", self.name, name)
                        continue
                    merged[key] = systems[name].solve(merged[key])
                if working is not None:
                    write_parameters(working, merged, unit.own or ())
        return MethodResult(parameters=merged, matches=[None] * len(context.spec.groups),
                            calibration_examples=examples)


@dataclass(frozen=True)
class FisherMethod(MergeMethod):
    """Fisher-weighted averaging (module docstring)."""

    num_parents: int | None = None
    needs_data: bool = True
    needs_classifier: bool = True
    needs_gradients: bool = True

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        return {"weights": options.weights, "fisher_epsilon": options.fisher_epsilon}

    def data_pass_flops(self, facts: PassFacts, parents: int) -> float:
        """Per parent and example (run alone): a forward, then per class a backward (about two forwards) and the
        squared gradient summed into every parameter (`hf_mudsc.calibrate.fisher.diagonal_fisher`): memory-bound
        work, counted as `FISHER_FLOPS_PER_PARAMETER` matmul FLOPs per parameter and class."""
        return parents * ((1 + 2 * facts.classes) * facts.forward
                          + FISHER_FLOPS_PER_PARAMETER * facts.classes * facts.parameters)

    def working_bytes(self, facts: PassFacts, parents: int) -> float:
        """Per parameter: the float64 numerator and denominator (16 bytes), the last parent's float64 Fisher while
        the next one's is summed (16), the batch's float32 sums (4) and two classes' gradients (8: the last one's
        are held while the next are computed) — `diagonal_fisher`."""
        return 44.0 * facts.parameters

    def check_options(self, options: MergeOptions, num_parents: int) -> None:
        check_shares(self.name, options)

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        import torch

        from hf_mudsc.calibrate.fisher import diagonal_fisher
        from hf_mudsc.solve.regmean import device_of
        from hf_mudsc.solve.task_vectors import fisher_share

        parents = list(context.parents)
        weights = parent_weights(context.options, len(parents))
        floor = float(context.options.fisher_epsilon)
        names = [name for name, value in parents[0].items() if value.is_floating_point()]
        numerator = {name: torch.zeros(parents[0][name].shape, dtype=torch.float64) for name in names}
        denominator = {name: torch.zeros(parents[0][name].shape, dtype=torch.float64) for name in names}
        device = torch.device(context.device)
        examples = 0
        for index, (parent, model) in enumerate(zip(parents, context.models)):
            home = device_of(model)
            try:
                model.to(device)
                fisher, examples = diagonal_fisher(model, context.batches, names, device=device,
                                                   progress=context.progress)
            finally:
                model.to(home)
            if not examples:
                raise MergeInputError(f"{self.name}: {NO_EXAMPLES}")
            for name in names:
                share = fisher_share(fisher[name], weights[index], floor)
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
