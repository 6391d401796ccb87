"""The MuDSC solve loop (docs/design.md §4.2–4.5): activation start, then dual-space sweeps in a seeded random order.

Architecture-free: it reads only the PermutationSpec, parameters and per-group activation correlations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match, attention_head_scores, match, pair_attention_heads
from hf_mudsc.solve.similarity import WeightCorrelation, blend
from hf_mudsc.spec import PermutationSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveOptions:
    """How groups are matched. `alpha` weighs weight similarity against activation similarity."""

    matcher: str = "zip"
    alpha: float = 0.5
    use_activations: bool = True
    iterate: bool = True
    zip_decay: float = 0.5
    zip_budget: float = 1.0
    independent_heads: bool = False
    normalizer_eps: float = 0.0
    seed: int = 0
    max_sweeps: int = 100
    patience: int = 5
    # Where the weight-similarity Gram products run ("cpu", "cuda:0", ...); matching itself is on the CPU.
    device: str = "cpu"


@dataclass
class SolveResult:
    matches: list[Match]
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0

    def group_values(self) -> list[float]:
        return [m.value for m in self.matches]


class _State:
    """Current matches of every group plus each group's latest match value."""

    def __init__(self, size: int) -> None:
        self.matches: list[Match | None] = [None] * size
        self.maps: list[GroupMaps | None] = [None] * size
        self.values: list[float] = [0.0] * size

    def set(self, index: int, found: Match) -> None:
        previous = self.matches[index]
        self.matches[index] = found
        # An unchanged match keeps its GroupMaps object: the solver's visit cache keys on map identity.
        if previous is not found and not (previous is not None and previous.same_as(found)):
            self.maps[index] = GroupMaps.from_match(found)
        self.values[index] = found.value

    def copy(self) -> _State:
        other = _State(len(self.matches))
        other.matches, other.maps, other.values = list(self.matches), list(self.maps), list(self.values)
        return other


