"""`reference_compat=True` reproduces the MuDSC reference implementation's merged weights (issue 3, item 6).

The reference is played by tests/reference_mudsc.py, a slow, literal re-implementation that shares no
code with the library. Two tiny ViTs from different seeds (same label set) make every matching
non-trivial; the q/k and v head pairings of the reference disagree on them, which is what separates the
library's default (shared head pairing, exact normaliser) from the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference_mudsc as ref
import torch
from factories import make_batches, make_model, relative_error

import hf_mudsc
from hf_mudsc.solve.matchers import match

TOLERANCE = 1e-6
# (method, matcher, alpha, zip_decay, zip_budget)
CASES = [
    ("mudsc", "align", 0.3, 0.5, 1.0),
    ("mudsc", "align", 0.5, 0.5, 1.0),
    ("mudsc", "align", 1.0, 0.5, 1.0),
    ("mudsc", "zip", 0.3, 0.5, 1.0),
    ("mudsc", "zip", 0.5, 0.5, 1.0),
    ("mudsc", "zip", 0.5, 0.9, 0.25),  # small model budget: exhausted in every group
    ("mudsc", "zip", 0.5, 1.0, 0.0),  # budget 0: one same-model fusion still happens, then the mask
    ("zipit", "zip", 0.5, 0.5, 1.0),
    ("activation_align", "align", 0.5, 0.5, 1.0),
    ("weight_matching", "align", 0.5, 0.5, 1.0),
]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def parents():
    model_a, model_b = make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)
    assert model_a.config.id2label == model_b.config.id2label
    batches = make_batches("vit_cls", num_batches=3)
    act = ref.activation_correlations(model_a, model_b, ref.vit_groups(model_a), batches)
    return model_a, model_b, batches, act


@pytest.fixture(scope="module")
def oracle(parents):
    model_a, model_b, batches, act = parents
    cache: dict[tuple, ref.OracleResult] = {}

    def get(method, matcher, alpha=0.5, decay=0.5, budget=1.0, eps=ref.REFERENCE_EPS) -> ref.OracleResult:
        key = (method, matcher, alpha, decay, budget, eps)
        if key not in cache:
            cache[key] = ref.reference_merge(model_a, model_b, batches, method=method, matcher=matcher,
                                             alpha=alpha, zip_decay=decay, zip_budget=budget, eps=eps, act=act)
        return cache[key]

    return get


def library_merge(parents, method, matcher, alpha=0.5, decay=0.5, budget=1.0, **switches):
    """The library's merge with float64 statistics: the oracle computes in exact float64, and the tolerances
    here are tighter than the float32-GEMM default's rounding (that path is checked in test_performance_paths)."""
    model_a, model_b, batches, _ = parents
    switches.setdefault("statistics_dtype", "float64")
    switches.setdefault("refit", "none")  # the reference's merge has no refit (reference_compat=True implies none)
    return hf_mudsc.merge([model_a, model_b], batches, method=method, matcher=matcher, alpha=alpha,
                          zip_decay=decay, zip_budget=budget, progress=False, **switches)


def max_diff(merged: torch.nn.Module, expected: dict[str, torch.Tensor]) -> float:
    params = {k: v.detach().to(torch.float64) for k, v in merged.named_parameters()}
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert params[name].shape == value.shape, name
    return max(float((params[name] - value).abs().max()) for name, value in expected.items())


# ------------------------------------------------------------------------------------------------
# The oracle checks itself first: a wrong oracle would make the comparisons meaningless.
# ------------------------------------------------------------------------------------------------
def test_oracle_group_table_covers_every_parameter(parents):
    model_a = parents[0]
    groups = ref.vit_groups(model_a)
    params = dict(model_a.named_parameters())
    table = ref.axes_of(groups)
    assert set(params) - set(table) == {"classifier.bias"}  # the only averaged tensor, as in the reference
    for group in groups:
        for name, axis, _ in group.members:
            assert params[name].shape[axis] == group.width, (group.name, name)
    assert [g.name for g in groups][:4] == ["residual", "vit.layers.0.attention.qk", "vit.layers.0.attention.v",
                                            "vit.layers.0.mlp"]


