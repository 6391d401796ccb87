"""QA s22 (dry run, options, recorded settings): a dry run refuses the output the merge refuses, in its words and
exit code; `inspect RECIPE` and `merge` share the size check (exit 2); an explicit matcher the method does not use is
warned about, weights mudsc reads are not; `auto`'s plan warns what its merge will; `--refit-samples all`; the
batch size recorded. In-process (`run_cli`), tiny models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli
from factories import fine_tune, make_batches, make_model
from test_cli import save_parents_and_data

import hf_mudsc
from hf_mudsc.publish.recipe import Recipe


def run_with_output(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """`run_cli`, keeping standard output too (the plan)."""
    from hf_mudsc.cli.main import main

    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path, Path]:
    return save_parents_and_data(tmp_path_factory.mktemp("qa22"))


@pytest.fixture(scope="module")
def pair() -> list[torch.nn.Module]:
    return [make_model("vit_cls", seed=1), make_model("vit_cls", seed=2)]


# ------------------------------------------------------------------------------------------------ 1. dry-run output


@pytest.mark.parametrize("case", ["exists", "overlaps"])
def test_the_dry_run_refuses_the_output_the_merge_refuses_in_its_words_and_exit_code(folders, tmp_path, capsys,
                                                                                    monkeypatch, case):
    """QA s22: `merge --dry-run --output out1` (out1 exists) and `--output ./vit-a --overwrite` exited 0 with a plan;
    the merge itself refuses both at once (exit 1)."""
    a, b, _ = folders
    monkeypatch.chdir(tmp_path)
    if case == "exists":
        (tmp_path / "out1").mkdir()
        argv = ["merge", str(a), str(b), "--method", "linear", "--output", "out1"]
        said = "already exists; pass --overwrite"
    else:
        argv = ["merge", str(a), str(b), "--method", "linear", "--output", str(a), "--overwrite"]
        said = "overlaps the parent folder"
    merged_code, merged_lines = run_cli(argv, capsys)
    dry_code, planned, dry_lines = run_with_output([*argv, "--dry-run"], capsys)
    assert merged_code == 1 and said in merged_lines[-1], merged_lines
    assert (dry_code, dry_lines[-1:]) == (merged_code, merged_lines[-1:])
    assert planned == ""  # refused before any plan


def test_the_dry_run_says_it_did_not_check_the_hub_repo(folders, capsys):
    """The merge asks the Hub whether the --push-to-hub repo exists (refusing it offline); the dry run does not
    contact the Hub for it, and says so in the plan instead of passing in silence."""
    a, b, _ = folders
    code, planned, _ = run_with_output(["merge", str(a), str(b), "--method", "linear", "--push-to-hub", "me/x",
                                        "--dry-run"], capsys)
    assert code == 0
    lines = [line for line in planned.splitlines() if "me/x" in line]
    assert len(lines) == 1 and "not checked" in lines[0], lines


def test_the_service_refuses_a_dry_run_job_whose_output_exists(tmp_path):
    """The service's dry run answers as the CLI's: an existing output is refused at POST for a dry run too."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.serve.jobs import parse_job

    (tmp_path / "taken").mkdir()
    body = {"models": ["user/a", "user/b"], "method": "average", "output": "taken"}
    with pytest.raises(RecipeError, match="already exists"):
        parse_job(body, tmp_path, dry_run=True)
    assert parse_job({**body, "output": "free"}, tmp_path, dry_run=True).dry_run


# ------------------------------------------------------------------------------------------------ 2. size


def test_inspect_and_merge_refuse_a_size_the_method_cannot_spend_with_exit_2(folders, tmp_path, capsys):
    """QA s22: `inspect RECIPE` passed `method: linear` + `size: 1.5`, which `merge --recipe` then refused with exit 1
    (other option refusals exit 2); `--method linear --size 1.5` exited 1 too."""
    a, b, _ = folders
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{a}, {b}]\nmethod: linear\nsize: 1.5\n")
    said = "method 'linear' keeps one parent's shape, so it cannot spend size=1.5"
    for argv in (["inspect", str(recipe), "--no-plots"], ["merge", "--recipe", str(recipe), "--dry-run"],
                 ["merge", str(a), str(b), "--method", "linear", "--size", "1.5", "--dry-run"]):
        code, lines = run_cli(argv, capsys)
        assert code == 2 and said in lines[-1], (argv, code, lines)
    with pytest.raises(Exception, match="cannot spend size=1.5"):
        Recipe(models=["a/b", "c/d"], method="linear", size=1.5).validate()


