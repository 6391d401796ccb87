"""The fast paths (gather axis maps, chunked Gram, cached visits, fp32 statistics GEMMs) give the plain answers."""

from __future__ import annotations

import pytest
import torch
from factories import CLASSIFIERS, WITH_LOGITS, make_batches, make_model, permuted_copy

import hf_mudsc
import hf_mudsc.solve.similarity as similarity
from hf_mudsc.apply.weights import apply_matches
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import CorrelationAccumulator, correlations_from, pearson_from_covariance
from hf_mudsc.calibrate.statistics import collect_statistics
from hf_mudsc.solve.loop import VISIT_CACHE_SIZE, SolveOptions, Solver
from hf_mudsc.solve.maps import AxisMap, GroupMaps, transform_axis
from hf_mudsc.solve.matchers import match
from hf_mudsc.solve.similarity import WeightCorrelation, weight_features


def _dense(index: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    matrix = torch.zeros(index.numel(), size, dtype=torch.float64)
    matrix[torch.arange(index.numel()), index] = weight
    return matrix


@pytest.mark.parametrize("kind", ["permutation", "weighted_permutation", "fusing"])
@pytest.mark.parametrize("shape,axis", [((6,), 0), ((6, 5), 0), ((4, 6), 1), ((1, 3, 6), 2), ((6, 2, 3), 0)])
def test_axis_map_equals_the_dense_product(kind, shape, axis):
    gen = torch.Generator().manual_seed(0)
    index = torch.randperm(6, generator=gen)
    weight = torch.ones(6, dtype=torch.float64)
    if kind == "weighted_permutation":
        weight = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    if kind == "fusing":
        index[index == 5] = 0
    axis_map = AxisMap(index=index, weight=weight, size=6)
    assert (axis_map.inverse is not None) == (kind != "fusing")
    assert axis_map.exact == (kind == "permutation")
    tensor = torch.randn(shape, generator=gen, dtype=torch.float64)
    expected = transform_axis(tensor, axis, _dense(index, weight, 6))
    assert torch.allclose(axis_map.apply(tensor, axis), expected, atol=1e-14)
    if axis_map.exact:  # an exact copy: the fp32 result is the fp32 input, rearranged
        dense = transform_axis(tensor.float().double(), axis, _dense(index, weight, 6))
        assert torch.equal(axis_map.apply(tensor.float(), axis).double(), dense)


def _plain_weight_correlation(spec, index, pa, pb, maps) -> torch.Tensor:
    """docs/design.md §4.3 written out: concatenate Z_A and Z_B, centre over columns, Pearson of the rows."""
    z = torch.cat([weight_features(spec, index, p, i, maps) for i, p in enumerate((pa, pb))])
    centred = z - z.mean(1, keepdim=True)
    return pearson_from_covariance(centred @ centred.T / z.shape[1])


def _maps_from_matches(spec, pa, pb, matcher: str) -> list[GroupMaps]:
    """Every group matched on its raw weight correlation: align gives permutations, zip fuses units."""
    maps = []
    for index, group in enumerate(spec.groups):
        found = match(_plain_weight_correlation(spec, index, pa, pb, [None] * len(spec.groups)),
                      matcher=matcher, num_heads=group.num_heads)
        maps.append(GroupMaps.from_matrices(found.merge_matrix, found.unmerge))
    return maps


@pytest.mark.parametrize("kind", CLASSIFIERS)
@pytest.mark.parametrize("matcher", ["align", "zip", None])
def test_weight_correlation_equals_the_dense_computation(monkeypatch, kind, matcher):
    a, b = make_model(kind, 0), make_model(kind, 1)
    spec = spec_for(a)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    maps = [None] * len(spec.groups) if matcher is None else _maps_from_matches(spec, pa, pb, matcher)
    monkeypatch.setattr(similarity, "_CHUNK_ELEMENTS", 500)  # many chunks per group
    cached = WeightCorrelation(spec, pa, pb)
    for _ in range(2):  # the second call reads the cached constant part
        for index in range(len(spec.groups)):
            expected = _plain_weight_correlation(spec, index, pa, pb, maps)
            assert torch.allclose(cached(index, maps), expected, atol=1e-10), spec.groups[index].name


def test_accumulator_float32_gemm_matches_float64_for_large_means():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4000, 16, generator=gen) @ torch.randn(16, 16, generator=gen) + 50.0).float()
    exact, fast = CorrelationAccumulator(16), CorrelationAccumulator(16, dtype=torch.float32)
    for chunk in x.split(512):
        exact.update(chunk)
        fast.update(chunk)
    assert torch.allclose(exact.finalize(), torch.corrcoef(x.double().T), atol=1e-12)
    assert torch.allclose(fast.finalize(), exact.finalize(), atol=1e-5)
    assert fast.count == exact.count == 4000
    # The float32 shift is stored exactly, so the summable tensors describe the same data.
    assert torch.allclose(fast.tensors()[0] / 4000, x.double().mean(0), rtol=1e-6)


