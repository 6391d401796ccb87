"""`refit="repair"` (docs/design.md §4.9, REPAIR): each repaired unit's mean and std on the calibration data are set
to the parents' (its fused units' merge-weighted mean), layer by layer in forward order.

Proven here: on a hand-made model the repaired layers' per-unit statistics equal targets computed independently
(align and zip clusters, equal and unequal weights, every scope); a model merged with its permuted copy comes back
unchanged for every architecture; memory is flat in samples; the option reaches config, recipe, card and CLI (a
round trip through `from_pretrained`); bad inputs are refused in one line before anything is loaded."""

from __future__ import annotations

import pytest
import torch
import yaml
from factories import (
    count_runs,
    make_batches,
    make_model,
    model_output,
    permuted_copy,
    relative_error,
    vit_cli_case,
)
from readme_examples import readme_example
from torch import nn

import hf_mudsc
from hf_mudsc.apply.repair import SCOPES, Moments, repair_layers, repair_model
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import MergeInputError, RecipeError
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

MISSING = ["/nonexistent/parent-a", "/nonexistent/parent-b"]

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoLayers(nn.Module):
    """fc1 -> ReLU -> fc2 -> LayerNorm: an MLP input layer, a residual-space Linear and a LayerNorm in sequence."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        with torch.no_grad():  # a non-trivial γ, β: the parents' LayerNorm statistics differ
            self.norm.weight.uniform_(0.5, 2.0)
            self.norm.bias.uniform_(-1.0, 1.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


SPEC = PermutationSpec(groups=(
    Group("residual", 3, (Member("fc2.weight", 0, "out"), Member("fc2.bias", 0, "out"),
                          Member("norm.weight", 0, "out"), Member("norm.bias", 0, "out")),
          (HookPoint("norm", "output"),)),
    Group("mlp", 4, (Member("fc1.weight", 0, "out"), Member("fc1.bias", 0, "out"), Member("fc2.weight", 1, "in")),
          (HookPoint("fc2", "input"),), width_key="intermediate_size"),
))
LAYERS = {"mlp": ["fc1"], "mlp+ln": ["fc1", "norm"], "all": ["fc1", "fc2", "norm"]}


def _match(clusters: list[int], merged: int) -> Match:
    return Match(cluster_of=torch.tensor(clusters), merge_weight=torch.full((len(clusters),), 0.5,
                                                                            dtype=torch.float64),
                 num_merged=merged, value=1.0)


def _outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's output on `x`, in float64, from forward hooks (independent of the package's code)."""
    found: dict[str, torch.Tensor] = {}
    handles = [getattr(model, name).register_forward_hook(
        lambda module, args, output, name=name: found.__setitem__(name, output.detach().to(torch.float64)))
        for name in ("fc1", "fc2", "norm")]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(("mlp_clusters", "residual_clusters", "weights"), [
    ([2, 0, 3, 1, 0, 3, 1, 2], [1, 0, 2, 2, 1, 0], None),  # align: merged unit j = {A_i, B_k}
    ([0, 0, 1, 2, 1, 2, 3, 3], [0, 1, 2, 0, 1, 2], None),  # zip: A0+A1 and B2+B3 fused within their model
    ([0, 0, 1, 2, 1, 2, 3, 3], [1, 0, 2, 2, 1, 0], [1.0, 3.0]),  # zip, parent B weighs 3
])
def test_repair_sets_each_layers_unit_mean_and_std_to_the_merge_weighted_parents(scope, mlp_clusters,
                                                                                    residual_clusters, weights):
    parent_a, parent_b, merged = TwoLayers(1), TwoLayers(2), TwoLayers(3)
    matches = [_match(residual_clusters, 3), _match(mlp_clusters, 4)]
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(7, 3, generator=generator)} for _ in range(3)]
    report = repair_model(merged, [parent_a, parent_b], SPEC, matches, lambda: iter(batches), scope=scope,
                          weights=weights)
    assert [layer.name for layer in report.layers] == LAYERS[scope]
    assert report.examples == 21 and all(layer.samples == 21 for layer in report.layers)

    x = torch.cat([b["x"] for b in batches])
    parents = [_outputs(parent, x) for parent in (parent_a, parent_b)]
    after = _outputs(merged, x)
    shares = torch.tensor(weights or [1.0, 1.0], dtype=torch.float64)
    for name in LAYERS[scope]:
        clusters = torch.tensor(mlp_clusters if name == "fc1" else residual_clusters)
        units = len(clusters) // 2
        share = shares.repeat_interleave(units)  # each original unit's parent weight, [A 0..n-1, B 0..n-1]
        outputs = torch.cat([p[name] for p in parents], dim=1)
        mean, std = outputs.mean(0), outputs.std(0, unbiased=False)
        for j in range(units):
            members = clusters == j
            target_mean = (share[members] * mean[members]).sum() / share[members].sum()
            target_std = (share[members] * std[members]).sum() / share[members].sum()
            assert float(after[name][:, j].mean()) == pytest.approx(float(target_mean), abs=1e-5)
            assert float(after[name][:, j].std(unbiased=False)) == pytest.approx(float(target_std), abs=1e-5)
    unrepaired = [name for name in ("fc1", "fc2", "norm") if name not in LAYERS[scope]]
    for name in unrepaired:  # an unrepaired layer's parameters are kept
        assert torch.equal(getattr(merged, name).weight, getattr(TwoLayers(3), name).weight)


