"""Permuted-copy recovery over option combinations the other tests do not reach, and the solver's edge cases.

The promise (docs issue 12 item 6): a parent merged with permuted copies of itself comes back exactly for every
architecture, unit-matching method and option. tests/test_permuted_copy.py holds each architecture x method at the
default options, tests/test_n_parents_matching.py three copies at the defaults, test_alpha_auto.py `alpha="auto"`
on two kinds, test_refit*.py / test_repair.py one refit at a time on ViT/BERT, test_size_*.py ViT widening with
`refit="none"`, test_unequal_labels.py other label counts at the defaults, test_reference_compat.py mudsc only.
`CASES` crosses them: every kind x method in three rounds, each round turning alpha (0, 1, 0.3, "auto"), refit
(none, ridge, gate, repair, auto), size (1, 1.5, 2), the parent count and unequal label sets against the others,
plus reference_compat and the stream-widening spends where they apply — 60 merges of tiny models.
"""

from __future__ import annotations

import copy
import logging
from itertools import product

import pytest
import torch
from factories import (
    BERT,
    VIT,
    make_batches,
    make_model,
    model_output,
    permuted_copy,
    randomize,
    relative_error,
    with_new_head,
)
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.errors import CalibrationError
from hf_mudsc.methods import get_method, method_runs

MATCHING = [(options["method"], options["matcher"]) for _, options in method_runs()
            if get_method(options["method"]).matches_units]
# The methods that match on activations alone (alpha 0 fixed): nothing but calibration tells their units apart.
ACTIVATION_ONLY = [(method, matcher) for method, matcher in MATCHING if get_method(method).alpha == 0.0]
KINDS = ("vit_cls", "bert_cls", "roberta_cls", "distilbert_cls", "clip")
ALPHAS = (0.0, 1.0, 0.3, "auto")
REFITS = ("none", "ridge", "gate", "repair", "auto")
SIZES = (1.0, 1.5, 2.0)


