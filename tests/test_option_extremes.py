"""Extreme option values (1e308, subnormals, integers too long for a float, YAML's `1e-3`): each is refused in
one line before any work, or merged to what it means — never a traceback, never NaN weights written, never a
result that silently ignores the option. And whatever produced them, NaN/inf weights are never written."""

from __future__ import annotations

import pytest
import torch
from factories import fine_tune, make_model, recipe_refusal

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.errors import MergeInputError, OptionError, RecipeError
from hf_mudsc.options import MergeOptions
from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

# (option, value, fragment of the one-line message)
OUT_OF_RANGE = [
    # task_arithmetic at 1e308 overflowed to inf after the whole merge; at 1e30 it wrote weights of 3e29.
    ("scaling", 1e308, "scaling must lie in [-100, 100] (CLI: --scaling)"),
    ("scaling", -1e308, "scaling must lie in [-100, 100] (CLI: --scaling)"),
    ("scaling", 1e30, "scaling must lie in [-100, 100] (CLI: --scaling)"),
    ("scaling", 2.0**1000, "scaling must lie in [-100, 100] (CLI: --scaling)"),
    # consensus at 1e30 (or 1e308) kept no entry: the merge was the base, silently.
    ("consensus_lambda", 1e308, "consensus_lambda must lie in [0, 100] (CLI: --consensus-lambda)"),
    ("consensus_lambda", 1e30, "consensus_lambda must lie in [0, 100] (CLI: --consensus-lambda)"),
    # fisher at 1e308 overflowed to NaN after the whole merge (the message blamed --weights / --scaling); 1e-320 is 0
    # as the float32 floor of the Fishers: 0/0 where no parent's data moves a parameter.
    ("fisher_epsilon", 1e308, "fisher_epsilon must lie in [1e-30, 1e+30] (CLI: --fisher-epsilon)"),
    ("fisher_epsilon", 1e-320, "fisher_epsilon must lie in [1e-30, 1e+30] (CLI: --fisher-epsilon)"),
    # the ridge refit at 1e308 overflowed to NaN after the whole merge (the message blamed --weights / --scaling).
    ("refit_lambda", 1e308, "refit_lambda must lie in (0, 1e+30] (CLI: --refit-lambda)"),
]


@pytest.mark.parametrize(("option", "value", "needle"), OUT_OF_RANGE)
def test_the_api_refuses_an_extreme_factor_before_loading_anything(tmp_path, option, value, needle):
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, str(tmp_path / "no-data"), progress=False, **{option: value})
    assert needle in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


@pytest.mark.parametrize(("option", "value", "needle"), OUT_OF_RANGE)
def test_the_cli_refuses_an_extreme_factor_in_one_line(tmp_path, capsys, option, value, needle):
    out = tmp_path / "out"
    code = main(["merge", str(tmp_path / "no-a"), str(tmp_path / "no-b"), "--output", str(out),
                 f"--{option.replace('_', '-')}={value!r}"])  # `=`: argparse takes `-1e308` for a flag
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(("option", "value", "needle"), OUT_OF_RANGE)
def test_a_recipe_refuses_an_extreme_factor(tmp_path, option, value, needle):
    assert needle.split(" (CLI")[0] in recipe_refusal(tmp_path, option, value)


def test_the_edges_of_the_ranges_pass():
    for option, value in (("scaling", -100.0), ("scaling", 100), ("scaling", -0.0), ("consensus_lambda", 100.0),
                          ("consensus_lambda", 0.0), ("fisher_epsilon", 1e-30), ("fisher_epsilon", 1e30),
                          ("refit_lambda", 1e30), ("refit_lambda", 1e-320)):
        assert MergeOptions.check(option, value) == value


@pytest.mark.parametrize("option", ["scaling", "alpha", "density", "weights", "zip_budget"])
def test_an_integer_too_large_for_a_float_is_refused_in_one_line(tmp_path, option):
    """`scaling: 1000...0` (400 digits) raised OverflowError with a traceback from float()."""
    huge = 10**400
    value = [huge, 1] if option == "weights" else huge
    with pytest.raises(OptionError) as caught:
        MergeOptions.check(option, value)
    message = str(caught.value)
    assert f"{option} must be " in message and "an integer of 401 digits" in message and "\n" not in message, message
    path = tmp_path / RECIPE_FILENAME
    path.write_text(f"models: [org/a, org/b]\ncalibration: org/ds:train\n{option}: {value}\n".replace("'", ""))
    with pytest.raises(RecipeError, match=f"{option} must be "):
        Recipe.load(path).validate()


