"""The paper's claim on a small scale: two ViTs trained from DIFFERENT random initializations on disjoint
digit tasks (0-4 and 5-9) merge far better with MuDSC than with plain weight averaging, which ignores that
the two models' units are in unrelated orders. The models are trained here (seconds each, 1 thread)."""

from __future__ import annotations

import pytest
import torch

import hf_mudsc
from hf_mudsc.evaluate.harness import evaluate_merge
from hf_mudsc.testing import toy

# Measured with these settings (16x16 digits, hidden 64, 2 layers, 25 epochs, seeds 0/1, 512 calibration
# images): joint accuracy MuDSC ~0.39-0.47, average ~0.14-0.17, ensemble ~0.82-0.85.
MARGIN = 0.15


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is several times faster on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow  # trains the toy pair and merges 512 images: a quality check at benchmark size
def test_mudsc_beats_weight_averaging_across_different_initializations(digit_pair_cache, record_property):
    pair = toy.trained_digit_pair(range(5), range(5, 10), seeds=(0, 1), hidden_size=64, cache_dir=digit_pair_cache)
    pair.model_a.config._name_or_path = "digits-0-4"
    pair.model_b.config._name_or_path = "digits-5-9"
    splits = pair.splits
    calibration = list(toy.digit_calibration_batches(splits, num_samples=512, batch_size=64))
    merged = {
        method: hf_mudsc.merge([pair.model_a, pair.model_b], calibration, method=method, progress=False)
        for method in ("mudsc", "average")
    }
    tests = {
        "digits-0-4": (splits.task_a.test_pixel_values, splits.task_a.test_labels),
        "digits-5-9": (splits.task_b.test_pixel_values, splits.task_b.test_labels),
    }
    result = evaluate_merge(merged, [pair.model_a, pair.model_b], tests, progress=False)
    figures = {
        name: {
            view: round(result.score(name, view), 4)
            for view in ("digits-0-4", "digits-5-9", "joint")
            if result.score(name, view) is not None
        }
        for name in result.scores
    }
    print("\n" + result.table())
    for name, values in figures.items():
        record_property(name, values)

    # The parents really learned their tasks (otherwise the comparison means nothing) ...
    assert result.score("parent_a", "digits-0-4") >= 0.9 and result.score("parent_b", "digits-5-9") >= 0.9
    # ... and the two tasks need the two parents: their ensemble answers the joint 10-way test well.
    assert result.score("ensemble", "joint") >= 0.7
    mudsc, average = result.score("mudsc", "joint"), result.score("average", "joint")
    assert mudsc >= average + MARGIN, f"MuDSC joint {mudsc:.3f} vs average {average:.3f}"
    assert result.score("mudsc", "average") >= result.score("average", "average") + MARGIN
    # Matching was actually done: MuDSC's match quality is recorded per group, averaging has none.
    assert merged["mudsc"].config.mudsc["group_match_values"]
    assert not merged["average"].config.mudsc["group_match_values"]


# ------------------------------------------------ permuted copies: the different-basis pair with known truth
def test_permuted_copy_computes_the_same_function_in_another_basis():
    from factories import make_batches, make_model

    from hf_mudsc.architectures import spec_for
    from hf_mudsc.testing.permute import permute_model, random_permutations

    model = make_model("vit_cls", seed=3)
    spec = spec_for(model)
    perms = random_permutations(spec, seed=5)
    copy = permute_model(model, spec, perms)
    batch = make_batches("vit_cls", num_batches=1)[0]
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, copy(**batch).logits, atol=1e-5)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)
    assert not torch.equal(model.vit.layers[0].mlp.fc1.weight, copy.vit.layers[0].mlp.fc1.weight)
    # Heads move as blocks, shared by the q/k and v groups of a block; units stay inside their head.
    for group, perm in zip(spec.groups, perms):
        size = group.width // group.num_heads
        heads = perm.view(group.num_heads, size) // size
        assert (heads == heads[:, :1]).all()
    with pytest.raises(ValueError, match="not a permutation"):
        permute_model(model, spec, [torch.zeros(g.width, dtype=torch.long) for g in spec.groups])


def test_recovered_fraction_counts_true_partner_pairs_only():
    from hf_mudsc.solve.matchers import match
    from hf_mudsc.testing.permute import recovered_fraction, recovery_breakdown

    perm = torch.tensor([2, 0, 1])  # B unit j is A unit perm[j]
    similarity = torch.eye(6, dtype=torch.float64)
    for j, i in enumerate(perm.tolist()):
        similarity[i, 3 + j] = similarity[3 + j, i] = 0.9
    found = match(similarity, matcher="align")
    assert recovered_fraction(found, perm) == 1.0
    assert recovered_fraction(found, torch.tensor([0, 1, 2])) == 0.0
    # A zip that fuses two A units (and two B units) recovers only the cross pair it made.
    similarity = torch.full((6, 6), 0.1, dtype=torch.float64)
    similarity[0, 1] = similarity[1, 0] = 0.99  # A0 + A1
    similarity[4, 5] = similarity[5, 4] = 0.98  # B1 + B2
    similarity[2, 3] = similarity[3, 2] = 0.97  # A2 + B0: true partner (perm[0] = 2)
    zipped = match(similarity, matcher="zip", budget=1.0)
    assert recovered_fraction(zipped, perm) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="units per model"):
        recovered_fraction(found, torch.arange(4))
    # Where the misses are: one true pair, one same-model fusion in each parent.
    assert recovery_breakdown(zipped, perm) == {"true": 1, "A-A": 1, "B-B": 1}
    assert recovery_breakdown(found, perm) == {"true": 3}
    assert recovery_breakdown(found, torch.tensor([0, 1, 2])) == {"wrong cross": 3}