def _permuted_with_oracle_table(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A function-equivalent copy: random units per group, one head order per attention block."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    groups = ref.vit_groups(model)
    perms, head_orders = [], {}
    for group in groups:
        g = group.width // group.heads
        block = group.name.rsplit(".", 1)[0]
        if group.heads > 1 and block not in head_orders:
            head_orders[block] = torch.randperm(group.heads, generator=generator)
        heads = head_orders[block] if group.heads > 1 else torch.zeros(1, dtype=torch.long)
        perms.append(torch.cat([h * g + torch.randperm(g, generator=generator) for h in heads.tolist()]))
    clone = copy.deepcopy(model)
    table = ref.axes_of(groups)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            value = param.detach().clone()
            for gi, axis, _ in table.get(name, []):
                value = value.index_select(axis, perms[gi])
            param.copy_(value)
    return clone.eval()


@pytest.mark.parametrize("method,matcher", [("activation_align", "align"), ("mudsc", "zip")])
def test_oracle_recovers_a_permuted_copy(parents, method, matcher):
    model, batches = parents[0], parents[2]
    permuted = _permuted_with_oracle_table(model, seed=3)
    with torch.no_grad():
        logits = model(pixel_values=batches[0]["pixel_values"]).logits
        assert relative_error(permuted(pixel_values=batches[0]["pixel_values"]).logits, logits) < 1e-5
    moved = sum(not torch.equal(a, b) for a, b in zip(model.parameters(), permuted.parameters()))
    assert moved > len(list(model.parameters())) // 2
    result = ref.reference_merge(model, permuted, batches, method=method, matcher=matcher, eps=0.0)
    merged = make_model("vit_cls", seed=5)
    merged.load_state_dict({k: v.to(torch.float32) for k, v in result.state_dict.items()})
    with torch.no_grad():
        assert relative_error(merged(pixel_values=batches[0]["pixel_values"]).logits, logits) < 1e-5


def test_oracle_zip_lets_a_same_model_pair_win_then_spends_the_budget():
    # units [A0, A1, B0, B1]; budget per model int((2 // 2) * 1) = 1
    sims = torch.tensor([[1.0, 0.9, 0.8, 0.1],
                         [0.9, 1.0, 0.1, 0.5],
                         [0.8, 0.1, 1.0, 0.3],
                         [0.1, 0.5, 0.3, 1.0]], dtype=torch.float64)
    found = ref.zip_match(sims, heads=1, decay=0.5, budget_factor=1.0, eps=0.0)
    # A0+A1 (0.9) first; the fused row is min(...) * 0.5 = 0.05 against both B units, so B0+B1 (0.3) wins.
    assert found.clusters == [(0, 1), (2, 3)]
    assert found.value == pytest.approx(0.6)
    assert found.events == ["model 0 budget exhausted", "model 1 budget exhausted"]
    assert torch.equal(found.merge2, found.unmerge)  # 2 * P / 2, exact normaliser


def test_oracle_zip_budget_zero_still_allows_one_same_model_fusion_and_breaks_ties_row_major():
    sims = torch.tensor([[1.0, 0.9, 0.8, 0.1],
                         [0.9, 1.0, 0.1, 0.5],
                         [0.8, 0.1, 1.0, 0.04],
                         [0.1, 0.5, 0.04, 1.0]], dtype=torch.float64)
    found = ref.zip_match(sims, heads=1, decay=0.5, budget_factor=0.0, eps=ref.REFERENCE_EPS)
    # After A0+A1, the fused cluster ties at 0.05 with B0 and B1: the row-major first (B0) is taken.
    assert found.clusters == [(0, 1, 2), (3,)]
    assert found.value == pytest.approx((0.9 + 0.05) / 2)
    assert found.events == ["model 0 budget exhausted"]
    assert found.merge2[0, 0].item() == pytest.approx(2 / (3 + 1e-5))
    assert found.merge2[3, 1].item() == pytest.approx(2 / (1 + 1e-5))


# ------------------------------------------------------------------------------------------------
# The library against the oracle
# ------------------------------------------------------------------------------------------------
def _tied_similarity(seed: int, size: int) -> torch.Tensor:
    """Few distinct values, so exact ties appear everywhere (also after min(x, y) * decay)."""
    x = np.random.default_rng(seed).integers(-3, 4, (size, size)) / 4.0
    return torch.from_numpy(np.triu(x, 1) + np.triu(x, 1).T + np.eye(size))


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("matcher,decay,budget", [("align", 0.5, 1.0), ("zip", 0.5, 1.0), ("zip", 1.0, 0.25)])
def test_library_matchers_equal_the_oracle_on_tied_similarities(matcher, heads, decay, budget):
    """Tie order, budgets and column order of the matchers alone, where real data rarely has exact ties."""
    for seed in range(6):
        sims = _tied_similarity(seed, 16)
        expected = ref.match(sims, heads, matcher, decay, budget, ref.REFERENCE_EPS)
        found = match(sims, matcher=matcher, num_heads=heads, decay=decay, budget=budget,
                      normalizer_eps=ref.REFERENCE_EPS)
        assert found.clusters() == expected.clusters, seed
        assert torch.equal(found.unmerge, expected.unmerge)
        assert torch.allclose(2 * found.merge_matrix, expected.merge2, rtol=0, atol=1e-12)
        assert found.value == pytest.approx(expected.value, abs=1e-12)
        if heads > 1:
            assert list(found.head_pairing) == expected.head_pairing


@pytest.mark.parametrize("method,matcher,alpha,decay,budget", CASES)
def test_reference_compat_reproduces_the_reference(parents, oracle, method, matcher, alpha, decay, budget):
    expected = oracle(method, matcher, alpha, decay, budget)
    if matcher == "zip":
        assert any(m.events for m in expected.mats.values())  # budgets really ran out somewhere
        if budget < 1.0:
            assert all(any(e.startswith("model") for e in m.events) for m in expected.mats.values())
    merged = library_merge(parents, method, matcher, alpha, decay, budget, reference_compat=True)
    assert max_diff(merged, expected.state_dict) < TOLERANCE
    report = merged.merge_report
    assert report.group_names == [g.name for g in expected.groups]
    assert report.group_values == pytest.approx([expected.mats[i].value for i in range(len(expected.groups))],
                                                abs=1e-9)
    if expected.history:
        assert report.objective_history == pytest.approx(expected.history, abs=1e-9)
        assert report.sweeps == len(expected.history)
    assert merged.config.mudsc["reference_compat"] is True
    assert merged.config.mudsc["independent_heads"] is True


def _disagreeing_blocks(result: ref.OracleResult) -> list[str]:
    """Attention blocks whose q/k and v groups the reference paired with different head orders."""
    pairings = {g.name: result.mats[i].head_pairing for i, g in enumerate(result.groups) if g.heads > 1}
    blocks = {name.rsplit(".", 1)[0] for name in pairings}
    return sorted(b for b in blocks if pairings[f"{b}.qk"] != pairings[f"{b}.v"])


@pytest.mark.parametrize("method,matcher", [("mudsc", "align"), ("mudsc", "zip")])
def test_default_differs_from_the_reference(parents, oracle, method, matcher):
    """Shared head pairing changes the merge itself, not just the 1e-5 normaliser."""
    expected = oracle(method, matcher)
    assert _disagreeing_blocks(expected)  # precondition: the reference's independent pairings disagree here
    exact = oracle(method, matcher, eps=0.0)
    merged = library_merge(parents, method, matcher)
    assert merged.config.mudsc["independent_heads"] is False
    assert max_diff(merged, expected.state_dict) > 1e-2
    assert max_diff(merged, exact.state_dict) > 1e-2  # so it is the head pairing, not the normaliser


def _out_axes(groups: list[ref.RefGroup]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        for name, _, role in group.members:
            counts[name] = counts.get(name, 0) + (role == "out")
    return counts


def test_independent_heads_differs_from_reference_compat_only_by_the_normaliser_align(parents, oracle):
    """With align every cluster has 2 units, so the +1e-5 normaliser scales each out axis by 2/(2+1e-5)."""
    independent = library_merge(parents, "mudsc", "align", independent_heads=True)
    compat = library_merge(parents, "mudsc", "align", reference_compat=True)
    assert independent.config.mudsc["independent_heads"] is True
    assert independent.config.mudsc["reference_compat"] is False
    groups = oracle("mudsc", "align").groups
    out_axes = _out_axes(groups)
    params_i = {k: v.detach().double() for k, v in independent.named_parameters()}
    params_c = {k: v.detach().double() for k, v in compat.named_parameters()}
    raw = max(float((params_i[k] - params_c[k]).abs().max()) for k in params_c)
    assert raw > 2 * TOLERANCE  # the normaliser is really applied by reference_compat ...
    for name, value in params_c.items():  # ... and it is the only difference
        scale = (2 / (2 + ref.REFERENCE_EPS)) ** out_axes.get(name, 0)
        assert float((params_i[name] * scale - value).abs().max()) < TOLERANCE, name


def test_independent_heads_equals_the_reference_with_an_exact_normaliser_zip(parents, oracle):
    """Zip clusters have 1-4 units, so compare with the oracle run at eps = 0 instead of rescaling."""
    independent = library_merge(parents, "mudsc", "zip", independent_heads=True)
    assert max_diff(independent, oracle("mudsc", "zip", eps=0.0).state_dict) < TOLERANCE
    assert max_diff(independent, oracle("mudsc", "zip").state_dict) > 2 * TOLERANCE