def test_a_recipe_reads_exponent_numbers_as_numbers(tmp_path):
    """PyYAML reads `1e-3` (no dot) as the string '1e-3': `refit_lambda: 1e-3` was refused as "must be a number"."""
    path = tmp_path / RECIPE_FILENAME
    path.write_text("models: [org/a, org/b]\ncalibration: org/ds:train\nrefit_lambda: 1e-3\nfisher_epsilon: 1E-6\n"
                    "scaling: -2e0\nmethod: '1e3'\n")
    recipe = Recipe.load(path)
    assert (recipe.refit_lambda, recipe.fisher_epsilon, recipe.scaling) == (1e-3, 1e-6, -2.0)
    assert recipe.method == "1e3"  # a quoted string stays a string
    path.write_text("models: [org/a, org/b]\ncalibration: org/ds:train\nrefit_lambda: 1e999\n")
    with pytest.raises(RecipeError, match=r"refit_lambda must lie in \(0, 1e\+30\] \(CLI: --refit-lambda\).*got inf$"):
        Recipe.load(path).validate()


def test_a_zip_budget_of_1e308_is_unlimited_like_2():
    """`zip_budget=1e308` (documented: >= 2 means unlimited) raised OverflowError: int((n // 2) * 1e308)."""
    from hf_mudsc.solve.matchers import match

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 40, generator=generator, dtype=torch.float64)
    similarity = torch.corrcoef(features)
    for num_models, heads in ((2, 1), (2, 2), (3, 1)):
        size = 12 // num_models * num_models
        sim = similarity[:size, :size]
        unlimited = match(sim, matcher="zip", budget=2.0, num_heads=heads, num_models=num_models)
        huge = match(sim, matcher="zip", budget=1e308, num_heads=heads, num_models=num_models)
        assert torch.equal(unlimited.cluster_of, huge.cluster_of), (num_models, heads)


def test_a_pcb_ratio_that_keeps_no_entry_is_refused_in_one_line():
    """`pcb_ratio=1e-320` died of an IndexError in the sort; 1e-6 on a small model returned the base, silently."""
    base = make_model("vit_cls", 0)
    a, b = fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05)
    for ratio in (1e-320, 1e-6):
        with pytest.raises(MergeInputError) as caught:
            hf_mudsc.merge([a, b], None, method="pcb", base=base, pcb_ratio=ratio, progress=False)
        message = str(caught.value)
        assert f"pcb_ratio {ratio:g} keeps none of each task vector's " in message, message
        assert "pcb_ratio= (CLI: --pcb-ratio)" in message and "\n" not in message


