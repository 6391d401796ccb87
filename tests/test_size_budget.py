"""The size budget (`size=`, docs/design.md §4.12): MLP units left unfused, counted exactly, stock classes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from factories import make_batches, make_model, model_output, permuted_copy, relative_error, with_new_head
from readme_examples import readme_example
from transformers import AutoModel, AutoModelForImageClassification

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.errors import MergeInputError
from hf_mudsc.solve.maps import GroupMaps
from hf_mudsc.solve.matchers import Match
from hf_mudsc.solve.widen import best_cross_match, plan_size, unfuse

KINDS = ("vit_cls", "bert_cls", "clip", "clip_text_proj")
SIZES = (1.0, 1.1, 1.25, 1.5, 2.0)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def different():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = (make_model(kind, seed=0), make_model(kind, seed=1), make_batches(kind, num_batches=6))
        return cache[kind]

    return get


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mlp_cost(model: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """Per width key by hand: (parent width k, parameters one more unit costs in all its layers, layers)."""
    config = model.config
    configs = {"intermediate_size": config} if hasattr(config, "intermediate_size") else {
        f"{name}.intermediate_size": getattr(config, name) for name in ("vision_config", "text_config")}
    return {key: (c.intermediate_size, c.num_hidden_layers * (2 * c.hidden_size + 1), c.num_hidden_layers)
            for key, c in configs.items()}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_within_the_budget_and_no_unit_more_fits(different, kind, size):
    a, b, batches = different(kind)
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, progress=False)
    parent = count(a)
    total = count(merged)
    assert total <= size * parent
    budget = merged.config.mudsc["size_budget"]
    assert budget["num_parameters"] == total and budget["parent_parameters"] == parent
    assert merged.config.mudsc["size"] == size
    costs = mlp_cost(a)
    left = math.floor(size * parent) - total
    for key, (width, cost, _) in costs.items():
        holder = merged.config
        for name in key.split(".")[:-1]:
            holder = getattr(holder, name)
        assert holder.intermediate_size == budget["widths"][key] == width + budget["extra_units"][key]
        # Maximal: every key is fully unfused (2k units) or one more unit would not fit.
        assert holder.intermediate_size == 2 * width or cost > left, (key, left)
    if len(costs) == 1:  # one key: the count is known in closed form
        (width, cost, _), = costs.values()
        extra = min(width, (math.floor(size * parent) - parent) // cost)
        assert total == parent + extra * cost
    if size == 1.0:
        assert total == parent


def test_size_one_is_the_paper_merge_bit_for_bit(different):
    a, b, batches = different("vit_cls")
    plain = hf_mudsc.merge([a, b], batches, method="mudsc", progress=False)
    one = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.0, progress=False)
    wider = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.25, progress=False)
    assert plain.state_dict().keys() == one.state_dict().keys()
    assert all(torch.equal(t, one.state_dict()[name]) for name, t in plain.state_dict().items())
    assert wider.config.intermediate_size > plain.config.intermediate_size == a.config.intermediate_size


def test_concatenated_heads_count_in_the_budget():
    a = make_model("vit_cls", seed=0, num_labels=3)
    b = with_new_head(make_model("vit_cls", seed=1, num_labels=3), 5, seed=2)
    batches = make_batches("vit_cls")
    parent = max(count(a), count(b))
    head_b = b.classifier.weight.numel() + b.classifier.bias.numel()
    for size in (1.0, 1.1, 1.2):
        merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=size, progress=False)
        assert merged.classifier.out_features == 8
        total = count(merged)
        if size == 1.0:  # the paper's merge: A's model plus B's head rows, nothing widened
            assert total == count(a) + head_b
        else:
            assert total <= size * parent
            _, cost, _ = mlp_cost(a)["intermediate_size"]
            assert math.floor(size * parent) - total < cost


@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_size_two_keeps_every_mlp_unit_and_outputs_the_parents_mean(different, matcher):
    """Known answer: with every unit kept, block l's MLP on merged features x is the mean of the parents' MLPs on
    the aligned inputs (x unmerged into each parent's basis), mapped into the merged basis (2·merge_i)."""
    a, b, batches = different("vit_cls")
    spec = spec_for(a)
    residual = spec.group_index("residual")
    generator = torch.Generator().manual_seed(5)
    errors = {}
    for size in (1.0, 2.0):
        merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher=matcher, size=size, refit="none",
                                 progress=False)
        k = a.config.intermediate_size
        assert merged.config.intermediate_size == (2 * k if size == 2.0 else k)
        found = merged.merge_report.matches[residual]
        maps = GroupMaps.from_match(found)
        n = a.config.hidden_size
        x = torch.randn(4, 17, found.num_merged, generator=generator)
        inputs = [x[..., found.cluster_of[:n]], x[..., found.cluster_of[n:]]]
        errors[size] = []
        for layer in range(a.config.num_hidden_layers):
            with torch.no_grad():
                outputs = [m.vit.layers[layer].mlp(h).double() for m, h in zip((a, b), inputs)]
                expected = sum(maps.merge2[side].apply(y, -1) for side, y in enumerate(outputs)) / 2
                got = merged.vit.layers[layer].mlp(x).double()
            errors[size].append(float((got - expected).abs().max() / expected.abs().max()))
            mlp_match = merged.merge_report.matches[spec.group_index(f"vit.layers.{layer}.mlp")]
            if size == 2.0:  # every unit its own merged unit, copied with its parent's weight 1/2 in the mean
                assert mlp_match.num_merged == 2 * k
                assert sorted(mlp_match.cluster_of.tolist()) == list(range(2 * k))
                assert torch.equal(mlp_match.merge_weight, torch.ones(2 * k, dtype=torch.float64))
    assert max(errors[2.0]) < 1e-5
    assert min(errors[1.0]) > 1e-2  # the fused merge is not the mean: the known answer is specific to size 2


