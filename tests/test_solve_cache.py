"""`SolveCache` (hf_mudsc/solve/loop.py): the `alpha="auto"` search's solves share what does not depend on alpha.

Proven here: a solve with the cache returns exactly what a fresh solve returns (matches, values, objective
history, sweeps, every start's objective and the winner) at every alpha, for both matchers, on a different-init
and a same-init pair; the alpha-free work really is done once (the weight start's sweeps and the weight
correlations counted); and a solve of other inputs (another seed, other parents) empties the cache first."""

from __future__ import annotations

import copy

import pytest
import torch
from factories import make_batches, make_model

from hf_mudsc.apply.fidelity import ALPHA_GRID
from hf_mudsc.architectures import spec_for
from hf_mudsc.blas import packed_size
from hf_mudsc.calibrate.correlation import correlations_from
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.solve import loop
from hf_mudsc.solve.loop import SolveCache, SolveOptions, Solver
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match
from hf_mudsc.solve.similarity import WeightCorrelation

ALPHAS = (*ALPHA_GRID, 0.0, 1.0)
STARTS = ("weight", "identity")


pytestmark = pytest.mark.usefixtures("one_thread")


def _fine_tune(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.15 * torch.randn(param.shape, generator=generator))
    return model


def _inputs(pair: str):
    if pair == "different_init":
        a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    else:
        base = make_model("vit_cls", seed=0)
        a, b = _fine_tune(base, 1), _fine_tune(base, 2)
    spec = spec_for(a)
    correlations = correlations_from(collect_statistics(a, b, spec, make_batches("vit_cls"), progress=False))
    return spec, dict(a.named_parameters()), dict(b.named_parameters()), correlations


def _same(got, want) -> None:
    assert got.start == want.start and got.starts == want.starts
    assert got.objective_history == want.objective_history and got.sweeps == want.sweeps
    for g, w in zip(got.matches, want.matches, strict=True):
        assert torch.equal(g.cluster_of, w.cluster_of) and torch.equal(g.merge_weight, w.merge_weight)
        assert g.value == w.value and g.head_pairing == w.head_pairing and g.num_merged == w.num_merged


@pytest.mark.parametrize("pair", ["different_init", "same_init"])
@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_cached_solves_equal_fresh_solves_at_every_alpha(pair, matcher):
    spec, params_a, params_b, correlations = _inputs(pair)
    cache = SolveCache()
    winners = set()
    for alpha in ALPHAS:
        options = SolveOptions(matcher=matcher, alpha=alpha, extra_starts=STARTS)
        fresh = Solver(spec, params_a, params_b, correlations, options).solve()
        cached = Solver(spec, params_a, params_b, correlations, options, cache=cache).solve()
        _same(cached, fresh)
        winners.add(fresh.start)
    # Both regimes are covered: the activation start kept (different init) and another start winning (same init).
    assert winners == ({"activation"} if pair == "different_init" else {"activation", "weight"})


@pytest.mark.parametrize("pair", ["different_init", "same_init"])
def test_a_full_solve_after_a_single_start_one_at_the_same_alpha_reuses_its_sweeps_and_equals_a_fresh_one(
        pair, monkeypatch):
    """The α search's order: every candidate from the activation start alone, then the chosen α with every start.
    The second solve at an α takes that α's refined activation start from the cache (no sweeps from it) and
    returns exactly what a fresh solve returns."""
    spec, params_a, params_b, correlations = _inputs(pair)
    cache = SolveCache()
    single = {alpha: SolveOptions(matcher="zip", alpha=alpha) for alpha in ALPHA_GRID}
    candidates = {alpha: Solver(spec, params_a, params_b, correlations, options, cache=cache).solve()
                  for alpha, options in single.items()}
    own_sweeps = []
    real_sweeps = Solver._sweeps

    def counting_sweeps(self, *args, label="solve", **kwargs):
        own_sweeps.append(label == "solve" and not kwargs.get("weight_only", False))
        return real_sweeps(self, *args, label=label, **kwargs)

    monkeypatch.setattr(Solver, "_sweeps", counting_sweeps)
    assert sorted(cache.refined) == sorted(cache.visits) == sorted(ALPHA_GRID)
    cache.keep_alpha(0.7)  # the search chose 0.7: the other alphas' refined starts and visits are dropped
    assert list(cache.refined) == list(cache.visits) == [0.7]
    # At 0.7: no sweeps from the activation start, then the weight-only solve, the weight and identity starts.
    # At 0.1 (dropped): the activation start's sweeps run again; the weight-only solve is cached.
    for alpha, expected in ((0.7, [False] * 3), (0.1, [True, False, False])):
        options = SolveOptions(matcher="zip", alpha=alpha, extra_starts=STARTS)
        own_sweeps.clear()
        full = Solver(spec, params_a, params_b, correlations, options, cache=cache).solve()
        assert own_sweeps == expected
        _same(full, Solver(spec, params_a, params_b, correlations, options).solve())
        assert full.starts["activation"] == candidates[alpha].starts["activation"]
    for alpha, options in single.items():
        _same(candidates[alpha], Solver(spec, params_a, params_b, correlations, options).solve())


