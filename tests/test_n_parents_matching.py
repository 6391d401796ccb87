"""N > 2 parents for the unit-matching methods (docs/design.md §4.13): one merged space for all parents.

Permuted copies merge back exactly for every method and architecture; hand-made similarities give known N-model
clusters; different label sets give the heads in parent order; weights make each merged unit the weighted mean of
its cluster; impossible requests fail in one line before anything is loaded.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from factories import (
    BARE,
    WITH_LOGITS,
    classifier_names,
    make_batches,
    make_model,
    model_output,
    permuted_copy,
    relative_error,
    with_new_head,
)
from readme_examples import readme_example

import hf_mudsc
from hf_mudsc.apply.weights import apply_matches, apply_matches_weighted
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.statistics import collect_statistics, new_accumulators
from hf_mudsc.cli.main import main
from hf_mudsc.errors import MergeInputError
from hf_mudsc.methods import get_method, method_runs
from hf_mudsc.solve.matchers import match

MATCHING_METHODS = [(options["method"], options["matcher"]) for _, options in method_runs()
                    if get_method(options["method"]).matches_units]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def triples():
    cache = {}

    def get(kind):
        if kind not in cache:
            model = make_model(kind, seed=0)
            spec = spec_for(model)
            cache[kind] = ([model, permuted_copy(model, spec, seed=1), permuted_copy(model, spec, seed=2)],
                           make_batches(kind))
        return cache[kind]

    return get


@pytest.mark.parametrize("method,matcher", MATCHING_METHODS)
@pytest.mark.parametrize("kind", WITH_LOGITS)
def test_three_permuted_copies_merge_back_to_the_model(triples, kind, method, matcher):
    (model, *copies), batches = triples(kind)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), copies[1].parameters()))
    merged = hf_mudsc.merge([model, *copies], batches, method=method, matcher=matcher, progress=False)
    report = merged.merge_report
    # One merged space in parent 0's basis: every matched tensor is parent 0's ...
    original = params(model)
    matched = apply_matches_weighted(spec_for(model), [params(p) for p in (model, *copies)], report.matches,
                                     [1.0, 1.0, 1.0], concatenate_classifier=False)
    assert matched.keys() == original.keys()
    for name, tensor in matched.items():
        assert torch.allclose(tensor, original[name], atol=1e-6, rtol=1e-6), name
    # ... and the default refit (the gate, for N parents too) keeps that function: its targets are the model's own.
    assert merged.config.mudsc["refit"] == "gate" and report.refit is not None
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
    assert all(m.num_models == 3 and m.cluster_of.numel() == 3 * m.num_merged for m in report.matches)
    assert len(merged.config.mudsc["parents"]) == 3 and merged.config.mudsc["weights"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind", BARE)
@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_three_permuted_bare_encoders_merge_back(triples, kind, matcher):
    (model, *copies), batches = triples(kind)
    merged = hf_mudsc.merge([model, *copies], batches, method="mudsc", matcher=matcher, progress=False)
    assert relative_error(model_output(merged, batches[0]), model_output(model, batches[0])) < 1e-6


# Units [A0 A1 | B0 B1 | C0 C1]: A0-B1-C0 belong together (0.9, 0.8, 0.85), A1-B0-C1 too (0.7, 0.6, 0.65).
HAND = np.full((6, 6), 0.1)
for (i, j), value in {(0, 3): 0.9, (0, 4): 0.8, (3, 4): 0.85, (1, 2): 0.7, (1, 5): 0.6, (2, 5): 0.65}.items():
    HAND[i, j] = HAND[j, i] = value
np.fill_diagonal(HAND, 1.0)


def test_three_model_align_on_a_hand_made_similarity():
    found = match(torch.tensor(HAND), matcher="align", num_models=3)
    assert found.clusters() == [(0, 3, 4), (1, 2, 5)]
    # mean over the pairs (A,B), (A,C), (B,C) of the matched entries: (0.8 + 0.7 + 0.75) / 3
    assert found.value == pytest.approx(0.75, abs=1e-12)
    assert found.merge_weight.tolist() == [1 / 3] * 6 and found.num_models == 3


def test_three_model_zip_on_a_hand_made_similarity():
    """Picks 0.9 (A0,B1), 0.8 ({A0,B1},C0: min(0.8, 0.85), no decay while the cluster lacks a C unit), 0.7 (A1,B0),
    0.6. With the two-model rule (decay after every fusion) {A0,B1} would drop to 0.4 against C0."""
    found = match(torch.tensor(HAND), matcher="zip", num_models=3)
    assert found.clusters() == [(0, 3, 4), (1, 2, 5)]
    assert found.value == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.6]), abs=1e-12)


def test_three_model_zip_spends_the_same_model_budget_on_a_duplicated_unit():
    """A0 and A1 are one feature (0.95); B and C each have one unit like it and one unlike anything (n = 2). ZipIt's
    N-model budget is ((N-1)·n // N)·b = 1 same-model fusion per model: A0+A1 fuse first, then take B0 and C0; B1
    and C1 (correlation 0.3) end together."""
    c = np.full((6, 6), 0.0)
    for (i, j), value in {(0, 1): 0.95, (0, 2): 0.9, (1, 2): 0.9, (0, 4): 0.9, (1, 4): 0.9, (2, 4): 0.9,
                          (3, 5): 0.3}.items():
        c[i, j] = c[j, i] = value
    np.fill_diagonal(c, 1.0)
    found = match(torch.tensor(c), matcher="zip", num_models=3)
    assert found.clusters() == [(0, 1, 2, 4), (3, 5)]
    assert found.merge_weight.tolist() == pytest.approx([0.25, 0.25, 0.25, 0.5, 0.25, 0.5])


def test_three_model_align_refines_the_star_start_on_the_sum_of_pairwise_similarities():
    """Matched to A alone, B keeps the identity (A-B: 0.5 vs 0.49 swapped); but B-C only agree swapped (0.9) while
    A-C agree unswapped (0.9). The sum over all pairs is 2.8 for the star's answer and 4.58 with B swapped, the
    optimum of all four choices; the refinement finds it."""
    c = np.zeros((6, 6))
    for (i, j), value in {(0, 2): 0.5, (1, 3): 0.5, (0, 3): 0.49, (1, 2): 0.49, (0, 4): 0.9, (1, 5): 0.9,
                          (2, 5): 0.9, (3, 4): 0.9}.items():
        c[i, j] = c[j, i] = value
    np.fill_diagonal(c, 1.0)
    found = match(torch.tensor(c), matcher="align", num_models=3)
    assert found.clusters() == [(0, 3, 4), (1, 2, 5)]
    assert found.value == pytest.approx(4.58 / 6, abs=1e-12)


def test_three_model_align_never_ends_below_its_star_start():
    generator = np.random.default_rng(0)
    n = 5
    for _ in range(10):
        c = np.corrcoef(generator.normal(size=(40, 3 * n)).T)
        found = match(torch.tensor(c), matcher="align", num_models=3)
        star = [np.arange(n)] + [j * n + match(torch.tensor(c[np.ix_(np.r_[0:n, j * n:(j + 1) * n],
                                                                      np.r_[0:n, j * n:(j + 1) * n])]),
                                               matcher="align").cluster_of[n:].argsort().numpy() for j in (1, 2)]
        star_value = np.mean([c[star[a], star[b]].mean() for a, b in ((0, 1), (0, 2), (1, 2))])
        assert found.value >= star_value - 1e-12


def test_three_model_group_matchers_keep_units_inside_paired_heads():
    """2 heads of 2 units per model; model 1 has its heads swapped, model 2 not: merged head 0 = model 0's head 0
    with model 1's head 1 and model 2's head 0."""
    n, g = 4, 2
    generator = np.random.default_rng(1)
    base = generator.normal(size=(50, n))
    order_1 = [2, 3, 0, 1]  # model 1's unit j = model 0's unit order_1[j]
    order_2 = [1, 0, 3, 2]
    c = np.corrcoef(np.concatenate([base, base[:, order_1], base[:, order_2]], 1).T)
    for matcher in ("align", "zip"):
        found = match(torch.tensor(c), matcher=matcher, num_heads=2, num_models=3)
        assert found.head_pairing == (1, 0, 0, 1)
        assert found.clusters() == [(0, n + 2, 2 * n + 1), (1, n + 3, 2 * n), (2, n, 2 * n + 3),
                                    (3, n + 1, 2 * n + 2)]
        assert found.clusters()[0][1] // g == n // g + 1  # model 1's head 1


def test_statistics_of_three_parents_are_the_correlation_of_the_concatenated_features():
    """Each group's accumulator holds [x_0; x_1; x_2]: for three copies of one model, every block equals the
    one-model correlation; its size (and memory) is (3n)², 9/4 of two parents'."""
    model = make_model("vit_cls", 0)
    spec = spec_for(model)
    batches = make_batches("vit_cls", 2)
    three = collect_statistics(model, model, spec, batches, progress=False, statistics_dtype="float64",
                               others=[model])
    two = collect_statistics(model, model, spec, batches, progress=False, statistics_dtype="float64")
    for group, joint, pair in zip(spec.groups, three, two):
        n = group.width
        corr3, corr2 = joint.finalize(), pair.finalize()
        assert corr3.shape == (3 * n, 3 * n)
        for i, j in itertools.product(range(3), repeat=2):
            assert torch.allclose(corr3[i * n:(i + 1) * n, j * n:(j + 1) * n], corr2[:n, :n], atol=1e-9)
    sizes = [sum(a.outer.numel() for a in new_accumulators(spec, num_models=k)) for k in (2, 3)]
    assert sizes[1] * 4 == sizes[0] * 9


def test_different_label_sets_of_three_parents_give_the_heads_in_parent_order(triples):
    (model, *copies), batches = triples("vit_cls")
    parents = [with_new_head(p, labels, seed) for p, labels, seed in zip([model, *copies], (2, 3, 4), (4, 5, 6))]
    for index, parent in enumerate(parents):
        parent.config.id2label = {i: f"{'xyz'[index]}{i}" for i in range(parent.config.num_labels)}
        parent.config._name_or_path = f"org/task-{index}"
    for matcher in ("zip", "align"):
        merged = hf_mudsc.merge(parents, batches, method="mudsc", matcher=matcher, progress=False)
        assert merged.config.task_label_ranges == {"task-0": [0, 2], "task-1": [2, 5], "task-2": [5, 9]}
        assert merged.config.id2label[2] == "task-1: y0" and merged.config.id2label[8] == "task-2: z3"
        weight, bias = classifier_names(model)
        state = params(merged)
        assert torch.equal(state[weight][:2], params(parents[0])[weight])  # parent 0's basis is the merged one
        # parent j's rows are its own head with its residual columns mapped into the merged basis
        residual = merged.merge_report.matches[0]
        n = residual.num_merged
        for j, (lo, hi) in enumerate(((0, 2), (2, 5), (5, 9))):
            cols = residual.cluster_of[j * n:(j + 1) * n]
            expected = torch.zeros(hi - lo, n).index_add_(1, cols, params(parents[j])[weight])
            assert torch.allclose(state[weight][lo:hi], expected, atol=1e-6)
            assert torch.equal(state[bias][lo:hi], params(parents[j])[bias])
        logits = model_output(merged, batches[0])
        for parent, (lo, hi) in zip(parents, ((0, 2), (2, 5), (5, 9))):
            assert relative_error(logits[:, lo:hi], model_output(parent, batches[0])) < 1e-6


def test_weights_make_each_merged_unit_the_weighted_mean_of_its_cluster():
    parents = [make_model("vit_cls", seed) for seed in (0, 1, 2)]
    batches = make_batches("vit_cls")
    weights = [1.0, 2.0, 5.0]
    # The weighted apply itself (the default refit would rewrite it): refit="none".
    merged = hf_mudsc.merge(parents, batches, method="zipit", weights=weights, refit="none", progress=False)
    assert merged.config.mudsc["weights"] == weights
    spec = spec_for(parents[0])
    residual = merged.merge_report.matches[0]
    assert spec.groups[0].name == "residual"
    n = residual.num_merged
    name = "vit.layernorm.weight"  # an out member of the residual group, in no other group
    units = torch.cat([params(p)[name] for p in parents]).double()
    unit_weights = torch.tensor(weights, dtype=torch.float64).repeat_interleave(n)
    numerator = torch.zeros(n, dtype=torch.float64).index_add_(0, residual.cluster_of, unit_weights * units)
    denominator = torch.zeros(n, dtype=torch.float64).index_add_(0, residual.cluster_of, unit_weights)
    assert torch.allclose(params(merged)[name].double(), numerator / denominator, atol=1e-6)
    bias = "classifier.bias"  # same label set: averaged with the weights
    expected = sum(w * params(p)[bias] for w, p in zip(weights, parents)) / sum(weights)
    assert torch.allclose(params(merged)[bias], expected, atol=1e-6)


def test_the_weighted_apply_of_two_equal_parents_is_the_two_parent_apply():
    model = make_model("bert_cls", 0)
    other = make_model("bert_cls", 1)
    # The matched merge itself (the default refit would rewrite it): refit="none".
    merged = hf_mudsc.merge([model, other], make_batches("bert_cls"), method="mudsc", refit="none", progress=False)
    spec = spec_for(model)
    matches = merged.merge_report.matches
    two = apply_matches(spec, params(model), params(other), matches)
    weighted = apply_matches_weighted(spec, [params(model), params(other)], matches, [3.0, 3.0])
    assert two.keys() == weighted.keys()
    assert all(torch.allclose(two[k], weighted[k], atol=1e-7) for k in two)
    assert all(torch.equal(two[k], v.detach()) for k, v in merged.named_parameters())


@pytest.mark.parametrize(("options", "message"), [
    ({"reference_compat": True},
     r"^reference_compat= \(CLI: --reference-compat\) reproduces the reference's two-parent merge, got 3 parents; "
     r"drop it to merge 3 parents$"),
    ({"weights": [1.0, 0.0, 2.0]},
     r"^weights= \(CLI: --weights\) of mudsc must all be > 0 .*got \[1.0, 0.0, 2.0\]$"),
])
def test_impossible_three_parent_requests_fail_in_one_line_before_loading(tmp_path, options, message):
    missing = [str(tmp_path / f"no-parent-{i}") for i in range(3)]
    with pytest.raises(MergeInputError, match=message) as caught:
        hf_mudsc.merge(missing, "nowhere:train", method="mudsc", **options)
    assert "\n" not in str(caught.value)


def test_reference_compat_refuses_unequal_weights_of_two_parents(tmp_path):
    missing = [str(tmp_path / f"no-parent-{i}") for i in range(2)]
    with pytest.raises(MergeInputError, match=r"reproduces the reference's equal-weight merge; drop weights="):
        hf_mudsc.merge(missing, "nowhere:train", method="mudsc", reference_compat=True, weights=[1.0, 2.0])


def test_cli_refuses_three_parents_with_reference_compat_without_a_traceback(tmp_path, capsys):
    """Refused while the recipe is validated (exit 2, as every recipe error), before any parent is read."""
    folders = []
    for seed in range(3):
        folder = tmp_path / f"parent-{seed}"
        make_model("vit_cls", seed).save_pretrained(folder)
        folders.append(str(folder))
    capsys.readouterr()
    code = main(["merge", *folders, "--method", "weight_matching", "--reference-compat",
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--reference-compat" in err and "got 3 parents" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_dry_run_estimate_counts_every_parents_statistics_and_weights():
    from hf_mudsc.plan import estimate_cost, statistics_bytes

    assert statistics_bytes([2, 3], parents=3) == 8 * (6 ** 2 + 9 ** 2)
    kwargs = dict(widths=[2, 3], columns=[4, 5], group_tokens=[5, 1], linear_params={"w": 10}, tokens={"": 5},
                  num_parameters=100, rows=10, needs_statistics=True, matmul_flops=1e9)
    two, three = estimate_cost(**kwargs), estimate_cost(**kwargs, parents=3)
    assert three.statistics_bytes == statistics_bytes([2, 3], parents=3)
    assert three.peak_memory_bytes > two.peak_memory_bytes and three.calibration_seconds > two.calibration_seconds


def test_the_readme_example_of_n_parents_matching_runs(capsys):
    block = readme_example("matching-n-parents")
    namespace: dict = {"__name__": "readme_matching_n_parents"}
    exec(compile(block, "README.md (N-parent matching example)", "exec"), namespace)
    assert capsys.readouterr().out.splitlines() == ["True", "3 [2.0, 1.0, 1.0]", "gate 13"]
    merged, model = namespace["merged"], namespace["model"]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(merged.parameters(), model.parameters()))


def test_cli_merges_three_parents_by_zipit_with_weights_and_the_card_and_recipe_say_so(tmp_path, capsys):
    import datasets
    import yaml
    from PIL import Image
    from transformers import ViTForImageClassification, ViTImageProcessor

    from hf_mudsc.publish.recipe import RECIPE_FILENAME

    model = make_model("vit_cls", 0)
    spec = spec_for(model)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    folders = []
    for index, parent in enumerate([model, permuted_copy(model, spec, 1), permuted_copy(model, spec, 2)]):
        parent.save_pretrained(tmp_path / f"parent-{index}")
        processor.save_pretrained(tmp_path / f"parent-{index}")
        folders.append(str(tmp_path / f"parent-{index}"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(48)]
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).save_to_disk(
        tmp_path / "calibration")
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["-q", "merge", *folders, "--calibration", str(tmp_path / "calibration"), "--method", "zipit",
                 "--weights", "2", "1", "1", "--output", str(out)]) == 0
    merged = ViTForImageClassification.from_pretrained(out)
    for name, tensor in merged.named_parameters():
        assert torch.allclose(tensor.detach(), params(model)[name], atol=1e-6), name
    recipe = yaml.safe_load((out / RECIPE_FILENAME).read_text())
    assert recipe["models"] == folders and recipe["weights"] == [2.0, 1.0, 1.0] and recipe["method"] == "zipit"
    card = (out / "README.md").read_text()
    assert "| C | `parent-2` (local folder) |" in card and "| Weights | 2.0 1.0 1.0 |" in card


@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_three_permuted_copies_with_a_size_budget_come_back_with_a_wider_mlp(triples, matcher):
    # The size budget (§4.12) on the N-parent apply (§4.13): kept MLP units are exact copies of one parent's unit,
    # so the function is the model's while the MLP is wider and the parameter count stays within the budget.
    (model, *copies), batches = triples("vit_cls")
    merged = hf_mudsc.merge([model, *copies], batches, method="mudsc", matcher=matcher, size=1.5, progress=False)
    assert merged.config.intermediate_size > model.config.intermediate_size
    assert merged.num_parameters() <= 1.5 * model.num_parameters()
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5


@pytest.mark.parametrize(("num_models", "num_heads", "budget"), [(3, 1, 0.0), (3, 2, 0.0), (4, 2, 0.0)])
def test_zip_of_n_models_with_a_small_budget_fuses_every_unit_instead_of_crashing(num_models, num_heads, budget,
                                                                                  caplog):
    """Bug hunt s29: with N > 2 models a zip_budget below 1 could exhaust every model's same-model budget while
    clusters were left to fuse (a fused cluster carries its lowest member's model): zip raised a bare RuntimeError
    after the whole calibration. The rest is fused without the budgets (min-linkage of the similarity), and said."""
    import logging

    n = 32
    fused_any = False
    for seed in range(4):
        x = torch.randn(num_models * n, 3 * num_models * n, generator=torch.Generator().manual_seed(seed))
        with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
            caplog.clear()
            found = match(torch.corrcoef(x), matcher="zip", num_heads=num_heads, budget=budget,
                          num_models=num_models)
        clusters = found.clusters()
        assert len(clusters) == n and sorted(u for c in clusters for u in c) == list(range(num_models * n))
        fused_any |= "were fused without the budgets" in caplog.text
    assert fused_any  # these random similarities do exhaust the budgets