# ------------------------------------------------------------------------------------------------ 3. matcher


@pytest.mark.parametrize("method, matcher, warned", [
    ("zipit", "align", True), ("activation_align", "align", False), ("mudsc", "align", False),
])
def test_a_matcher_the_method_does_not_use_is_said_to_have_no_effect(pair, caplog, method, matcher, warned):
    """QA s22: `method="zipit", matcher="align"` recorded `zip` without a word (zipit fixes its matcher)."""
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(pair, make_batches("vit_cls", num_batches=2), method=method, matcher=matcher,
                                refit="none", progress=False)
    said = [r.getMessage() for r in caplog.records if "matcher=" in r.getMessage()]
    if warned:
        assert said == [f"method {method} does not read matcher= (CLI: --matcher): it has no effect"], said
        assert merged.config.mudsc["matcher"] == "zip"
        plan = hf_mudsc.merge(pair, make_batches("vit_cls", num_batches=2), method=method, matcher=matcher,
                              refit="none", dry_run=True, progress=False)
        assert said[0] in plan.warnings
    else:
        assert said == [], said


# ------------------------------------------------------------------------------------------------ 4. weights


def test_equal_weights_given_to_mudsc_draw_no_warning_and_are_recorded_as_the_default(pair, caplog):
    """QA s22: `method="mudsc", weights=[1, 1]` logged "does not read weights=" — mudsc reads weights; two equal
    weights are its default (each parent's share of every merged unit), so config.mudsc records None (no weights row)
    as for a merge without them, and the weights are those of that merge."""
    batches = make_batches("vit_cls", num_batches=2)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        merged = hf_mudsc.merge(pair, batches, method="mudsc", weights=[1, 1], refit="none", progress=False)
    assert not [r for r in caplog.records if "weights=" in r.getMessage()], caplog.text
    plain = hf_mudsc.merge(pair, batches, method="mudsc", refit="none", progress=False)
    assert merged.config.mudsc["weights"] is None and plain.config.mudsc["weights"] is None
    assert merged.merge_report.recipe["weights"] == [1, 1]  # the recipe keeps what was asked: it re-runs the same
    assert all(torch.equal(x, y) for x, y in zip(merged.state_dict().values(), plain.state_dict().values()))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        hf_mudsc.merge(pair, method="slerp", weights=[1, 2], progress=False)
    assert "method slerp does not read weights=" in caplog.text  # a method that does not read them still says so


# ------------------------------------------------------------------------------------------------ 5. auto's plan


def test_the_plan_of_auto_warns_about_an_option_no_choice_reads(pair, caplog):
    """QA s22: `size_spend="heads"` with size 1 and method auto: the merge warns (its chosen method does not read
    size_spend at size 1), the plan did not."""
    batches = make_batches("vit_cls", num_batches=2)
    plan = hf_mudsc.merge(pair, batches, size_spend="heads", dry_run=True, progress=False)
    assert [w for w in plan.warnings if "size_spend=" in w and "no effect" in w], plan.warnings
    plain = hf_mudsc.merge(pair, batches, dry_run=True, progress=False)
    assert not [w for w in plain.warnings if "no effect" in w], plain.warnings
    # an option only some of auto's choices read is not called unread before the choice: zip_decay (mudsc reads it,
    # regmean does not); density, which no dataless choice without a base reads (mudsc, linear), is
    chosen = hf_mudsc.merge(pair, batches, zip_decay=0.3, dry_run=True, progress=False)
    assert not [w for w in chosen.warnings if "zip_decay=" in w], chosen.warnings
    dense = hf_mudsc.merge(pair, None, density=0.5, dry_run=True, progress=False)
    assert [w for w in dense.warnings if "density=" in w and "no effect" in w], dense.warnings


# ------------------------------------------------------------------------------------------------ 6. refit samples


