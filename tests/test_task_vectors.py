"""Known-answer tests for hf_mudsc.solve.task_vectors (hand-made tensors, arithmetic in comments)."""

import math

import pytest
import torch

import hf_mudsc.solve.task_vectors as tm

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(a.double(), torch.as_tensor(b).double(), atol=tol, rtol=0)


# ------------------------------------------------------------------------------ linear


def test_linear_weighted_and_unnormalized():
    a = {"w": T([1.0, 2.0])}
    b = {"w": T([3.0, 6.0])}
    # (1*1 + 3*3)/4 = 2.5 ; (1*2 + 3*6)/4 = 5
    assert close(tm.linear(None, [a, b], [1, 3])["w"], [2.5, 5.0])
    # normalize=False: 1*1+3*3 = 10 ; 1*2+3*6 = 20
    assert close(tm.linear(None, [a, b], [1, 3], normalize=False)["w"], [10.0, 20.0])


def test_linear_zero_weight_sum_is_an_error():
    with pytest.raises(ValueError, match="sum to 0"):
        tm.linear(None, [{"w": T([1.0])}, {"w": T([2.0])}], [1, -1])


# ---------------------------------------------------------------------- task arithmetic


def test_task_arithmetic():
    base = {"w": T([1.0, 1.0])}
    p1, p2 = {"w": T([2.0, 0.0])}, {"w": T([4.0, 1.0])}
    # deltas [1,-1], [3,0]; sum w*d = [1 + 0.5*3, -1 + 0] = [2.5, -1]
    assert close(tm.task_arithmetic(base, [p1, p2], [1, 0.5])["w"], [3.5, 0.0])
    # lambda 2 -> base + [5, -2]
    assert close(tm.task_arithmetic(base, [p1, p2], [1, 0.5], scaling=2)["w"], [6.0, -1.0])
    # normalize: /1.5 -> [1 + 2.5/1.5, 1 - 1/1.5]
    assert close(tm.task_arithmetic(base, [p1, p2], [1, 0.5], normalize=True)["w"],
                 [1 + 2.5 / 1.5, 1 - 1 / 1.5])


def test_task_arithmetic_normalize_zero_weight_sum_guard():
    base = {"w": T([0.0])}
    # weights 1 and -1 sum to 0 -> divisor replaced by 1 (mergekit's |sum| < 1e-8 guard): 1*2 + (-1)*1 = 1; the
    # method refuses such weights with normalize before loading (tests/test_option_extremes.py)
    out = tm.task_arithmetic(base, [{"w": T([2.0])}, {"w": T([1.0])}], [1, -1], normalize=True)
    assert close(out["w"], [1.0])


# -------------------------------------------------------------------------------- TIES


def test_ties_sign_election_zero_sum_elects_plus():
    base = {"w": T([0.0, 0.0, 0.0])}
    p1 = {"w": T([2.0, 1.0, 0.0])}
    p2 = {"w": T([-2.0, 3.0, 0.0])}
    out = tm.ties(base, [p1, p2], [1, 1])["w"]
    # entry 0: sum 2 + (-2) = 0 -> elected "+" -> only p1 agrees -> 2 / 1 = 2
    # entry 1: both positive -> (1 + 3) / 2 = 2
    # entry 2: nobody moved: sign(0)=0 never agrees -> sum 0, divisor 0 -> 1 -> 0 (no NaN)
    assert close(out, [2.0, 2.0, 0.0])


def test_ties_divisor_counts_only_agreeing_weights():
    base = {"w": T([0.0, 0.0])}
    p1 = {"w": T([1.0, -4.0])}
    p2 = {"w": T([2.0, 1.0])}
    out = tm.ties(base, [p1, p2], [1, 3])["w"]
    # entry 0: weighted 1, 6 -> sum 7, both agree, divisor 1+3 = 4 -> 1.75
    # entry 1: weighted -4, 3 -> sum -1 -> elected "-" -> only p1: -4 / 1 = -4
    assert close(out, [1.75, -4.0])
    # normalize=False: plain sum of agreeing weighted deltas
    assert close(tm.ties(base, [p1, p2], [1, 3], normalize=False)["w"], [7.0, -4.0])


