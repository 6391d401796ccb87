"""`alpha="auto"` (docs/design.md §4.4, `hf_mudsc.apply.fidelity`): the balance factor chosen without labels.

Proven here: the curve is recorded in `config.mudsc` and the card, each point is the fidelity of the merge at that
α with the statistics of the kept examples (recomputed independently), the chosen α is the curve's argmax (ties to
the α nearest 0.5), permuted copies are still recovered exactly, and bad combinations are refused up front."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from factories import (
    BARE,
    WITH_LOGITS,
    fine_tune,
    make_batches,
    make_model,
    model_output,
    permuted_copy,
    relative_error,
)
from readme_examples import readme_example

import hf_mudsc
from hf_mudsc.apply.fidelity import ALPHA_GRID, FidelityScorer, choose_alpha, holdout_split, linear_cka
from hf_mudsc.architectures import spec_for
from hf_mudsc.cli.main import build_parser
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import MergeInputError
from hf_mudsc.methods.registry import METHODS
from hf_mudsc.publish.card import render_card
from hf_mudsc.publish.recipe import Recipe
from hf_mudsc.solve.loop import Solver

pytestmark = pytest.mark.usefixtures("one_thread")


def test_choose_alpha_takes_the_best_and_breaks_ties_towards_one_half():
    assert choose_alpha({0.1: 0.2, 0.3: 0.9, 0.5: 0.5, 0.7: 0.1, 0.9: 0.3}) == 0.3
    assert choose_alpha({0.1: 0.8, 0.3: 0.8, 0.5: 0.6, 0.7: 0.8, 0.9: 0.8}) == 0.3  # equal distance: the smaller
    assert choose_alpha({0.1: 1.0, 0.3: 1.0, 0.5: 1.0, 0.7: 1.0, 0.9: 1.0}) == 0.5


def test_holdout_split_holds_out_every_fifth_example_the_same_on_every_read():
    batches = make_batches("vit_cls", num_batches=3, batch_size=7)  # 21 images, batches not a multiple of 5
    images = torch.cat([b["pixel_values"] for b in batches])
    kept, held_out = holdout_split(lambda: iter(batches))
    held = torch.cat([b["pixel_values"] for b in held_out])
    assert torch.equal(held, images[[4, 9, 14, 19]])
    assert torch.equal(torch.cat([b["pixel_values"] for b in kept]),
                       images[[i for i in range(21) if i % 5 != 4]])
    assert torch.equal(torch.cat([b["pixel_values"] for b in held_out]), held)  # re-readable, same rows


def test_linear_cka_ignores_the_basis():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    assert linear_cka(x, x[:, torch.randperm(6, generator=gen)] * 3.0) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, torch.randn(40, 6, generator=gen, dtype=torch.float64)) < 0.6


def test_alpha_search_scores_each_distinct_merge_once():
    """Neighbouring α often give the same matches: a merge equal tensor for tensor to one already scored takes its
    score without being built and run. Here α 0.1 and 0.3 give one merge, 0.5-0.9 another (0.7 a bit apart)."""
    import dataclasses
    from types import SimpleNamespace

    from hf_mudsc.apply.fidelity import parameters_digest, search_alpha

    @dataclasses.dataclass
    class Options:
        alpha: float = 0.5

    @dataclasses.dataclass
    class Context:
        options: Options
        solve_cache: object = None
        candidate: bool = False

    def merged(alpha: float) -> dict[str, torch.Tensor]:
        value = 1.0 if alpha < 0.4 else 2.0
        return {"w": torch.full((2, 3), value), "b": torch.tensor([value, 0.125 if alpha == 0.7 else 0.0])}

    method = SimpleNamespace(merge_parameters=lambda context: SimpleNamespace(
        parameters=merged(context.options.alpha), alpha=context.options.alpha))
    built: list[float] = []

    def scorer(model) -> float:
        built.append(float(model["w"][0, 0]) + float(model["b"][1]))
        return {1.0: 0.25, 2.0: 0.75}.get(built[-1], 0.5)

    scorer.examples = 7
    chosen, result, curve = search_alpha(method, Context(Options()), scorer, build=lambda parameters: parameters)
    assert built == [1.0, 2.0, 2.125]  # three distinct merges, each built and scored once
    assert curve["fidelity"] == [0.25, 0.25, 0.75, 0.5, 0.75] and curve["held_out_examples"] == 7
    assert chosen == 0.5 and result.alpha == 0.5
    assert parameters_digest(merged(0.5)) == parameters_digest(dict(reversed(list(merged(0.9).items()))))
    assert parameters_digest(merged(0.5)) != parameters_digest(merged(0.7))
    assert parameters_digest({"w": torch.ones(2)}) != parameters_digest({"w": torch.ones(2, dtype=torch.float64)})


def test_auto_alpha_records_its_curve_and_keeps_the_argmax_of_independently_computed_fidelities(tmp_path):
    model_a, model_b = make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)  # unrelated: α matters
    batches = make_batches("vit_cls", num_batches=5)  # 80 images: 64 feed the statistics, 16 are held out
    # refit="none": the α search scores the matched merges; the default refit would then rewrite the chosen one.
    merged = hf_mudsc.merge([model_a, model_b], batches, alpha="auto", refit="none", progress=False)
    curve = merged.config.mudsc["alpha_auto"]
    assert curve["grid"] == list(ALPHA_GRID) and curve["held_out_examples"] == 16
    assert merged.config.mudsc["num_calibration_samples"] == 64
    # Every point, recomputed: the merge at that α on the kept examples, scored on the held-out ones.
    kept, held_out = holdout_split(lambda: iter(batches))
    kept, held_out = list(kept), list(held_out)
    scorer = FidelityScorer([model_a, model_b], held_out, task_sizes=None)
    expected = {}
    for alpha in ALPHA_GRID:
        fixed = hf_mudsc.merge([model_a, model_b], kept, alpha=alpha, refit="none", progress=False)
        expected[alpha] = scorer(fixed)
        if alpha == curve["chosen"]:
            assert all(torch.equal(v, fixed.state_dict()[k]) for k, v in merged.state_dict().items())
    assert curve["fidelity"] == [round(expected[a], 6) for a in ALPHA_GRID]
    assert len(set(curve["fidelity"])) > 1  # the curve is not flat here: the choice is a real one
    assert curve["chosen"] == choose_alpha(expected) == merged.config.mudsc["alpha"]
    assert merged.merge_report.alpha == curve["chosen"]
    # The recipe keeps "auto" (it reproduces the choice); the card shows the choice and the curve.
    assert merged.merge_report.recipe["alpha"] == "auto"
    card = str(render_card(merged, Recipe(models=["a", "b"], alpha="auto")))
    assert f"| Balance factor α (weight share) | {curve['chosen']} (auto: held-out fidelity 0.1: " in card
    assert "; 16 examples)" in card


def test_auto_alpha_scores_single_start_candidates_then_solves_the_chosen_alpha_with_every_start(monkeypatch):
    """The candidates are solved from the activation start alone (counted); the chosen α is solved again with the
    three starts, reusing that α's refined activation start; the merge returned is `merge(alpha=<chosen>)` tensor
    for tensor. On this same-init pair the weight start wins at the chosen α, so the returned merge differs from
    the candidate and its own fidelity is recorded next to the candidates' (each recomputed independently)."""
    base = make_model("vit_cls", seed=0)
    model_a, model_b = fine_tune(base, 1, 0.15), fine_tune(base, 2, 0.15)
    batches = make_batches("vit_cls", num_batches=5)
    runs: list[tuple[float, str]] = []
    real_sweeps = Solver._sweeps

    def counting_sweeps(self, *args, label="solve", weight_only=False, **kwargs):
        runs.append((self.options.alpha, "weight-only solve" if weight_only else label))
        return real_sweeps(self, *args, label=label, weight_only=weight_only, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Solver, "_sweeps", counting_sweeps)
        merged = hf_mudsc.merge([model_a, model_b], batches, method="mudsc", alpha="auto", refit="none",
                                progress=False)
    curve = merged.config.mudsc["alpha_auto"]
    chosen = curve["chosen"]
    assert runs == [*((alpha, "solve") for alpha in ALPHA_GRID),  # one start per candidate, in grid order
                    (chosen, "weight-only solve"), (chosen, "solve (weight start)"), (chosen, "solve (identity start)")]
    assert curve["candidate_starts"] == ["activation"]
    assert list(merged.config.mudsc["start_objectives"]) == ["activation", "weight", "identity"]
    assert merged.config.mudsc["solve_start"] == "weight" and curve["returned_is_candidate"] is False

    kept, held_out = holdout_split(lambda: iter(batches))
    kept, held_out = list(kept), list(held_out)
    scorer = FidelityScorer([model_a, model_b], held_out, task_sizes=None)
    with monkeypatch.context() as patch:  # the paper's single start, as a registered method would run it
        patch.setitem(METHODS, "mudsc", dataclasses.replace(METHODS["mudsc"], extra_starts=()))
        candidates = {alpha: scorer(hf_mudsc.merge([model_a, model_b], kept, method="mudsc", alpha=alpha,
                                                   refit="none", progress=False)) for alpha in ALPHA_GRID}
    assert curve["fidelity"] == [round(candidates[a], 6) for a in ALPHA_GRID]
    assert chosen == choose_alpha(candidates) == merged.config.mudsc["alpha"]
    full = hf_mudsc.merge([model_a, model_b], kept, method="mudsc", alpha=chosen, refit="none", progress=False)
    assert full.state_dict().keys() == merged.state_dict().keys()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in merged.state_dict().items())
    assert curve["returned_fidelity"] == round(scorer(full), 6) != curve["fidelity"][ALPHA_GRID.index(chosen)]
    card = str(render_card(merged, Recipe(models=["a", "b"], alpha="auto")))
    assert f"; {chosen} with every start (the merge returned): {curve['returned_fidelity']:.3f}; 16 examples)" in card