def test_refit_samples_all_on_the_command_line_is_none(folders, capsys):
    """QA s22: the API (`refit_samples=None`) and recipes (`null`) take "all the examples", the CLI refused it while
    its own error for `--refit-samples 0` suggested None."""
    a, b, calibration = folders
    base = ["merge", str(a), str(b), "--calibration", str(calibration), "--dry-run"]
    code, planned, lines = run_with_output([*base, "--refit-samples", "all"], capsys)
    assert code == 0 and "Dry run" in planned, lines
    code, lines = run_cli([*base, "--refit-samples", "0"], capsys)
    assert code == 2 and "or None for all calibration examples ('all' on the command line) (CLI: --refit-samples)" \
        in lines[-1], lines
    from hf_mudsc.cli.main import build_parser

    args = build_parser(available=["merge"]).parse_args(["merge", "a", "b", "--refit-samples", "all", "--output", "o"])
    from hf_mudsc.cli.merge import build_recipe

    recipe = build_recipe(args)
    assert recipe.refit_samples is None and "refit_samples: null" in recipe.to_yaml()


def test_num_samples_all_on_the_command_line_resets_a_recipes_number(folders, tmp_path, capsys):
    """s30 (left alone in s29): a recipe recording `num_samples: 8` could not be re-run on the whole split from the
    command line (`--num-samples` took only an int; the error for 0 said None); `all` is None, as for
    `--refit-samples`."""
    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.merge import build_recipe

    a, b, calibration = folders
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"models: [{a}, {b}]\ncalibration: {calibration}\nnum_samples: 8\n")
    parser = build_parser(available=["merge"])
    recipe = build_recipe(parser.parse_args(["merge", "--recipe", str(recipe_file), "--num-samples", "all",
                                             "--output", str(tmp_path / "o")]))
    assert recipe.num_samples is None and "num_samples: null" in recipe.to_yaml()
    code, lines = run_cli(["merge", str(a), str(b), "--calibration", str(calibration), "--dry-run",
                           "--num-samples", "0"], capsys)
    assert code == 2 and "('all' on the command line)" in lines[-1], lines


# ------------------------------------------------------------------------------------------------ 7. batch size


def test_the_batch_size_is_recorded_in_the_config_and_the_card(pair, tmp_path):
    """QA s22: the batch size changes the merged weights in their last bits (float summation order) yet neither
    config.mudsc nor the card said which was used."""
    import datasets

    batches = make_batches("vit_cls", num_batches=2)  # a dataset: the batch size cuts it (batches run as given)
    rows = datasets.Dataset.from_dict({"pixel_values": torch.cat([b["pixel_values"] for b in batches]).numpy()})
    merged = hf_mudsc.merge(pair, rows, method="mudsc", batch_size=8, refit="none", progress=False)
    assert merged.config.mudsc["batch_size"] == 8
    card = (hf_mudsc.save_merged(merged, tmp_path / "m") / "README.md").read_text()
    assert [line for line in card.splitlines() if line.startswith("| Calibration batch size | 8 |")], card
    dataless = hf_mudsc.merge(pair, method="weight_matching", progress=False)
    card = (hf_mudsc.save_merged(dataless, tmp_path / "d") / "README.md").read_text()
    assert "Calibration batch size" not in card


@pytest.mark.parametrize("data,options,said", [
    (True, {"refit": "none", "refit_lambda": 0.1}, "refit_lambda= (CLI: --refit-lambda) has no effect"),
    (False, {"num_samples": 16}, "num_samples= (CLI: --num-samples) has no effect"),
])
def test_the_plan_of_auto_says_an_inert_option_changes_nothing_as_the_merge_does(pair, caplog, data, options, said):
    """The plan of `method="auto"` named only options no choice reads; a setting for a part of the merge that runs
    for no choice (a refit setting with refit="none", a calibration setting without data) was said by the merge
    only."""
    batches = make_batches("vit_cls", num_batches=2) if data else None
    if not data:  # without data, auto merges fine-tunes of one base (parents from two inits need data)
        base = make_model("vit_cls", seed=0)
        pair = [fine_tune(base, 1, 0.02), fine_tune(base, 2, 0.02)]
    plan = hf_mudsc.merge(pair, batches, dry_run=True, progress=False, **options)
    assert [w for w in plan.warnings if said in w], plan.warnings
    merged = hf_mudsc.merge(pair, batches, progress=False, **options)
    assert [w for w in merged.config.mudsc["warnings"] if said in w], merged.config.mudsc["warnings"]
    plain = hf_mudsc.merge(pair, batches, dry_run=True, progress=False)
    assert not [w for w in plain.warnings if "no effect" in w], plain.warnings