class Solver:
    def __init__(
        self,
        spec: PermutationSpec,
        params_a: Mapping[str, torch.Tensor],
        params_b: Mapping[str, torch.Tensor],
        activation_correlations: Sequence[torch.Tensor] | None,
        options: SolveOptions,
    ) -> None:
        if options.use_activations and activation_correlations is None:
            raise ValueError("activation correlations are required for this method")
        if not 0.0 <= options.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {options.alpha}")
        self.spec = spec
        # Detached: similarity work must never build autograd graphs or touch the parents' tensors.
        params_a = {name: tensor.detach() for name, tensor in params_a.items()}
        params_b = {name: tensor.detach() for name, tensor in params_b.items()}
        self.params_a = params_a
        self.params_b = params_b
        self.activations = activation_correlations
        self.options = options
        self.ties = {} if options.independent_heads else spec.head_ties()
        self.tie_of = {index: members for members in self.ties.values() for index in members}
        self.weight_correlation = WeightCorrelation(spec, params_a, params_b, device=options.device)
        # A visit's result depends only on the maps of the groups sharing a tensor with the visited
        # group(s): while those GroupMaps objects are the same, the last result is reused exactly.
        self._neighbours = {index: self._neighbour_groups(members) for members in
                            [[i] for i in range(len(spec.groups)) if i not in self.tie_of] + list(self.ties.values())
                            for index in members}
        self._visit_cache: dict[int, tuple[list[GroupMaps | None], list[Match]]] = {}

    def _neighbour_groups(self, members: Sequence[int]) -> list[int]:
        found: set[int] = set()
        for index in members:
            for member in self.spec.groups[index].members:
                if not member.ignore:
                    found.update(q for q, _ in self.spec.axes_of(member.param) if q != index)
        return sorted(found)

    # -- similarities -------------------------------------------------------------------------
    def _weight(self, index: int, state: _State) -> torch.Tensor:
        return self.weight_correlation(index, state.maps)

    def similarity(self, index: int, state: _State, *, activation_only: bool = False) -> torch.Tensor:
        options = self.options
        activation = self.activations[index].to(torch.float64) if self.activations is not None else None
        if activation_only:
            return activation
        if not options.use_activations:
            return self._weight(index, state)
        if options.alpha == 0:
            return activation
        if activation is None or options.alpha == 1:
            return blend(self._weight(index, state), activation, options.alpha)
        # blend(), in place on the fresh weight correlation: no (2n, 2n) temporary.
        weight = self._weight(index, state).mul_(options.alpha)
        return weight.add_(activation, alpha=1 - options.alpha)

    # -- matching -------------------------------------------------------------------------------
    def _match(self, index: int, similarity: torch.Tensor, head_pairing: Sequence[int] | None = None) -> Match:
        group = self.spec.groups[index]
        return match(
            similarity,
            matcher=self.options.matcher,
            num_heads=group.num_heads,
            decay=self.options.zip_decay,
            budget=self.options.zip_budget,
            head_pairing=head_pairing,
            normalizer_eps=self.options.normalizer_eps,
        )

    def visit(self, index: int, state: _State, *, activation_only: bool = False) -> None:
        """Re-match one group (and, with shared heads, its head-tied partners on one head pairing)."""
        members = self.tie_of.get(index)
        key = None
        if not activation_only:
            key = [state.maps[q] for q in self._neighbours[index]]
            cached = self._visit_cache.get(index)
            if cached is not None and all(a is b for a, b in zip(cached[0], key, strict=True)):
                for m, found in zip(members or [index], cached[1]):
                    state.set(m, found)
                return
        if members is None:
            state.set(index, self._match(index, self.similarity(index, state, activation_only=activation_only)))
        else:
            # Every similarity is computed from the state before this visit, then all tied groups move together.
            similarities = {m: self.similarity(m, state, activation_only=activation_only) for m in members}
            scores = sum(attention_head_scores(similarities[m], self.spec.groups[m].num_heads) for m in members)
            pairing = pair_attention_heads(np.asarray(scores))
            for m in members:
                state.set(m, self._match(m, similarities[m], head_pairing=pairing))
        if key is not None:
            result = [state.matches[m] for m in members or [index]]
            for m in members or [index]:
                self._visit_cache[m] = (key, result)

    def _initial_state(self) -> _State:
        state = _State(len(self.spec.groups))
        if self.options.use_activations:
            for index in range(len(self.spec.groups)):
                if state.matches[index] is None:
                    self.visit(index, state, activation_only=True)
        return state

    def solve(self, *, progress: bool = False) -> SolveResult:
        options = self.options
        state = self._initial_state()
        groups = self.spec.groups
        if not options.iterate or (options.use_activations and options.alpha == 0):
            # Activation-only similarities never change, so sweeps would reproduce the start exactly.
            return SolveResult(matches=list(state.matches), objective_history=[float(np.mean(state.values))])
        generator = torch.Generator().manual_seed(options.seed)
        best: _State | None = None
        best_objective = -float("inf")
        stalls = 0
        history: list[float] = []
        sweeps = 0
        bar = tqdm(total=options.max_sweeps, desc="solve", unit="sweep", disable=not progress)
        try:
            for _ in range(options.max_sweeps):
                sweeps += 1
                for index in torch.randperm(len(groups), generator=generator).tolist():
                    self.visit(index, state)
                objective = float(np.mean(state.values))
                history.append(objective)
                bar.update(1)
                bar.set_postfix(objective=f"{objective:.5f}")
                if best is not None and best_objective >= objective:
                    stalls += 1
                    if stalls >= options.patience:
                        break
                    state = best.copy()
                else:
                    stalls = 0
                    best, best_objective = state.copy(), objective
        finally:
            bar.close()
        logger.info("solve: %d sweeps, best objective %.6f", sweeps, best_objective)
        assert best is not None
        return SolveResult(matches=list(best.matches), objective_history=history, sweeps=sweeps)