def test_a_model_whose_weights_turned_non_finite_is_never_written(tmp_path):
    """merge() refuses NaN/inf weights it produced; a model changed afterwards (here cast to float16 with a value
    past its range) was written by save_merged as it stood."""
    from hf_mudsc.publish.writer import save_merged

    merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], None, method="average",
                            progress=False)
    with torch.no_grad():
        merged.classifier.weight[0, 0] = 1e5
        merged.vit.embeddings.cls_token.fill_(float("nan"))
    merged.half()
    with pytest.raises(MergeInputError) as caught:
        save_merged(merged, tmp_path / "out")
    message = str(caught.value)
    assert "refusing to write the merged model: NaN or infinite values in 2 tensors (" in message, message
    assert "'vit.embeddings.cls_token'" in message and "'classifier.weight'" in message
    assert "float16" in message and "\n" not in message
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("keywords", "needle"), [
    ({"density": 1e-6}, "density 1e-06 ± epsilon 0.15 leaves (-0.149999, 0.150001), not inside (0, 1)"),
    ({"density": 0.9, "epsilon": 0.3}, "density 0.9 ± epsilon 0.3 leaves (0.6, 1.2), not inside (0, 1)"),
    ({"density": [0.5, 0.1], "epsilon": 0.2}, "density 0.1 ± epsilon 0.2 leaves (-0.1, 0.3), not inside (0, 1)"),
])
def test_della_keep_probabilities_outside_0_1_are_refused_before_loading(tmp_path, keywords, needle):
    """`--method della --density 1e-6` (epsilon's default 0.15) failed after loading with "della: epsilon must keep
    density +/- epsilon inside (0, 1)", naming neither the values nor the fix."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, method="della", base=str(tmp_path / "no-base"), progress=False, **keywords)
    message = str(caught.value)
    assert needle in message and "epsilon= (CLI: --epsilon)" in message and "\n" not in message, message


@pytest.mark.parametrize(("method", "keywords", "needle"), [
    ("task_arithmetic", {"weights": [1e30, 1e30]}, "weights [1e+30, 1e+30] times scaling 1 scale a task vector by "
     "1e+30"),
    ("task_arithmetic", {"weights": [1.0, 50.0], "scaling": 4.0}, "times scaling 4 scale a task vector by 200"),
    ("pcb", {"weights": [-1e3, 1.0]}, "scale a task vector by -1000"),
    ("consensus", {"weights": [1e30, 1.0]}, "scale a task vector by 1e+30"),
    ("linear", {"weights": [1e30, 1.0], "normalize": False}, "scale a parent by 1e+30"),
])
def test_unnormalized_weights_that_scale_a_parent_past_100_are_refused_before_loading(tmp_path, method, keywords,
                                                                                        needle):
    """Where the weights are not divided by their sum they are factors like `scaling`: task_arithmetic with
    `--weights 1e30 1e30` (allowed: "only their ratios matter when normalized") wrote weights of 3e29."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, method=method, base=str(tmp_path / "no-base"), progress=False, **keywords)
    message = str(caught.value)
    assert needle in message and "weights= (CLI: --weights)" in message and "\n" not in message, message


def test_normalized_weights_of_any_magnitude_still_merge():
    base = make_model("vit_cls", 0)
    a, b = fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05)
    small = hf_mudsc.merge([a, b], None, method="linear", weights=[1.0, 3.0], progress=False)
    huge = hf_mudsc.merge([a, b], None, method="linear", weights=[1e29, 3e29], progress=False)
    for (name, x), y in zip(small.state_dict().items(), huge.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), name
    scaled = hf_mudsc.merge([a, b], None, method="task_arithmetic", base=base, weights=[-1.0, 2.0], scaling=50.0,
                            progress=False)
    assert all(torch.isfinite(p).all() for p in scaled.parameters())


def test_consensus_of_two_parents_with_lambda_of_1_or_more_is_refused():
    """Two parents, k=2: both TALL masks hold only where |tau_1| > L|tau_2| and |tau_2| > L|tau_1|, impossible for
    L >= 1 — the merge was exactly the base, silently."""
    base = make_model("vit_cls", 0)
    a, b = fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], None, method="consensus", base=base, consensus_lambda=1.0, progress=False)
    message = str(caught.value)
    assert "consensus_lambda 1 with 2 parents and consensus_k 2 keeps no entry" in message, message
    assert "consensus_lambda= (CLI: --consensus-lambda)" in message and "\n" not in message
    kept = hf_mudsc.merge([a, b], None, method="consensus", base=base, consensus_lambda=0.9, progress=False)
    assert any(not torch.equal(p, q) for p, q in zip(kept.parameters(), base.parameters()))