def test_repair_of_a_widened_merge_sets_every_merged_units_statistics_to_its_clusters_mean():
    """A size budget keeps some MLP units unfused (a wider fc1 than the parents'): each merged unit's target is its
    cluster's mean, a single parent unit's own statistics for an unfused one."""
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls")
    merged = hf_mudsc.merge([model_a, model_b], batches, size=1.5, refit="repair", progress=False)
    name = "vit.layers.1.mlp.fc1"
    assert merged.get_submodule(name).out_features > model_a.get_submodule(name).out_features
    found = merged.merge_report.matches[spec_for(model_a).group_index("vit.layers.1.mlp")]

    def outputs(model: nn.Module) -> torch.Tensor:
        rows = []
        handle = model.get_submodule(name).register_forward_hook(
            lambda module, args, output: rows.append(output.detach().reshape(-1, output.shape[-1])))
        with torch.no_grad():
            for batch in batches:  # 64 examples: all of them are read (fewer than the 256 of "auto")
                model(**batch)
        handle.remove()
        return torch.cat(rows).to(torch.float64)

    parents = torch.cat([outputs(model_a), outputs(model_b)], dim=1)
    mean, std = parents.mean(0), parents.std(0, unbiased=False)
    after = outputs(merged)
    for j in range(found.num_merged):
        members = found.cluster_of == j
        assert float(after[:, j].mean()) == pytest.approx(float(mean[members].mean()), abs=1e-4)
        assert float(after[:, j].std(unbiased=False)) == pytest.approx(float(std[members].mean()), abs=1e-4)


def test_repair_layers_follow_the_spec_for_each_scope():
    model = make_model("bert_cls", seed=0)
    spec = spec_for(model)
    mlp = repair_layers(model, spec, "mlp")
    assert mlp == [f"bert.encoder.layer.{i}.intermediate.dense" for i in range(2)]
    with_norms = repair_layers(model, spec, "mlp+ln")
    assert set(with_norms) - set(mlp) == {"bert.embeddings.LayerNorm",
                                           *(f"bert.encoder.layer.{i}.{part}.LayerNorm" for i in range(2)
                                             for part in ("attention.output", "output"))}
    every = repair_layers(model, spec, "all")
    assert "bert.encoder.layer.0.attention.self.query" in every and "bert.pooler.dense" in every
    assert "classifier" not in every  # a head's rows are labels, never renormalised
    with pytest.raises(ValueError, match="unknown REPAIR scope 'bogus'; choose one of mlp, mlp\\+ln, all"):
        repair_layers(model, spec, "bogus")


def test_moments_are_streamed_sums_whose_size_does_not_grow_with_the_samples():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1000, 5, generator=generator) * 3 + 1
    moments = Moments(5)
    for chunk in rows.split(64):
        moments.update(chunk)
    assert moments.total.shape == moments.squares.shape == (5,) and moments.samples == 1000
    assert torch.allclose(moments.mean, rows.double().mean(0), atol=1e-12)
    assert torch.allclose(moments.std, rows.double().std(0, unbiased=False), atol=1e-10)


# ----------------------------------------------------------------------------------------- invariance


@pytest.mark.parametrize(("kind", "matcher"), [("vit_cls", "align"), ("vit_cls", "zip"), ("bert_cls", "zip"),
                                               ("roberta_cls", "align"), ("distilbert_cls", "zip"),
                                               ("clip", "align")])
def test_repair_returns_a_model_merged_with_its_permuted_copy_unchanged(kind, matcher):
    model = make_model(kind, seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches(kind)
    plain = hf_mudsc.merge([model, permuted], batches, matcher=matcher, refit="none", progress=False)
    repaired = hf_mudsc.merge([model, permuted], batches, matcher=matcher, refit="repair", progress=False)
    report = repaired.merge_report.refit
    assert report.layers and all(abs(layer.scale_min - 1) < 1e-4 and abs(layer.scale_max - 1) < 1e-4
                                 for layer in report.layers)
    expected = plain.state_dict()
    for name, value in repaired.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-5, rtol=1e-5), name
    for batch in batches[:2]:
        assert relative_error(model_output(repaired, batch), model_output(model, batch)) < 1e-5