@pytest.mark.parametrize("kind", [WITH_LOGITS[0], BARE[0]])
def test_auto_alpha_still_recovers_a_permuted_copy_exactly(kind):
    model = make_model(kind, seed=0)
    permuted = permuted_copy(model, spec_for(model), seed=1)
    batches = make_batches(kind, num_batches=5)
    merged = hf_mudsc.merge([model, permuted], batches, alpha="auto", progress=False)
    for batch in batches[:2]:
        assert relative_error(model_output(merged, batch), model_output(model, batch)) < 1e-5
    assert max(merged.config.mudsc["alpha_auto"]["fidelity"]) == pytest.approx(1.0, abs=1e-6)


def test_auto_alpha_is_refused_with_reference_compat_and_parsed_from_the_command_line(tmp_path):
    with pytest.raises(MergeInputError, match=r"alpha='auto'.*reference_compat.*--alpha 0.5"):
        hf_mudsc.merge(["/nonexistent/a", "/nonexistent/b"], "c:train", alpha="auto", reference_compat=True)
    with pytest.raises(MergeInputError, match=r"alpha must be a number or 'auto' \(CLI: --alpha\)"):
        hf_mudsc.merge(["/nonexistent/a", "/nonexistent/b"], "c:train", alpha="best")
    args = build_parser().parse_args(["merge", "a", "b", "--calibration", "c", "-o", "o", "--alpha", "auto"])
    assert build_recipe(args).alpha == "auto"
    args = build_parser().parse_args(["merge", "a", "b", "--calibration", "c", "-o", "o", "--alpha", "0.3"])
    assert build_recipe(args).alpha == 0.3