def test_a_localize_stitch_density_that_keeps_no_entry_is_refused_in_one_line():
    """`--method localize_stitch --density 1e-9` on a model of fewer than 1e9 entries kept none (the threshold is
    the k-th largest, kept strictly above): the merge was the base, silently."""
    base = make_model("vit_cls", 0)
    a, b = fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], None, method="localize_stitch", base=base, density=1e-9, progress=False)
    message = str(caught.value)
    assert "density 1e-09 keeps none of each task vector's " in message, message
    assert "density= (CLI: --density)" in message and "\n" not in message


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus", "fisher"])
@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [-1.0, -2.0]])
def test_the_data_methods_refuse_negative_or_all_zero_weights_before_loading(tmp_path, method, weights):
    """weights [1, -1, 0]: regmean died after calibration with a bare ValueError naming `linear` and a normalize=False
    it does not read; fisher wrote NaN where the weighted Fishers cancel (then blamed "the options overflowed")."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, str(tmp_path / "no-data"), method=method, weights=weights, progress=False)
    message = str(caught.value)
    assert f"weights= (CLI: --weights) of {method} must be >= 0 with a positive sum" in message, message
    assert "\n" not in message


def test_a_data_method_merges_with_a_zero_weight_as_without_that_parent():
    from factories import make_batches

    base = make_model("vit_cls", 0)
    a, b, c = fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05), fine_tune(base, 3, 0.05)
    batches = make_batches("vit_cls", 2, 8)
    for method in ("regmean", "fisher"):
        three = hf_mudsc.merge([a, b, c], batches, method=method, weights=[1.0, 2.0, 0.0], refit="none",
                               progress=False)
        two = hf_mudsc.merge([a, b], batches, method=method, weights=[1.0, 2.0], refit="none", progress=False)
        for (name, x), y in zip(three.state_dict().items(), two.state_dict().values()):
            assert torch.allclose(x, y, atol=1e-5), (method, name)


def test_push_merged_refuses_non_finite_weights_before_asking_the_hub(monkeypatch):
    from hf_mudsc.publish import hub
    from hf_mudsc.publish.writer import push_merged

    merged = hf_mudsc.merge([make_model("vit_cls", 1), make_model("vit_cls", 2)], None, method="average",
                            progress=False)
    with torch.no_grad():
        merged.classifier.bias.fill_(float("inf"))

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(hub, "check_target", no_hub)
    monkeypatch.setattr(hub, "push_folder", no_hub)
    with pytest.raises(MergeInputError, match=r"NaN or infinite values in 1 tensor \('classifier.bias'\)"):
        push_merged(merged, "me/merged")


@pytest.mark.parametrize(("text", "needle"), [
    ("models: [a, b]\nmethod: task_arithmetic\nbase: c\nweights: [1.0e+30, 1]\n", "scale a task vector by 1e+30"),
    ("models: [a, b]\nmethod: consensus\nbase: c\nconsensus_lambda: 2\n", "consensus_lambda 2 with 2 parents"),
    ("models: [a, b]\nmethod: della\nbase: c\ndensity: 0.05\n", "density 0.05 ± epsilon 0.15 leaves"),
    ("models: [a, b]\nmethod: fisher\ncalibration: d\nweights: [1, -1]\n", "must be >= 0 with a positive sum"),
    ("models: [a, b, c]\nmethod: consensus\nbase: c\nconsensus_k: 4\n", "consensus_k 4 asks more tasks"),
])
def test_inspect_refuses_a_recipe_whose_method_refuses_its_options(tmp_path, capsys, text, needle):
    """`hf-mudsc inspect RECIPE` printed `would merge ...` for options the method refuses when the merge starts;
    exit 2, as `merge --recipe` refuses them (QA s21: it was 1)."""
    path = tmp_path / RECIPE_FILENAME
    path.write_text(text)
    assert main(["inspect", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize(("method", "keywords"), [
    ("task_arithmetic", {"weights": [1.0, -1.0], "normalize": True}),
    ("dare_linear", {"weights": [1.0, -1.0], "normalize": True}),
    ("breadcrumbs", {"weights": [2.0, -2.0], "normalize": True}),
    ("della_linear", {"weights": [1.0, -1.0], "normalize": True}),
    ("task_arithmetic", {"weights": [4e-9, 5e-9], "normalize": True}),
    ("linear", {"weights": [1.0, -1.0]}),
])
def test_normalized_weights_whose_sum_is_0_are_refused_before_loading(tmp_path, method, keywords):
    """normalize divides by the weights' sum: mergekit 0.1.5 skips the division where |sum| < 1e-8, so task
    arithmetic with weights [1, -1] and normalize=True silently gave the unnormalised base + δ_A - δ_B (and
    [4e-9, 5e-9] gave base + 9e-9 δ, not the average); linear died after loading."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, method=method, base=str(tmp_path / "no-base"), progress=False, **keywords)
    message = str(caught.value)
    total = sum(keywords["weights"])
    assert f"weights {keywords['weights']} sum to {total:g}" in message, message
    assert "normalize= (CLI: --normalize" in message and "weights= (CLI: --weights)" in message, message
    assert "\n" not in message


