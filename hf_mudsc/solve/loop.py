"""The MuDSC solve loop (docs/design.md §4.2–4.5): starts refined by dual-space sweeps in a seeded random order.

The paper's solve has one start, the activation-only matching. The default adds two more (§4.5): the weight-only
solve (Git Re-Basin's) and the identity (A_i <-> B_i). Each start is refined by the same sweeps; the activation
start's solution is kept unless another start ends above it by more than `MULTISTART_MARGIN`.

Architecture-free: it reads only the PermutationSpec, parameters and per-group activation correlations.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch

from hf_mudsc.blas import pack_upper, packed_size, torch_thread_count, unpack_upper
from hf_mudsc.heap import release_free_heap
from hf_mudsc.memory import available_memory
from hf_mudsc.option_values import MULTISTART_MARGIN
from hf_mudsc.progress import Progress
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import (
    Match,
    attention_head_scores,
    attention_head_scores_n,
    match,
    pair_attention_heads,
    pair_attention_heads_n,
)
from hf_mudsc.solve.similarity import WeightCorrelation, blend
from hf_mudsc.spec import PermutationSpec

logger = logging.getLogger(__name__)

#: The starts a solve may run, in the order they run (docs/design.md §4.5). A solve without activations
#: (`weight_matching`) has no activation start: its own start is the weight-only solve, named "weight".
STARTS = ("activation", "weight", "identity")
#: Visit results kept per group (§4.5's exact shortcut): enough for the sweeps' revert-to-best states and for a
#: later start that reaches a neighbourhood an earlier one visited; each is a few index tensors.
VISIT_CACHE_SIZE = 4
#: The most bytes of weight correlations the α search's solves keep for reuse (`SolveCache`, `WeightCorrelationCache`);
#: less when a quarter of the memory available, or `WEIGHT_CACHE_PER_GROUP` correlations of every group, is less.
#: Any budget gives the same merges (a miss recomputes the same values); it trades memory for time: on an auto-α
#: MiniLM merge two in three weight correlations were recomputations (19 of 29 CPU s), and keeping every one of
#: them, packed (`blas.pack_upper`), fits in it.
WEIGHT_CACHE_BYTES = 2**30
#: The budget's bound by the groups' sizes: this many packed `(N·n, N·n)` correlations of every group (a
#: group meeting many neighbourhoods may take more of them while others hold fewer). The MiniLM merge above reused
#: two per group on average; four leave room for the full solve's starts.
WEIGHT_CACHE_PER_GROUP = 4


def weight_cache_bytes(widths: Sequence[int], parents: int) -> int:
    """The α search's weight-correlation budget for groups of `widths` units per parent (N = `parents`):
    `WEIGHT_CACHE_BYTES`, a quarter of the memory available now, or `WEIGHT_CACHE_PER_GROUP` packed correlations of
    every group, whichever is least (a small machine keeps its memory for the merge, a small model needs little)."""
    by_groups = WEIGHT_CACHE_PER_GROUP * sum(8 * packed_size(parents * n) for n in widths)
    available = available_memory()
    quarter = WEIGHT_CACHE_BYTES if available is None else available // 4
    return min(WEIGHT_CACHE_BYTES, quarter, by_groups)


def _same_match(a: Match | None, b: Match | None) -> bool:
    """The same unit assignment (or both unmatched): a visit's similarity depends on nothing else of a neighbour."""
    return a is b or (a is not None and b is not None and a.same_as(b))


def start_choice_note(objectives: Mapping[str, float], chosen: str) -> str:
    """The log line of a multi-start solve: every start's final objective and the one kept — with why, when a start
    that ends higher was not kept (it did not clear `MULTISTART_MARGIN`)."""
    listed = ", ".join(f"{name} {value:.6f}" for name, value in objectives.items())
    top = max(objectives, key=lambda name: objectives[name])
    why = (f" (the {top} start ends {objectives[top] - objectives[chosen]:.4f} higher, within the "
           f"{MULTISTART_MARGIN} margin a start must clear to replace it)" if objectives[top] > objectives[chosen]
           else "")
    return f"start objectives {listed}; kept the {chosen} start{why}"