@pytest.mark.parametrize("size", [1.2, 1.5])
@pytest.mark.parametrize("matcher", ["zip", "align"])
def test_permuted_copy_comes_back_exactly_with_duplicated_units(matcher, size):
    """A permuted copy matches every unit to its twin (best cross match 1 for all units), so the units left
    unfused are exact duplicates: the same fc1 row and bias twice, each with half of the parent's fc2 column in
    the merged (= the parent's, permuted) basis. Expected: the parent's function exactly, widths k + e, and in
    every block e fc1 rows appearing twice, k - e once, no other row."""
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    permuted = permuted_copy(model, spec, seed=1)
    batches = make_batches("vit_cls")
    merged = hf_mudsc.merge([model, permuted], batches, method="mudsc", matcher=matcher, size=size, refit="none",
                            progress=False)
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
    k = model.config.intermediate_size
    extra = merged.config.mudsc["size_budget"]["extra_units"]["intermediate_size"]
    assert 0 < extra <= k and (extra < k) == (size == 1.2)
    assert merged.config.intermediate_size == k + extra
    residual = GroupMaps.from_match(merged.merge_report.matches[spec.group_index("residual")])
    for layer in range(model.config.num_hidden_layers):
        parent, block = model.vit.layers[layer].mlp, merged.vit.layers[layer].mlp
        # The parent's units in the merged residual basis (fc1's input axis, fc2's output axis).
        up = torch.cat([parent.fc1.weight, parent.fc1.bias[:, None]], 1).detach()
        up = torch.cat([residual.unmerge[0].apply(up[:, :-1].double(), 1), up[:, -1:].double()], 1).float()
        down = residual.merge2[0].apply(parent.fc2.weight.detach().double(), 0).float() / 2
        merged_up = torch.cat([block.fc1.weight, block.fc1.bias[:, None]], 1).detach()
        merged_down = block.fc2.weight.detach()
        copies = []
        for unit in range(k):
            same = [j for j in range(k + extra) if torch.equal(merged_up[j], up[unit])]
            copies.append(len(same))
            if len(same) == 2:  # a kept pair: each copy carries half of the parent's fc2 column
                assert all(torch.allclose(merged_down[:, j], down[:, unit], atol=1e-7) for j in same)
            else:  # a fused pair: the parent's column (the mean of two equal columns)
                assert torch.allclose(merged_down[:, same[0]], 2 * down[:, unit], atol=1e-7)
        assert sorted(copies) == [1] * (k - extra) + [2] * extra


