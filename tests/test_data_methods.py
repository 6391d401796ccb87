"""The calibration-data same-base methods (issue 13): `regmean`, `regmean_plusplus`, `fisher` (docs/design.md §4.11).

Proven here, on the tiny ViT/BERT models of tests/factories.py: the streamed Grams drop padding (a padded batch
gives the Grams of the same texts without padding) and keep nothing per batch; the RegMean solve equals a direct
least-squares solve over the stacked activations (regmean_scale=1) and the energy-weighted column average
(regmean_scale=0); the Fisher equals the analytic softmax-regression Fisher of the classifier; through `merge()`:
RegMean equals the closed form on Grams collected directly with hooks, identical parents give that parent, weights
(1, 0) give parent 0, RegMean++ averages the layers whose inputs all parents share (BERT's first q/k/v) and equals
a direct block-by-block re-computation, Fisher takes the other parent's value where one parent's Fisher is zero;
and errors come before any forward pass.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from factories import fine_tune, make_batches, make_model
from torch import nn

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.fisher import diagonal_fisher
from hf_mudsc.calibrate.layer_inputs import collect_grams, linear_layers, padding_mask_key
from hf_mudsc.errors import MergeInputError
from hf_mudsc.solve.regmean import RegMeanSystem, chained_units, transformer_blocks
from hf_mudsc.solve.task_vectors import fisher_average, regmean_solve


def direct_grams(model: nn.Module, layers: list[str], batches: list[dict], spec) -> dict[str, torch.Tensor]:
    """Each layer's mean input Gram over non-padding tokens, by keeping every activation (the naive way)."""
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    current: dict = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().double()
            key = padding_mask_key(spec, f"{name}.weight")
            mask = current.get(key) if key else None
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.bool()]
            rows[name].append(x.reshape(-1, x.shape[-1]))
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in layers]
    with torch.no_grad():
        for batch in batches:
            current.clear()
            current.update(batch)
            model(**batch)
    for handle in handles:
        handle.remove()
    stacked = {name: torch.cat(values) for name, values in rows.items()}
    return {name: x.T @ x / len(x) for name, x in stacked.items()}


# ----------------------------------------------------------------------------------------- streamed Grams