def test_the_alpha_free_work_is_done_once(monkeypatch):
    spec, params_a, params_b, correlations = _inputs("different_init")
    calls = {"weight_correlations": 0, "weight_sweeps": 0}
    real_call, real_sweeps = WeightCorrelation.__call__, Solver._sweeps

    def counting_call(self, *args, **kwargs):
        calls["weight_correlations"] += 1
        return real_call(self, *args, **kwargs)

    def counting_sweeps(self, *args, weight_only=False, **kwargs):
        calls["weight_sweeps"] += weight_only
        return real_sweeps(self, *args, weight_only=weight_only, **kwargs)

    monkeypatch.setattr(WeightCorrelation, "__call__", counting_call)
    monkeypatch.setattr(Solver, "_sweeps", counting_sweeps)
    per_solve = {}
    cache = SolveCache()
    for label, shared in (("first", cache), ("second", cache), ("fresh", None)):
        calls.update(weight_correlations=0, weight_sweeps=0)
        options = SolveOptions(matcher="zip", alpha=0.3 if label != "first" else 0.7, extra_starts=STARTS)
        Solver(spec, params_a, params_b, correlations, options, cache=shared).solve()
        per_solve[label] = dict(calls)
    assert per_solve["first"]["weight_sweeps"] == 1 and per_solve["fresh"]["weight_sweeps"] == 1
    assert per_solve["second"]["weight_sweeps"] == 0  # the weight start is reused
    # The weight start's solve and both starts' scores are not recomputed: fewer weight correlations than fresh.
    groups = len(spec.groups)
    assert per_solve["second"]["weight_correlations"] <= per_solve["fresh"]["weight_correlations"] - 2 * groups
    assert cache.weight_start is not None and cache.activation_start is not None
    assert sorted(cache.start_entries) == ["identity", "weight"]
    assert all(len(entries) == groups for entries in cache.start_entries.values())


def test_a_solve_of_other_inputs_empties_the_cache_first():
    spec, params_a, params_b, correlations = _inputs("different_init")
    _, _, other_b, other_correlations = _inputs("same_init")
    cache = SolveCache()
    options = SolveOptions(matcher="zip", alpha=0.5, extra_starts=STARTS)
    Solver(spec, params_a, params_b, correlations, options, cache=cache).solve()
    first_start = cache.weight_start
    for changed in ({"options": SolveOptions(matcher="zip", alpha=0.5, seed=3, extra_starts=STARTS)},
                    {"params_b": other_b, "correlations": other_correlations}):
        inputs = {"params_b": params_b, "correlations": correlations, "options": options, **changed}
        fresh = Solver(spec, params_a, inputs["params_b"], inputs["correlations"], inputs["options"]).solve()
        cached = Solver(spec, params_a, inputs["params_b"], inputs["correlations"], inputs["options"],
                        cache=cache).solve()
        _same(cached, fresh)
        assert cache.weight_start is not first_start
        first_start = cache.weight_start