def test_ties_trimming_top_k_with_ties_and_at_least_one():
    d = T([1.0, -2.0, 2.0, 0.5])
    # density 0.25: k = int(0.25*4) = 1 -> the largest |.| is 2 twice: first index (1) wins
    assert close(tm.magnitude_mask(d, 0.25), [0, 1, 0, 0])
    # density 0.5: k = 2 -> both 2s
    assert close(tm.magnitude_mask(d, 0.5), [0, 1, 1, 0])
    # density 0.1: int(0.4) = 0 -> at least one is kept (mergekit 0.1.5)
    assert close(tm.magnitude_mask(d, 0.1), [0, 1, 0, 0])
    # density <= 0 keeps nothing; >= 1 keeps everything
    assert close(tm.magnitude_mask(d, 0.0), [0, 0, 0, 0])
    assert close(tm.magnitude_mask(d, 1.0), [1, 1, 1, 1])
    base = {"w": torch.zeros(4)}
    out = tm.ties(base, [{"w": d}], [1], density=0.25)["w"]
    # single parent, only -2 survives; divisor = its weight 1
    assert close(out, [0.0, -2.0, 0.0, 0.0])


def test_ties_trim_then_elect_per_parent_density():
    base = {"w": torch.zeros(4)}
    p1 = {"w": T([4.0, -3.0, 1.0, 0.0])}
    p2 = {"w": T([-1.0, -1.0, 5.0, 2.0])}
    out = tm.ties(base, [p1, p2], [1, 1], density=[0.5, 0.25])["w"]
    # p1 keeps top 2: [4, -3, 0, 0]; p2 keeps top 1: [0, 0, 5, 0]
    # entry0: 4 -> 4/1 ; entry1: -3 -> -3/1 ; entry2: 5/1 ; entry3: nothing -> 0
    assert close(out, [4.0, -3.0, 5.0, 0.0])


# -------------------------------------------------------------------------------- DARE


def test_dare_mask_statistics_and_reproducibility():
    base = {"w": torch.zeros(200, 500)}
    parent = {"w": torch.ones(200, 500)}
    out = tm.dare_linear(base, [parent], [1], density=0.3, rescale=False, seed=7)["w"]
    kept = (out != 0).double().mean().item()
    # Binomial(100000, 0.3): sd = sqrt(0.3*0.7/1e5) = 0.00145; allow 7 sd
    assert abs(kept - 0.3) < 0.01
    again = tm.dare_linear(base, [parent], [1], density=0.3, rescale=False, seed=7)["w"]
    assert torch.equal(out, again)
    other = tm.dare_linear(base, [parent], [1], density=0.3, rescale=False, seed=8)["w"]
    assert not torch.equal(out, other)
    # masks depend on (seed, tensor name, parent), not on what else is merged
    two = tm.dare_linear({"a": torch.zeros(3), "w": base["w"]}, [{"a": torch.ones(3), "w": parent["w"]}],
                         [1], density=0.3, rescale=False, seed=7)["w"]
    assert torch.equal(out, two)


def test_dare_l1_rescale_keeps_l1_norm():
    delta = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])
    base = {"w": torch.zeros(8)}
    out = tm.dare_linear(base, [{"w": delta}], [1], density=0.5, seed=3)["w"]
    mask = tm.bernoulli_mask(delta, 0.5, tm.tensor_generator(3, "w", 0))
    assert 0 < mask.sum() < 8  # this seed drops some, keeps some
    # L1 before = 36; kept entries scaled by 36 / sum|kept| (not by 1/density = 2)
    factor = 36.0 / (delta.abs() * mask).sum().item()
    assert close(out, delta * mask * factor, 1e-5)
    assert abs(out.abs().sum().item() - 36.0) < 1e-4
    # rescale=False: kept entries unchanged, dropped are 0
    raw = tm.dare_linear(base, [{"w": delta}], [1], density=0.5, seed=3, rescale=False)["w"]
    assert close(raw, delta * mask)


def test_dare_density_one_is_task_arithmetic_and_ties_variant_uses_masks():
    base = {"w": T([0.0, 0.0])}
    p1, p2 = {"w": T([1.0, 2.0])}, {"w": T([3.0, -1.0])}
    assert close(tm.dare_linear(base, [p1, p2], [1, 1])["w"], [4.0, 1.0])
    # dare_ties at density 1: entry1 weighted 2, -1 -> sum 1 -> "+" -> 2; normalize off
    assert close(tm.dare_ties(base, [p1, p2], [1, 1])["w"], [4.0, 2.0])


def test_l1_rescale_guard():
    d = T([1e-9, 0.0])
    # L1 before < 1e-7 -> no rescale
    assert close(tm.l1_rescale(d, T([1.0, 0.0])), [1e-9, 0.0], 1e-15)
    # everything dropped -> zeros, not NaN
    assert close(tm.l1_rescale(T([1.0, 2.0]), T([0.0, 0.0])), [0.0, 0.0])