def test_grams_of_a_padded_batch_equal_the_grams_of_the_same_texts_without_padding():
    model = make_model("bert_cls", seed=0)
    spec = spec_for(model)
    layers = linear_layers(model)
    batch = make_batches("bert_cls", num_batches=1, batch_size=6, seed=3)[0]
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.min()) < batch["attention_mask"].shape[1]  # the batch really is padded
    keys = {name: padding_mask_key(spec, f"{name}.weight") for name in layers}
    padded, examples = collect_grams(model, layers, lambda: [batch], mask_keys=keys)
    alone = [{"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n]}
             for i, n in enumerate(lengths.tolist())]
    unpadded, _ = collect_grams(model, layers, lambda: alone, mask_keys=keys)
    assert examples == 6
    assert padded["bert.encoder.layer.0.attention.self.query"].rows == int(lengths.sum())  # tokens, pads dropped
    for name in layers:
        assert padded[name].rows == unpadded[name].rows
        scale = float(unpadded[name].sum.abs().max())
        assert float((padded[name].sum - unpadded[name].sum).abs().max()) < 1e-6 * scale  # float32 forwards
    # Without the mask keys the padded rows would count: the comparison above can fail.
    unmasked, _ = collect_grams(model, layers, lambda: [batch])
    name = "bert.encoder.layer.0.attention.self.query"
    assert unmasked[name].rows == batch["attention_mask"].numel()
    assert float((unmasked[name].sum - unpadded[name].sum).abs().max()) > 1e-2 * float(unpadded[name].sum.abs().max())


def test_grams_equal_the_naive_gram_of_every_kept_activation_and_memory_does_not_grow_with_the_batches():
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    layers = linear_layers(model)

    def live_bytes() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on deprecated torch aliases in gc's list warns
            warnings.simplefilter("ignore")
            return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def run(count: int):
        before = live_bytes()
        grams, examples = collect_grams(model, layers, lambda: (make_batches("vit_cls", 1, 8, seed=s)[0]
                                                                 for s in range(count)))
        return grams, examples, live_bytes() - before

    few, examples_few, kept_few = run(2)
    many, examples_many, kept_many = run(12)
    assert (examples_few, examples_many) == (16, 96)
    assert kept_few == kept_many  # only the (in, in) sums are kept, whatever the number of batches
    assert kept_many == sum(g.sum.numel() * 8 for g in many.values())
    naive = direct_grams(model, layers, [make_batches("vit_cls", 1, 8, seed=s)[0] for s in range(12)], spec)
    for name in layers:
        torch.testing.assert_close(many[name].mean(), naive[name], rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------------------------------- the solve


def test_regmean_solve_with_scale_1_is_the_least_squares_fit_to_every_parents_outputs():
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 6, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 2.0, 0.5]
    system = RegMeanSystem(6, 4)
    for w, x, matrix in zip(weights, xs, ws):
        system.add(w, x.T @ x / len(x), matrix, scale=1.0, rows=len(x))
    solved = system.solve(torch.zeros(4, 6, dtype=torch.float64))
    # argmin_W Σ_i (w_i / n_i) ||X_i Wᵀ - X_i W_iᵀ||²: stack √(w_i/n_i) X_i against √(w_i/n_i) X_i W_iᵀ.
    a = torch.cat([(w / len(x)) ** 0.5 * x for w, x in zip(weights, xs)])
    b = torch.cat([(w / len(x)) ** 0.5 * x @ m.T for w, x, m in zip(weights, xs, ws)])
    torch.testing.assert_close(solved, torch.linalg.lstsq(a, b).solution.T, rtol=1e-9, atol=1e-10)
    # The package's independent closed form agrees (weights folded into the Grams).
    reference = regmean_solve([w * x.T @ x / len(x) for w, x in zip(weights, xs)], ws, scale=1.0)
    torch.testing.assert_close(solved, reference, rtol=1e-9, atol=1e-10)


def test_regmean_solve_with_scale_0_averages_each_input_column_by_its_input_energy_and_keeps_dead_features():
    grams = [torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)),
             torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))]
    grams[0][0, 1] = grams[0][1, 0] = 1.5  # off-diagonals vanish at scale 0
    ws = [torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), torch.tensor([[6.0, 4.0, 5.0]], dtype=torch.float64)]
    system = RegMeanSystem(3, 1)
    for gram, matrix in zip(grams, ws):
        system.add(1.0, gram, matrix, scale=0.0, rows=10)
    average = torch.tensor([[3.5, 3.0, 4.0]], dtype=torch.float64)  # what the caller would average
    solved = system.solve(average)
    # column 0: (4·1 + 1·6)/5 = 2; column 1: (2 + 4)/2 = 3; column 2 saw no input: the average's 4.
    torch.testing.assert_close(solved, torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ Fisher


def test_fisher_of_the_classifier_equals_the_analytic_softmax_fisher_under_the_models_own_predictions():
    model = make_model("bert_cls", seed=0, num_labels=3)
    batches = make_batches("bert_cls", num_batches=2, batch_size=5, seed=1)
    fisher, examples = diagonal_fisher(model, lambda: batches, ["classifier.weight", "classifier.bias"])
    assert examples == 10
    expected_w = torch.zeros(3, 32, dtype=torch.float64)
    expected_b = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            pooled = model.bert(**batch).pooler_output.double()
            probs = torch.softmax(model(**batch).logits.double(), dim=-1)
            for h, p in zip(pooled, probs):
                for c in range(3):
                    residual = torch.nn.functional.one_hot(torch.tensor(c), 3).double() - p  # ∂ log p_c / ∂ logits
                    expected_w += p[c] * torch.outer(residual, h) ** 2
                    expected_b += p[c] * residual ** 2
    torch.testing.assert_close(fisher["classifier.weight"], expected_w / examples, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fisher["classifier.bias"], expected_b / examples, rtol=1e-5, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the parents are left as they were


def test_fisher_refuses_a_model_without_a_classification_head_in_one_line():
    model = make_model("bert", seed=0)
    with pytest.raises(MergeInputError, match=r"fisher needs parents with a classification head") as error:
        diagonal_fisher(model, lambda: make_batches("bert", 1, 2))
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------- RegMean++ units


def test_transformer_blocks_and_chained_units_follow_the_forward_order():
    vit = make_model("vit_cls", seed=0)
    assert transformer_blocks(vit) == ["vit.layers.0", "vit.layers.1"]  # transformers 5 names
    clip = make_model("clip", seed=0)
    assert transformer_blocks(clip) == [f"text_model.encoder.layers.{i}" for i in range(2)] + [
        f"vision_model.encoder.layers.{i}" for i in range(2)]
    bert = make_model("bert_cls", seed=0)
    names = [n for n, _ in bert.named_parameters()]
    units = chained_units(bert, linear_layers(bert), make_batches("bert_cls", 1, 2)[0], names)
    assert [u.stop_after for u in units] == ["bert.encoder.layer.0", "bert.encoder.layer.1", None]
    assert units[0].layers[:3] == ("bert.encoder.layer.0.attention.self.query",
                                   "bert.encoder.layer.0.attention.self.key",
                                   "bert.encoder.layer.0.attention.self.value")
    assert units[2].layers == ("bert.pooler.dense", "classifier")
    assert set(units[2].own) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                 "classifier.bias"}
    assert "bert.encoder.layer.1.output.LayerNorm.weight" in units[1].own


# ------------------------------------------------------------------------------------------ through merge()


def weighted_average(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)) / sum(weights) for k in states[0]}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_states_close(merged: nn.Module, expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    params = state(merged)
    assert set(params) == set(expected)
    for name, value in expected.items():
        error = float((params[name].double() - value.double()).abs().max())
        assert error <= rtol * max(float(value.abs().max()), 1e-3), (name, error)


def test_regmean_through_merge_equals_the_closed_form_on_grams_collected_directly_for_three_weighted_parents():
    base = make_model("bert_cls", seed=0)
    parents = [fine_tune(base, seed, 0.02) for seed in (1, 2, 3)]
    batches = make_batches("bert_cls", num_batches=3, batch_size=8, seed=5)
    weights = [1.0, 2.0, 0.5]
    merged = hf_mudsc.merge(parents, batches, method="regmean", weights=weights, progress=False)
    spec = spec_for(base)
    layers = linear_layers(base)
    grams = [direct_grams(p, layers, batches, spec) for p in parents]
    expected = weighted_average([state(p) for p in parents], weights)
    for name in layers:
        expected[f"{name}.weight"] = regmean_solve([w * g[name] for w, g in zip(weights, grams)],
                                                   [state(p)[f"{name}.weight"].double() for p in parents], 0.95)
    assert_states_close(merged, expected)
    # The solve moved the Linear weights away from the plain weighted average (the test can fail).
    query = "bert.encoder.layer.0.attention.self.query.weight"
    average = weighted_average([state(p) for p in parents], weights)[query]
    assert float((state(merged)[query].double() - average).abs().max()) > 1e-3
    assert merged.config.mudsc["regmean_scale"] == 0.95 and merged.config.mudsc["fisher_epsilon"] is None


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher"])
def test_identical_parents_give_that_parent_and_weights_one_zero_give_parent_zero(method):
    base = make_model("vit_cls", seed=0)
    batches = make_batches("vit_cls", num_batches=2, batch_size=4, seed=1)
    same = hf_mudsc.merge([base, copy.deepcopy(base)], batches, method=method, progress=False)
    assert_states_close(same, state(base))
    other = fine_tune(base, seed=7, scale=0.05)
    # Parent 1's Gram / Fisher weighs nothing: parent 0 exactly (RegMean at regmean_scale=1: its own least squares).
    scale = {} if method == "fisher" else {"regmean_scale": 1.0}
    first = hf_mudsc.merge([other, base], batches, method=method, weights=[1.0, 0.0], progress=False, **scale)
    assert_states_close(first, state(other))


def test_regmean_plusplus_averages_layers_whose_inputs_all_parents_share_and_equals_a_direct_block_by_block_solve():
    base = make_model("bert_cls", seed=0)
    parents = [fine_tune(base, seed, scale=0.05) for seed in (1, 2)]
    batches = make_batches("bert_cls", num_batches=2, batch_size=8, seed=4)
    # refit="none": the methods' own closed forms (refit="auto" would refit after them, two equal parents)
    merged = hf_mudsc.merge(parents, batches, method="regmean_plusplus", regmean_scale=0.9, refit="none",
                            progress=False)
    plain = hf_mudsc.merge(parents, batches, method="regmean", regmean_scale=0.9, refit="none", progress=False)
    average = weighted_average([state(p) for p in parents], [1.0, 1.0])
    query = "bert.encoder.layer.0.attention.self.query.weight"
    # BERT's block 0 reads the merged embeddings (LayerNorm outside the block): the same Gram for both parents,
    # so RegMean++ gives the average there, while RegMean (each parent's own embeddings) does not.
    torch.testing.assert_close(state(merged)[query].double(), average[query], rtol=1e-5, atol=1e-6)
    assert float((state(plain)[query].double() - average[query]).abs().max()) > 1e-4
    # Direct re-computation: a working model with the merged blocks before l and parent i's block l.
    spec = spec_for(base)
    working = copy.deepcopy(base)
    working.load_state_dict({k: v.float() for k, v in average.items()}, strict=False)
    expected = dict(average)
    units = [("bert.encoder.layer.0.", None), ("bert.encoder.layer.1.", None),
             ("", ("bert.pooler.dense", "classifier"))]
    for prefix, tail in units:
        layers = [n for n in linear_layers(base) if (n in tail if tail else n.startswith(prefix))]
        own = [k for k in average if (k.rsplit(".", 1)[0] in tail if tail else k.startswith(prefix))]
        grams = []
        for parent in parents:
            working.load_state_dict({k: state(parent)[k] for k in own}, strict=False)
            grams.append(direct_grams(working, layers, batches, spec))
        for name in layers:
            expected[f"{name}.weight"] = regmean_solve([g[name] for g in grams],
                                                       [state(p)[f"{name}.weight"].double() for p in parents], 0.9)
        working.load_state_dict({k: expected[k].float() for k in own}, strict=False)
    assert_states_close(merged, expected)


def test_fisher_takes_the_other_parents_value_where_one_parents_fisher_is_zero():
    base = make_model("vit_cls", seed=0)
    parent_a = fine_tune(base, seed=1, scale=0.05)
    parent_b = fine_tune(base, seed=2, scale=0.05)
    with torch.no_grad():  # feature 5 of B's final norm is dead: B's classifier column 5 has no gradient
        parent_b.vit.layernorm.weight[5] = 0.0
        parent_b.vit.layernorm.bias[5] = 0.0
    batches = make_batches("vit_cls", num_batches=2, batch_size=6, seed=3)
    merged = hf_mudsc.merge([parent_a, parent_b], batches, method="fisher", weights=[1.0, 3.0], progress=False)
    column = state(merged)["classifier.weight"][:, 5]
    torch.testing.assert_close(column, state(parent_a)["classifier.weight"][:, 5], rtol=1e-4, atol=1e-6)
    other = state(merged)["classifier.weight"][:, 4]
    assert float((other - state(parent_a)["classifier.weight"][:, 4]).abs().max()) > 1e-3  # elsewhere: a blend
    # The whole merge is fisher_average's floored Fisher-weighted mean of the parents' Fishers (one definition).
    fishers = [diagonal_fisher(p, lambda: batches)[0] for p in (parent_a, parent_b)]
    expected = fisher_average([state(parent_a), state(parent_b)], fishers, [1.0, 3.0], epsilon=1e-6)
    assert_states_close(merged, expected)
    assert merged.config.mudsc["fisher_epsilon"] == 1e-6 and merged.config.mudsc["regmean_scale"] is None


# --------------------------------------------------------------------------------------------------- errors

MISSING = ["/nonexistent/parent-a", "/nonexistent/parent-b"]


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher"])
def test_no_calibration_is_refused_in_one_line_naming_calibration_before_anything_is_loaded(method):
    with pytest.raises(MergeInputError, match="calibration") as error:
        hf_mudsc.merge(MISSING, method=method, progress=False)
    assert "\n" not in str(error.value) and method in str(error.value)


@pytest.mark.parametrize(("keyword", "value", "fragment"), [
    ("regmean_scale", 1.5, "--regmean-scale"), ("regmean_scale", -0.1, "--regmean-scale"),
    ("fisher_epsilon", 0.0, "--fisher-epsilon"), ("fisher_epsilon", float("nan"), "--fisher-epsilon")])
def test_bad_option_values_are_refused_before_anything_is_loaded(keyword, value, fragment):
    with pytest.raises(MergeInputError, match=keyword) as error:
        hf_mudsc.merge(MISSING, make_batches("vit_cls", 1), method="regmean", progress=False, **{keyword: value})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_fisher_refuses_parents_without_a_classification_head_before_any_weights(tmp_path, monkeypatch):
    """Known from parent A's configuration (no classification head in its architecture), so refused before any
    weights are read or a forward runs: by the dry run (which reads no weights) and by the merge before the Fisher
    pass (it was refused only at the pass's first forward, after the parents were loaded — downloaded, for Hub
    ones). CLIP's dual encoder has no head either."""
    import hf_mudsc.calibrate.fisher as fisher_module

    def never(*args, **kwargs):
        raise AssertionError("the Fisher pass ran before the refusal")

    monkeypatch.setattr(fisher_module, "diagonal_fisher", never)
    base = make_model("bert", seed=0)
    parents = [base, fine_tune(base, 1, 0.02)]
    for index, parent in enumerate(parents):
        parent.save_pretrained(tmp_path / str(index))
    for dry_run in (True, False):
        with pytest.raises(MergeInputError, match="fisher needs parents with a classification head") as error:
            hf_mudsc.merge(parents if not dry_run else [tmp_path / "0", tmp_path / "1"], make_batches("bert", 1, 2),
                           method="fisher", dry_run=dry_run, progress=False)
        assert "\n" not in str(error.value) and "--method" in str(error.value)
    clip = make_model("clip", seed=0)
    with pytest.raises(MergeInputError, match="fisher needs parents with a classification head"):
        hf_mudsc.merge([clip, fine_tune(clip, 1, 0.02)], make_batches("clip", 1, 2), method="fisher", progress=False)
    # a model with a head is not refused by the check (the pass runs: here it is the stub)
    with_head = make_model("bert_cls", seed=0)
    with pytest.raises(AssertionError, match="the Fisher pass ran"):
        hf_mudsc.merge([with_head, fine_tune(with_head, 1, 0.02)], make_batches("bert_cls", 1, 2), method="fisher",
                       progress=False)


@pytest.mark.parametrize(("labels", "problem_type", "named"), [
    (1, None, "problem_type 'regression'"), (1, "regression", "problem_type 'regression'"),
    (3, "regression", "problem_type 'regression'"),
    (3, "multi_label_classification", "problem_type 'multi_label_classification'")])
def test_fisher_refuses_heads_not_read_by_one_softmax_before_any_weights(tmp_path, monkeypatch, labels, problem_type,
                                                                        named):
    """Fisher's weights are the Fisher of one softmax over the head's classes: of a regression head's one output it
    is identically zero (log_softmax of one logit is 0: the merge was the plain average, recorded as fisher), and a
    multi-label head is read by a sigmoid per label. Refused in one line naming the problem_type and the methods to
    use, from parent A's config: by the dry run (no weights read) and by merge() before the Fisher pass."""
    import hf_mudsc.calibrate.fisher as fisher_module

    def never(*args, **kwargs):
        raise AssertionError("the Fisher pass ran before the refusal")

    monkeypatch.setattr(fisher_module, "diagonal_fisher", never)
    base = make_model("bert_cls", seed=0, num_labels=labels)
    base.config.problem_type = problem_type
    parents = [base, fine_tune(base, 1, 0.02)]
    for index, parent in enumerate(parents):
        parent.save_pretrained(tmp_path / str(index))
    for dry_run in (True, False):
        with pytest.raises(MergeInputError, match=named) as error:
            hf_mudsc.merge(parents if not dry_run else [tmp_path / "0", tmp_path / "1"],
                           make_batches("bert_cls", 1, 2), method="fisher", dry_run=dry_run, progress=False)
        message = str(error.value)
        assert "\n" not in message and "regmean" in message and "linear" in message and "--method" in message


def test_options_reach_the_cli_recipe_and_card_only_for_the_method_that_reads_them(tmp_path):
    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.merge import build_recipe
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.recipe import Recipe

    args = build_parser().parse_args(["merge", "a", "b", "c", "--calibration", "d", "-o", "o", "--method", "regmean",
                                      "--regmean-scale", "0.5", "--fisher-epsilon", "1e-8"])
    recipe = build_recipe(args)
    assert (recipe.method, recipe.regmean_scale, recipe.fisher_epsilon) == ("regmean", 0.5, 1e-8)
    base = make_model("vit_cls", seed=0)
    parents = [fine_tune(base, 1, 0.02), fine_tune(base, 2, 0.02)]
    batches = make_batches("vit_cls", 1, 4)
    merged = hf_mudsc.merge(parents, batches, method="regmean", regmean_scale=0.5, progress=False)
    card = str(render_card(merged, Recipe(models=["a", "b"], method="regmean", regmean_scale=0.5)))
    assert "| RegMean off-diagonal scale | 0.5 |" in card and "Fisher floor" not in card
    fisher = hf_mudsc.merge(parents, batches, method="fisher", fisher_epsilon=1e-8, progress=False)
    card = str(render_card(fisher, Recipe(models=["a", "b"], method="fisher", fisher_epsilon=1e-8)))
    assert "| Fisher floor ε | 1e-08 |" in card and "RegMean off-diagonal scale" not in card


def test_cli_without_calibration_exits_2_with_one_line_naming_calibration(tmp_path, capsys):
    """A recipe/usage error: exit 2, as every option error of `hf-mudsc merge` (tests/test_cli.py)."""
    from hf_mudsc.cli.main import main

    code = main(["merge", *MISSING, "/nonexistent/parent-c", "--method", "regmean_plusplus", "-o",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "calibration" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_merges_folders_with_regmean_and_the_recipe_reproduces_the_weights(tmp_path):
    import datasets
    import numpy as np
    import yaml
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import ViTImageProcessor

    from hf_mudsc.cli.main import main
    from hf_mudsc.publish.recipe import Recipe

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    base = make_model("vit_cls", seed=0)
    folders = []
    for seed in (1, 2):
        fine_tune(base, seed, 0.02).save_pretrained(tmp_path / f"ft-{seed}")
        processor.save_pretrained(tmp_path / f"ft-{seed}")
        folders.append(str(tmp_path / f"ft-{seed}"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(12)]
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).save_to_disk(
        tmp_path / "calibration")
    out = tmp_path / "merged"
    assert main(["merge", *folders, "--calibration", str(tmp_path / "calibration"), "--method", "regmean",
                 "--regmean-scale", "0.8", "--weights", "1", "2", "--batch-size", "5", "-o", str(out)]) == 0
    config = yaml.safe_load((out / "config.json").read_text())["mudsc"]
    assert (config["method"], config["regmean_scale"], config["weights"]) == ("regmean", 0.8, [1.0, 2.0])
    assert config["fisher_epsilon"] is None and config["num_calibration_samples"] == 12
    recipe = Recipe.load(out / "mudsc_recipe.yaml")
    assert (recipe.method, recipe.regmean_scale) == ("regmean", 0.8)
    card = (out / "README.md").read_text()
    assert "| RegMean off-diagonal scale | 0.8 |" in card and "Fisher floor" not in card
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / "mudsc_recipe.yaml"), "-o", str(again)]) == 0
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_parents_with_different_label_sets_get_the_concatenated_head_and_a_merged_body(method):
    from factories import classifier_names, with_new_head

    base = make_model("bert_cls", seed=0, num_labels=4)
    parent_a = fine_tune(base, 1, 0.02)
    parent_b = with_new_head(fine_tune(base, 2, 0.02), num_labels=2, seed=3)
    batches = make_batches("bert_cls", num_batches=2, batch_size=6, seed=4)
    merged = hf_mudsc.merge([parent_a, parent_b], batches, method=method, progress=False)
    weight, bias = classifier_names(base)
    head = state(merged)
    torch.testing.assert_close(head[weight], torch.cat([state(parent_a)[weight], state(parent_b)[weight]]))
    torch.testing.assert_close(head[bias], torch.cat([state(parent_a)[bias], state(parent_b)[bias]]))
    assert merged.config.num_labels == 6
    # The body is the method's merge, not a copy of either parent nor the plain average.
    query = "bert.encoder.layer.1.attention.self.query.weight"
    average = (state(parent_a)[query] + state(parent_b)[query]) / 2
    assert float((head[query] - average).abs().max()) > 1e-4


