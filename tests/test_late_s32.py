"""Refusals that came late, silently or with wrong advice (session 32, the late-error hunt): each is now one line
before any weights are read, naming the flag and the fix."""

from __future__ import annotations

import re

import pytest
import torch
from cli_runs import run_cli
from factories import fine_tune, make_model

import hf_mudsc
from hf_mudsc.errors import CalibrationError, MergeInputError

pytestmark = pytest.mark.usefixtures("one_thread_module")


# --- 1: weights of all 0 / scaling 0 give back the base (or, for linear, a model of zeros) -----------------------

@pytest.mark.parametrize(("method", "keywords", "needles"), [
    ("task_arithmetic", {"weights": [0, 0]}, ("weights [0, 0] are all 0", "would be the base")),
    ("ties", {"weights": [0, 0]}, ("weights [0, 0] are all 0", "would be the base")),
    ("dare_linear", {"weights": [0.0, 0.0]}, ("weights [0, 0] are all 0", "would be the base")),
    ("consensus", {"weights": [0, 0]}, ("weights [0, 0] are all 0", "would be the base")),
    ("linear", {"weights": [0, 0], "normalize": False}, ("weights [0, 0] are all 0", "would be all zeros")),
    ("task_arithmetic", {"weights": [1, 1], "scaling": 0.0}, ("scaling 0", "would be the base")),
    ("ties", {"scaling": -0.0}, ("scaling 0", "would be the base")),
    ("pcb", {"scaling": 0}, ("scaling 0", "would be the base")),
])
def test_weights_or_scaling_of_0_are_refused_before_loading(tmp_path, method, keywords, needles):
    """mergekit returns the base for them silently (linear without normalize: zeros); these options are checked
    before the parents are located (the missing folders are never looked at)."""
    missing = [str(tmp_path / "no-parent-a"), str(tmp_path / "no-parent-b")]
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(missing, method=method, base=None if method == "linear" else str(tmp_path / "no-base"),
                       progress=False, **keywords)
    message = str(caught.value)
    assert all(needle in message for needle in needles) and "\n" not in message, message
    assert ("CLI: --scaling" if "scaling" in keywords else "CLI: --weights") in message, message


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_the_cli_refuses_weights_of_0_with_exit_2(tmp_path, capsys, extra):
    out = tmp_path / "out"
    code, err = run_cli(["merge", str(tmp_path / "no-a"), str(tmp_path / "no-b"), "--method", "ties", "--base",
                         str(tmp_path / "no-base"), "--weights", "0", "0", "--output", str(out), *extra], capsys)
    assert code == 2 and len(err) == 1 and "are all 0" in err[0] and "--weights" in err[0], err
    assert not out.exists()


def test_one_weight_of_0_still_leaves_that_parent_out():
    base = make_model("vit_cls", 5)
    a, b = fine_tune(base, 11, 0.01), fine_tune(base, 12, 0.01)
    merged = hf_mudsc.merge([a, b], method="task_arithmetic", base=base, weights=[0, 1], progress=False)
    state, expected = merged.state_dict(), b.state_dict()
    assert all(torch.allclose(state[name], expected[name], atol=1e-6) for name in expected)


# --- 2: method auto with calibration data: its columns are checked before any weights are read ------------------