def _neighbourhood(spec, group_index: int, maps) -> tuple:
    """What a weight correlation of `group_index` reads: the maps of the groups its members share tensors with."""
    key = []
    for member in spec.groups[group_index].members:
        if member.ignore:
            continue
        for other, _ in spec.axes_of(member.param):
            if other == group_index:
                continue
            found = maps[other]
            key.append((other, None if found is None else tuple(
                (tuple(m.index.tolist()), tuple(m.weight.tolist()), m.size) for m in (*found.merge2, *found.unmerge))))
    return group_index, tuple(sorted(set(key), key=repr))


def _count_weight_correlations(monkeypatch, spec):
    """Patch `WeightCorrelation.__call__` to count each (group, neighbourhood) it computes."""
    computed: dict[tuple, int] = {}
    real_call = WeightCorrelation.__call__

    def counting_call(self, group_index, maps):
        key = _neighbourhood(spec, group_index, maps)
        computed[key] = computed.get(key, 0) + 1
        return real_call(self, group_index, maps)

    monkeypatch.setattr(WeightCorrelation, "__call__", counting_call)
    return computed


def _search_order(spec, params_a, params_b, correlations, cache):
    """The α search's solves: every candidate from the activation start alone, then the chosen α with every start."""
    for alpha in ALPHA_GRID:
        Solver(spec, params_a, params_b, correlations, SolveOptions(matcher="zip", alpha=alpha), cache=cache).solve()
    cache.keep_alpha(0.5)
    options = SolveOptions(matcher="zip", alpha=0.5, extra_starts=STARTS)
    return Solver(spec, params_a, params_b, correlations, options, cache=cache).solve()


@pytest.mark.parametrize("pair", ["different_init", "same_init"])
def test_the_alpha_search_computes_each_weight_correlation_once(pair, monkeypatch):
    """A weight correlation depends only on the matches of the groups sharing a tensor with its group; the search's
    solves all begin from the activation start and meet the same neighbourhoods again (on MiniLM two in three weight
    correlations of an auto-α merge were recomputations). With room for all of them, each is computed once."""
    spec, params_a, params_b, correlations = _inputs(pair)
    computed = _count_weight_correlations(monkeypatch, spec)
    monkeypatch.setattr(loop, "WEIGHT_CACHE_PER_GROUP", 1000)  # the toy meets many neighbourhoods per group
    _search_order(spec, params_a, params_b, correlations, SolveCache())
    assert computed and max(computed.values()) == 1
    # Without the room to keep one, the same neighbourhoods are computed again (what the cache saves).
    computed.clear()
    monkeypatch.setattr(loop, "WEIGHT_CACHE_BYTES", 0)
    _search_order(spec, params_a, params_b, correlations, SolveCache())
    assert max(computed.values()) > 1


def test_one_solve_alone_keeps_no_weight_correlation():
    """Only the α search's solves share weight correlations: a solve alone meets few neighbourhoods twice (on MiniLM
    28 of 100 weight correlations, 5 CPU s, for ~0.7 GB kept), so it keeps none — and returns what a cached solve
    returns."""
    spec, params_a, params_b, correlations = _inputs("same_init")
    options = SolveOptions(matcher="zip", alpha=0.5, extra_starts=STARTS)
    alone = Solver(spec, params_a, params_b, correlations, options)
    _same(alone.solve(), Solver(spec, params_a, params_b, correlations, options, cache=SolveCache()).solve())
    assert alone.weight_cache.budget == 0 and alone.weight_cache.held_bytes == 0 and not alone.weight_cache.entries()