class _NoCache(dict):
    def get(self, key, default=None):
        return default


def _perturbed_copy(model, spec, seed: int, noise: float):
    other = permuted_copy(model, spec, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(noise * torch.randn(param.shape, generator=gen))
    return other


@pytest.mark.parametrize("starts", [(), ("weight", "identity")], ids=["one start", "three starts"])
@pytest.mark.parametrize("matcher", ["align", "zip"])
def test_cached_solve_equals_the_uncached_solve(matcher, starts):
    # With three starts the cache also serves a later start the results an earlier one computed for the same
    # neighbouring matches (equal unit assignments in other Match objects): still exactly the uncached solve.
    a, b = make_model("bert_cls", 0), make_model("bert_cls", 1)  # unrelated: the solve wanders for sweeps
    spec = spec_for(a)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    correlations = [acc.finalize() for acc in collect_statistics(a, b, spec, make_batches("bert_cls"), progress=False)]
    options = SolveOptions(matcher=matcher, max_sweeps=8, extra_starts=starts)
    fast = Solver(spec, pa, pb, correlations, options)
    plain = Solver(spec, pa, pb, correlations, options)
    plain._visit_cache = _NoCache()
    got, expected = fast.solve(), plain.solve()
    assert got.objective_history == expected.objective_history and got.sweeps == expected.sweeps >= 2
    assert got.starts == expected.starts and got.start == expected.start
    assert list(got.starts) == ["activation", *starts]
    for g, e in zip(got.matches, expected.matches):
        assert torch.equal(g.unmerge, e.unmerge) and g.value == e.value
    # The weight start's own (weight-only) visits are freed once it has run; the rest stay bounded.
    assert all(not weight_only for weight_only, _ in fast._visit_cache)
    assert all(len(entries) <= VISIT_CACHE_SIZE for entries in fast._visit_cache.values())


def test_consumed_weight_moments_give_the_same_correlation_bitwise():
    # The solve finalizes each weight correlation inside its Gram buffer, a few rows at a time; every entry must
    # equal the plain formula's exactly (the merged weights are digested bit for bit).
    gen = torch.Generator().manual_seed(0)
    width = 300  # 2n = 600 rows: more than one block of _CORRELATION_ROWS, and a ragged last block
    z = torch.randn(2 * width, 50, generator=gen, dtype=torch.float64) * torch.rand(2 * width, 1, generator=gen)
    z[3] = 0.0  # a zero-variance unit: its row and column stay zero
    plain, consumed = similarity._Moments(width), similarity._Moments(width)
    for moments in (plain, consumed):
        moments.add_stacked(z)
    expected = plain.correlation()
    got = consumed.correlation(consume=True)
    assert torch.equal(got, expected)
    assert torch.equal(plain.correlation(), expected)  # the plain call leaves its sums untouched
    assert got[3].abs().sum() == 0 and got[:, 3].abs().sum() == 0


@pytest.mark.parametrize("matcher", ["align", "zip"])
def test_float32_statistics_give_the_default_merged_weights(matcher):
    a = make_model("bert_cls", 0)
    spec = spec_for(a)
    b = _perturbed_copy(a, spec, seed=1, noise=0.02)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    merged = []
    for dtype in (torch.float64, torch.float32):
        accumulators = [CorrelationAccumulator(2 * g.width, dtype=dtype) for g in spec.groups]
        collect_statistics(a, b, spec, make_batches("bert_cls"), progress=False, accumulators=accumulators)
        result = Solver(spec, pa, pb, [acc.finalize() for acc in accumulators],
                        SolveOptions(matcher=matcher)).solve()
        merged.append(apply_matches(spec, pa, pb, result.matches))
    for name, value in merged[0].items():
        assert torch.allclose(merged[1][name], value, atol=1e-6), name


@pytest.mark.parametrize("kind", WITH_LOGITS)
@pytest.mark.parametrize("matcher", ["align", "zip"])
def test_merge_statistics_dtypes_agree(kind, matcher):
    """The default float32-GEMM statistics give `hf_mudsc.merge` the float64 path's weights to 1e-6."""
    a = make_model(kind, 0)
    b = _perturbed_copy(a, spec_for(a), seed=1, noise=0.02)
    batches = make_batches(kind)
    exact = hf_mudsc.merge([a, b], batches, matcher=matcher, statistics_dtype="float64", progress=False)
    fast = hf_mudsc.merge([a, b], batches, matcher=matcher, progress=False)
    assert fast.config.mudsc["statistics_dtype"] == "float32"
    assert exact.config.mudsc["statistics_dtype"] == "float64"
    assert fast.merge_report.group_values == pytest.approx(exact.merge_report.group_values, abs=1e-6)
    expected = exact.state_dict()
    for name, value in fast.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def test_merge_refuses_an_unknown_statistics_dtype():
    a = make_model("vit_cls", 0)
    with pytest.raises(hf_mudsc.MergeInputError, match="statistics_dtype.*float32, float64"):
        hf_mudsc.merge([a, a], make_batches("vit_cls"), statistics_dtype="bfloat16", progress=False)


def test_merge_report_lists_the_matches():
    a = make_model("vit_cls", 0)
    spec = spec_for(a)
    b = permuted_copy(a, spec, seed=3)
    merged = hf_mudsc.merge([a, b], make_batches("vit_cls"), matcher="align", progress=False)
    matches = merged.merge_report.matches
    assert len(matches) == len(spec.groups)
    for group, found in zip(spec.groups, matches):
        assert found.unmerge.shape == (2 * group.width, group.width)
    averaged = hf_mudsc.merge([a, b], None, method="average", progress=False)
    assert averaged.merge_report.matches == [None] * len(spec.groups)


def test_in_place_finalize_equals_finalize_and_consumes_the_sums():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(700, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 10, generator=gen).double()
    x[:, 3] = 2.0  # a zero-variance unit: zero row and column, as in `finalize`
    accumulators = []
    for dtype in (torch.float64, torch.float32):
        acc = CorrelationAccumulator(10, dtype=dtype)
        for chunk in x.split(64):
            acc.update(chunk)
        accumulators.append(acc)
    expected = [acc.finalize() for acc in accumulators]
    got = correlations_from(list(accumulators))
    for e, g in zip(expected, got):
        assert torch.equal(g[3], torch.zeros(10)) and torch.allclose(g, e, atol=1e-13)
    rows = CorrelationAccumulator(10)
    rows.update(x)
    assert torch.allclose(rows.finalize_in_place(chunk_rows=3), expected[0], atol=1e-13)
    for use in (lambda: rows.update(x), rows.finalize, rows.tensors, lambda: rows.combine(accumulators[0])):
        with pytest.raises(RuntimeError, match="consumed by finalize_in_place"):
            use()