def test_unfuse_known_answer():
    """Three A units paired with three B units; A1 and B2 have the weakest best cross-parent matches."""
    similarity = torch.tensor([
        [1.0, 0.0, 0.0, 0.9, 0.1, 0.0],
        [0.0, 1.0, 0.0, 0.2, 0.3, 0.1],
        [0.0, 0.0, 1.0, 0.0, 0.1, 0.8],
        [0.9, 0.2, 0.0, 1.0, 0.0, 0.0],
        [0.1, 0.3, 0.1, 0.0, 1.0, 0.0],
        [0.0, 0.1, 0.8, 0.0, 0.0, 1.0],
    ], dtype=torch.float64)
    # Best cross match: A 0.9 0.3 0.8, B 0.9 0.3 0.8 -> A1 (row 1) first, then B1 (row 4; its pair is split by then).
    found = Match(cluster_of=torch.tensor([0, 1, 2, 0, 1, 2]), merge_weight=torch.full((6,), 0.5, dtype=torch.float64),
                  num_merged=3, value=0.7)
    assert unfuse(found, similarity, 0) is found
    one = unfuse(found, similarity, 1)
    assert one.num_merged == 4 and one.value == 0.7
    assert one.cluster_of.tolist() == [0, 3, 2, 0, 1, 2]
    assert one.merge_weight.tolist() == [0.5, 1.0, 0.5, 0.5, 1.0, 0.5]
    two = unfuse(found, similarity, 2)  # A1, then (B1 is alone already) A2 -> B2 alone too
    assert two.cluster_of.tolist() == [0, 3, 4, 0, 1, 2]
    assert two.merge_weight.tolist() == [0.5, 1.0, 1.0, 0.5, 1.0, 1.0]
    three = unfuse(found, similarity, 3)
    assert sorted(three.cluster_of.tolist()) == list(range(6))
    with pytest.raises(ValueError, match="only 3 units can be left unfused"):
        unfuse(found, similarity, 4)


def test_best_cross_match_ignores_the_own_parent():
    similarity = torch.tensor([
        [1.0, 0.9, 0.2, 0.1, 0.0, 0.3],
        [0.9, 1.0, 0.4, 0.0, 0.1, 0.0],
        [0.2, 0.4, 1.0, 0.8, 0.6, 0.0],
        [0.1, 0.0, 0.8, 1.0, 0.0, 0.5],
        [0.0, 0.1, 0.6, 0.0, 1.0, 0.7],
        [0.3, 0.0, 0.0, 0.5, 0.7, 1.0],
    ], dtype=torch.float64)
    assert best_cross_match(similarity, 3).tolist() == [0.3, 0.4, 0.6, 0.5, 0.6, 0.5]
    assert best_cross_match(similarity, 2).tolist() == [0.3, 0.1, 0.8, 0.8, 0.6, 0.3]


def test_plan_counts_by_hand():
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    params = dict(model.named_parameters())
    parent = count(model)
    k, cost, _ = mlp_cost(model)["intermediate_size"]
    assert cost == 2 * (2 * 32 + 1)
    plan = plan_size(spec, [params, params], 1.0 + 10 * cost / parent)
    assert plan.extra == {"intermediate_size": 10} and plan.num_parameters == parent + 10 * cost
    plan = plan_size(spec, [params, params], 1.0 + (10 * cost - 1) / parent)
    assert plan.extra == {"intermediate_size": 9}
    assert plan_size(spec, [params, params], 2.0).extra == {"intermediate_size": k}


def test_clip_towers_grow_by_their_share(different):
    a, b, batches = different("clip")
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.1, progress=False)
    extra = merged.config.mudsc["size_budget"]["extra_units"]
    vision, text = extra["vision_config.intermediate_size"], extra["text_config.intermediate_size"]
    # Shares of the possible extra units (56 vision, 48 text) within one unit of each other.
    assert vision > 0 and text > 0
    assert abs(vision / 56 - text / 48) <= 1 / 48
    assert merged.vision_model.encoder.layers[0].mlp.fc1.out_features == 56 + vision
    assert merged.text_model.encoder.layers[1].mlp.fc2.in_features == 48 + text


def test_weight_matching_zipit_and_refit_spend_the_budget(different):
    a, b, batches = different("vit_cls")
    parent = count(a)
    for options in ({"method": "weight_matching"}, {"method": "zipit"}, {"method": "mudsc", "refit": "ridge"},
                    {"method": "mudsc", "alpha": "auto"}):
        merged = hf_mudsc.merge([a, b], None if options["method"] == "weight_matching" else batches,
                                size=1.25, progress=False, **options)
        assert parent < count(merged) <= 1.25 * parent, options
        assert merged.config.intermediate_size > a.config.intermediate_size
        logits = merged(**batches[0]).logits
        assert torch.isfinite(logits).all()


