"""Streaming activation statistics, weight correlation, the blend and the sparse axis maps."""

from __future__ import annotations

import pytest
import torch
from factories import make_model

from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.correlation import CorrelationAccumulator, pearson_from_covariance
from hf_mudsc.solve.maps import AxisMap, GroupMaps, transform_axis
from hf_mudsc.solve.matchers import match
from hf_mudsc.solve.similarity import blend, weight_correlation


def test_streaming_correlation_equals_corrcoef_of_everything():
    x = torch.randn(300, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64) + 3.0
    acc = CorrelationAccumulator(12)
    for chunk in x.split(37):
        acc.update(chunk)
    assert acc.count == 300
    assert torch.allclose(acc.finalize(), torch.corrcoef(x.T), atol=1e-12)


def test_merged_shards_equal_one_accumulator():
    x = torch.randn(200, 6, dtype=torch.float64)
    whole, left, right = CorrelationAccumulator(6), CorrelationAccumulator(6), CorrelationAccumulator(6)
    whole.update(x)
    left.update(x[:77])
    right.update(x[77:])
    assert torch.allclose(left.combine(right).finalize(), whole.finalize(), atol=1e-14)
    restored = CorrelationAccumulator(6)
    restored.load_tensors([t.clone() for t in whole.tensors()])
    assert restored.count == 200 and torch.allclose(restored.finalize(), whole.finalize(), atol=1e-13)


def test_zero_variance_units_get_zero_rows():
    x = torch.randn(50, 4, dtype=torch.float64)
    x[:, 2] = 5.0
    acc = CorrelationAccumulator(4)
    acc.update(x)
    corr = acc.finalize()
    assert torch.all(corr[2] == 0) and torch.all(corr[:, 2] == 0)
    assert torch.allclose(corr.diagonal()[[0, 1, 3]], torch.ones(3, dtype=torch.float64))


def test_accumulator_errors():
    acc = CorrelationAccumulator(3)
    with pytest.raises(ValueError, match="no calibration samples"):
        acc.finalize()
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        acc.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="width 3 and 4"):
        acc.combine(CorrelationAccumulator(4))


def test_pearson_clamps_tiny_variances():
    cov = torch.diag(torch.tensor([1e-9, 1.0], dtype=torch.float64))
    assert pearson_from_covariance(cov)[0, 0] == pytest.approx(1e-9 / 1e-7)


def test_axis_map_equals_dense_contraction():
    c = torch.randn(16, 16, dtype=torch.float64)
    found = match(c @ c.T, matcher="zip")
    maps = GroupMaps.from_matrices(found.merge_matrix, found.unmerge)
    tensor = torch.randn(5, 8, 3, dtype=torch.float64)
    for model in (0, 1):
        rows = slice(model * 8, (model + 1) * 8)
        assert torch.allclose(maps.unmerge[model].apply(tensor, 1), transform_axis(tensor, 1, found.unmerge[rows]))
        merge2 = 2 * found.merge_matrix[rows]
        assert torch.allclose(maps.merge2[model].apply(tensor, -2), transform_axis(tensor, 1, merge2))
    with pytest.raises(ValueError, match="exactly one nonzero"):
        AxisMap.from_matrix(torch.ones(3, 2))


def test_weight_correlation_without_matrices_is_corrcoef_of_the_raw_rows():
    a, b = make_model("vit_cls", 0), make_model("vit_cls", 1)
    spec = spec_for(a)
    index = spec.group_index("vit.layers.0.mlp")
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    rows = [torch.cat([p["vit.layers.0.mlp.fc1.weight"], p["vit.layers.0.mlp.fc1.bias"][:, None],
                       p["vit.layers.0.mlp.fc2.weight"].T], 1) for p in (pa, pb)]
    expected = torch.corrcoef(torch.cat(rows).double())
    got = weight_correlation(spec, index, pa, pb, [None] * len(spec.groups))
    assert torch.allclose(got, expected, atol=1e-10)


def test_weight_correlation_maps_neighbour_axes_into_the_merged_space():
    """With the residual matched by the permutation that B applied, B's MLP rows line up with A's."""
    from factories import permuted_copy, random_permutations

    a = make_model("vit_cls", 0)
    spec = spec_for(a)
    b = permuted_copy(a, spec, seed=5)
    perms = random_permutations(spec, seed=5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    n = spec.groups[0].width
    # Merged residual unit i = {A_i, B_j} where B unit j is A unit perm[j].
    inverse = torch.argsort(perms[0])
    unmerge = torch.zeros(2 * n, n, dtype=torch.float64)
    unmerge[torch.arange(n), torch.arange(n)] = 1
    unmerge[n + inverse, torch.arange(n)] = 1
    maps = [None] * len(spec.groups)
    maps[0] = GroupMaps.from_matrices(unmerge / 2, unmerge)
    index = spec.group_index("vit.layers.1.mlp")
    corr = weight_correlation(spec, index, pa, pb, maps)
    width = spec.groups[index].width
    cross = corr[:width, width:]
    assert torch.allclose(cross[torch.arange(width), torch.argsort(perms[index])],
                          torch.ones(width, dtype=torch.float64))


def test_blend_checks_its_inputs():
    w, a = torch.zeros(2, 2), torch.ones(2, 2)
    assert torch.equal(blend(w, a, 0.25), 0.75 * a)
    assert blend(None, a, 0.0) is a and blend(w, None, 1.0) is w
    with pytest.raises(ValueError):
        blend(None, a, 0.5)
    with pytest.raises(ValueError):
        blend(w, None, 0.5)
