"""Matchers (docs/design.md §4.6): hand-checked clusters, invariants, fast zip == reference loop, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hf_mudsc.solve.matchers import MATCHERS, Match, attention_head_scores, match, pair_attention_heads, zip_reference


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def sym(size: int, entries: dict[tuple[int, int], float], fill: float = 0.0) -> torch.Tensor:
    """Symmetric float64 matrix with unit diagonal, ``fill`` off the diagonal and the given pairs."""
    c = torch.full((size, size), fill, dtype=torch.float64)
    c.fill_diagonal_(1.0)
    for (i, j), v in entries.items():
        c[i, j] = c[j, i] = v
    return c


def columns(m: Match) -> list[set[int]]:
    return [set(c) for c in m.clusters()]


def as_sets(m: Match) -> set[frozenset[int]]:
    return {frozenset(c) for c in m.clusters()}


def u(cols: list[set[int]], size: int) -> torch.Tensor:
    """Expected unmerge matrix from explicit column contents."""
    out = torch.zeros(size, len(cols), dtype=torch.float64)
    for j, rows in enumerate(cols):
        out[sorted(rows), j] = 1.0
    return out


def random_symmetric(rng: np.random.Generator, size: int, kind: str) -> torch.Tensor:
    if kind == "normal":
        x = rng.standard_normal((size, size))
    elif kind == "ties":  # few distinct values: exact ties everywhere, also after min(x, y) * decay
        x = rng.integers(-2, 3, (size, size)).astype(np.float64)
    elif kind == "negative":
        x = -np.abs(rng.standard_normal((size, size)))
    elif kind == "float32":  # correlations of float32 features: near-ties and rounding
        feats = rng.standard_normal((size, 12)).astype(np.float32)
        return torch.from_numpy(np.corrcoef(feats).astype(np.float32))
    else:
        raise AssertionError(kind)
    return torch.from_numpy(np.triu(x) + np.triu(x, 1).T)


# The 3+3 example: A0~B2 (0.9), A1~B0 (0.8), A2~B1 (0.7); other pairs 0.1 (same model) / 0.2 (cross).
PERM3 = sym(
    6,
    {**{(i, j): 0.2 for i in range(3) for j in range(3, 6)}, (0, 5): 0.9, (1, 3): 0.8, (2, 4): 0.7},
    fill=0.1,
)
PERM3_U = u([{0, 5}, {1, 3}, {2, 4}], 6)


# ---------------------------------------------------------------------------------------------------
# Align and zip: hand-checked cases
# ---------------------------------------------------------------------------------------------------
def test_align_recovers_known_permutation() -> None:
    m = match(PERM3, matcher="align")
    assert torch.equal(m.unmerge, PERM3_U)
    assert m.value == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert m.head_pairing is None


def test_zip_recovers_known_permutation() -> None:
    # 0.9 (A0,B2) first; the fused row is min(...) * 0.5 = 0.05, so 0.8 (A1,B0) then 0.7 (A2,B1) follow.
    m = match(PERM3, matcher="zip")
    assert torch.equal(m.unmerge, PERM3_U)
    assert m.value == pytest.approx(0.8)
    assert torch.equal(zip_reference(PERM3).unmerge, PERM3_U)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_permuted_features_are_recovered(matcher: str) -> None:
    rng = np.random.default_rng(1)
    n = 10
    a = rng.standard_normal((n, 50))
    perm = rng.permutation(n)  # B unit i is A unit perm[i]
    c = torch.from_numpy(np.corrcoef(np.vstack([a, a[perm]])))
    m = match(c, matcher=matcher)
    inverse = np.argsort(perm)
    assert as_sets(m) == {frozenset({i, n + int(inverse[i])}) for i in range(n)}
    assert m.value == pytest.approx(1.0)


def test_zip_same_model_pair_wins() -> None:
    # A0-A1 = 0.95 beats every cross pair; the fused {A0,A1} row is min(0.6, 0.4) * 0.5 = 0.2 and
    # min(0.2, 0.5) * 0.5 = 0.1, so B2-B3 = 0.3 is next. Align on the same matrix must keep the cross pairs.
    c = sym(4, {(0, 1): 0.95, (2, 3): 0.3, (0, 2): 0.6, (1, 2): 0.4, (0, 3): 0.2, (1, 3): 0.5})
    m = match(c, matcher="zip")
    assert torch.equal(m.unmerge, u([{0, 1}, {2, 3}], 4))
    assert m.value == pytest.approx((0.95 + 0.3) / 2)
    assert torch.equal(match(c, matcher="align").unmerge, u([{0, 2}, {1, 3}], 4))


# n = 4: strong same-model pairs inside both models, weak "diagonal" cross pairs A_i ~ B_i (0.5).
BUDGET4 = sym(
    8,
    {
        (0, 1): 0.9, (2, 3): 0.8, (0, 2): 0.7, (0, 3): 0.7, (1, 2): 0.7, (1, 3): 0.7,
        (4, 5): 0.85, (6, 7): 0.75, (4, 6): 0.65, (4, 7): 0.65, (5, 6): 0.65, (5, 7): 0.65,
        (0, 4): 0.5, (1, 5): 0.5, (2, 6): 0.5, (3, 7): 0.5,
    },
)  # fmt: skip


def test_zip_budget_zero_still_allows_one_same_model_fusion_per_model() -> None:
    # budget 0: (A0,A1) then (B4,B5) each spend their model's budget and mask that model; the rest go cross.
    m = match(BUDGET4, matcher="zip", budget=0.0)
    assert torch.equal(m.unmerge, u([{0, 1}, {2, 6}, {3, 7}, {4, 5}], 8))
    assert m.value == pytest.approx((0.9 + 0.85 + 0.5 + 0.5) / 4)


def test_zip_budget_one_allows_n_over_2_same_model_fusions() -> None:
    # budget 1 -> int((4 // 2) * 1) = 2 same-model fusions per model: A0A1, B4B5, A2A3, B6B7.
    m = match(BUDGET4, matcher="zip", budget=1.0)
    assert torch.equal(m.unmerge, u([{0, 1}, {2, 3}, {4, 5}, {6, 7}], 8))
    assert m.value == pytest.approx((0.9 + 0.85 + 0.8 + 0.75) / 4)


@pytest.mark.parametrize(
    ("decay", "expected", "value"),
    [
        (1.0, [{0, 1, 2}, {3}], (0.9 + 0.8) / 2),  # fused {A0,B2} keeps 0.8 > B-A1/B3 0.5: it absorbs A1
        (0.5, [{0, 2}, {1, 3}], (0.9 + 0.5) / 2),  # decayed to 0.4 < 0.5: A1-B3 is picked instead
    ],
)
def test_zip_decay(decay: float, expected: list[set[int]], value: float) -> None:
    c = sym(4, {(0, 2): 0.9, (0, 1): 0.8, (2, 3): 0.8, (1, 2): 0.85, (0, 3): 0.8, (1, 3): 0.5})
    m = match(c, matcher="zip", decay=decay)
    assert torch.equal(m.unmerge, u(expected, 4))
    assert m.value == pytest.approx(value)


def test_zip_decay_raises_negative_entries_and_ties_go_row_major() -> None:
    # After (A0,B2) = -0.1 the fused row is min(-0.5,-0.6)*0.5 = -0.3 (raised from -0.5/-0.6) and
    # min(-0.7,-0.8)*0.5 = -0.4; -0.3 ties with A1-B3: row-major order picks (0, 1) first.
    c = sym(4, {(0, 2): -0.1, (0, 1): -0.5, (1, 2): -0.6, (0, 3): -0.7, (2, 3): -0.8, (1, 3): -0.3})
    assert -0.6 * 0.5 == -0.3
    m = match(c, matcher="zip")
    assert torch.equal(m.unmerge, u([{0, 1, 2}, {3}], 4))
    assert m.value == pytest.approx(-0.2)
    assert torch.equal(zip_reference(c).unmerge, m.unmerge)


# ---------------------------------------------------------------------------------------------------
# Group matchers
# ---------------------------------------------------------------------------------------------------
# n = 4, 2 heads of 2: A heads {0,1},{2,3}; B heads {4,5},{6,7}. A head 0 ~ B head 1 (0->7, 1->6),
# A head 1 ~ B head 0 (2->4, 3->5). Same-model entries 0.
HEADS4 = sym(
    8,
    {
        (0, 7): 0.9, (1, 6): 0.8, (0, 6): 0.1, (1, 7): 0.1,
        (2, 4): 0.7, (3, 5): 0.6, (2, 5): 0.1, (3, 4): 0.1,
        (0, 4): 0.1, (0, 5): 0.3, (1, 4): 0.2, (1, 5): 0.1,
        (2, 6): 0.2, (2, 7): 0.1, (3, 6): 0.1, (3, 7): 0.3,
    },
)  # fmt: skip
HEADS4_SCORES = np.array([[0.25, 0.85], [0.65, 0.25]])


def test_attention_head_scores_and_pairing() -> None:
    scores = attention_head_scores(HEADS4, 2)
    assert scores.shape == (2, 2) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, HEADS4_SCORES)
    assert pair_attention_heads(scores) == (1, 0)
    # The Hungarian, not a greedy pick: greedy would take 0.9 for A head 0 and be left with 0 + 0.5.
    assert pair_attention_heads(np.array([[0.9, 0.8, 0.0], [0.85, 0.0, 0.0], [0.0, 0.0, 0.5]])) == (1, 0, 2)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_group_matchers_hand_case(matcher: str) -> None:
    m = match(HEADS4, matcher=matcher, num_heads=2)
    assert m.head_pairing == (1, 0)
    assert torch.equal(m.unmerge, u([{0, 7}, {1, 6}, {2, 4}, {3, 5}], 8))
    if matcher == "align":  # mean score of the paired heads
        assert m.value == pytest.approx((0.85 + 0.65) / 2)
    else:  # mean of all picks: 0.9, 0.8 (pair 0) then 0.7, 0.6 (pair 1)
        assert m.value == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)


@pytest.mark.parametrize("matcher", MATCHERS)
def test_head_pairing_override(matcher: str) -> None:
    m = match(HEADS4, matcher=matcher, num_heads=2, head_pairing=[0, 1])
    assert m.head_pairing == (0, 1)
    # A head 0 with B head 0: 0->5 (0.3), 1->4 (0.2); A head 1 with B head 1: 2->6 (0.2), 3->7 (0.3).
    assert torch.equal(m.unmerge, u([{0, 5}, {1, 4}, {2, 6}, {3, 7}], 8))
    assert m.value == pytest.approx(0.25)
    if matcher == "zip":
        assert torch.equal(zip_reference(HEADS4, num_heads=2, head_pairing=(0, 1)).unmerge, m.unmerge)


# n = 4, 2 heads: same-model pairs inside every head (A 0.9 / 0.8, B 0.85 / 0.75), weak cross pairs.
GROUPBUDGET = sym(
    8,
    {
        (0, 1): 0.9,
        (2, 3): 0.8,
        (4, 5): 0.85,
        (6, 7): 0.75,
        (0, 4): 0.5,
        (1, 5): 0.4,
        (2, 6): 0.5,
        (3, 7): 0.4,
    },
)


def test_group_zip_model_budget_is_shared_across_heads() -> None:
    # budget 0: the first A-A and B-B fusions (head pair 0) mask both models everywhere; pair 1 must go cross.
    m = match(GROUPBUDGET, matcher="zip", num_heads=2, budget=0.0)
    assert m.head_pairing == (0, 1)
    assert torch.equal(m.unmerge, u([{0, 1}, {4, 5}, {2, 6}, {3, 7}], 8))
    assert m.value == pytest.approx((0.9 + 0.85 + 0.5 + 0.4) / 4)
    # budget 1: int((4 // 2) * 1) = 2 per model, so pair 1 may also fuse within each model.
    m = match(GROUPBUDGET, matcher="zip", num_heads=2, budget=1.0)
    assert torch.equal(m.unmerge, u([{0, 1}, {4, 5}, {2, 3}, {6, 7}], 8))
    assert m.value == pytest.approx((0.9 + 0.85 + 0.8 + 0.75) / 4)


def test_group_zip_per_head_budget() -> None:
    # n = 8, 2 heads of g = 4. A head 0 is one tight family (0.9x, decay 1 keeps fused rows high), so without
    # limits it would fuse 3 times; the per-head budget g // 2 = 2 stops it even with a huge model budget.
    n, g = 8, 4
    entries = {(0, 1): 0.95, (0, 2): 0.94, (0, 3): 0.93, (1, 2): 0.92, (1, 3): 0.91, (2, 3): 0.9}
    entries |= {(i, n + i): 0.5 for i in range(n)}  # A_i ~ B_i: pairs head j with head j
    c = sym(2 * n, entries)

    def same_a(cols: list[set[int]]) -> int:  # A-A fusions = (A units - 1) summed over columns with A units
        return sum(len([i for i in col if i < n]) - 1 for col in cols if any(i < n for i in col))

    m = match(c, matcher="zip", num_heads=2, budget=10.0, decay=1.0)
    assert m.head_pairing == (0, 1)
    assert same_a(columns(m)[:g]) == 2
    assert {0, 1, 2} <= columns(m)[0]  # 0.95 then 0.92 (= min(0.94, 0.92)), then head 0 is masked
    assert torch.equal(m.unmerge, zip_reference(c, num_heads=2, budget=10.0, decay=1.0).unmerge)
    assert {0, 1, 2, 3} <= columns(match(c, matcher="zip", budget=10.0, decay=1.0))[0]  # no heads: no limit


@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("pairing", [None, (2, 0, 3, 1)])
def test_group_matchers_never_mix_heads(matcher: str, pairing: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(3)
    n, k = 24, 4
    g = n // k
    c = random_symmetric(rng, 2 * n, "normal")
    m = match(c, matcher=matcher, num_heads=k, head_pairing=pairing)
    assert m.head_pairing is not None and sorted(m.head_pairing) == list(range(k))
    if pairing is not None:
        assert m.head_pairing == pairing
    else:
        assert m.head_pairing == pair_attention_heads(attention_head_scores(c, k))
    for col, rows in enumerate(m.clusters()):
        head = col // g  # merged head j = columns j*g..(j+1)*g-1 = A head j and its partner
        a_rows = [r for r in rows if r < n]
        b_rows = [r - n for r in rows if r >= n]
        assert all(r // g == head for r in a_rows)
        assert all(r // g == m.head_pairing[head] for r in b_rows)
        if matcher == "align":
            assert len(a_rows) == len(b_rows) == 1 and a_rows[0] == col


# ---------------------------------------------------------------------------------------------------
# Invariants, values, dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("matcher", MATCHERS)
@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_shapes_and_normalisation(matcher: str, num_heads: int, eps: float) -> None:
    rng = np.random.default_rng(4)
    n = 12
    c = random_symmetric(rng, 2 * n, "normal")
    m = match(c, matcher=matcher, num_heads=num_heads, normalizer_eps=eps)
    assert m.unmerge.shape == m.merge_matrix.shape == (2 * n, n)
    assert m.unmerge.dtype == m.merge_matrix.dtype == torch.float64
    assert set(m.unmerge.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.unmerge.sum(dim=1), torch.ones(2 * n, dtype=torch.float64))  # every unit once
    colsum = m.unmerge.sum(dim=0)
    assert (colsum >= 1).all()
    assert torch.equal(m.merge_matrix, m.unmerge / (colsum + eps))
    torch.testing.assert_close(m.merge_matrix.sum(dim=0), colsum / (colsum + eps), rtol=0, atol=1e-12)
    if eps == 0.0:
        torch.testing.assert_close(m.merge_matrix.sum(dim=0), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-12)
    if matcher == "align":
        assert torch.equal(colsum, torch.full((n,), 2.0, dtype=torch.float64))
    assert (m.head_pairing is None) == (num_heads == 1)


def test_value_semantics() -> None:
    rng = np.random.default_rng(5)
    n, k = 12, 3
    c = random_symmetric(rng, 2 * n, "normal")
    cn = c.numpy()
    m = match(c, matcher="align")
    partner = [max(col) - n for col in m.clusters()]
    assert m.value == pytest.approx(np.mean([cn[i, n + p] for i, p in enumerate(partner)]))
    m = match(c, matcher="align", num_heads=k)
    scores = attention_head_scores(c, k)
    assert m.value == pytest.approx(scores[np.arange(k), list(m.head_pairing)].mean())
    for heads in (1, k):
        fast = match(c, matcher="zip", num_heads=heads)
        assert fast.value == zip_reference(c, num_heads=heads).value


def test_input_untouched_and_dtypes() -> None:
    rng = np.random.default_rng(6)
    c = random_symmetric(rng, 16, "ties")  # small integers: exact in every float dtype
    before = c.clone()
    expected = {mt: match(c, matcher=mt, num_heads=2).unmerge for mt in MATCHERS}
    for heads in (1, 2):
        for mt in MATCHERS:
            match(c, matcher=mt, num_heads=heads)
        zip_reference(c, num_heads=heads)
        attention_head_scores(c, heads)
    assert torch.equal(c, before)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mt in MATCHERS:
            assert torch.equal(match(c.to(dtype), matcher=mt, num_heads=2).unmerge, expected[mt])
    assert torch.equal(match(c.numpy(), matcher="zip", num_heads=2).unmerge, expected["zip"])


def test_nearly_symmetric_input_is_symmetrised() -> None:
    c = PERM3.clone()
    c[0, 5] += 1e-9  # rounding-level asymmetry, as a float32 X @ X.T produces
    assert torch.equal(match(c, matcher="zip").unmerge, PERM3_U)
    assert torch.equal(match(c, matcher="align").unmerge, PERM3_U)


# ---------------------------------------------------------------------------------------------------
# Fast zip == reference loop
# ---------------------------------------------------------------------------------------------------
KINDS = ("normal", "ties", "negative", "float32")


@pytest.mark.parametrize(("kind", "seed"), list(itertools.product(KINDS, range(6))))
def test_fast_zip_equals_reference(kind: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for n in range(1, 11):
        c = random_symmetric(rng, 2 * n, kind)
        for decay, budget in ((0.5, 1.0), (1.0, 0.0), (0.1, 0.25), (0.7, 2.0), (0.5, 0.5)):
            fast = match(c, matcher="zip", decay=decay, budget=budget)
            ref = zip_reference(c, decay=decay, budget=budget)
            assert as_sets(fast) == as_sets(ref), (n, decay, budget)
            assert torch.equal(fast.unmerge, ref.unmerge)  # same deterministic column order too
            assert fast.value == ref.value


@pytest.mark.parametrize(("kind", "seed"), list(itertools.product(KINDS, range(4))))
def test_fast_group_zip_equals_reference(kind: str, seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    for n, k in ((2, 2), (4, 2), (6, 3), (6, 2), (8, 4), (9, 3), (12, 4), (12, 6)):
        c = random_symmetric(rng, 2 * n, kind)
        for decay, budget in ((0.5, 1.0), (1.0, 0.0), (0.3, 0.5), (0.5, 3.0)):
            fast = match(c, matcher="zip", num_heads=k, decay=decay, budget=budget)
            ref = zip_reference(c, num_heads=k, decay=decay, budget=budget)
            assert fast.head_pairing == ref.head_pairing
            assert as_sets(fast) == as_sets(ref), (n, k, decay, budget)
            assert torch.equal(fast.unmerge, ref.unmerge)
            assert fast.value == ref.value


@pytest.mark.parametrize("num_heads", [1, 4])
def test_fast_zip_equals_reference_medium(num_heads: int) -> None:
    rng = np.random.default_rng(7)
    n = 48
    feats = rng.standard_normal((n, 30))
    noisy = (feats + 0.5 * rng.standard_normal((n, 30)))[rng.permutation(n)]
    c = torch.from_numpy(np.corrcoef(np.vstack([feats, noisy])).astype(np.float32))
    fast = match(c, matcher="zip", num_heads=num_heads)
    ref = zip_reference(c, num_heads=num_heads)
    assert torch.equal(fast.unmerge, ref.unmerge) and fast.value == ref.value


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
GOOD = PERM3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"similarity": torch.zeros(4, 6)}, "square"),
        ({"similarity": torch.zeros(8)}, "square"),
        ({"similarity": torch.zeros(0, 0)}, "empty"),
        ({"similarity": torch.eye(5)}, "even size"),
        ({"similarity": torch.eye(6), "num_heads": 2}, "not divisible by num_heads"),
        ({"similarity": torch.eye(6), "num_heads": 0}, "num_heads must be >= 1"),
        ({"similarity": torch.eye(6), "num_heads": 1.5}, "num_heads must be a positive int"),
        ({"similarity": torch.eye(6), "matcher": "greedy"}, "valid matchers: align, zip"),
        ({"similarity": torch.eye(6), "decay": 0.0}, "decay"),
        ({"similarity": torch.eye(6), "decay": 1.5}, "decay"),
        ({"similarity": torch.eye(6), "budget": -1.0}, "budget"),
        ({"similarity": torch.eye(6), "normalizer_eps": -1e-5}, "normalizer_eps"),
        ({"similarity": torch.eye(6), "head_pairing": (0, 0)}, "permutation"),
        ({"similarity": torch.eye(8), "num_heads": 2, "head_pairing": (1, 1)}, "permutation of range"),
        ({"similarity": torch.eye(8), "num_heads": 2, "head_pairing": (0, 1, 2)}, "permutation of range"),
        ({"similarity": torch.eye(8), "num_heads": 2, "head_pairing": (0.5, 1)}, "permutation of range"),
        ({"similarity": torch.eye(8), "num_heads": 2, "head_pairing": ("a", "b")}, "sequence of ints"),
        ({"similarity": torch.eye(8), "num_heads": 2, "head_pairing": 3}, "sequence of ints"),
        ({"similarity": torch.triu(torch.ones(4, 4))}, "symmetric"),
    ],
)
def test_match_errors(kwargs: dict, message: str) -> None:
    similarity = kwargs.pop("similarity")
    with pytest.raises(ValueError, match=message):
        match(similarity, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_similarity(bad: float) -> None:
    c = GOOD.clone()
    c[0, 4] = c[4, 0] = bad
    message = "NaN" if bad != bad else "infinite"
    for call in (
        lambda: match(c),
        lambda: match(c, matcher="zip"),
        lambda: attention_head_scores(c, 1),
        lambda: zip_reference(c),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_other_errors() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        match([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="not divisible"):
        attention_head_scores(torch.eye(6), 2)
    with pytest.raises(ValueError, match="square"):
        pair_attention_heads(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        pair_attention_heads(np.array([[0.0, np.nan], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="decay"):
        zip_reference(GOOD, decay=-1.0)
    with pytest.raises(ValueError, match="permutation"):
        zip_reference(torch.eye(8), num_heads=2, head_pairing=(0, 2))