def test_wider_model_round_trips_with_the_stock_class(different, tmp_path):
    a, b, batches = different("vit_cls")
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", size=1.5, progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "wide")
    loaded = AutoModelForImageClassification.from_pretrained(folder)
    assert type(loaded) is type(a)
    assert loaded.config.intermediate_size == merged.config.intermediate_size == 2 * a.config.intermediate_size
    assert loaded.config.mudsc["size_budget"] == merged.config.mudsc["size_budget"]
    with torch.no_grad():
        assert torch.equal(loaded(**batches[0]).logits, merged(**batches[0]).logits)
    card = (Path(folder) / "README.md").read_text()
    row = next(line for line in card.splitlines() if "Size budget" in line)
    assert "1.5× one parent" in row and f"intermediate_size {loaded.config.intermediate_size}" in row
    assert f"{count(loaded):,} parameters" in row
    assert "size: 1.5" in (Path(folder) / "mudsc_recipe.yaml").read_text()


def test_bert_round_trip_keeps_the_function(different, tmp_path):
    a, b, batches = different("bert_cls")
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", size=1.3, progress=False)
    merged.save_pretrained(tmp_path / "bert")
    loaded = AutoModel.from_pretrained(tmp_path / "bert")  # the stock encoder class reads the wider width too
    assert loaded.config.intermediate_size == merged.config.intermediate_size > a.config.intermediate_size
    with torch.no_grad():
        hidden = merged.bert(**batches[0]).last_hidden_state
        assert torch.allclose(loaded(**batches[0]).last_hidden_state, hidden, atol=1e-6)


def test_card_row_at_size_one_says_nothing_was_widened(different, tmp_path):
    a, b, batches = different("vit_cls")
    merged = hf_mudsc.merge([a, b], batches, method="mudsc", progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "plain")
    row = next(line for line in (Path(folder) / "README.md").read_text().splitlines() if "Size budget" in line)
    assert f"1× one parent: nothing widened; {count(a):,} parameters (1.000× the parent's {count(a):,})" in row
    assert merged.config.mudsc["size_budget"]["extra_units"] == {"intermediate_size": 0}


@pytest.mark.parametrize("value", [0.5, 2.5, float("nan")])
def test_size_out_of_range_is_refused_before_loading(value):
    with pytest.raises(MergeInputError, match=r"size must lie in \[1, 2\] \(CLI: --size\)"):
        hf_mudsc.merge(["/nonexistent/a", "/nonexistent/b"], None, method="mudsc", size=value)


def test_methods_keeping_one_shape_refuse_a_budget_before_loading():
    with pytest.raises(MergeInputError, match="method 'linear' keeps one parent's shape, so it cannot spend size=1.5 "
                                              r"\(CLI: --size\).*mudsc"):
        hf_mudsc.merge(["/nonexistent/a", "/nonexistent/b"], None, method="linear", size=1.5)
    with pytest.raises(MergeInputError, match="reference_compat"):
        hf_mudsc.merge(["/nonexistent/a", "/nonexistent/b"], None, method="mudsc", size=1.5, reference_compat=True)


def test_auto_choosing_a_shape_keeping_method_refuses_a_budget():
    a = make_model("vit_cls", seed=0)
    b = make_model("vit_cls", seed=0)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    # without data auto chooses mudsc (which needs data) or linear: both refuse, so it is refused before loading
    with pytest.raises(MergeInputError, match="method 'auto' .*linear: method 'linear' keeps one parent's shape"):
        hf_mudsc.merge([a, b], None, size=1.5)


def test_cli_refuses_a_bad_size_in_one_line(tmp_path, capsys):
    """A value out of range is a usage error (exit 2, as every flag's); a method that cannot spend it exits 1."""
    parents = []
    for seed in (0, 1):
        make_model("vit_cls", seed=seed).save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    for flags, code, needle in ((["--size", "3"], 2, "size must lie in [1, 2] (CLI: --size)"),
                                # an option the method cannot use: an invalid command line too (exit 2, QA s22)
                                (["--method", "linear", "--size", "1.5"], 2, "cannot spend size=1.5 (CLI: --size)")):
        returned, lines = run_cli(["merge", *parents, *flags, "--output", str(tmp_path / "out")], capsys)
        assert returned == code and len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "out").exists()


def test_the_readme_size_budget_example_runs_and_gives_what_it_says(tmp_path, monkeypatch):
    python = readme_example("size-budget")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_size_budget"}
    exec(compile(python, "README.md (size-budget example)", "exec"), scope)
    merged, wide, parents = scope["merged"], scope["wide"], scope["parents"]
    assert "# 128: 64 units kept unfused" in python
    assert merged.config.intermediate_size == wide.config.intermediate_size == 128
    assert count(merged) <= 1.5 * count(parents[0])
    with torch.no_grad():
        batch = scope["batches"][0]
        assert torch.equal(wide(**batch).logits, merged(**batch).logits)
    assert (tmp_path / "wide" / "model.safetensors").is_file()
