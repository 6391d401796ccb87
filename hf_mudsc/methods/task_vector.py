"""Same-base, tensor-wise merge methods: mergekit's task-vector family, the seed list's dataless methods, SLERP and
layer swapping — each a registry entry around a pure function of `hf_mudsc.solve.task_vectors`.

The arithmetic lives in `hf_mudsc.solve.task_vectors` (checked against mergekit 0.1.5; facts and citations in
docs/research/same_base_facts.md). An entry here says what the function needs (a base, how many parents), which
`MergeOptions` it reads and under which keyword, and the defaults of those left unset (`None`): mergekit's
`normalize` per method, and `density` as the method's paper or FusionBench publishes it (mergekit's own default
is 1.0 — no sparsification at all, which would make `ties` plain sign election and `breadcrumbs` plain task
arithmetic). `used_options` returns the values actually used, so the config and card record exactly those.

Tensor-wise methods read each parent's tensor only while merging it (`streams=True`): given
`hf_mudsc.load.lazy.LazyParameters` parents, memory stays at about one model however many parents there are. Big
tensors of the `chunked=True` entries are merged in row chunks (`hf_mudsc.solve.streamed`), so neither do the
N-sized intermediates of one tensor (stacked task vectors, masks ...) grow with the number of parents.
`localize_stitch` ranks entries over the whole model: its streaming form finds each parent's threshold one parent at
a time, then stitches tensor by tensor. `pcb`'s balancing couples every entry of every parent over the whole
model: it reads every tensor of every parent at once.

When the parents' label sets differ, the pipeline leaves the classifier out of `context.parents` and concatenates
the heads itself (`builds_concatenated_head=False`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_mudsc.methods.registry import MergeMethod, MethodContext, MethodResult, register_method

if TYPE_CHECKING:
    from hf_mudsc.options import MergeOptions

PAPER_TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
PAPER_TIES = "https://arxiv.org/abs/2306.01708"
PAPER_DARE = "https://arxiv.org/abs/2311.03099"
PAPER_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
PAPER_DELLA = "https://arxiv.org/abs/2406.11617"
PAPER_SOUPS = "https://arxiv.org/abs/2203.05482"
PAPER_SLERP = "https://github.com/arcee-ai/mergekit"  # mergekit's SLERP (Shoemake 1985 applied to weights)
PAPER_PCB = "https://arxiv.org/abs/2410.02396"
PAPER_TALL = "https://arxiv.org/abs/2405.07813"
PAPER_LOCALIZE_STITCH = "https://arxiv.org/abs/2408.13656"
PAPER_LAYER_SWAP = "https://arxiv.org/abs/2410.01335"


@dataclass(frozen=True)
class TensorWiseMethod(MergeMethod):
    """A same-base method: `function(base, parents, weights, **keywords)` from `hf_mudsc.solve.task_vectors`.

    `arguments`: (option, keyword) pairs — which `MergeOptions` fields the method reads and the function keyword
    each becomes (`weights` is passed positionally). `defaults`: (option, value) pairs used where the option is
    None (unset). `streams`: the function reads one tensor name at a time across the parents. `chunked`: big
    tensors are merged in row chunks by `hf_mudsc.solve.streamed` (the function is one of `GTA_FORMS` or elementwise
    across a tensor), so the working set does not grow with the number of parents either. `streamed_function`: a
    whole-model method's streaming form (`hf_mudsc.solve.streamed`, called with `source=`), used instead of
    `function` when set.
    """

    function: Callable[..., dict[str, Any]] | None = None
    arguments: tuple[tuple[str, str], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    streams: bool = True
    num_parents: int | None = None
    chunked: bool = False
    streamed_function: Callable[..., dict[str, Any]] | None = None

    def option_value(self, options: MergeOptions, name: str) -> Any:
        """The value the method uses for option `name`: the user's, else the method's default."""
        value = getattr(options, name)
        return dict(self.defaults).get(name) if value is None else value

    def used_options(self, options: MergeOptions) -> dict[str, Any]:
        """Exactly the options this method reads, with the values it uses (the config and card record these)."""
        return {name: self.option_value(options, name) for name, _ in self.arguments}

    def check_options(self, options: MergeOptions, num_parents: int) -> None:
        """Refuse option values this method cannot use with `num_parents` parents (one line each)."""
        from hf_mudsc.errors import MergeInputError, option_hint
        from hf_mudsc.option_values import parse_layer_swap

        read = dict(self.arguments)
        if "layer_swap" in read:
            text = self.option_value(options, "layer_swap")
            if text is None:
                raise MergeInputError(f"method {self.name!r} needs the blocks to take from each parent: "
                                      f"{option_hint('layer_swap')}, e.g. '1:0-5' (parent 1's blocks 0 to 5)")
            wrong = sorted({p for p in parse_layer_swap(text).values() if p >= num_parents})
            if wrong:
                raise MergeInputError(f"layer_swap {text!r} names parent {wrong[0]}, but there are {num_parents} "
                                      f"parents (0 to {num_parents - 1}) {option_hint('layer_swap')}")
        k = self.option_value(options, "consensus_k") if "consensus_k" in read else None
        if k is not None and k > num_parents:
            raise MergeInputError(f"consensus_k {k} asks more tasks to agree than the {num_parents} parents have: "
                                  "every task-vector entry would be dropped and the merge would be the base; give 0 "
                                  f"to {num_parents}, {option_hint('consensus_k')}")
        if k is not None and num_parents >= 2 and k == num_parents:
            tall = self.option_value(options, "consensus_lambda")
            # every mask |tau_t| > L|S - tau_t| (S = sum of the task vectors, unweighted) squared gives
            # 2 S tau_t > S^2 for L >= 1; summed over t, 0 > (N - 2) S^2: never, for any N and any weights
            if tall >= 1:
                masks = ("both TALL masks (|tau_1| > L·|tau_2| and |tau_2| > L·|tau_1|)" if num_parents == 2
                         else f"all {num_parents} TALL masks (|tau_t| > L·|tau_sum - tau_t| for every t)")
                raise MergeInputError(
                    f"consensus_lambda {tall:g} with {num_parents} parents and consensus_k {k} keeps no entry: "
                    f"{masks} hold together only for L < 1, so the merge would be the base; give a value below 1 "
                    f"(0.6 is FusionBench's), {option_hint('consensus_lambda')}"
                    + (f", or {option_hint('consensus_k')} below {num_parents}" if num_parents > 2 else ""))
        if "weights" in read:
            self._check_weight_factors(options)
        if "epsilon" in read:
            self._check_keep_probabilities(options, num_parents)
        if read.get("density") == "sparsity":
            density = self.option_value(options, "density")
            if isinstance(density, Sequence):
                raise MergeInputError(f"method {self.name!r} keeps one share of entries for every parent: give "
                                      f"one number, not {len(density)}, {option_hint('density')}")

    def option_warnings(self, options: MergeOptions, num_parents: int) -> list[str]:
        """Breadcrumbs keeps `density` of the entries first (mergekit's `magnitude_outliers`): when density + gamma
        > 1 the two do not fit, and only the largest 1 - density are dropped (none at density 1), not gamma's share
        — which `--gamma`'s help promises — while the config records gamma as given."""
        from hf_mudsc.errors import option_hint, parent_label

        if "gamma" not in dict(self.arguments):
            return []

        def each(name: str) -> list[float]:
            value = self.option_value(options, name)
            return list(value) if isinstance(value, Sequence) else [value] * num_parents

        per_parent = isinstance(options.density, Sequence) or isinstance(options.gamma, Sequence)
        crowded: dict[tuple[float, float], list[str]] = {}
        for index, (density, gamma) in enumerate(zip(each("density"), each("gamma"))):
            if gamma > 0 and density + gamma > 1 + 1e-9:
                crowded.setdefault((density, gamma), []).append(parent_label(index))
        texts = []
        for (density, gamma), parents in crowded.items():
            dropped = ("none of each task vector's largest entries are dropped" if density >= 1
                       else f"only the largest {100 * (1 - density):.3g}% of each task vector's entries are dropped")
            whose = f" (parent{'s' if len(parents) > 1 else ''} {', '.join(parents)})" if per_parent else ""
            texts.append(f"method {self.name}: density {density:g} + gamma {gamma:g} > 1{whose}, so {dropped}, not "
                         f"gamma's {100 * gamma:.3g}% — the density kept comes first (mergekit); give density + "
                         f"gamma <= 1 ({option_hint('density')}, {option_hint('gamma')}) to drop gamma's share")
        return texts

    def _check_weight_factors(self, options: MergeOptions) -> None:
        """The weights are factors on a task vector (on a parent for `linear`), like `scaling` — divided by their
        sum with `normalize` (per entry when the method `elects_signs`: not known before the tensors are read, so not
        checked): the factors must stay within ±`FACTOR_LIMIT` (1e30 wrote weights of 3e29), and a sum to divide by
        must be at least `WEIGHT_SUM_FLOOR` in magnitude — below it mergekit 0.1.5 silently skips the division
        (`|divisor| < 1e-8 → 1`), and linear divided by 0."""
        from hf_mudsc.errors import MergeInputError, option_hint
        from hf_mudsc.option_values import FACTOR_LIMIT, WEIGHT_SUM_FLOOR

        read = dict(self.arguments)
        weights = self.option_value(options, "weights")
        normalized = "normalize" in read and self.option_value(options, "normalize")
        self._check_not_all_zero(options, weights, normalized)
        if not weights or (normalized and self.elects_signs):
            return
        total = sum(weights) if normalized else 1.0
        if abs(total) < WEIGHT_SUM_FLOOR:
            raise MergeInputError(
                f"method {self.name!r}: weights {weights} sum to {total:g}, and normalize divides by their sum "
                f"(mergekit skips the division below {WEIGHT_SUM_FLOOR:g}, leaving them unnormalised); give "
                f"{option_hint('weights')} whose sum is at least {WEIGHT_SUM_FLOOR:g} in magnitude, or "
                f"{option_hint('normalize')} False")
        scaling = self.option_value(options, "scaling") if "scaling" in read else 1.0
        factors = [w * scaling / total for w in weights]
        worst = max(factors, key=abs)
        if abs(worst) > FACTOR_LIMIT:
            what = "a task vector" if self.needs_base_model else "a parent"
            times = f" times scaling {scaling:g}" if "scaling" in read else ""
            divided = f"divided by their sum {total:g}" if normalized else "they are not divided by their sum"
            raise MergeInputError(
                f"method {self.name!r}: weights {weights}{times} scale {what} by {worst:g}, beyond ±{FACTOR_LIMIT:g} "
                f"({divided}); give smaller {option_hint('weights')}"
                + (f" or {option_hint('scaling')}" if "scaling" in read else "")
                + (f", or {option_hint('normalize')} {not normalized}" if "normalize" in read else ""))

    def _check_not_all_zero(self, options: MergeOptions, weights: Sequence[float] | None, normalized: bool) -> None:
        """Every weight 0, or `scaling` 0, multiplies every task vector by 0: mergekit silently returns the base
        (`linear` without normalize, a model of zeros; with it, the zero sum is refused by the caller). One weight
        of 0 stays allowed: it leaves that parent out."""
        from hf_mudsc.errors import MergeInputError, option_hint

        result = "the merge would be the base" if self.needs_base_model else "the merge would be all zeros"
        # with normalize (not per entry), weights all 0 sum to 0: the caller refuses that sum as one it cannot divide by
        if weights and all(w == 0 for w in weights) and not (normalized and not self.elects_signs):
            left_out = ("every parent's task vector is left out" if self.needs_base_model
                        else "every parent is multiplied by 0")
            shown = ", ".join(f"{w:g}" for w in weights)
            raise MergeInputError(
                f"method {self.name!r}: weights [{shown}] are all 0: {left_out} and {result}; give at least "
                f"one nonzero {option_hint('weights')} (a 0 leaves just that parent out)")
        if "scaling" in dict(self.arguments) and self.option_value(options, "scaling") == 0:
            raise MergeInputError(
                f"method {self.name!r}: scaling 0 multiplies the merged task vector by 0, so {result}; give a "
                f"nonzero {option_hint('scaling')} (1 adds it whole)")

    def _check_keep_probabilities(self, options: MergeOptions, num_parents: int) -> None:
        """DELLA keeps an entry with a probability from density - epsilon to density + epsilon (mergekit's
        `della_magprune`): both ends must lie inside (0, 1) for every parent whose density is below 1."""
        from hf_mudsc.errors import MergeInputError, option_hint

        def each(name: str, default: float) -> list[float]:  # one per parent (a wrong length is refused elsewhere)
            value = self.option_value(options, name)
            values = [default] if value is None else list(value) if isinstance(value, Sequence) else [value]
            return values * num_parents if len(values) == 1 else values

        for density, epsilon in zip(each("density", 1.0), each("epsilon", 0.15)):
            if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
                raise MergeInputError(
                    f"method {self.name!r}: density {density:g} ± epsilon {epsilon:g} leaves "
                    f"({density - epsilon:g}, {density + epsilon:g}), not inside (0, 1) — keep probabilities must be "
                    f"probabilities; give a smaller epsilon than min(density, 1 - density), "
                    f"{option_hint('epsilon')}, or another {option_hint('density')}")

    def check_shapes(self, options: MergeOptions, shapes: Callable[[], Mapping[str, tuple[int, ...]]]) -> None:
        """Refuse, from parent A's shapes and before any weights are read, a `density` with which the method's
        sparsifier keeps no entry of even the largest tensor (`task_vectors.check_density_keeps`), and `layer_swap`
        blocks the model (or one of its towers) does not have."""
        if self._unfloored_sparsifier() is not None:
            self._check_kept_entries(self.option_value(options, "density"),
                                     max((math.prod(shape) for shape in shapes().values()), default=0))
        if "layer_swap" in dict(self.arguments) and options.layer_swap is not None:
            _check_blocks(self.keywords(options)["blocks"], shapes().keys(), options.layer_swap)
        if self.name in ("pcb", "localize_stitch"):  # they rank a whole model's entries: counted from its shapes
            self._check_whole_model_keeps(options, sum(math.prod(shape) for shape in shapes().values()))

    def _check_whole_model_keeps(self, options: MergeOptions, entries: int) -> None:
        """PCB's `pcb_ratio` / Localize-and-Stitch's `density` that keeps no entry of the whole model's task vector,
        refused before any weights are read (`entries` counts every tensor: at least the float ones the method
        ranks, so nothing it would keep is refused)."""
        from hf_mudsc.errors import MergeInputError
        from hf_mudsc.solve import task_vectors as tv

        keywords = self.keywords(options)
        try:
            if self.name == "pcb":
                tv.check_pcb_keeps(float(keywords["pcb_ratio"]), entries)
            else:
                shares = keywords["sparsity"]
                for share in shares if isinstance(shares, list) else [shares]:
                    tv.check_stitch_keeps(float(share), entries)
        except ValueError as error:
            raise MergeInputError(f"{self.name}: {error}") from None

    @property
    def elects_signs(self) -> bool:
        """The function elects a sign per entry (TIES consensus, `task_vectors.GTA_FORMS`), so with `normalize` it
        divides each entry by the sum of its agreeing parents' weights; otherwise by the sum of all the weights."""
        from hf_mudsc.solve import task_vectors as tv

        return tv.GTA_FORMS.get(getattr(self.function, "__name__", ""), (None, False))[1]

    def _unfloored_sparsifier(self) -> str | None:
        """The method's sparsifier when it may keep no entry of a tensor (`task_vectors.UNFLOORED_SPARSIFIERS`:
        Breadcrumbs, DARE, DELLA), else None."""
        from hf_mudsc.solve import task_vectors as tv

        sparsify, _ = tv.GTA_FORMS.get(getattr(self.function, "__name__", ""), (None, False))
        return sparsify if sparsify in tv.UNFLOORED_SPARSIFIERS and "density" in dict(self.arguments) else None

    def _check_kept_entries(self, density: Any, entries: int) -> None:
        """`task_vectors.check_density_keeps` for the density (one, or one per parent) and the largest tensor's
        `entries`, as a one-line `MergeInputError` naming the method (and the parent, for a per-parent density)."""
        from hf_mudsc.errors import MergeInputError, parent_label
        from hf_mudsc.solve import task_vectors as tv

        sparsify = self._unfloored_sparsifier()
        each = density if isinstance(density, Sequence) else None
        try:
            for index, value in enumerate(each if each is not None else [density]):
                tv.check_density_keeps(sparsify, float(value), entries,
                                       f"parent {parent_label(index)}" if each is not None else None)
        except ValueError as error:
            raise MergeInputError(f"method {self.name!r}: {error}") from None

    def keywords(self, options: MergeOptions) -> dict[str, Any]:
        """The function's keyword arguments for these options."""
        from hf_mudsc.option_values import parse_layer_swap

        out: dict[str, Any] = {}
        for name, keyword in self.arguments:
            if name == "weights":
                continue
            value = self.option_value(options, name)
            if name == "layer_swap":
                value = parse_layer_swap(value)
            if isinstance(value, Sequence) and not isinstance(value, str):
                value = [float(v) for v in value]
            out[keyword] = value
        return out

    def merge_tensor_by_tensor(self, context: MethodContext, weights: Any, keywords: dict[str, Any]
                               ) -> dict[str, Any]:
        """The method's function called on one tensor name at a time: a streaming method's definition is per
        tensor (TIES trims, DARE draws its masks seeded by the tensor's name, ...), so this equals one call on
        whole state dicts, while only one tensor of each parent (read lazily from its file) is held at a time."""
        parameters: dict[str, Any] = {}
        for name in _names_in_order(context.parents):
            if self.chunked:
                merged = self.merge_in_chunks(context, name, weights, keywords)
                if merged is not None:
                    parameters[name] = merged
                    continue
            parents = [{name: parent[name]} if name in parent else {} for parent in context.parents]
            base = None if context.base is None else ({name: context.base[name]} if name in context.base else {})
            parameters.update(self.function(base, parents, weights, **keywords))
        return parameters

    def merge_in_chunks(self, context: MethodContext, name: str, weights: Any, keywords: dict[str, Any]) -> Any:
        """Tensor `name` merged in row chunks (`hf_mudsc.solve.streamed.merge_tensor`), or None for a tensor that
        is not chunked (small, 1-D, ...: the caller merges it whole)."""
        from hf_mudsc.solve import streamed

        base = context.base if self.needs_base_model else None
        return streamed.merge_tensor(self.function.__name__, name, _source(base, name),
                                     [_source(parent, name) for parent in context.parents], weights, keywords)

    def merge_parameters(self, context: MethodContext) -> MethodResult:
        from hf_mudsc.errors import MergeInputError, option_hint

        if self.function is None:
            raise NotImplementedError(f"merge method {self.name!r} has no function")
        self.check_options(context.options, len(context.parents))
        if self.needs_base_model and context.base is None:
            raise MergeInputError(f"method {self.name!r} needs the parents' common base model: "
                                  f"{option_hint('base')}")
        keywords = self.keywords(context.options)
        if self._unfloored_sparsifier() is not None and context.base is not None:  # `auto`'s choice, a base's shapes
            from hf_mudsc.load.lazy import shape_of

            self._check_kept_entries(keywords["density"], max(
                (math.prod(shape_of(context.base, name)) for name in context.base.keys()), default=0))
        if "blocks" in keywords:
            _check_blocks(keywords["blocks"], context.parents[0], context.options.layer_swap)
        if isinstance(keywords.get("t"), list):  # a layer gradient needs the whole model's blocks, not one tensor's
            from hf_mudsc.solve.task_vectors import layer_gradient

            keywords["t"] = layer_gradient(keywords["t"], list(context.parents[0].keys()))
        weights = self.option_value(context.options, "weights") if "weights" in dict(self.arguments) else None
        try:
            if self.streamed_function is not None:
                parameters = self.streamed_function(context.base, list(context.parents), weights, source=_source,
                                                    **keywords)
            elif self.streams:
                parameters = self.merge_tensor_by_tensor(context, weights, keywords)
            else:
                parameters = self.function(context.base, list(context.parents), weights, **keywords)
        except ValueError as error:  # shapes that do not fit, weights summing to 0 ...: one line, no traceback
            raise MergeInputError(f"method {self.name!r}: {error}") from None
        return MethodResult(parameters=parameters, matches=[None] * len(context.spec.groups))


def _names_in_order(mappings: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every tensor name of the mappings, parent 0's order first (dict keys keep order, duplicates dropped)."""
    return list(dict.fromkeys(name for mapping in mappings for name in mapping.keys()))


def _source(parameters: Mapping[str, Any] | None, name: str) -> Any:
    """A `TensorSource` of tensor `name` of a (possibly lazy) parameter mapping; None when it lacks the tensor."""
    from hf_mudsc.load.lazy import rows_of, shape_of
    from hf_mudsc.solve.streamed import TensorSource

    if parameters is None or name not in parameters:
        return None
    return TensorSource(shape_of(parameters, name), lambda: parameters[name],
                        lambda start, stop: rows_of(parameters, name, start, stop))


def _check_blocks(blocks: dict[int, int], parameters: Iterable[str], text: str) -> None:
    """Refuse `layer_swap` blocks the model does not have (they would silently change nothing), and in a model of
    several towers (CLIP), blocks one tower lacks: block b moves in every tower (docs/design.md §4.10), and a tower
    shallower than the listed block moved nothing while the others moved (silently)."""
    from hf_mudsc.errors import MergeInputError, option_hint
    from hf_mudsc.solve.task_vectors import block_tower

    towers: dict[str, set[int]] = {}
    for name in parameters:
        found = block_tower(name)
        if found is not None:
            towers.setdefault(found[0], set()).add(found[1])
    present = set().union(*towers.values())
    missing = sorted(set(blocks) - present)
    if missing:
        have = f"blocks 0 to {max(present)}" if present else "no numbered encoder blocks"
        raise MergeInputError(f"layer_swap {text!r} lists block {missing[0]}, but the model has {have} "
                              f"{option_hint('layer_swap')}")
    for block in sorted(blocks):
        lacking = [tower for tower, held in towers.items() if block not in held]
        if lacking:
            having = next(tower for tower in towers if tower not in lacking)
            raise MergeInputError(
                f"layer_swap {text!r} lists block {block}, which the {having} tower has (blocks 0 to "
                f"{max(towers[having])}) but the {lacking[0]} tower has not (blocks 0 to {max(towers[lacking[0]])}): "
                f"block b moves in every tower; list blocks every tower has, or merge the towers apart (e.g. "
                f"CLIPTextModel) {option_hint('layer_swap')}")


def _function(name: str) -> Callable[..., dict[str, Any]]:
    """The pure function `name` of `hf_mudsc.solve.task_vectors`, imported when first called (keeps the registry
    torch-free: `hf-mudsc merge --help` lists the methods without importing torch)."""

    def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        from hf_mudsc.solve import task_vectors

        return getattr(task_vectors, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"hf_mudsc.solve.task_vectors.{name}"
    return call


def _streamed(name: str) -> Callable[..., dict[str, Any]]:
    """The streaming form `name` of `hf_mudsc.solve.streamed`, imported when first called (as `_function`)."""

    def call(*args: Any, **kwargs: Any) -> dict[str, Any]:
        from hf_mudsc.solve import streamed

        return getattr(streamed, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"hf_mudsc.solve.streamed.{name}"
    return call


# What every generalized-task-arithmetic method reads (mergekit 0.1.5 `GeneralizedTaskArithmeticMerge`).
_GTA = (("weights", "weights"), ("normalize", "normalize"), ("scaling", "scaling"))
_SPARSE = _GTA + (("density", "density"),)
_RANDOM = _SPARSE + (("rescale", "rescale"), ("seed", "seed"))

LINEAR = register_method(TensorWiseMethod(
    name="linear",
    pretty_name="Linear (weighted average, model soup)",
    paper=PAPER_SOUPS,
    description="Weighted average of the parents' tensors, divided by the weights' sum (mergekit linear); "
    "no base needed.",
    function=_function("linear"),
    chunked=True,
    arguments=(("weights", "weights"), ("normalize", "normalize")),
    defaults=(("normalize", True),),
))
TASK_ARITHMETIC = register_method(TensorWiseMethod(
    name="task_arithmetic",
    pretty_name="Task arithmetic",
    paper=PAPER_TASK_ARITHMETIC,
    description="base + scaling * sum_i w_i (parent_i - base) (mergekit task_arithmetic).",
    needs_base_model=True,
    function=_function("task_arithmetic"),
    chunked=True,
    arguments=_GTA,
    defaults=(("normalize", False),),
))
TIES = register_method(TensorWiseMethod(
    name="ties",
    pretty_name="TIES-Merging",
    paper=PAPER_TIES,
    description="Task vectors trimmed to their top-density magnitudes per tensor, signs elected by the sum, "
    "agreeing entries averaged (mergekit ties; density 0.2 = the paper's top 20%).",
    needs_base_model=True,
    function=_function("ties"),
    chunked=True,
    arguments=_SPARSE,
    defaults=(("normalize", True), ("density", 0.2)),
))
DARE_LINEAR = register_method(TensorWiseMethod(
    name="dare_linear",
    pretty_name="DARE (task arithmetic)",
    paper=PAPER_DARE,
    description="Task-vector entries kept at random with probability density, L1 norm restored, then summed "
    "(mergekit dare_linear; masks seeded by seed; density 0.5 as FusionBench).",
    needs_base_model=True,
    function=_function("dare_linear"),
    chunked=True,
    arguments=_RANDOM,
    defaults=(("normalize", False), ("density", 0.5)),
))
DARE_TIES = register_method(TensorWiseMethod(
    name="dare_ties",
    pretty_name="DARE + TIES sign election",
    paper=PAPER_DARE,
    description="DARE's random drop and rescale, then TIES's sign election (mergekit dare_ties; masks seeded by "
    "seed; density 0.5 as FusionBench).",
    needs_base_model=True,
    function=_function("dare_ties"),
    chunked=True,
    arguments=_RANDOM,
    defaults=(("normalize", False), ("density", 0.5)),
))
BREADCRUMBS = register_method(TensorWiseMethod(
    name="breadcrumbs",
    pretty_name="Model Breadcrumbs",
    paper=PAPER_BREADCRUMBS,
    description="Task vectors without their largest gamma and smallest entries (density kept), summed "
    "(mergekit breadcrumbs; density 0.9, gamma 0.01; with density + gamma > 1 only the largest 1 - density are "
    "dropped, and a warning says so).",
    needs_base_model=True,
    function=_function("breadcrumbs"),
    chunked=True,
    arguments=_SPARSE + (("gamma", "gamma"),),
    defaults=(("normalize", False), ("density", 0.9), ("gamma", 0.01)),
))
BREADCRUMBS_TIES = register_method(TensorWiseMethod(
    name="breadcrumbs_ties",
    pretty_name="Model Breadcrumbs + TIES sign election",
    paper=PAPER_BREADCRUMBS,
    description="Breadcrumbs masks, then TIES's sign election (mergekit breadcrumbs_ties, which does not "
    "normalise by default; density 0.9, gamma 0.01; with density + gamma > 1 only the largest 1 - density are "
    "dropped, and a warning says so).",
    needs_base_model=True,
    function=_function("breadcrumbs_ties"),
    chunked=True,
    arguments=_SPARSE + (("gamma", "gamma"),),
    defaults=(("normalize", False), ("density", 0.9), ("gamma", 0.01)),
))
DELLA = register_method(TensorWiseMethod(
    name="della",
    pretty_name="DELLA (MagPrune + TIES sign election)",
    paper=PAPER_DELLA,
    description="Entries kept at random with a probability rising with magnitude (density ± epsilon per row), "
    "L1 norm restored, signs elected (mergekit della; density 0.5, epsilon 0.15).",
    needs_base_model=True,
    function=_function("della"),
    chunked=True,
    arguments=_RANDOM + (("epsilon", "epsilon"),),
    defaults=(("normalize", True), ("density", 0.5), ("epsilon", 0.15)),
))
DELLA_LINEAR = register_method(TensorWiseMethod(
    name="della_linear",
    pretty_name="DELLA (MagPrune, task arithmetic)",
    paper=PAPER_DELLA,
    description="DELLA's magnitude-ranked random drop and rescale, then summed (mergekit della_linear; "
    "density 0.5, epsilon 0.15).",
    needs_base_model=True,
    function=_function("della_linear"),
    chunked=True,
    arguments=_RANDOM + (("epsilon", "epsilon"),),
    defaults=(("normalize", False), ("density", 0.5), ("epsilon", 0.15)),
))
SLERP = register_method(TensorWiseMethod(
    name="slerp",
    pretty_name="SLERP (spherical interpolation)",
    paper=PAPER_SLERP,
    description="Each tensor interpolated along the great circle from parent 0 (t=0) to parent 1 (t=1), "
    "linear where they are nearly colinear (mergekit slerp); two parents, no base.",
    num_parents=2,
    function=_function("slerp"),
    arguments=(("slerp_t", "t"),),
))
PCB = register_method(TensorWiseMethod(
    name="pcb",
    pretty_name="PCB-Merging (parameter competition balancing)",
    paper=PAPER_PCB,
    description="Task-vector entries scored by intra- and inter-task balancing over the whole model, the top "
    "pcb_ratio kept per task and averaged by score (PCB_merge).",
    needs_base_model=True, streams=False,
    function=_function("pcb"),
    arguments=(("weights", "weights"), ("pcb_ratio", "pcb_ratio"), ("scaling", "scaling")),
))
CONSENSUS = register_method(TensorWiseMethod(
    name="consensus",
    pretty_name="Consensus merging (TALL masks)",
    paper=PAPER_TALL,
    description="Task arithmetic keeping only the entries at least consensus_k tasks' TALL masks hold "
    "(drops selfish and catastrophic weights).",
    needs_base_model=True,
    function=_function("consensus"),
    chunked=True,
    arguments=(("weights", "weights"), ("consensus_k", "k"), ("consensus_lambda", "tall_mask_lambda"),
               ("scaling", "scaling")),
))
LOCALIZE_STITCH = register_method(TensorWiseMethod(
    name="localize_stitch",
    pretty_name="Localize-and-Stitch (dataless)",
    paper=PAPER_LOCALIZE_STITCH,
    description="Each parent's largest task-vector entries over the whole model (density = share kept, 0.1 as "
    "the paper), stitched onto the base; overlapping entries shared equally.",
    needs_base_model=True,
    function=_function("localize_stitch"),
    streamed_function=_streamed("localize_stitch"),
    arguments=(("weights", "weights"), ("density", "sparsity")),
    defaults=(("density", 0.1),),
))
LAYER_SWAP = register_method(TensorWiseMethod(
    name="layer_swap",
    pretty_name="Layer swapping",
    paper=PAPER_LAYER_SWAP,
    description="Chosen encoder blocks copied from other parents (layer_swap = 'parent:first-last,...'); the "
    "rest, embeddings and head from parent 0; no base.",
    function=_function("layer_swap"),
    arguments=(("layer_swap", "blocks"),),
    demo_options=(("layer_swap", "1:0"),),  # the demo's pair: block 0 from parent B, the rest from A
))