@pytest.fixture(scope="module")
def vit_case(tmp_path_factory):
    from factories import vit_cli_case

    folder = tmp_path_factory.mktemp("vit-case")
    parents, calibration = vit_cli_case(folder)
    (folder / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    return parents, calibration, folder


def _no_weights_read(monkeypatch) -> None:
    """`auto` judges the parents from every tensor (`auto_before_loading`): a refusal due before weights never gets
    there."""
    import hf_mudsc.pipeline as pipeline

    def weights_read(*args, **kwargs):
        raise AssertionError("every tensor of the parents was read before a refusal due before any weights")

    monkeypatch.setattr(pipeline, "auto_before_loading", weights_read)


@pytest.mark.parametrize("bad", ["image_column", "jsonl"])
def test_auto_checks_the_calibration_columns_before_weights(vit_case, tmp_path, capsys, monkeypatch, bad):
    parents, calibration, folder = vit_case
    _no_weights_read(monkeypatch)
    argv = ["--image-column", "nosuch"] if bad == "image_column" else []
    data = calibration if bad == "image_column" else f"{folder}/rows.jsonl:train"
    code, err = run_cli(["merge", *parents, "--calibration", data, *argv, "--output", str(tmp_path / "out")], capsys)
    needle = "image_column='nosuch'" if bad == "image_column" else "lacks column(s) ['pixel_values']"
    assert code == 1 and needle in err[-1], err
    with pytest.raises(CalibrationError, match=re.escape(needle)):
        hf_mudsc.merge(parents, data, progress=False, **({"image_column": "nosuch"} if argv else {}))


@pytest.mark.parametrize("extra", [[], ["--dry-run"], ["--method", "mudsc"]])
def test_three_text_columns_are_an_option_error(vit_case, tmp_path, capsys, monkeypatch, extra):
    parents, calibration, _ = vit_case
    _no_weights_read(monkeypatch)
    code, err = run_cli(["merge", *parents, "--calibration", calibration, "--text-column", "a,b,c", *extra,
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "text_column='a,b,c' (CLI: --text-column) names 3 columns" in err[0], err


# --- 3: method auto refuses, before loading, options every method it may choose refuses ------------------------

@pytest.mark.parametrize("weights", [["0", "0"], ["-1", "1"]])
@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_auto_refuses_weights_no_method_it_may_choose_takes(vit_case, tmp_path, capsys, monkeypatch, weights, extra):
    """With data auto chooses mudsc (weights > 0), regmean (>= 0, positive sum) or, short of memory, linear (a sum
    to divide by): none takes these, whatever the parents' relation."""
    parents, calibration, _ = vit_case
    _no_weights_read(monkeypatch)
    code, err = run_cli(["merge", *parents, "--calibration", calibration, "--weights", *weights, *extra,
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "method 'auto'" in err[0], err
    assert all(name in err[0] for name in ("mudsc", "regmean", "linear", "--weights")), err


def test_the_api_refuses_auto_with_options_every_choice_refuses(vit_case, monkeypatch):
    parents, calibration, _ = vit_case
    _no_weights_read(monkeypatch)
    for dry_run in (False, True):
        with pytest.raises(MergeInputError, match="method 'auto'") as caught:
            hf_mudsc.merge(parents, calibration, weights=[0, 0], progress=False, dry_run=dry_run)
        assert "\n" not in str(caught.value)
    # no data: auto may choose mudsc (which needs data) or linear, which cannot spend a size budget
    with pytest.raises(MergeInputError, match="method 'auto'") as caught:
        hf_mudsc.merge(parents, size=1.5, progress=False)
    assert "calibration" in str(caught.value) and "size=1.5" in str(caught.value), str(caught.value)


def test_the_dry_run_says_which_choice_of_auto_would_refuse(vit_case, tmp_path, capsys):
    """--size 1.5 with data: mudsc spends it (different initializations), regmean or linear (fine-tunes of one base)
    would refuse it; which one auto takes is known from the weights only."""
    parents, calibration, _ = vit_case
    plan = hf_mudsc.merge(parents, calibration, size=1.5, dry_run=True)
    said = [text for text in plan.warnings if "regmean" in text and "size=1.5" in text]
    assert said and "method auto" in said[0], plan.warnings
    # mudsc would not refuse it (its calibration-size line, "if method auto chooses mudsc ..., the merge warns", may be)
    assert not any("chooses mudsc" in text and "refused" in text for text in plan.warnings), plan.warnings


# --- 4: a base that is one of the parents ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fine-tunes")
    base = make_model("vit_cls", 5)
    tunes = [fine_tune(base, seed, 0.01) for seed in (11, 12)]
    for index, tuned in enumerate(tunes):
        tuned.save_pretrained(folder / f"ft{index}")
    return tunes, [str(folder / "ft0"), str(folder / "ft1")]


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_a_base_that_is_a_parent_is_refused(fine_tunes, tmp_path, capsys, extra):
    """Parent A's task vector from itself is 0: ties merged B's trimmed task vector onto A, with an INFO line only."""
    _, folders = fine_tunes
    out = tmp_path / "out"
    code, err = run_cli(["merge", *folders, "--base", folders[0], "--method", "ties", "--output", str(out), *extra],
                        capsys)
    assert code == 1 and "error:" in err[-1] and "parent A" in err[-1] and "--base" in err[-1], err
    assert "--method linear" in err[-1] and not out.exists(), err


@pytest.mark.parametrize("method", ["task_arithmetic", "auto"])
def test_the_api_refuses_a_parent_as_the_base(fine_tunes, method):
    (a, b), _ = fine_tunes
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], base=b, method=method, progress=False)
    message = str(caught.value)
    assert "parent B" in message and "the same model" in message and "\n" not in message, message


# --- 5: a slice missing its ']' -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "slice_"), [("./calib:train[:100", "[:100"), ("org/ds:train[10:20", "[10:20"),
                                              ("org/ds:cfg:train[:5%", "[:5%")])
def test_a_slice_without_its_closing_bracket_is_named(spec, slice_):
    """It was read as config 'train[' and split '100', and the advice (`./calib:100`) was refused again."""
    from hf_mudsc.calibrate.dataset_spec import DatasetSpec

    with pytest.raises(CalibrationError) as caught:
        DatasetSpec.parse(spec)
    assert str(caught.value).endswith(f"the slice {slice_!r} lacks its closing ']'; write {spec + ']'!r}"), caught.value
    fixed = DatasetSpec.parse(spec + "]")
    assert fixed.split.endswith(slice_ + "]") and fixed.config in (None, "cfg"), fixed


# --- 7: an existing --output that --overwrite would refuse -----------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "folder", "link"])
def test_an_output_overwrite_would_refuse_gets_the_reason_at_once(tmp_path, kind):
    """It was told "pass --overwrite to replace it", and with --overwrite refused ("delete it yourself")."""
    from hf_mudsc.publish.folder import check_output

    target = tmp_path / "taken"
    if kind == "file":
        target.write_text("hi")
    elif kind == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    said = []
    for overwrite in (False, True):
        with pytest.raises(FileExistsError) as caught:
            check_output(target, overwrite=overwrite)
        said.append(str(caught.value))
    first, second = said
    assert "pass --overwrite" not in first and "--overwrite would not replace it" in first, first
    assert first.split(": ", 1)[1] == second.split(": ", 1)[1] or first.endswith(second.split(": ", 1)[1]), said
    assert "output folder" not in first or kind == "folder", first
    fix = "pass the link's target" if kind == "link" else "delete it yourself"
    assert fix in first and fix in second, said
    assert kind != "file" or target.read_text() == "hi"


def test_an_output_overwrite_would_replace_is_still_advised_so(tmp_path):
    from hf_mudsc.publish.folder import check_output

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it"):
        check_output(tmp_path / "empty", overwrite=False)
    check_output(tmp_path / "empty", overwrite=True)


# --- 6: the dry run's device refusal in the CLI's words --------------------------------------------------------

def test_the_dry_run_refuses_a_missing_cuda_in_the_cli_words(vit_case, tmp_path, capsys, monkeypatch):
    """The run said "--device cuda ... use --device cpu", its dry run "device 'cuda' ... pass device='cpu'"."""
    parents, _, _ = vit_case
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lines = []
    for extra in ([], ["--dry-run"]):
        code, err = run_cli(["merge", *parents, "--method", "linear", "--device", "cuda", "--output",
                             str(tmp_path / "out"), *extra], capsys)
        assert code == 1 and len(err) == 1, err
        lines.append(err[0])
    assert lines[0] == lines[1] and "--device cuda" in lines[1] and "device=" not in lines[1], lines


# --- 8: a list of batches is checked before the parents' weights ------------------------------------------------

@pytest.mark.parametrize(("batch", "needle"), [
    ({"input_ids": torch.zeros(4, 5, dtype=torch.long)}, "lacks column(s) ['pixel_values']"),
    ({"pixel_values": torch.zeros(4, 1, 32, 32)}, "pixel_values have shape (4, 1, 32, 32)"),
])
@pytest.mark.parametrize("method", ["zipit", "auto"])
def test_a_list_of_batches_is_checked_before_the_weights(vit_case, caplog, monkeypatch, batch, needle, method):
    """Its first batch is at hand before any weights; it was checked only once both parents were loaded whole."""
    import logging

    parents, _, _ = vit_case
    _no_weights_read(monkeypatch)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"), pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(parents, [batch], method=method, progress=False)
    assert needle in str(caught.value), caught.value
    loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("loaded", "parents:"))]
    assert not loaded, loaded
