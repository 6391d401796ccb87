"""The after-matching refit for N > 2 parents (docs/design.md §4.9, §4.13): one merged space, every parent's layer
outputs mapped into it by its own merge map and averaged; concatenated heads target each parent's centred logits
in parent order; the matched head is kept only when every parent shares parent 0's basis.

Proven here: the closed-form ridge solution on one linear layer with three parents (body and concatenated heads),
three permuted copies keep the model's function through the refit, `refit="auto"` resolves to ridge for three
parents of a unit-matching method, a three-parent refit really changes the weights, the shared-basis test is the
minimum over parents of the score against parent 0, and memory stays flat in samples."""

from __future__ import annotations

import pytest
import torch
from factories import (
    make_batches,
    make_model,
    model_output,
    one_linear,
    permuted_copy,
    relative_error,
    ridge_solution,
    with_new_head,
)
from torch import nn

import hf_mudsc
from hf_mudsc.apply.refit import refit_model, shared_basis_score
from hf_mudsc.architectures import spec_for
from hf_mudsc.options import resolve_refit
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import Classifier, Group, HookPoint, Member, PermutationSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


# ------------------------------------------------------------------------------------------ known answer


def _batches(rows: int, count: int, width: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(rows, width, generator=generator)} for _ in range(count)]


@pytest.mark.parametrize("weights", [None, (1.0, 2.0, 5.0)])
@pytest.mark.parametrize("clusters", [
    [2, 0, 3, 1, 0, 3, 1, 2, 1, 2, 0, 3],  # align: merged unit j = {A_i, B_k, C_l}
    [0, 0, 1, 2, 1, 2, 3, 3, 3, 2, 1, 0],  # zip: A0+A1 and B2+B3 fused within their model, clusters of 2 to 4
])
def test_three_parent_refit_of_a_single_linear_layer_is_the_closed_form_ridge_solution(clusters, weights):
    """Each merged unit's target is the weighted mean of the outputs fused into it, `Σ_u w_p(u) y_u / Σ_u w_p(u)`
    (the apply step's weighting); equal weights: the plain mean of the cluster's units over all three parents."""
    spec = PermutationSpec(groups=(Group("hidden", 4, (Member("lin.weight", 0, "out"), Member("lin.bias", 0, "out")),
                                         (HookPoint("lin", "output"),)),))
    parents = [one_linear(3, 4, seed=seed) for seed in (1, 2, 4)]
    merged = one_linear(3, 4, seed=3)
    start_w, start_b = merged.lin.weight.detach().clone(), merged.lin.bias.detach().clone()
    cluster_of = torch.tensor(clusters)
    sizes = torch.bincount(cluster_of, minlength=4).to(torch.float64)
    found = Match(cluster_of=cluster_of, merge_weight=1.0 / sizes[cluster_of], num_merged=4, value=1.0, num_models=3)
    batches = _batches(5, 3)
    report = refit_model(merged, parents, spec, [found], lambda: iter(batches), lambda_rel=0.1, weights=weights)

    x = torch.cat([b["x"] for b in batches]).to(torch.float64)
    with torch.no_grad():
        outputs = torch.cat([p(x.float()) for p in parents], dim=1).to(torch.float64)  # [A 0..3, B 0..3, C 0..3]
    unit_weight = torch.tensor(weights or (1.0, 1.0, 1.0), dtype=torch.float64).repeat_interleave(4)
    target = torch.stack([(outputs[:, cluster_of == j] * unit_weight[cluster_of == j]).sum(1)
                          / unit_weight[cluster_of == j].sum() for j in range(4)], dim=1)
    weight, bias = ridge_solution(x, target, start_w, start_b, 0.1)
    assert torch.allclose(merged.lin.weight.to(torch.float64), weight, atol=1e-6)
    assert torch.allclose(merged.lin.bias.to(torch.float64), bias, atol=1e-6)
    assert not torch.allclose(merged.lin.weight, start_w, atol=1e-3)
    assert [fit.name for fit in report.layers] == ["lin"] and report.layers[0].samples == 15