def test_fisher_of_a_padded_batch_equals_the_fisher_of_the_same_texts_without_padding():
    model = make_model("bert_cls", seed=0)
    batch = make_batches("bert_cls", num_batches=1, batch_size=5, seed=6)[0]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert min(lengths) < batch["attention_mask"].shape[1]
    alone = [{"input_ids": batch["input_ids"][i:i + 1, :n], "attention_mask": batch["attention_mask"][i:i + 1, :n]}
             for i, n in enumerate(lengths)]
    padded, _ = diagonal_fisher(model, lambda: [batch])
    unpadded, _ = diagonal_fisher(model, lambda: alone)
    for name, value in unpadded.items():
        assert float((padded[name] - value).abs().max()) <= 1e-5 * float(value.abs().max()) + 1e-12, name


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher"])
def test_calibration_data_without_examples_is_refused_in_one_line(method):
    base = make_model("vit_cls", seed=0)
    with pytest.raises(MergeInputError, match="gave no examples") as error:
        hf_mudsc.merge([base, fine_tune(base, 1, 0.02)], [], method=method, progress=False)
    assert "\n" not in str(error.value)


def test_a_singular_system_takes_the_least_squares_solution_nearest_the_weighted_average():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=generator, dtype=torch.float64)  # 3 samples, 6 features: rank 3
    ws = [torch.randn(2, 6, generator=generator, dtype=torch.float64) for _ in range(2)]
    system = RegMeanSystem(6, 2)
    for matrix in ws:
        system.add(1.0, x.T @ x / 3, matrix, scale=1.0, rows=3)
    average = (ws[0] + ws[1]) / 2
    solved = system.solve(average)
    # It fits the data like the average does (both parents saw the same inputs) and moves nowhere else.
    torch.testing.assert_close(solved, average, rtol=1e-9, atol=1e-9)
    only_first = RegMeanSystem(6, 2)
    only_first.add(1.0, x.T @ x / 3, ws[0], scale=1.0, rows=3)
    only_first.add(0.0, x.T @ x / 3, ws[1], scale=1.0, rows=3)
    torch.testing.assert_close(only_first.solve(ws[0]), ws[0], rtol=1e-9, atol=1e-9)
    # Against another start the data-determined part is still parent 0's outputs.
    shifted = only_first.solve(average)
    torch.testing.assert_close(x @ shifted.T, x @ ws[0].T, rtol=1e-9, atol=1e-9)
    assert float((shifted - ws[0]).abs().max()) > 1e-3  # free directions follow the given average