def test_the_readme_alpha_auto_example_runs_and_prints_the_curve(capsys):
    """The README's `alpha="auto"` example as written (it crashed when `auto` merged its tiny parents by regmean)."""
    block = readme_example("alpha-auto")
    exec(compile(block, "README.md (alpha auto example)", "exec"), {"__name__": "readme_alpha_auto"})
    alpha, curve = capsys.readouterr().out.strip().split(" ", 1)
    fidelity = [float(value) for value in curve.strip("[]").split(",")]
    assert len(fidelity) == len(ALPHA_GRID) and all(0 <= value <= 1 for value in fidelity)
    assert float(alpha) == choose_alpha(dict(zip(ALPHA_GRID, fidelity)))


@pytest.mark.parametrize("method", ["linear", "zipit"])
def test_auto_alpha_with_a_method_that_ignores_alpha_is_recorded_as_the_alpha_it_was_handed(tmp_path, method):
    """No α search runs for a method that does not read α (a warning says so): the recipe and the card record the
    α the method was handed (0.5), as `auto` options are recorded as what they resolved to (method, refit,
    out_dtype), not `auto` — and the recipe still re-runs the merge bit for bit."""
    import yaml
    from factories import vit_cli_case
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageClassification

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", *parents, "--calibration", calibration, "--method", method, "--alpha", "auto",
                 "--refit", "none", "--output", str(out)]) == 0
    recipe = yaml.safe_load((out / "mudsc_recipe.yaml").read_text())
    assert recipe["alpha"] == 0.5 and recipe["method"] == method
    card = ModelCard.load(out / "README.md").text
    assert "alpha: auto" not in card and "auto: held-out" not in card
    assert "| Balance factor α (weight share) | — |" in card
    merged = hf_mudsc.merge(parents, calibration, method=method, alpha="auto", refit="none", progress=False)
    assert merged.merge_report.recipe["alpha"] == 0.5 and merged.config.mudsc["alpha_auto"] is None
    again = tmp_path / "again"
    assert main(["merge", "--recipe", str(out / "mudsc_recipe.yaml"), "--output", str(again)]) == 0
    first = AutoModelForImageClassification.from_pretrained(out).state_dict()
    second = AutoModelForImageClassification.from_pretrained(again).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", ["zipit", "activation_align", "weight_matching", "linear"])
