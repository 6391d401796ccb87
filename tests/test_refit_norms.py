"""`refit_norms=True` (docs/design.md §4.9, docs/benchmarks/refit_layernorm.md): the ridge refit also refits every
LayerNorm's affine per unit, in forward order with the linear layers.

Proven here: on a hand-made LayerNorm the fit is the closed-form per-unit ridge solution and recovers a known γ, β;
a model merged with its permuted copy keeps its function (the refit of an exact merge is a fixed point); padding
tokens are dropped; a LayerNorm is a step of its own, before the layers it feeds; the option reaches the config
and is refused where no ridge refit runs, before anything is loaded."""

from __future__ import annotations

import pytest
import torch
from factories import make_batches, make_model, model_output, permuted_copy, relative_error
from torch import nn

import hf_mudsc
from hf_mudsc.apply.refit import refit_model
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import MergeInputError, RecipeError
from hf_mudsc.solve.matchers import Match
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

MISSING = ["/nonexistent/parent-a", "/nonexistent/parent-b"]

pytestmark = pytest.mark.usefixtures("one_thread")


class OneNorm(nn.Module):
    """x -> LayerNorm(x): the smallest model with a LayerNorm to refit."""

    def __init__(self, width: int, gamma: torch.Tensor, beta: torch.Tensor) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        with torch.no_grad():
            self.ln.weight.copy_(gamma)
            self.ln.bias.copy_(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


SPEC = PermutationSpec(groups=(Group("hidden", 4, (Member("ln.weight", 0, "out"), Member("ln.bias", 0, "out")),
                                     (HookPoint("ln", "output"),)),))


def _batches(offset: float = 0.0) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    # Unequal means and scales per unit, so x̂_j is not centred: the bias and the scale are both identified.
    scale, shift = torch.tensor([1.0, 3.0, 0.5, 2.0]), torch.tensor([2.0, -1.0, 0.0, 4.0]) + offset
    return [{"x": torch.randn(6, 4, generator=generator) * scale + shift} for _ in range(3)]


def _identity_match(clusters: list[int]) -> Match:
    return Match(cluster_of=torch.tensor(clusters), merge_weight=torch.full((8,), 0.5, dtype=torch.float64),
                 num_merged=4, value=1.0)


def test_norm_refit_recovers_the_affine_that_made_its_targets():
    gamma, beta = torch.tensor([1.5, -0.5, 2.0, 0.25]), torch.tensor([0.3, -1.0, 0.0, 2.0])
    parents = [OneNorm(4, gamma, beta).eval(), OneNorm(4, gamma, beta).eval()]
    merged = OneNorm(4, torch.ones(4), torch.zeros(4)).eval()  # the start: the ridge pulls toward it
    batches = _batches()
    report = refit_model(merged, parents, SPEC, [_identity_match([0, 1, 2, 3, 0, 1, 2, 3])], lambda: iter(batches),
                         lambda_rel=1e-9, norms=True)
    assert torch.allclose(merged.ln.weight, gamma, atol=1e-5) and torch.allclose(merged.ln.bias, beta, atol=1e-5)
    assert [fit.name for fit in report.layers] == ["ln"] and report.layers[0].samples == 18
    assert report.steps == [["ln"]]


@pytest.mark.parametrize("clusters", [
    [2, 0, 3, 1, 0, 3, 1, 2],  # align: merged unit j = {A_i, B_k}
    [0, 0, 1, 2, 1, 2, 3, 3],  # zip: A0+A1 and B2+B3 fused within their model
])
def test_norm_refit_is_the_closed_form_per_unit_ridge_solution(clusters):
    parents = [OneNorm(4, torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 2.0, -1.0])).eval(),
               OneNorm(4, torch.tensor([0.5, -2.0, 3.0, 1.0]), torch.tensor([1.0, 0.0, -2.0, 0.5])).eval()]
    start_gamma, start_beta = torch.tensor([0.9, 1.1, 1.0, 0.7]), torch.tensor([0.1, -0.2, 0.3, 0.0])
    merged = OneNorm(4, start_gamma, start_beta).eval()
    batches = _batches(offset=1.0)
    refit_model(merged, parents, SPEC, [_identity_match(clusters)], lambda: iter(batches), lambda_rel=0.1, norms=True)

    x = torch.cat([b["x"] for b in batches])
    with torch.no_grad():
        outputs = torch.cat([p(x) for p in parents], dim=1).to(torch.float64)  # [A 0..3, B 0..3]
    cluster_of = torch.tensor(clusters)
    target = torch.stack([outputs[:, cluster_of == j].mean(1) for j in range(4)], dim=1)  # each cluster's mean
    normalised = nn.functional.layer_norm(x, (4,)).to(torch.float64)
    lam = 0.1 * (normalised ** 2).sum(0).mean()
    for j in range(4):  # the ridge as an augmented least squares: rows √λ·(γ − γ⁰), √λ·(β − β⁰) appended
        design = torch.cat([torch.stack([normalised[:, j], torch.ones(len(x), dtype=torch.float64)], dim=1),
                            lam.sqrt() * torch.eye(2, dtype=torch.float64)])
        right = torch.cat([target[:, j], lam.sqrt() * torch.tensor([start_gamma[j], start_beta[j]]).double()])
        solution = torch.linalg.lstsq(design, right[:, None]).solution[:, 0]
        assert float(merged.ln.weight[j].detach()) == pytest.approx(float(solution[0]), abs=1e-5)
        assert float(merged.ln.bias[j].detach()) == pytest.approx(float(solution[1]), abs=1e-5)
    assert not torch.allclose(merged.ln.weight, start_gamma, atol=1e-3)  # the refit really moved it