def choose_start(objectives: Mapping[str, float], *, keep: str = "activation",
                 margin: float = MULTISTART_MARGIN) -> str:
    """The start whose solution wins: `keep` unless another start's final objective exceeds it by more than
    `margin`; then the highest such start (the earlier one in `objectives`' order on a tie).

    A near-tie is kept on the paper's solution: the objective is flat across the starts' optima on unrelated
    parents, so only a clear gain is evidence of a better merge. Without `keep` among the starts: the highest.
    """
    if not objectives:
        raise ValueError("choose_start needs at least one start's objective")
    best = max(objectives, key=lambda name: objectives[name])  # max() keeps the first of equal values
    if keep not in objectives:
        return best
    return best if objectives[best] > objectives[keep] + margin else keep


class WeightCorrelationCache:
    """Weight correlations by group and the matches of the groups sharing a tensor with it — all a weight correlation
    depends on (docs/design.md §4.3) — within `budget` bytes, the least recently used dropped first.

    A solve's starts and an α search's solves meet the same neighbourhoods again (every solve's first sweep begins at
    the activation start). A weight correlation is exactly symmetric (`_Moments.correlation` mirrors its Gram, then
    applies the same products to (i, j) and (j, i)), so only its upper part is kept (`blas.pack_upper`: about half);
    `get` returns a new full matrix, the caller's own."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held_bytes = 0
        # serial -> (group, its neighbours' matches, size, packed correlation), least recently used first
        self._entries: OrderedDict[int, tuple[int, dict[int, Match | None], int, torch.Tensor]] = OrderedDict()
        self._of_group: dict[int, list[int]] = {}  # group -> the serials of its entries
        self._serial = 0

    def get(self, index: int, neighbours: Mapping[int, Match | None]) -> torch.Tensor | None:
        for serial in self._of_group.get(index, ()):
            _, key, size, packed = self._entries[serial]
            if all(_same_match(found, neighbours[other]) for other, found in key.items()):
                self._entries.move_to_end(serial)
                return unpack_upper(packed, size)
        return None

    def put(self, index: int, neighbours: Mapping[int, Match | None], correlation: torch.Tensor) -> None:
        size = correlation.shape[0]
        nbytes = packed_size(size) * correlation.element_size()
        if nbytes > self.budget:
            return
        while self.held_bytes + nbytes > self.budget:
            serial, (group, _, _, dropped) = self._entries.popitem(last=False)
            self._of_group[group].remove(serial)
            self.held_bytes -= dropped.numel() * dropped.element_size()
        self._entries[self._serial] = (index, dict(neighbours), size, pack_upper(correlation))
        self._of_group.setdefault(index, []).append(self._serial)
        self._serial += 1
        self.held_bytes += nbytes

    def entries(self) -> list[tuple[int, dict[int, Match | None], torch.Tensor]]:
        """(group, its neighbours' matches, the weight correlation), least recently used first."""
        return [(group, dict(key), unpack_upper(packed, size)) for group, key, size, packed in self._entries.values()]


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
    # Starts refined besides the activation start, from STARTS (run in STARTS order); they need activations and
    # are skipped when no sweeps run (`iterate=False` or `alpha=0`). Empty: the paper's single start.
    extra_starts: tuple[str, ...] = ()
    # Where the weight-similarity Gram products run ("cpu", "cuda:0", ...); matching itself is on the CPU.
    device: str = "cpu"
    # Constant weight rows of one value (pruned units) get similarity 1 (`similarity.WeightCorrelation`); False:
    # plain Pearson, the reference's (`reference_compat=True`).
    constant_units: bool = True


@dataclass
class SolveResult:
    """The winning start's matches, objective history and sweep count; `starts` holds every start's final
    objective (in the order they ran) and `start` names the winner."""

    matches: list[Match]
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0
    start: str = "activation"
    starts: dict[str, float] = field(default_factory=dict)

    def group_values(self) -> list[float]:
        return [m.value for m in self.matches]


class SolveCache:
    """The parts of a solve that do not depend on alpha, shared by successive solves of one merge that differ only
    in alpha (the `alpha="auto"` search, docs/design.md §4.4): the weight correlations' constant parts, the
    activation start (matched on activations only), the weight start (matched on weights only) and, for each
    candidate start, the weight-correlation entries of its matched pairs (its score's weight half). Per alpha it
    also keeps what a second solve at that alpha would repeat — the search's single-start candidate, then the full
    solve at the chosen alpha: the activation start's refined outcome and the visit results.

    Each of these is exactly what a fresh solve would compute, so every solve that uses the cache returns what it
    would return without it. A solve whose inputs differ in anything but alpha and the extra starts (other
    parents, statistics, matcher, seed, ...) clears the cache and starts it again.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight_correlation: WeightCorrelation | None = None
        self.weight_correlations = WeightCorrelationCache(0)  # its budget is set by `bind` (the groups' sizes)
        self.activation_start: _State | None = None
        self.weight_start: _State | None = None
        self.start_entries: dict[str, list[torch.Tensor]] = {}
        # alpha -> the activation start's sweeps outcome (state, objective, history, sweeps); alpha -> visit cache
        self.refined: dict[float, tuple[_State, float, list[float], int]] = {}
        self.visits: dict[float, dict[tuple[bool, int], list[tuple[list[Match | None], list[Match]]]]] = {}

    def keep_alpha(self, alpha: float) -> None:
        """Drop the per-alpha parts of every other alpha (the search, once it has chosen)."""
        self.refined = {a: v for a, v in self.refined.items() if a == alpha}
        self.visits = {a: v for a, v in self.visits.items() if a == alpha}

    def bind(self, key: tuple, weight_budget: int) -> None:
        """Use the cache for inputs identified by `key`; other inputs than last time empty it first (and give its
        weight correlations `weight_budget` bytes, `weight_cache_bytes`)."""
        if self.key != key:
            self.__init__()  # type: ignore[misc]
            self.key = key
            self.weight_correlations = WeightCorrelationCache(weight_budget)


def _storage_key(tensors: Sequence[Mapping[object, torch.Tensor]]) -> tuple:
    """Which tensors these are (names, memory, shapes, dtypes): equal keys, the same inputs (never modified)."""
    return tuple((name, t.data_ptr(), tuple(t.shape), t.dtype) for mapping in tensors for name, t in mapping.items())


def _is_permutation(index: torch.Tensor) -> bool:
    return torch.equal(torch.sort(index).values, torch.arange(index.numel(), device=index.device))


class _State:
    """Current matches of every group plus each group's latest match value."""

    def __init__(self, size: int) -> None:
        self.matches: list[Match | None] = [None] * size
        self.maps: list[GroupMaps | None] = [None] * size
        self.values: list[float] = [0.0] * size

    def set(self, index: int, found: Match) -> None:
        previous = self.matches[index]
        self.matches[index] = found
        # An unchanged match keeps its GroupMaps object (the maps are rebuilt only when the units move).
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
        others: Sequence[Mapping[str, torch.Tensor]] = (),
        cache: SolveCache | None = None,
    ) -> None:
        """`others`: the parents after the first two (N > 2 parents: every similarity is `(N·n, N·n)` over
        `[parent 0 units; parent 1 units; ...]` and the matchers merge N·n units into n, docs/design.md §4.6).
        `cache`: alpha-free parts shared with other solves of the same inputs (`SolveCache`); results unchanged."""
        if options.use_activations and activation_correlations is None:
            raise ValueError("activation correlations are required for this method")
        if not 0.0 <= options.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {options.alpha}")
        unknown = sorted(set(options.extra_starts) - set(STARTS))
        if unknown:
            raise ValueError(f"unknown solve starts {unknown}; choose from {', '.join(STARTS)}")
        if options.extra_starts and not options.use_activations:
            raise ValueError("extra solve starts need activation correlations: without them the weight-only "
                             "solve is the only start")
        self.spec = spec
        # Detached: similarity work must never build autograd graphs or touch the parents' tensors.
        params_a = {name: tensor.detach() for name, tensor in params_a.items()}
        params_b = {name: tensor.detach() for name, tensor in params_b.items()}
        self.params_a = params_a
        self.params_b = params_b
        others = [{name: tensor.detach() for name, tensor in params.items()} for params in others]
        self.num_models = 2 + len(others)
        self.activations = activation_correlations
        self.options = options
        self.ties = {} if options.independent_heads else spec.head_ties()
        self.tie_of = {index: members for members in self.ties.values() for index in members}
        self.cache = cache
        if cache is not None:
            # Everything a solve reads except alpha: the same objects (parents, statistics, spec) and options.
            cache.bind((id(spec), _storage_key([params_a, params_b, *others]),
                        _storage_key([dict(enumerate(activation_correlations or ()))]),
                        replace(options, alpha=0.0, extra_starts=())),
                       weight_cache_bytes([group.width for group in spec.groups], 2 + len(others)))
            if cache.weight_correlation is None:
                cache.weight_correlation = WeightCorrelation(spec, params_a, params_b, device=options.device,
                                                             others=others, constants=options.constant_units)
            self.weight_correlation = cache.weight_correlation
            self.weight_cache = cache.weight_correlations
        else:
            self.weight_correlation = WeightCorrelation(spec, params_a, params_b, device=options.device,
                                                        others=others, constants=options.constant_units)
            # One solve alone keeps none: its starts meet few neighbourhoods twice (on MiniLM 28 of 100 weight
            # correlations, 5 CPU s, for ~0.7 GB kept); the α search's solves meet most of them again.
            self.weight_cache = WeightCorrelationCache(0)
        self._weight_neighbours = {index: self._neighbour_groups([index]) for index in range(len(spec.groups))}
        # A visit's result depends only on the matches of the groups sharing a tensor with the visited
        # group(s): while those are the same (the same objects, or equal unit assignments — another start that
        # reached the same neighbourhood), an earlier result is reused exactly. A few results per group are kept.
        self._neighbours = {index: self._neighbour_groups(members) for members in
                            [[i] for i in range(len(spec.groups)) if i not in self.tie_of] + list(self.ties.values())
                            for index in members}
        # Visit results depend on alpha: a cache shares them only between solves at the same alpha.
        self._visit_cache: dict[tuple[bool, int], list[tuple[list[Match | None], list[Match]]]] = (
            {} if cache is None else cache.visits.setdefault(options.alpha, {}))

    def _neighbour_groups(self, members: Sequence[int]) -> list[int]:
        found: set[int] = set()
        for index in members:
            for member in self.spec.groups[index].members:
                if not member.ignore:
                    found.update(q for q, _ in self.spec.axes_of(member.param) if q != index)
        return sorted(found)

    # -- similarities -------------------------------------------------------------------------
    def _weight(self, index: int, state: _State) -> torch.Tensor:
        """Group `index`'s weight correlation under the state's matches: a new tensor (computed, or unpacked from the
        cache), the caller's to modify."""
        neighbours = {other: state.matches[other] for other in self._weight_neighbours[index]}
        found = self.weight_cache.get(index, neighbours)
        if found is None:
            found = self.weight_correlation(index, state.maps)
            self.weight_cache.put(index, neighbours, found)
        return found

    def similarity(self, index: int, state: _State, *, activation_only: bool = False,
                   weight_only: bool = False) -> torch.Tensor:
        """The similarity group `index` is matched on: the dual-space blend, or one of its two parts."""
        options = self.options
        if weight_only:
            return self._weight(index, state)
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

    def similarity_of(self, index: int, matches: Sequence[Match | None]) -> torch.Tensor:
        """Group `index`'s similarity (the one it is matched on) with every group at `matches` — e.g. a solve's
        result, for the size budget's choice of units to keep unfused (hf_mudsc.solve.widen)."""
        state = _State(len(self.spec.groups))
        for position, found in enumerate(matches):
            if found is not None:
                state.set(position, found)
        return self.similarity(index, state)

    # -- matching -------------------------------------------------------------------------------
    def _match(self, index: int, similarity: torch.Tensor, head_pairing: Sequence[int] | None = None,
               matcher: str | None = None) -> Match:
        group = self.spec.groups[index]
        return match(
            similarity,
            matcher=matcher or self.options.matcher,
            num_heads=group.num_heads,
            decay=self.options.zip_decay,
            budget=self.options.zip_budget,
            head_pairing=head_pairing,
            normalizer_eps=self.options.normalizer_eps,
            num_models=self.num_models,
        )

    def visit(self, index: int, state: _State, *, activation_only: bool = False, weight_only: bool = False) -> None:
        """Re-match one group (and, with shared heads, its head-tied partners on one head pairing).

        `weight_only`: on the weight similarity with the align matcher — a sweep of the weight start's solve."""
        members = self.tie_of.get(index)
        matcher = "align" if weight_only else None
        key = None
        if not activation_only:
            # The weight start's visits are cached apart: the same maps give another similarity and matcher.
            key = [state.matches[q] for q in self._neighbours[index]]
            for cached_key, cached in self._visit_cache.get((weight_only, index), ()):
                if all(_same_match(a, b) for a, b in zip(cached_key, key, strict=True)):
                    for m, found in zip(members or [index], cached):
                        state.set(m, found)
                    return
        similarity = partial(self.similarity, activation_only=activation_only, weight_only=weight_only)
        if members is None:
            state.set(index, self._match(index, similarity(index, state), matcher=matcher))
        else:
            # Every similarity is computed from the state before this visit, then all tied groups move together.
            similarities = {m: similarity(m, state) for m in members}
            if self.num_models == 2:
                scores = sum(attention_head_scores(similarities[m], self.spec.groups[m].num_heads) for m in members)
                pairing = pair_attention_heads(np.asarray(scores))
            else:
                scores = sum(attention_head_scores_n(similarities[m], self.spec.groups[m].num_heads, self.num_models)
                             for m in members)
                pairing = pair_attention_heads_n(np.asarray(scores))
            for m in members:
                state.set(m, self._match(m, similarities[m], head_pairing=pairing, matcher=matcher))
        if key is not None:
            result = [state.matches[m] for m in members or [index]]
            for m in members or [index]:
                entries = self._visit_cache.setdefault((weight_only, m), [])
                entries.insert(0, (key, result))
                del entries[VISIT_CACHE_SIZE:]

    def _initial_state(self) -> _State:
        cache = self.cache
        if cache is not None and cache.activation_start is not None:
            return cache.activation_start.copy()
        state = self._activation_state()
        if cache is not None:
            cache.activation_start = state.copy()
        return state

    def _activation_state(self) -> _State:
        """Every group matched on its activation correlation alone (§4.2; alpha plays no part)."""
        state = _State(len(self.spec.groups))
        if self.options.use_activations:
            for index in range(len(self.spec.groups)):
                if state.matches[index] is None:
                    self.visit(index, state, activation_only=True)
        return state

    def _identity_state(self) -> _State:
        """A_i <-> B_i in every group, heads unpermuted: a same-base pair's natural correspondence."""
        state = _State(len(self.spec.groups))
        models = self.num_models
        weight = 1.0 / (float(models) + self.options.normalizer_eps)
        for index, group in enumerate(self.spec.groups):
            n = group.width
            state.set(index, Match(
                cluster_of=torch.arange(n).repeat(models),
                merge_weight=torch.full((models * n,), weight, dtype=torch.float64),
                num_merged=n, value=0.0,
                head_pairing=tuple(range(group.num_heads)) * (models - 1) if group.num_heads > 1 else None,
                num_models=models,
            ))
        return state

    def _weight_state(self) -> _State:
        """The weight-only align solve (what `weight_matching` does): no start, weight-only sweeps (alpha plays no
        part: a `SolveCache` keeps it for the next solve)."""
        cache = self.cache
        if cache is not None and cache.weight_start is not None:
            return cache.weight_start.copy()
        state, _, _, _ = self._sweeps(_State(len(self.spec.groups)), candidate=False, weight_only=True)
        # Its visits are never repeated (one weight start per solve): free them now.
        for slot in [slot for slot in self._visit_cache if slot[0]]:
            del self._visit_cache[slot]
        if cache is not None:
            cache.weight_start = state.copy()
        return state

    def _score(self, state: _State, name: str = "") -> float:
        """Give every group of a permutation start its value under the blended similarity, given the whole start.

        The value is the mean similarity of the matched (A, B) pairs — exactly what align reports for a
        permutation, and what zip reports had it picked those pairs (n cross-model fusions of single units, so
        no decay). The start then competes with the sweeps that follow it. Returns the objective L.
        """
        if self.num_models != 2:
            return self._score_models(state)
        cache = self.cache
        entries = cache.start_entries.get(name) if cache is not None and name else None
        fresh: list[torch.Tensor] = []
        for index, found in enumerate(state.matches):
            assert found is not None
            n = found.num_merged
            a_cluster, b_cluster = found.cluster_of[:n], found.cluster_of[n:]
            if found.cluster_of.numel() != 2 * n or not (_is_permutation(a_cluster) and _is_permutation(b_cluster)):
                raise ValueError(f"group {self.spec.groups[index].name!r}: only a permutation start can be scored")
            b_unit = torch.argsort(b_cluster)  # the B unit in each merged unit
            pairs = (torch.arange(n), n + b_unit[a_cluster])
            if cache is None or not name or self.options.alpha in (0.0, 1.0):
                value = float(self.similarity(index, state)[pairs].mean())
            else:
                # The blend of the matched entries only, with the operations `similarity` applies to the whole
                # matrix (elementwise, so the same values); the weight entries depend on the start alone.
                if entries is None:
                    fresh.append(self._weight(index, state)[pairs].clone())
                weight = (entries[index] if entries is not None else fresh[-1]).clone().mul_(self.options.alpha)
                activation = self.activations[index].to(torch.float64)[pairs]
                value = float(weight.add_(activation, alpha=1 - self.options.alpha).mean())
            state.set(index, replace(found, value=value))
        if cache is not None and name and entries is None and fresh:
            cache.start_entries[name] = fresh
        return float(np.mean(state.values))

    def _score_models(self, state: _State) -> float:
        """`_score` for N > 2 parents: each group's value is the mean over every pair of parents of the mean
        similarity of their units in one merged unit (N-model align's value, `matchers._align_n`)."""
        models = self.num_models
        for index, found in enumerate(state.matches):
            assert found is not None
            n = found.num_merged
            blocks = found.cluster_of.reshape(models, n)
            if found.cluster_of.numel() != models * n or not all(_is_permutation(row) for row in blocks):
                raise ValueError(f"group {self.spec.groups[index].name!r}: only a permutation start can be scored")
            # unit[j][c]: parent j's unit (global row) in merged unit c
            unit = [j * n + torch.argsort(blocks[j]) for j in range(models)]
            similarity = self.similarity(index, state)
            value = float(np.mean([float(similarity[unit[a], unit[b]].mean())
                                   for a in range(models) for b in range(a + 1, models)]))
            state.set(index, replace(found, value=value))
        return float(np.mean(state.values))

    def _sweeps(self, state: _State, *, candidate: bool, weight_only: bool = False, progress: bool = False,
                label: str = "solve") -> tuple[_State, float, list[float], int]:
        """Refine `state` by sweeps (§4.5): a fresh generator seeded with `seed`, strict improvement, `patience`
        consecutive stalls revert-and-stop, at most `max_sweeps`. `candidate`: the start itself competes (its
        values already set); otherwise the first sweep is always accepted. Returns (best state, its objective,
        the objective after each sweep, sweeps run)."""
        options = self.options
        groups = self.spec.groups
        generator = torch.Generator().manual_seed(options.seed)
        best: _State | None = state.copy() if candidate else None
        best_objective = float(np.mean(state.values)) if candidate else -float("inf")
        stalls = 0
        history: list[float] = []
        sweeps = 0
        # The total is the sweep limit; an early stop (patience) cuts it to the sweeps run, so the bar ends full.
        bar = Progress(total=options.max_sweeps, desc=label, unit="sweeps", enabled=progress)
        try:
            for _ in range(options.max_sweeps):
                sweeps += 1
                for index in torch.randperm(len(groups), generator=generator).tolist():
                    self.visit(index, state, weight_only=weight_only)
                objective = float(np.mean(state.values))
                history.append(objective)
                bar.update(1)
                bar.set_postfix(objective=f"{objective:.5f}")
                logger.debug("%s: sweep %d, objective %.6f", label, sweeps, objective)
                if best is not None and best_objective >= objective:
                    stalls += 1
                    if stalls >= options.patience:
                        break
                    state = best.copy()
                else:
                    stalls = 0
                    best, best_objective = state.copy(), objective
        finally:
            bar.set_total(sweeps)
            bar.close()
        assert best is not None
        return best, best_objective, history, sweeps

    def _refined_start(self, state: _State, progress: bool) -> tuple[_State, float, list[float], int]:
        """The own start refined by the sweeps: taken from the cache when a solve at this alpha ran them (the same
        seeded sweeps from the same start give the same outcome)."""
        cache, alpha = self.cache, self.options.alpha
        if cache is not None and alpha in cache.refined:
            best, objective, history, sweeps = cache.refined[alpha]
            return best.copy(), objective, list(history), sweeps
        outcome = self._sweeps(state, candidate=False, progress=progress)
        if cache is not None:
            best, objective, history, sweeps = outcome
            cache.refined[alpha] = (best.copy(), objective, list(history), sweeps)
        return outcome

    def solve(self, *, progress: bool = False) -> SolveResult:
        # The weight correlations' BLAS (scipy's dsyrk, `similarity._Moments`) uses as many threads as torch does.
        with torch_thread_count():
            return self._solve(progress)

    def _solve(self, progress: bool) -> SolveResult:
        options = self.options
        own = "activation" if options.use_activations else "weight"
        state = self._initial_state()
        if not options.iterate or (options.use_activations and options.alpha == 0):
            # Activation-only similarities never change, so sweeps would reproduce the start exactly.
            objective = float(np.mean(state.values))
            return SolveResult(matches=list(state.matches), objective_history=[objective], start=own,
                               starts={own: objective})
        extra = [name for name in STARTS if name in options.extra_starts and name != own]
        # Only the paper's start and the best other start so far are kept: a losing start's state is dropped as
        # soon as it loses (choose_start picks among these two exactly as among all).
        kept: dict[str, tuple[_State, float, list[float], int]] = {}
        kept[own] = self._refined_start(state, progress)
        del state
        release_free_heap()
        objectives = {own: kept[own][1]}
        runner_up: str | None = None
        for name in extra:
            start = self._weight_state() if name == "weight" else self._identity_state()
            self._score(start, name)
            outcome = self._sweeps(start, candidate=True, progress=progress, label=f"solve ({name} start)")
            del start
            objectives[name] = outcome[1]
            if runner_up is None or outcome[1] > objectives[runner_up]:  # ties: the earlier start, as choose_start
                if runner_up is not None:
                    del kept[runner_up]
                runner_up, kept[name] = name, outcome
            del outcome
            release_free_heap()
        chosen = choose_start(objectives, keep=own)
        best, best_objective, history, sweeps = kept.pop(chosen)
        kept.clear()
        if len(objectives) > 1:
            logger.info("solve: %s", start_choice_note(objectives, chosen))
        logger.info("solve: %d sweeps, best objective %.6f", sweeps, best_objective)
        return SolveResult(matches=list(best.matches), objective_history=history, sweeps=sweeps, start=chosen,
                           starts=objectives)