@pytest.mark.parametrize("alpha", ["auto", 0.7])
def test_an_alpha_the_method_does_not_read_is_warned_about(method, alpha, caplog):
    """README: "A method that does not read α (`zipit`, `linear`, the task-vector methods) runs no search: a warning
    says so." The unit-matching methods that ignore α record it as None, which counted as read: no warning."""
    parents = [make_model("vit_cls", 1), make_model("vit_cls", 2)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=2), method=method, alpha=alpha, refit="none",
                       progress=False)
    assert f"method {method} does not read alpha= (CLI: --alpha): it has no effect" in caplog.text



def test_alpha_auto_without_a_held_out_example_says_so(caplog):
    """Fewer than 5 calibration examples hold none out: every α scored 0 and 0.5 was 'chosen' on nothing, silently
    (the refit gate warns in the same case). Now the log says the search had nothing to score and which α was used."""
    parents = [make_model("vit_cls", 1), make_model("vit_cls", 2)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        merged = hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=1, batch_size=3), method="mudsc",
                                alpha="auto", refit="none", progress=False)
    assert merged.config.mudsc["alpha_auto"]["held_out_examples"] == 0
    assert (f"alpha='auto': no held-out calibration example (fewer than 5 examples), so no alpha was scored; "
            f"alpha {merged.config.mudsc['alpha']:g} used") in caplog.text

def test_an_alpha_mudsc_reads_is_not_warned_about(caplog):
    parents = [make_model("vit_cls", 1), make_model("vit_cls", 2)]
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        hf_mudsc.merge(parents, make_batches("vit_cls", num_batches=2), method="mudsc", alpha=0.7, refit="none",
                       progress=False)
    assert "does not read" not in caplog.text


@pytest.mark.parametrize("method", ["mudsc", None])
def test_alpha_auto_with_a_one_shot_iterator_is_refused_before_any_work(monkeypatch, method):
    """QA s24: a generator with alpha="auto" logged "no held-out calibration example (fewer than 5 examples)" for 96
    examples, threw the 19 held out away and recorded an all-zero search (card, config, plot) — the search reads the
    held-out examples again, which a one-shot iterator cannot give. Refused in one line before any pass, for mudsc and
    for `auto` once it has chosen a unit-matching method."""
    import hf_mudsc.calibrate.distributed as distributed

    monkeypatch.setattr(distributed, "collect_statistics", lambda *a, **k: pytest.fail("calibration ran"))
    parents = [make_model("vit_cls", seed) for seed in (1, 2)]
    batches = make_batches("vit_cls", num_batches=6, batch_size=16)
    options = {"method": method} if method else {}
    with pytest.raises(MergeInputError, match=r"^alpha='auto' scores candidate merges on held-out calibration "
                                              r"examples it reads again, so the data cannot be a one-shot iterator; "
                                              r"pass a list of batches or a datasets\.Dataset, or a number for "
                                              r"alpha$"):
        hf_mudsc.merge(parents, iter(batches), alpha="auto", refit="none", progress=False, **options)