@pytest.mark.parametrize("scope", SCOPES)
def test_repair_at_every_scope_keeps_three_permuted_copies(scope):
    model = make_model("vit_cls", seed=0)
    spec = spec_for(model)
    parents = [model, permuted_copy(model, spec, seed=1), permuted_copy(model, spec, seed=2)]
    batches = make_batches("vit_cls")
    merged = hf_mudsc.merge(parents, batches, matcher="align", refit="none", progress=False)
    repair_model(merged, parents, spec, merged.merge_report.matches, lambda: batches, scope=scope)
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5


def test_repair_of_a_different_init_pair_moves_the_merged_model():
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls")
    plain = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
    repaired = hf_mudsc.merge([model_a, model_b], batches, refit="repair", progress=False)
    report = repaired.merge_report.refit
    assert report.scope == "all" and report.samples == 256 and report.examples == 64 and report.seconds > 0
    # Forward order; the q/k/v projections read one tensor: one step, one pass of the merged model.
    block = [["vit.layers.{i}.layernorm_before"], [f"vit.layers.{{i}}.attention.{p}_proj" for p in "qkv"],
             ["vit.layers.{i}.attention.o_proj"], ["vit.layers.{i}.layernorm_after"], ["vit.layers.{i}.mlp.fc1"],
             ["vit.layers.{i}.mlp.fc2"]]
    assert report.steps == [[name.format(i=i) for name in step] for i in range(2) for step in block] + [
        ["vit.layernorm"]]
    changed = [layer.name for layer in report.layers
               if not torch.equal(repaired.get_submodule(layer.name).weight, plain.get_submodule(layer.name).weight)]
    assert changed == [layer.name for layer in report.layers]
    assert repaired.config.mudsc["repair"] == {"scope": "all", "layers": len(report.layers)}


@pytest.mark.parametrize("kind", ["vit_cls", "bert_cls", "clip"])
def test_repair_replays_units_and_changes_no_weight(kind, monkeypatch):
    """REPAIR runs the merged model once per step: it replays the finished units inside the block it repairs
    (`block_replay.Unit`, as the refit does) — the same repaired weights, bit for bit, as with whole blocks only,
    and a ViT block's attention computes in fewer passes."""
    from hf_mudsc.apply import block_replay

    model_a, model_b = make_model(kind, seed=1), make_model(kind, seed=2)
    batches = make_batches(kind)
    results, runs = [], []
    for units in (True, False):
        with monkeypatch.context() as patch:
            if not units:
                patch.setattr(block_replay, "_unit_candidates", lambda *args: [])
            merged = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
            count: list[int] = []
            if kind == "vit_cls":
                count_runs(merged.get_submodule("vit.layers.0.attention.q_proj"), lambda count=count: count.append(1))
            repair_model(merged, [model_a, model_b], spec_for(model_a), merged.merge_report.matches, lambda: batches)
            results.append(merged.state_dict())
            runs.append(len(count))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][name], results[1][name]) for name in results[0])
    if kind == "vit_cls":
        assert runs[0] < runs[1]


# ----------------------------------------------------------------------------------- option and CLI


def test_repair_option_reaches_config_recipe_and_card(tmp_path):
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    merged = hf_mudsc.merge([model_a, model_b], make_batches("vit_cls", num_batches=1), refit="repair",
                            progress=False)
    mudsc = merged.config.mudsc
    assert (mudsc["refit"], mudsc["refit_lambda"], mudsc["refit_samples"], mudsc["refit_examples"]) == (
        "repair", None, "auto", 16)
    assert merged.merge_report.recipe["refit"] == "repair"
    path = Recipe(models=["a", "b"], calibration="c", refit="repair").save(tmp_path / "r.yaml")
    assert Recipe.load(path).refit == "repair"
    card = str(render_card(merged, Recipe.load(path)))
    assert "| Refit / ridge λ (relative) / examples | repair / — / auto: 16 examples |" in card
    args = build_parser().parse_args(["merge", "a", "b", "--calibration", "c", "-o", "o", "--refit", "repair"])
    assert build_recipe(args).refit == "repair"