# -------------------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_drops_largest_and_smallest():
    d = T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0])
    # N=10, density .7 -> keep 7; gamma .1 -> drop 1 largest; n_bot = 10-7-1 = 2 smallest
    assert close(tm.outlier_mask(d, 0.7, 0.1), [0, 0, 1, 1, 1, 1, 1, 1, 1, 0])
    # density .8, gamma .3: 8 + 3 > 10 -> n_bot 0: keep the 8 smallest (only 2 large dropped)
    assert close(tm.outlier_mask(d, 0.8, 0.3), [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    # gamma .01 on 10 entries: int(0.1) = 0 large dropped -> plain top-7
    assert close(tm.outlier_mask(d, 0.7, 0.01), [0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    # density 1 (mergekit's default): no sparsification at all, gamma ignored
    assert close(tm.outlier_mask(d, 1.0, 0.1), [1] * 10)
    base = {"w": torch.zeros(10)}
    out = tm.breadcrumbs(base, [{"w": d}], [2], density=0.7, gamma=0.1)["w"]
    assert close(out, 2 * d * T([0, 0, 1, 1, 1, 1, 1, 1, 1, 0.0]))


def test_a_tiny_density_keeps_one_entry_for_ties_and_none_for_breadcrumbs_dare_della_as_mergekit():
    """mergekit 0.1.5 `sparsify`: the TIES trim keeps max(1, int(density·n)) entries, Breadcrumbs int(density·n)
    (possibly 0), DARE and DELLA each entry with probability about density. The pure functions do exactly that; the
    methods refuse a density that keeps nothing of even the largest tensor (`check_density_keeps`)."""
    base = {"w": torch.zeros(4)}
    d = T([1.0, -2.0, 3.0, -0.5])
    # ties: k = max(1, int(4e-9)) = 1 -> only 3.0 survives; one parent, divisor its weight 1
    assert close(tm.ties(base, [{"w": d}], [1], density=1e-9)["w"], [0.0, 0.0, 3.0, 0.0])
    # breadcrumbs: target = int(4e-9) = 0 -> nothing kept -> the base
    assert close(tm.breadcrumbs(base, [{"w": d}], [1], density=1e-9, gamma=0.01)["w"], [0.0] * 4)
    # DARE: each entry kept with probability 1e-9 (none here), the L1 rescale guard leaves zeros -> the base
    assert close(tm.dare_linear(base, [{"w": d}], [1], density=1e-9, seed=0)["w"], [0.0] * 4)
    # DELLA with epsilon 1e-10: probabilities 0.9e-9 to 1.1e-9 -> none kept -> the base
    assert close(tm.della(base, [{"w": d}], [1], density=1e-9, epsilon=1e-10)["w"], [0.0] * 4)
    tm.check_density_keeps("magnitude", 1e-9, 4)  # the TIES trim always keeps one
    tm.check_density_keeps("outliers", 0.25, 4)  # int(0.25 * 4) = 1 kept
    with pytest.raises(ValueError, match=r"^density 0.2 keeps no entry of even the largest tensor \(4 entries\)"):
        tm.check_density_keeps("outliers", 0.2, 4)
    with pytest.raises(ValueError, match="parent B's density 0.2 keeps on average less than one entry .* leave out "
                                         "parent B's task vector; give a density of at least 1/4 = 0.25"):
        tm.check_density_keeps("random", 0.2, 4, "parent B")


def test_breadcrumbs_ties_default_unnormalized():
    base = {"w": torch.zeros(4)}
    p1 = {"w": T([1.0, 2.0, 3.0, 4.0])}
    p2 = {"w": T([-4.0, 3.0, 2.0, 1.0])}
    # density .5 gamma .25: N=4, keep 2, drop 1 largest, n_bot = 1
    # p1 keeps |2|,|3| -> [0,2,3,0]; p2 keeps 3,2 -> [0,3,2,0]
    out = tm.breadcrumbs_ties(base, [p1, p2], [1, 1], density=0.5, gamma=0.25)["w"]
    # normalize False by default -> sums: [0, 5, 5, 0]
    assert close(out, [0.0, 5.0, 5.0, 0.0])


# -------------------------------------------------------------------------------- slerp


def test_slerp_endpoints_midpoint_and_colinear_fallback():
    a, b = {"w": T([2.0, 0.0])}, {"w": T([0.0, 1.0])}
    assert close(tm.slerp(None, [a, b], t=0.0)["w"], [2.0, 0.0])
    assert close(tm.slerp(None, [a, b], t=1.0)["w"], [0.0, 1.0])
    # orthogonal: theta = pi/2; coefficients sin(pi/4)/sin(pi/2) = 0.70710678 on the raw vectors
    s = math.sin(math.pi / 4)
    assert close(tm.slerp(None, [a, b], t=0.5)["w"], [2 * s, s])
    # colinear (cos = 1 > 0.9995) -> lerp: ([1,2] + [2,4]) / 2
    assert close(tm.slerp(None, [{"w": T([1.0, 2.0])}, {"w": T([2.0, 4.0])}], t=0.5)["w"], [1.5, 3.0])
    # antiparallel (|cos| = 1) -> lerp -> 0
    assert close(tm.slerp(None, [{"w": T([1.0, 0.0])}, {"w": T([-1.0, 0.0])}], t=0.5)["w"], [0.0, 0.0])


def test_slerp_threshold():
    # cos = 0.9996 (> 0.9995) -> lerp; cos = 0.999 -> slerp
    for c, expect_lerp in ((0.9996, True), (0.999, False)):
        v0 = T([1.0, 0.0], dtype=torch.float64)
        v1 = T([c, math.sqrt(1 - c * c)], dtype=torch.float64)
        got = tm.slerp(None, [{"w": v0}, {"w": v1}], t=0.3)["w"]
        lerp = 0.7 * v0 + 0.3 * v1
        th = math.acos(c)
        sl = (math.sin(0.7 * th) * v0 + math.sin(0.3 * th) * v1) / math.sin(th)
        assert close(got, lerp if expect_lerp else sl, 1e-12)
        if not expect_lerp:
            assert not close(got, lerp, 1e-9)


def test_slerp_needs_two_parents_and_per_tensor_t():
    with pytest.raises(ValueError):
        tm.slerp(None, [{"w": T([1.0])}], t=0.5)
    a = {"x": T([1.0, 2.0]), "y": T([1.0, 2.0])}
    b = {"x": T([3.0, 6.0]), "y": T([3.0, 6.0])}
    out = tm.slerp(None, [a, b], t={"x": 0.0, "y": 1.0})
    assert close(out["x"], [1.0, 2.0]) and close(out["y"], [3.0, 6.0])


# -------------------------------------------------------------------------- DELLA (extra)


def test_della_keep_probability_rises_with_magnitude():
    d = torch.arange(1, 4001, dtype=torch.float32).reshape(1, -1)
    base = {"w": torch.zeros_like(d)}
    out = tm.della_linear(base, [{"w": d}], [1], density=0.5, epsilon=0.2, rescale=False, seed=1)["w"]
    kept = (out != 0).double()
    lo, hi = kept[0, :1000].mean().item(), kept[0, -1000:].mean().item()
    # linear probability 0.3 -> 0.7 over ranks: first quarter mean ~0.35, last ~0.65
    assert abs(lo - 0.35) < 0.05 and abs(hi - 0.65) < 0.05
    assert torch.equal(out, tm.della_linear(base, [{"w": d}], [1], density=0.5, epsilon=0.2,
                                            rescale=False, seed=1)["w"])


# ---------------------------------------------------------------------------------- PCB


def test_pcb_known_answer():
    base = {"w": torch.zeros(4)}
    p = {"w": T([1.0, 2.0, 3.0, 4.0])}
    out = tm.pcb(base, [p, dict(p)], [1, 1], pcb_ratio=0.75)["w"]
    # |tau| clipped per task to sorted[int(4*1e-4)] = 1 and sorted[int(4*0.9999-1)] = sorted[2] = 3
    #   -> clamped [1, 2, 3, 3]
    # self = exp(2 * minmax([1,2,3,3])^2) = exp(2*[0, .25, 1, 1]) = [1, 1.6487, 7.389, 7.389]
    # cross = tanh(tau * sum tau) = tanh([2, 8, 18, 32]) = [.964, ~1, 1, 1]
    # task_pcb = [.964, 1.6487, 7.389, 7.389]; clamp low at sorted[int(4*0.25)] = 1.6487
    # scale = minmax([1.6487, 1.6487, 7.389, 7.389]) = [0, 0, 1, 1]
    # merged = sum(clamped * scale) / sum(scale) = [0, 0, (3+3)/2, (3+3)/2]
    assert close(out, [0.0, 0.0, 3.0, 3.0])


def test_pcb_conflicting_entry_is_down_weighted():
    base = {"w": torch.zeros(6)}
    p1 = {"w": T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])}
    p2 = {"w": T([1.0, 2.0, 3.0, 4.0, 5.0, -6.0])}
    out = tm.pcb(base, [p1, p2], [1, 1], pcb_ratio=0.5)["w"]
    # entry 5 conflicts: tau*sum(tau) = 0 for both -> tanh 0 -> scale 0 -> 0/1e-12 = 0
    assert out[5].item() == 0.0
    assert out[4].item() > 0


# -------------------------------------------------------------------------- consensus


def test_consensus_tall_masks():
    base = {"w": torch.zeros(3)}
    p1 = {"w": T([1.0, 0.0, 2.0])}
    p2 = {"w": T([1.0, 3.0, -2.0])}
    # tau_MTL = [2, 3, 0]
    # mask1: |tau1| > .5|MTL - tau1| -> [1 > .5, 0 > 1.5, 2 > 1] = [T, F, T]
    # mask2: [1 > .5, 3 > 0, 2 > 1] = [T, T, T]; counts [2, 1, 2]
    out = tm.consensus(base, [p1, p2], [1, 1], k=2, tall_mask_lambda=0.5)["w"]
    assert close(out, [2.0, 0.0, 0.0])
    assert close(tm.consensus(base, [p1, p2], k=1, tall_mask_lambda=0.5)["w"], [2.0, 3.0, 0.0])
    assert close(tm.consensus(base, [p1, p2], k=0, tall_mask_lambda=0.5)["w"], [2.0, 3.0, 0.0])
    assert close(tm.consensus(base, [p1, p2], k=3, tall_mask_lambda=0.5)["w"], [0.0, 0.0, 0.0])
    assert close(tm.consensus(base, [p1, p2], k=2, tall_mask_lambda=0.5, scaling=0.5)["w"], [1.0, 0.0, 0.0])


# --------------------------------------------------------------------- localize & stitch


def test_localize_stitch_strict_threshold_and_stitch_average():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    p1 = {"a": T([5.0, 4.0]), "b": T([1.0, 0.0])}
    p2 = {"a": T([0.0, 3.0]), "b": T([6.0, 1.0])}
    # sparsity .5 over 4 entries (both tensors together): k = 2
    # p1: top-2 |.| = 5, 4 -> threshold 4 -> strictly greater: only 5
    # p2: top-2 = 6, 3 -> threshold 3 -> only 6
    out = tm.localize_stitch(base, [p1, p2], sparsity=0.5)
    assert close(out["a"], [5.0, 0.0]) and close(out["b"], [6.0, 0.0])
    # sparsity .75: k = 3; p1 threshold 1 -> {5, 4}; p2 threshold 1 -> {3, 6}
    # a[1] is held by both -> (4 + 3) / 2 = 3.5
    out = tm.localize_stitch(base, [p1, p2], sparsity=0.75)
    assert close(out["a"], [5.0, 3.5]) and close(out["b"], [6.0, 0.0])


# ----------------------------------------------------------------------------- RegMean


def test_regmean_hand_2x2():
    G1 = T([[1.0, 1.0], [1.0, 2.0]])
    G2 = torch.eye(2)
    W1, W2 = T([[1.0, 0.0]]), T([[0.0, 1.0]])
    # scale .5: G1' = [[1, .5], [.5, 2]]; sum G' = [[2, .5], [.5, 3]] (det 5.75)
    # rhs = G1' [1,0]^T + I [0,1]^T = [1, 1.5]
    # solution = [(3 - .75)/5.75, (3 - .5)/5.75] = [9/23, 10/23]
    W = tm.regmean_solve([G1, G2], [W1, W2], scale=0.5)
    assert close(W, [[9 / 23, 10 / 23]])


def test_regmean_matches_direct_solve_and_inverse():
    g = torch.Generator().manual_seed(0)
    grams, Ws = [], []
    for _ in range(3):
        X = torch.randn(50, 6, generator=g, dtype=torch.float64)
        grams.append(X.T @ X / 50)
        Ws.append(torch.randn(4, 6, generator=g, dtype=torch.float64))
    r = 0.95
    Gp = [G * (r + (1 - r) * torch.eye(6, dtype=torch.float64)) for G in grams]
    A = sum(Gp)
    B = sum(G @ W.T for G, W in zip(Gp, Ws))
    direct = torch.linalg.solve(A, B).T
    fusionbench_style = (torch.inverse(A) @ B).T
    got = tm.regmean_solve(grams, Ws, scale=r)
    assert got.shape == (4, 6)
    assert close(got, direct, 1e-10) and close(got, fusionbench_style, 1e-9)


def test_regmean_equal_grams_is_plain_average_and_other_tensors_averaged():
    X = torch.randn(30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G = X.T @ X
    Ws = [torch.randn(3, 5, dtype=torch.float64) for _ in range(3)]
    assert close(tm.regmean_solve([G, G, G], Ws, 0.95), sum(Ws) / 3, 1e-10)
    p1 = {"lin.weight": T([[2.0]]), "lin.bias": T([1.0])}
    p2 = {"lin.weight": T([[6.0]]), "lin.bias": T([3.0])}
    out = tm.regmean([p1, p2], {"lin": [T([[1.0]]), T([[3.0]])]})
    # 1-D input: (1*2 + 3*6) / (1 + 3) = 5 ; bias averaged (1 + 3) / 2 = 2
    assert close(out["lin.weight"], [[5.0]]) and close(out["lin.bias"], [2.0])


# ------------------------------------------------------------------------------ Fisher


def test_fisher_average_is_the_papers_fisher_weighted_mean_with_every_fisher_floored():
    """Matena & Raffel 2022: theta = sum_i w_i F_i theta_i / sum_i w_i F_i per entry, each F_i floored at epsilon
    (max, as the authors' `fisher_floor` on every model) — not FusionBench's F + epsilon, nor its coefficients
    divided by each Fisher's L2 norm (docs/design.md §4.11). The `fisher` method computes the same."""
    p1, p2 = {"w": T([1.0, 1.0, 1.0])}, {"w": T([3.0, 3.0, 3.0])}
    f1 = {"w": T([3.0, 0.0, 0.0])}
    f2 = {"w": T([1.0, 0.0, 2e-6])}
    # entry 0: (3*1 + 1*3) / (3 + 1) = 1.5 (normalising by the Fisher norms 3 and ~1 would give 2.0)
    # entry 1: no Fisher anywhere -> both floored at 1e-6 -> the plain average 2.0
    # entry 2: max(0, 1e-6) = 1e-6 and 2e-6 -> (1e-6*1 + 2e-6*3) / 3e-6 = 7/3 (adding 1e-6 would give 2.5)
    assert close(tm.fisher_average([p1, p2], [f1, f2])["w"], [1.5, 2.0, 7 / 3])
    # weights [1, 3]: entry 0 (1*3*1 + 3*1*3) / (3 + 3) = 2 ; entry 1 (1*1 + 3*3) / 4 = 2.5 ;
    # entry 2 (1e-6*1 + 3*2e-6*3) / (1e-6 + 6e-6) = 19/7
    assert close(tm.fisher_average([p1, p2], [f1, f2], [1, 3])["w"], [2.0, 2.5, 19 / 7])
    # the floor is the option: at 1e-12 entry 2 is all parent 2's Fisher -> ~3 ; entry 1 still the average
    assert close(tm.fisher_average([p1, p2], [f1, f2], epsilon=1e-12)["w"], [1.5, 2.0, 3.0], tol=1e-5)


# ------------------------------------------------------------------------ common rules


def test_dtype_kept_missing_tensor_skipped_shape_mismatch_refused_buffers_copied():
    base = {"w": T([1.0, 1.0], dtype=torch.bfloat16), "ids": T([0, 1, 2])}
    p1 = {"w": T([2.0, 3.0], dtype=torch.bfloat16), "ids": T([0, 1, 2])}
    p2 = {"ids": T([0, 1, 2])}  # lacks "w": does not contribute to it
    out = tm.ties(base, [p1, p2], [1, 1])
    assert out["w"].dtype == torch.bfloat16 and close(out["w"], [2.0, 3.0])
    assert torch.equal(out["ids"], base["ids"])
    with pytest.raises(ValueError, match="shape"):
        tm.task_arithmetic(base, [{"w": torch.zeros(3)}], [1])
    with pytest.raises(ValueError, match="differs"):
        tm.task_arithmetic(base, [{"w": torch.zeros(2), "ids": T([0, 1, 3])}], [1])
    with pytest.raises(ValueError, match="base"):
        tm.ties(None, [p1], [1])
    with pytest.raises(ValueError, match="one per parent"):
        tm.ties(base, [p1, p1], [1, 1], density=[0.5])