def _cases() -> list[tuple[str, str, str, dict]]:
    """(kind, method, matcher, options): each round shifts every option against kind x method (a Latin-square walk),
    so every option value meets every kind and every method; combinations a merge refuses by design are mapped to
    the nearest accepted one (reference_compat: two parents, size 1, a number alpha, no refit; a stream spend:
    ViT, two parents, size 2 — where the whole model is exact)."""
    cases = []
    for round_, (i, (kind, (method, matcher))) in product(range(3), enumerate(product(KINDS, MATCHING))):
        options = {"alpha": ALPHAS[(i + round_) % 4], "refit": REFITS[(i + 2 * round_) % 5],
                   "size": SIZES[(i // 2 + round_) % 3], "parents": 3 if (i + round_) % 3 == 0 else 2,
                   "labels": kind != "clip" and (i + round_) % 2 == 1}
        if round_ == 2 and i % 4 == 1:
            options.update(reference_compat=True, parents=2, size=1.0, refit=REFITS[i % 2 * 4],
                           alpha=0.5 if options["alpha"] == "auto" else options["alpha"])
        if round_ == 1 and kind == "vit_cls" and i % 2 == 0:
            options.update(size=2.0, size_spend="residual", parents=2)
        cases.append((kind, method, matcher, options))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def family():
    """A (seed 0), its permuted copies (seeds 1, 2) — with a fresh head of 2 and 4 labels if `labels` — and data."""
    cache: dict = {}

    def get(kind: str, parents: int, labels: bool):
        key = (kind, parents, labels)
        if key not in cache:
            model = make_model(kind, seed=0)
            copies = [permuted_copy(model, spec_for(model), seed=s) for s in range(1, parents)]
            if labels:
                copies = [with_new_head(c, 2 + 2 * n, seed=7 + n) for n, c in enumerate(copies)]
            cache[key] = ([model, *copies], make_batches(kind, num_batches=3))
        return cache[key]

    return get


def per_task_errors(merged: torch.nn.Module, parents: list[torch.nn.Module], batch: dict) -> list[float]:
    """Each parent's task, in parent order, on its slice of the concatenated head: the error of its log-probabilities
    (a refit fits each task's centred logits, docs/design.md §4.9: the probabilities are what it keeps)."""
    out = model_output(merged, batch)
    errors, start = [], 0
    for parent in parents:
        expected = model_output(parent, batch)
        part = out[:, start:start + expected.shape[-1]]
        errors.append(relative_error(part.log_softmax(-1), expected.log_softmax(-1)))
        start += expected.shape[-1]
    assert start == out.shape[-1], f"head of {out.shape[-1]} labels, parents' {start}"
    return errors


@pytest.mark.parametrize(("kind", "method", "matcher", "options"), CASES,
                         ids=[f"{k}-{m}-{mt}-" + "-".join(f"{a}{v}" for a, v in o.items()) for k, m, mt, o in CASES])
def test_permuted_copies_come_back_under_every_option_combination(family, kind, method, matcher, options):
    """hf_mudsc.merge([A, perm(A)(, perm'(A))], batches, method=..., alpha=..., refit=..., size=...) == A."""
    options = dict(options)
    parents, batches = family(kind, options.pop("parents"), options.pop("labels"))
    merged = hf_mudsc.merge(parents, batches, method=method, matcher=matcher, progress=False, **options)
    assert all(torch.isfinite(p).all() for p in merged.parameters())
    # reference_compat's +1e-5 normaliser shrinks out-rows by 2/(2+1e-5): function kept to ~1e-4 (test_permuted_copy).
    tolerance = 1e-3 if options.get("reference_compat") else 1e-5
    for batch in batches[:2]:
        if len({model_output(p, batch).shape[-1] for p in parents}) > 1:
            assert max(per_task_errors(merged, parents, batch)) < tolerance
        else:
            assert relative_error(model_output(merged, batch), model_output(parents[0], batch)) < tolerance
    if options["size"] > 1:  # a widened merge (docs/design.md §4.12): wider, within its budget, same function
        budget = merged.config.mudsc["size_budget"]
        assert sum(budget["extra_units"].values()) > 0
        assert budget["num_parameters"] <= options["size"] * budget["parent_parameters"]


# ---------------------------------------------------------------------------------------------- solver edge cases


def recovers(model: torch.nn.Module, parents: list[torch.nn.Module], batches: list[dict], method: str, matcher: str,
             **options) -> float:
    """The merge's relative error against `model` (after checking no weight is NaN or infinite)."""
    merged = hf_mudsc.merge(parents, batches, method=method, matcher=matcher, progress=False, **options)
    assert all(torch.isfinite(p).all() for p in merged.parameters())
    return max(relative_error(model_output(merged, b), model_output(model, b)) for b in batches[:2])


def with_constant_units(kind: str) -> torch.nn.Module:
    """A model whose first MLP units are constant on any input: 3 dead (GELU of -100: exactly 0), 2 at GELU(0.7)."""
    model = make_model(kind, seed=0)
    spec = spec_for(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for group in spec.groups:
            if not group.name.endswith("mlp"):
                continue
            up = next(m for m in group.members if m.axis == 0 and m.param.endswith("weight")
                      and m.param.replace("weight", "bias") in params and params[m.param].dim() == 2)
            params[up.param][:5] = 0.0
            params[up.param.replace("weight", "bias")][:5] = torch.tensor([-100.0, -100.0, -100.0, 0.7, 0.7])
    return model


@pytest.mark.parametrize("refit", ["none", "auto"])
@pytest.mark.parametrize(("method", "matcher"), MATCHING)
@pytest.mark.parametrize("kind", ["vit_cls", "bert_cls"])
def test_units_constant_in_calibration_are_matched_to_their_twins(kind, method, matcher, refit):
    """merge([A, perm(A)], method="zipit") with 3 dead and 2 constant MLP units per block: zip left the dead units
    unfused (similarity 0 to everything) and fused live twin pairs together instead (err 0.25); activation_align
    paired a dead unit with a constant one and averaged their biases (err 0.13)."""
    model = with_constant_units(kind)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    assert recovers(model, [model, permuted], make_batches(kind, num_batches=3), method, matcher, refit=refit) < 1e-5


@pytest.mark.parametrize(("method", "matcher"), ACTIVATION_ONLY)
def test_dead_relu_units_come_back(method, matcher):
    """merge([A, perm(A)], method="zipit") for a ReLU BERT whose first 8 MLP units have bias -50 (exactly 0)."""
    model = randomize(BertForSequenceClassification(BertConfig(**{**BERT, "hidden_act": "relu"}, num_labels=3)), 0)
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.bias[:8] = -50.0
    permuted = permuted_copy(model, spec_for(model), seed=1)
    assert recovers(model, [model, permuted], make_batches("bert_cls", num_batches=3), method, matcher,
                    refit="none") < 1e-5


def test_constant_units_of_one_value_correlate_1_in_both_finalizations():
    """CorrelationAccumulator over units [varying, 0, 0, 0.7, 0.7, 0.3, varying]: Pearson left every constant unit
    at 0 with its equal; now equal constants get 1, other pairs keep Pearson's value, and finalize() (a copy) equals
    finalize_in_place() (the solve's) bit for bit."""
    from hf_mudsc.calibrate.correlation import CorrelationAccumulator

    generator = torch.Generator().manual_seed(0)
    varying = torch.randn(40, 2, generator=generator)
    constants = torch.tensor([0.0, 0.0, 0.7, 0.7, 0.3]).expand(40, 5)
    samples = torch.cat([varying[:, :1], constants, varying[:, 1:]], dim=1)
    accumulators = [CorrelationAccumulator(7), CorrelationAccumulator(7)]
    for accumulator in accumulators:
        accumulator.update(samples[:25])
        accumulator.update(samples[25:])
    copy_, in_place = accumulators[0].finalize(), accumulators[1].finalize_in_place()
    assert torch.equal(copy_, in_place)
    same = {(1, 2), (2, 1), (3, 4), (4, 3)}
    for i, j in product(range(1, 6), range(1, 6)):
        if i != j:
            assert copy_[i, j] == (1.0 if (i, j) in same else 0.0), (i, j)
    assert copy_[0, 1:6].abs().max() == 0 and copy_[6, 1:6].abs().max() == 0
    expected = torch.corrcoef(varying.T.double())[0, 1]
    assert copy_[0, 6] == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize(("method", "matcher"), ACTIVATION_ONLY)
def test_three_parents_with_constant_units_come_back(method, matcher):
    """merge([A, perm(A), perm'(A)], method="zipit") with dead and constant MLP units."""
    model = with_constant_units("vit_cls")
    parents = [model, *(permuted_copy(model, spec_for(model), seed=s) for s in (1, 2))]
    assert recovers(model, parents, make_batches("vit_cls", num_batches=3), method, matcher, refit="none") < 1e-5


@pytest.mark.parametrize(("method", "matcher"), MATCHING)
@pytest.mark.parametrize("kind", ["vit_cls", "bert_cls", "roberta_cls", "distilbert_cls"])
def test_a_single_calibration_example_still_recovers_the_permuted_copy(kind, method, matcher, caplog):
    """merge([A, perm(A)], [one example], method="activation_align", refit="none"): the groups read once per example
    (the residual stream at the first token, BERT's pooler) saw one row, every unit zero-variance, correlation 0
    everywhere: an arbitrary matching (err 4.7), while the twins' values are equal."""
    model = make_model(kind, seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches(kind, num_batches=1, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        assert recovers(model, [model, permuted], batches, method, matcher, refit="none") < 1e-5


@pytest.mark.parametrize(("method", "matcher"), MATCHING)
def test_duplicate_units_recover(method, matcher):
    """merge([A, perm(A)]) where A's MLP unit 1 is a copy of unit 0 (the same fc1 row, bias and fc2 column)."""
    model = make_model("vit_cls", seed=0)
    with torch.no_grad():
        for layer in model.vit.layers:
            layer.mlp.fc1.weight[1] = layer.mlp.fc1.weight[0]
            layer.mlp.fc1.bias[1] = layer.mlp.fc1.bias[0]
            layer.mlp.fc2.weight[:, 1] = layer.mlp.fc2.weight[:, 0]
    permuted = permuted_copy(model, spec_for(model), seed=1)
    assert recovers(model, [model, permuted], make_batches("vit_cls", num_batches=3), method, matcher) < 1e-5


SHAPES = {
    "mlp width 1": ViTForImageClassification(ViTConfig(**{**VIT, "intermediate_size": 1}, num_labels=3)),
    "one head": ViTForImageClassification(ViTConfig(**{**VIT, "num_attention_heads": 1}, num_labels=3)),
    "head_dim 1": ViTForImageClassification(ViTConfig(**{**VIT, "hidden_size": 4, "num_attention_heads": 4},
                                                      num_labels=3)),
    "bert one head": BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=48,
        max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)),
}


@pytest.mark.parametrize(("method", "matcher"), MATCHING)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_degenerate_group_shapes_recover(shape, method, matcher):
    """merge([A, perm(A)]) for a layer group of width 1, one attention head, and heads of one unit each."""
    model = randomize(copy.deepcopy(SHAPES[shape]), 0)
    kind = "bert_cls" if "bert" in shape else "vit_cls"
    permuted = permuted_copy(model, spec_for(model), seed=1)
    assert recovers(model, [model, permuted], make_batches(kind, num_batches=3), method, matcher) < 1e-5


@pytest.mark.parametrize(("method", "matcher"), MATCHING)
@pytest.mark.parametrize("order", ["A A perm", "A perm perm"])
def test_three_parents_of_which_two_are_identical(order, method, matcher):
    """merge([A, A, perm(A)]) and merge([A, perm(A), perm(A)]): a tie between identical parents' units."""
    model = make_model("bert_cls", seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    parents = {"A A perm": [model, copy.deepcopy(model), permuted],
               "A perm perm": [model, permuted, copy.deepcopy(permuted)]}[order]
    assert recovers(model, parents, make_batches("bert_cls", num_batches=3), method, matcher) < 1e-5


@pytest.mark.parametrize("alpha", [0, 1, 0.0, 1.0])
@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_alpha_exactly_zero_and_one(alpha, matcher):
    """merge([A, perm(A)], method="mudsc", alpha=0) (activations alone) and alpha=1 (weights alone), ints too."""
    model = make_model("roberta_cls", seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    merged = hf_mudsc.merge([model, permuted], make_batches("roberta_cls", num_batches=3), method="mudsc",
                            matcher=matcher, alpha=alpha, progress=False)
    assert merged.config.mudsc["alpha"] == alpha
    batch = make_batches("roberta_cls", num_batches=1, seed=3)[0]
    assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5


@pytest.mark.parametrize(("method", "matcher"), [m for m in MATCHING if get_method(m[0]).needs_calibration])
def test_activations_overflowing_float32_are_refused_in_one_line(method, matcher):
    """merge([A, perm(A)]) with one fc1 weight 1e38: the statistics would be inf/NaN; a CalibrationError naming the
    group, never a scipy/torch traceback or NaN weights."""
    model = make_model("vit_cls", seed=0)
    with torch.no_grad():
        model.vit.layers[0].mlp.fc1.weight[0, 0] = 1e38
    permuted = permuted_copy(model, spec_for(model), seed=1)
    with pytest.raises(CalibrationError, match="infinite or NaN at group 'vit.layers.0.mlp'") as caught:
        hf_mudsc.merge([model, permuted], make_batches("vit_cls", num_batches=2), method=method, matcher=matcher,
                       progress=False)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("method", "matcher"), ACTIVATION_ONLY)
def test_calibration_of_one_image_repeated_recovers(method, matcher):
    """merge([A, perm(A)], [{"pixel_values": zeros(4, 1, 16, 16)}], method="zipit"): every example alike, so every
    unit read once per example is constant; the twins' equal values are what tells them apart."""
    model = make_model("vit_cls", seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = [{"pixel_values": torch.zeros(4, 1, 16, 16)}] * 2
    assert recovers(model, [model, permuted], batches, method, matcher, refit="none") < 1e-5


# The zip one: align's exact ties among constant units are broken otherwise than by the reference (pre-existing).
@pytest.mark.parametrize(("method", "matcher"), [m for m in ACTIVATION_ONLY if m[1] == "zip"])
def test_reference_compat_keeps_the_references_pearson_for_constant_units(method, matcher):
    """merge([A, perm(A)], method="zipit", reference_compat=True) with constant MLP units equals the reference
    implementation's merge (tests/reference_mudsc.py: constant units correlate 0 with everything there), while the
    default matches them by value — so the two merges differ."""
    import reference_mudsc as ref

    model = with_constant_units("vit_cls")
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches("vit_cls", num_batches=3)
    expected = ref.reference_merge(model, permuted, batches, method=method, matcher=matcher).state_dict
    options = dict(method=method, matcher=matcher, statistics_dtype="float64", refit="none", progress=False)
    compat = hf_mudsc.merge([model, permuted], batches, reference_compat=True, **options)
    params = {k: v.detach().double() for k, v in compat.named_parameters()}
    assert params.keys() == expected.keys()
    assert max(float((params[k] - v).abs().max()) for k, v in expected.items()) < 1e-6
    default = hf_mudsc.merge([model, permuted], batches, **options)
    assert relative_error(model_output(default, batches[0]), model_output(model, batches[0])) < 1e-5
    assert relative_error(model_output(compat, batches[0]), model_output(model, batches[0])) > 1e-2


def pruned(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (a ViT) with its first 6 MLP units per block pruned: fc1 row, bias and fc2 column zero."""
    with torch.no_grad():
        for layer in model.vit.layers:
            layer.mlp.fc1.weight[:6] = 0.0
            layer.mlp.fc1.bias[:6] = 0.0
            layer.mlp.fc2.weight[:, :6] = 0.0
    return model


@pytest.mark.parametrize("alpha", [1.0, 0.9])
@pytest.mark.parametrize("parents", [2, 3])
def test_pruned_units_are_matched_by_weight_too(alpha, parents):
    """merge([A, perm(A)], method="mudsc", matcher="zip", alpha=1) where 6 MLP units per block are pruned (fc1 row,
    bias and fc2 column zero): their weight rows are constant, so weight Pearson gave them 0 with their (identical)
    twins and zip fused live twin pairs instead (err 0.39; 0.018 at alpha 0.9)."""
    model = pruned(make_model("vit_cls", seed=0))
    copies = [permuted_copy(model, spec_for(model), seed=s) for s in range(1, parents)]
    assert recovers(model, [model, *copies], make_batches("vit_cls", num_batches=3), "mudsc", "zip", alpha=alpha,
                    refit="none") < 1e-5


def test_reference_compat_keeps_the_references_weight_pearson_for_pruned_units():
    """merge([A, perm(A)], method="mudsc", matcher="zip", alpha=1, reference_compat=True) with pruned units equals
    the reference implementation's merge (its weight Pearson: 0 for constant rows), not the default's."""
    import reference_mudsc as ref

    model = pruned(make_model("vit_cls", seed=0))
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches("vit_cls", num_batches=3)
    expected = ref.reference_merge(model, permuted, batches, method="mudsc", matcher="zip", alpha=1.0).state_dict
    options = dict(method="mudsc", matcher="zip", alpha=1.0, statistics_dtype="float64", refit="none", progress=False)
    compat = hf_mudsc.merge([model, permuted], batches, reference_compat=True, **options)
    params = {k: v.detach().double() for k, v in compat.named_parameters()}
    assert max(float((params[k] - v).abs().max()) for k, v in expected.items()) < 1e-6
    default = hf_mudsc.merge([model, permuted], batches, **options)
    assert relative_error(model_output(default, batches[0]), model_output(model, batches[0])) < 1e-5