def test_normalized_weights_whose_shares_pass_100_are_refused_before_loading(tmp_path):
    """Divided by a sum near 0 the weights are factors beyond ±100, like unnormalised ones: [1, -0.999] is
    1000·δ_A − 999·δ_B."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, method="task_arithmetic", base=str(tmp_path / "no-base"), weights=[1.0, -0.999],
                       normalize=True, progress=False)
    message = str(caught.value)
    assert "divided by their sum 0.001" in message and "scale a task vector by 1000" in message, message
    assert "\n" not in message


@pytest.fixture(scope="module")
def three():
    base = make_model("vit_cls", 0)
    return base, [fine_tune(base, seed, 0.05) for seed in (1, 2, 3)]


@pytest.mark.parametrize(("method", "keywords"), [
    ("breadcrumbs", {"density": 1e-9}),
    ("breadcrumbs_ties", {"density": 1e-9}),
    ("dare_linear", {"density": 1e-9}),
    ("dare_ties", {"density": 1e-9}),
    ("della", {"density": 1e-9, "epsilon": 1e-10}),
    ("della_linear", {"density": [0.5, 1e-9, 0.5], "epsilon": 1e-10}),
])
def test_a_density_that_keeps_no_entry_of_any_tensor_is_refused_in_one_line(three, method, keywords):
    """Breadcrumbs keeps int(density·entries) entries of each tensor, DARE and DELLA each entry with probability
    density on average (mergekit 0.1.5, no at-least-one rule): at density 1e-9 no tensor kept an entry (or one of
    a billion), and the merge was the base — or that parent left out — silently."""
    base, parents = three
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(parents, method=method, base=base, progress=False, **keywords)
    message = str(caught.value)
    who = "parent B's " if isinstance(keywords["density"], list) else ""
    assert f"method {method!r}: {who}density 1e-09 keeps " in message, message
    assert "of even the largest tensor" in message and "the merge would leave" in message, message
    assert "density= (CLI: --density)" in message and "\n" not in message


def test_ties_at_a_tiny_density_keeps_one_entry_per_tensor_and_parent_as_mergekit(three):
    """TIES's trim keeps max(1, int(density·entries)) entries (mergekit 0.1.5 `magnitude`): at density 1e-9 each
    parent keeps its largest task-vector entry of each tensor — so the merge differs from the base in 1 to 3 entries
    per tensor, each a kept entry of a parent."""
    base, parents = three
    merged = hf_mudsc.merge(parents, method="ties", base=base, density=1e-9, progress=False)
    before = dict(base.named_parameters())
    for name, tensor in merged.named_parameters():
        changed = {int(i) for i in (tensor != before[name]).reshape(-1).nonzero().flatten()}
        tops = {int((p.get_parameter(name) - before[name]).abs().reshape(-1).argmax()) for p in parents}
        assert 1 <= len(changed) <= 3 and changed <= tops, name


def test_a_density_that_keeps_no_entry_is_refused_from_the_configs_before_any_weights_are_read(tmp_path,
                                                                                              monkeypatch):
    """The shapes come from parent A's config: refused before any parent's weights are read, and by the dry run."""
    from hf_mudsc.load import parents as loading

    base = make_model("vit_cls", 0)
    base.save_pretrained(tmp_path / "base")
    for seed in (1, 2):
        fine_tune(base, seed, 0.05).save_pretrained(tmp_path / f"p{seed}")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(loading, "_prepare", no_weights)
    for dry_run in (False, True):
        with pytest.raises(MergeInputError) as caught:
            hf_mudsc.merge([str(tmp_path / "p1"), str(tmp_path / "p2")], method="dare_ties", density=1e-9,
                           base=str(tmp_path / "base"), progress=False, dry_run=dry_run)
        message = str(caught.value)
        assert "method 'dare_ties': density 1e-09 keeps on average less than one entry of even the largest" in message
        assert "\n" not in message