def test_weighted_three_parent_refit_of_an_unmatched_layer_targets_the_weighted_mean_of_the_outputs():
    spec = PermutationSpec(groups=(Group("features", 3, (Member("lin.weight", 1, "in"),), (HookPoint("lin"),)),),
                           averaged=("lin.bias",))
    parents = [one_linear(3, 2, seed) for seed in (1, 2, 4)]
    merged = one_linear(3, 2, seed=3)
    start_w, start_b = merged.lin.weight.detach().clone(), merged.lin.bias.detach().clone()
    batches = _batches(6, 2)
    refit_model(merged, parents, spec, [None], lambda: iter(batches), lambda_rel=0.05, weights=[1.0, 2.0, 5.0])
    x = torch.cat([b["x"] for b in batches]).to(torch.float64)
    with torch.no_grad():
        target = sum(w * parent(x.float()).to(torch.float64) for w, parent in zip((1 / 8, 2 / 8, 5 / 8), parents))
    weight, bias = ridge_solution(x, target, start_w, start_b, 0.05)
    assert torch.allclose(merged.lin.weight.to(torch.float64), weight, atol=1e-6)
    assert torch.allclose(merged.lin.bias.to(torch.float64), bias, atol=1e-6)


def test_three_parent_refit_of_concatenated_heads_fits_each_tasks_centred_logits_in_parent_order():
    spec = PermutationSpec(groups=(Group("features", 3, (Member("lin.weight", 1, "in"),), (HookPoint("lin"),)),),
                           averaged=("lin.bias",), classifier=Classifier("lin.weight", "lin.bias"))
    parents = [one_linear(3, labels, seed) for labels, seed in ((2, 1), (3, 2), (4, 4))]
    merged = one_linear(3, 9, seed=3)
    start_w, start_b = merged.lin.weight.detach().clone(), merged.lin.bias.detach().clone()
    batches = _batches(6, 2)
    report = refit_model(merged, parents, spec, [None], lambda: iter(batches), concatenate_classifier=True,
                         lambda_rel=0.05)
    assert report.shared_basis is None and not report.head_kept

    x = torch.cat([b["x"] for b in batches]).to(torch.float64)
    with torch.no_grad():
        logits = [parent(x.float()).to(torch.float64) for parent in parents]
    target = torch.cat([z - z.mean(1, keepdim=True) for z in logits], dim=1)
    weight, bias = ridge_solution(x, target, start_w, start_b, 0.05)
    assert torch.allclose(merged.lin.weight.to(torch.float64), weight, atol=1e-6)
    assert torch.allclose(merged.lin.bias.to(torch.float64), bias, atol=1e-6)


# ------------------------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize(("kind", "matcher", "layers"), [
    ("vit_cls", "align", 13), ("vit_cls", "zip", 13), ("bert_cls", "zip", 14)])
def test_refit_keeps_the_function_of_three_permuted_copies(kind, matcher, layers):
    """Every parent's mapped output is the merged model's own: the targets are one function, the refit a no-op."""
    model = make_model(kind, seed=0)
    spec = spec_for(model)
    parents = [model, permuted_copy(model, spec, seed=1), permuted_copy(model, spec, seed=2)]
    batches = make_batches(kind)
    merged = hf_mudsc.merge(parents, batches, method="mudsc", matcher=matcher, refit="ridge", progress=False)
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
    report = merged.merge_report.refit
    assert len(report.layers) == layers and all(fit.samples > 0 for fit in report.layers)
    assert merged.config.mudsc["refit"] == "ridge"


def test_three_permuted_copies_with_their_own_heads_keep_the_matched_heads():
    """One basis for all three (score 1 against parent 0 for both others): each task's slice is its parent's."""
    model = make_model("vit_cls", seed=0)
    heads = [with_new_head(model, labels, seed=seed) for labels, seed in ((4, 1), (5, 2))]
    parents = [model, *(permuted_copy(head, spec_for(head), seed=seed) for head, seed in zip(heads, (1, 2)))]
    batches = make_batches("vit_cls")
    merged = hf_mudsc.merge(parents, batches, method="mudsc", matcher="zip", refit="ridge", progress=False)
    report = merged.merge_report.refit
    assert report.shared_basis == pytest.approx(1.0, abs=1e-6) and report.head_kept
    assert "classifier" not in [fit.name for fit in report.layers]
    logits = model_output(merged, batches[0])
    for parent, (lo, hi) in zip(parents, ((0, 3), (3, 7), (7, 12))):
        assert relative_error(logits[:, lo:hi], model_output(parent, batches[0])) < 1e-5