@pytest.mark.parametrize("entries", [0, 1, 3, 1000])
@pytest.mark.parametrize("pair", ["different_init", "same_init"])
def test_the_weight_correlation_cache_keeps_to_its_budget_and_changes_no_result(pair, entries, monkeypatch):
    """Whatever room it has — none, one entry, a few (least recently used dropped first), all — every solve of the
    search returns exactly what a solve alone (no cache) returns, the entries held never exceed the budget, and an
    entry is what a fresh computation gives (no caller modified it in place)."""
    spec, params_a, params_b, correlations = _inputs(pair)
    widest = max(group.width for group in spec.groups)
    budget = entries * 8 * (2 * widest) ** 2
    monkeypatch.setattr(loop, "WEIGHT_CACHE_BYTES", budget)
    # At most 4 upper triangles of every group's correlation (1000 full widest matrices are more).
    by_groups = 4 * sum(8 * packed_size(2 * group.width) for group in spec.groups)
    budget = min(budget, by_groups)
    cache = SolveCache()
    for alpha in (*ALPHA_GRID, 1.0):
        options = SolveOptions(matcher="zip", alpha=alpha, extra_starts=STARTS)
        cached = Solver(spec, params_a, params_b, correlations, options, cache=cache).solve()
        _same(cached, Solver(spec, params_a, params_b, correlations, options).solve())
        held = cache.weight_correlations
        assert held.budget == budget and held.held_bytes <= budget
        # Each entry is kept as its upper triangle (half the memory), and unpacked bit for bit.
        assert held.held_bytes == sum(8 * packed_size(len(t)) for _, _, t in held.entries())
        if entries == 0:
            assert held.held_bytes == 0
        fresh = WeightCorrelation(spec, params_a, params_b)
        for index, neighbours, tensor in held.entries():
            maps = [None] * len(spec.groups)
            for other, found in neighbours.items():
                maps[other] = None if found is None else GroupMaps.from_match(found)
            assert torch.equal(tensor, fresh(index, maps))


@pytest.mark.parametrize(("available", "expected"), [
    (None, loop.WEIGHT_CACHE_BYTES), (10**12, loop.WEIGHT_CACHE_BYTES), (4 * 10**8, 10**8), (0, 0)])
def test_the_weight_correlation_cache_takes_at_most_a_quarter_of_the_memory_available(monkeypatch, available,
                                                                                      expected):
    monkeypatch.setattr(loop, "available_memory", lambda: available)
    assert loop.weight_cache_bytes([10**5], 2) == expected  # groups far larger than the budget
    # Small groups bound it by their size: 4 upper triangles of each (N·n, N·n) correlation.
    small = 4 * 8 * 30 * 30 + 4 * 8 * 12 * 12  # one block of rows each (fewer than PACK_ROWS): the whole matrix
    assert loop.weight_cache_bytes([10, 4], 3) == min(expected, small)
    spec, params_a, params_b, correlations = _inputs("different_init")
    cache = SolveCache()
    Solver(spec, params_a, params_b, correlations, SolveOptions(alpha=0.5), cache=cache)
    assert cache.weight_correlations.budget == loop.weight_cache_bytes([g.width for g in spec.groups], 2)


def test_the_weight_correlation_cache_drops_the_least_recently_used_entry_first():
    """Hand-made: three 2x2 symmetric correlations in a budget of two (4 values each: one block of rows); a lookup
    makes an entry the most recently used."""
    first, second = (Match(cluster_of=torch.tensor([0, 1, 1, 0]), merge_weight=torch.full((4,), 0.5,
                                                                                          dtype=torch.float64),
                           num_merged=2, value=0.0) for _ in range(2))
    other = Match(cluster_of=torch.tensor([0, 1, 0, 1]), merge_weight=torch.full((4,), 0.5, dtype=torch.float64),
                  num_merged=2, value=0.0)
    matrices = [torch.tensor([[1.0, v], [v, 1.0]], dtype=torch.float64) for v in (0.1, 0.2, 0.3)]
    cache = loop.WeightCorrelationCache(2 * 4 * 8)
    cache.put(0, {1: first}, matrices[0])
    cache.put(5, {1: other}, matrices[1])
    # `second` is another object with `first`'s unit assignment: the same neighbourhood.
    assert torch.equal(cache.get(0, {1: second}), matrices[0]) and cache.get(0, {1: other}) is None
    cache.put(7, {2: None}, matrices[2])  # evicts group 5's entry, the least recently used
    assert cache.get(5, {1: other}) is None and torch.equal(cache.get(7, {2: None}), matrices[2])
    assert torch.equal(cache.get(0, {1: first}), matrices[0]) and cache.held_bytes == 2 * 4 * 8
    got = cache.get(0, {1: first})
    got.add_(1.0)  # the caller's own copy
    assert torch.equal(cache.get(0, {1: first}), matrices[0])
    cache.put(9, {}, torch.eye(3, dtype=torch.float64))  # 9 values: more than the whole budget, not kept
    assert [group for group, _, _ in cache.entries()] == [7, 0]