def test_cli_merge_with_repair_round_trips_through_from_pretrained(tmp_path):
    from transformers import AutoModelForImageClassification

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", *parents, "--calibration", calibration, "--method", "mudsc",
                 "--refit", "repair", "--batch-size", "8", "-o", str(out)]) == 0
    config = yaml.safe_load((out / "config.json").read_text())["mudsc"]
    assert (config["refit"], config["refit_examples"], config["repair"]["scope"]) == ("repair", 24, "all")
    assert Recipe.load(out / "mudsc_recipe.yaml").refit == "repair"
    assert "| Refit / ridge λ (relative) / examples | repair / — / auto: 24 examples |" in (out / "README.md"
                                                                                            ).read_text()
    loaded = AutoModelForImageClassification.from_pretrained(out)
    pixels = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.isfinite(loaded(pixel_values=pixels).logits).all()
    assert loaded.config.mudsc["repair"] == config["repair"]
    plain = tmp_path / "plain"
    assert main(["merge", "--recipe", str(out / "mudsc_recipe.yaml"), "--refit", "none", "-o", str(plain)]) == 0
    plain_model = AutoModelForImageClassification.from_pretrained(plain)
    assert not torch.equal(plain_model.vit.layers[0].mlp.fc1.weight, loaded.vit.layers[0].mlp.fc1.weight)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("options", "message"), [
    ({"refit": "repair", "reference_compat": True},
     "refit='repair' changes the merged weights, which reference_compat=True must keep equal to the reference's; "
     "drop one of --refit / --reference-compat"),
    ({"refit": "repair", "method": "average"}, "refit='repair' needs calibration data"),
    ({"refit": "repiar"}, "unknown refit 'repiar'; choose one of: auto, none, ridge, gate, repair (CLI: --refit)"),
])
def test_bad_repair_options_are_refused_before_loading(options, message):
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING, None, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_repair_refuses_a_one_shot_iterator_before_loading():
    with pytest.raises(MergeInputError, match=r"refit='repair' reads the calibration data once per layer step"):
        hf_mudsc.merge(MISSING, iter(make_batches("vit_cls", num_batches=1)), refit="repair")


@pytest.mark.parametrize(("extra", "message"), [
    (["--refit", "repair", "--reference-compat"], "drop one of --refit / --reference-compat"),
    (["--refit", "repair"], "refit 'repair' needs calibration data: pass --calibration"),
])
def test_cli_refuses_repair_without_data_or_with_reference_compat(extra, message):
    args = build_parser().parse_args(["merge", "a", "b", "-o", "o", *extra])
    with pytest.raises(RecipeError, match=message):
        build_recipe(args)


def test_cli_repair_without_calibration_is_a_usage_error_in_one_line(capsys):
    from hf_mudsc.cli.main import main

    # Exit 2: a contradictory command line, as every recipe error (argparse's convention, like --refit ridge).
    assert main(["merge", *MISSING, "--refit", "repair", "-o", "/nonexistent/out"]) == 2
    err = capsys.readouterr().err
    assert "refit 'repair' needs calibration data" in err and "Traceback" not in err and err.count("\n") == 1


def test_the_readme_repair_example_runs_and_prints_what_it_says(capsys):
    block = readme_example("repair")
    exec(compile(block, "README.md (repair example)", "exec"), {"__name__": "readme_repair"})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["repair {'scope': 'all', 'layers': 17}", "128 13"]
    assert all(f"# {line}" in block for line in printed)  # the comments say what is printed


@pytest.mark.parametrize(("kind", "options"), [
    ("bert_cls", {"refit": "repair"}), ("bert_cls", {"refit": "ridge"}),
    ("bert_cls", {"refit": "ridge", "refit_norms": True}), ("clip", {"refit": "repair"})],
    ids=["bert repair", "bert ridge", "bert ridge+norms", "clip repair"])
def test_what_padding_positions_hold_never_changes_a_refit(kind, options):
    """Padding positions are not data: their hidden states depend on whatever token ids fill them. Every statistic a
    refit reads must drop them — also a LayerNorm's, whose residual group BERT reads at the unmasked pooler input
    (REPAIR took the LayerNorms' moments over padding tokens too)."""
    model_a, model_b = make_model(kind, seed=1), make_model(kind, seed=2)
    batches = make_batches(kind)
    assert all((batch["attention_mask"] == 0).any() for batch in batches)
    config = getattr(model_a.config, "text_config", model_a.config)
    generator = torch.Generator().manual_seed(5)
    refilled = []
    for batch in batches:
        noise = torch.randint(1, config.vocab_size - 1, batch["input_ids"].shape, generator=generator)
        refilled.append({**batch, "input_ids": torch.where(batch["attention_mask"].bool(), batch["input_ids"], noise)})
    merged = [hf_mudsc.merge([model_a, model_b], data, method="mudsc", progress=False, **options).state_dict()
              for data in (batches, refilled)]
    for name, tensor in merged[0].items():
        assert torch.allclose(tensor, merged[1][name], rtol=1e-4, atol=1e-5), name