def test_shared_basis_of_three_parents_is_the_lowest_score_against_parent_0():
    """Parent 1 is parent 0 permuted (score 1), parent 2 another init (score ~0): the minimum (not the mean, ~0.5)
    says one head does not read the merged features, so the concatenated head is refitted."""
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    other = with_new_head(model, 4, seed=1)
    parents = [model, permuted_copy(other, spec_for(other), seed=1), make_model("vit_cls", 7, 5)]
    merged = hf_mudsc.merge(parents, make_batches("vit_cls"), method="mudsc", matcher="align", refit="ridge",
                            progress=False)
    report = merged.merge_report.refit
    head_spec = spec.without_weight_similarity([spec.classifier.weight])
    matches = merged.merge_report.matches
    p = [_params(parent) for parent in parents]
    scores = [shared_basis_score(head_spec, p[0], p[j], matches, other=j) for j in (1, 2)]
    assert scores[0] > 0.9 and abs(scores[1]) < 0.3
    assert report.shared_basis == pytest.approx(min(scores), abs=1e-12) and not report.head_kept
    assert "classifier" in [fit.name for fit in report.layers]


def test_shared_basis_score_against_parent_j_pairs_its_units_with_parent_0s():
    """Three models, model 2 a permuted copy of model 0, model 1 unrelated: with the clusters pairing each unit of
    model 2 with its original in model 0, the score against model 2 is 1 and against model 1 is small."""
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    three = [model, make_model("vit_cls", seed=7), permuted_copy(model, spec, seed=3)]
    merged = hf_mudsc.merge(three, make_batches("vit_cls"), method="mudsc", matcher="align", refit="none",
                            progress=False)
    head_spec = spec.without_weight_similarity([spec.classifier.weight])
    p = [_params(m) for m in three]
    matches = merged.merge_report.matches
    assert shared_basis_score(head_spec, p[0], p[2], matches, other=2) == pytest.approx(1.0, abs=1e-6)
    assert abs(shared_basis_score(head_spec, p[0], p[1], matches, other=1)) < 0.3


# ------------------------------------------------------------------------------------ it runs, by default


def test_three_parent_merge_with_refit_ridge_runs_and_changes_the_weights():
    parents = [make_model("vit_cls", seed=seed) for seed in (1, 2, 3)]
    batches = make_batches("vit_cls", num_batches=2)
    plain = hf_mudsc.merge(parents, batches, method="mudsc", refit="none", progress=False)
    refitted = hf_mudsc.merge(parents, batches, method="mudsc", refit="ridge", progress=False)
    report = refitted.merge_report.refit
    assert len(report.layers) == 13 and report.examples == 32
    assert {fit.samples for fit in report.layers if fit.name != "classifier"} == {32 * 17}
    assert refitted.config.mudsc["refit"] == "ridge" and refitted.merge_report.recipe["refit"] == "ridge"
    changed = [name for name, tensor in refitted.state_dict().items()
               if not torch.allclose(tensor, plain.state_dict()[name], atol=1e-4)]
    assert "classifier.weight" in changed and "vit.layers.1.mlp.fc2.weight" in changed
    # the refit moves the merged model toward the mean of the parents' logits (one shared label set)
    batch = batches[0]
    mean = sum(model_output(p, batch) for p in parents) / 3
    assert relative_error(model_output(refitted, batch), mean) < relative_error(model_output(plain, batch), mean)


@pytest.mark.parametrize("method", ["mudsc", "zipit", "activation_align", "weight_matching"])
def test_default_refit_is_the_gate_for_three_parents_of_a_unit_matching_method(method):
    assert resolve_refit("auto", matches_units=True, has_data=True, num_parents=3, reference_compat=False) == "gate"
    assert resolve_refit("auto", matches_units=True, has_data=True, num_parents=3, reference_compat=False,
                         rereadable=False) == "none"
    parents = [make_model("vit_cls", seed=seed) for seed in (1, 2, 3)]
    merged = hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=1), method=method, progress=False)
    assert merged.config.mudsc["refit"] == "gate" and len(merged.merge_report.refit.layers) == 13


def test_three_parent_refit_memory_does_not_grow_with_the_number_of_samples():
    parents = [make_model("vit_cls", seed=seed) for seed in (1, 2, 3)]
    reports = [hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=n), method="mudsc", matcher="align",
                              refit="ridge", progress=False).merge_report.refit for n in (1, 3)]
    small, large = ({fit.name: fit for fit in report.layers} for report in reports)
    assert small.keys() == large.keys()
    for name, fit in small.items():
        assert (fit.gram_shape, fit.cross_shape) == (large[name].gram_shape, large[name].cross_shape)
        assert large[name].samples == 3 * fit.samples
    # the same accumulators as two parents': (in + 1)² and (in + 1) × out, in the merged width
    assert (small["vit.layers.1.mlp.fc2"].gram_shape, small["vit.layers.1.mlp.fc2"].cross_shape) == ((49, 49), (49, 32))