@pytest.mark.parametrize(("kind", "matcher", "norms"), [
    ("vit_cls", "align", 5), ("vit_cls", "zip", 5), ("bert_cls", "align", 5), ("clip", "align", 11)])
def test_norm_refit_keeps_the_function_of_a_model_merged_with_its_permuted_copy(kind, matcher, norms):
    model = make_model(kind, seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches(kind)
    merged = hf_mudsc.merge([model, permuted], batches, matcher=matcher, refit="ridge", refit_norms=True,
                            progress=False)
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
    modules = dict(merged.named_modules())
    fitted = [fit for fit in merged.merge_report.refit.layers if isinstance(modules[fit.name], nn.LayerNorm)]
    assert len(fitted) == norms  # every LayerNorm of the residual stream(s): CLIP pre and post ones included
    assert all(fit.samples > 0 and fit.relative_change < 1e-5 for fit in fitted)
    assert merged.config.mudsc["refit_norms"] is True


def test_norm_refit_is_a_step_of_its_own_before_the_layers_it_feeds():
    model = make_model("vit_cls", seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    merged = hf_mudsc.merge([model, permuted], make_batches("vit_cls", num_batches=1), matcher="align",
                            refit="ridge", refit_norms=True, progress=False)
    expected = []
    for i in range(2):
        expected += [[f"vit.layers.{i}.layernorm_before"],
                     [f"vit.layers.{i}.attention.{p}_proj" for p in "qkv"], [f"vit.layers.{i}.attention.o_proj"],
                     [f"vit.layers.{i}.layernorm_after"], [f"vit.layers.{i}.mlp.fc1"], [f"vit.layers.{i}.mlp.fc2"]]
    assert merged.merge_report.refit.steps == [*expected, ["vit.layernorm"], ["classifier"]]


def test_norm_refit_drops_padding_tokens():
    model_a, model_b = make_model("bert_cls", seed=1), make_model("bert_cls", seed=2)
    batches = make_batches("bert_cls", num_batches=2)
    report = hf_mudsc.merge([model_a, model_b], batches, refit="ridge", refit_norms=True,
                            progress=False).merge_report.refit
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert tokens < sum(batch["attention_mask"].numel() for batch in batches)  # there is padding to drop
    samples = {fit.name: fit.samples for fit in report.layers if "LayerNorm" in fit.name}
    assert samples == {"bert.embeddings.LayerNorm": tokens,
                       **{f"bert.encoder.layer.{i}.{name}": tokens for i in range(2)
                          for name in ("attention.output.LayerNorm", "output.LayerNorm")}}


def test_without_the_option_no_layernorm_changes():
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    plain = hf_mudsc.merge([model_a, model_b], batches, refit="none", progress=False)
    ridge = hf_mudsc.merge([model_a, model_b], batches, refit="ridge", progress=False)
    norms = hf_mudsc.merge([model_a, model_b], batches, refit="ridge", refit_norms=True, progress=False)
    names = [name for name, module in plain.named_modules() if isinstance(module, nn.LayerNorm)]
    params = [dict(m.named_parameters()) for m in (plain, ridge, norms)]
    assert all(torch.equal(params[0][f"{n}.weight"], params[1][f"{n}.weight"]) for n in names)
    assert not all(torch.equal(params[0][f"{n}.weight"], params[2][f"{n}.weight"]) for n in names)
    assert ridge.config.mudsc["refit_norms"] is False


@pytest.mark.parametrize(("options", "message"), [
    ({"refit": "none", "refit_norms": True},
     "refit_norms=True refits the LayerNorms within the ridge refit, but refit='none' runs no ridge refit; pass "
     "--refit ridge, gate or auto without --reference-compat, or drop --refit-norms"),
    ({"refit": "repair", "refit_norms": True}, "but refit='repair' runs no ridge refit"),
    ({"reference_compat": True, "refit_norms": True}, "but reference_compat=True runs no refit"),
    ({"refit_norms": "yes"}, "refit_norms"),
])
def test_bad_refit_norms_options_are_refused_before_loading(options, message):
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(MISSING, make_batches("vit_cls", num_batches=1), **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_refit_norms_is_a_cli_flag_refused_without_a_ridge_refit():
    args = build_parser().parse_args(["merge", "a", "b", "-o", "o", "--refit-norms", "--calibration", "c"])
    assert build_recipe(args).refit_norms is True
    args = build_parser().parse_args(["merge", "a", "b", "-o", "o", "--refit-norms", "--refit", "none"])
    with pytest.raises(RecipeError, match="drop --refit-norms"):
        build_recipe(args)


def test_the_card_says_the_layernorms_were_refitted_too():
    from hf_mudsc.publish.card import render_card
    from hf_mudsc.publish.recipe import Recipe

    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)
    batches = make_batches("vit_cls", num_batches=2)
    cards = {norms: str(render_card(hf_mudsc.merge([model_a, model_b], batches, refit="ridge", refit_norms=norms,
                                                   progress=False),
                                    Recipe(models=["org/a", "org/b"], calibration="org/ds:train")))
             for norms in (False, True)}
    row = next(line for line in cards[True].splitlines() if line.startswith("| Refit /"))
    assert row.split("|")[2].strip().startswith("ridge + LayerNorms /")
    assert "LayerNorms" not in cards[False]
