"""Defects the lead fixed in session 35, each test written first (its reproduction in its docstring)."""

from __future__ import annotations

import pytest
from cli_runs import run_cli
from factories import make_batches, make_model, model_output, permuted_copy, relative_error

import hf_mudsc
from hf_mudsc.architectures import spec_for


def test_a_parent_subclass_whose_forward_hides_its_argument_names_calibrates_by_its_stock_forward():
    """merge([Sub(A), Sub(permuted A)], calibration=batches) with `forward(self, *args, **kwargs)` calling super was
    refused: 'calibration rows hold no input column the models read: ['pixel_values']'."""
    stock = make_model("vit_cls", 0)
    cls = type(stock)

    class Wrapped(cls):
        def forward(self, *args, **kwargs):  # a user's wrapper: logs, then the stock forward
            return super().forward(*args, **kwargs)

    a = Wrapped(stock.config)
    a.load_state_dict(stock.state_dict())
    b = Wrapped(stock.config)
    b.load_state_dict(permuted_copy(stock, spec_for(stock), seed=3).state_dict())
    batches = make_batches("vit_cls", num_batches=2, batch_size=8)
    merged = hf_mudsc.merge([a.eval(), b.eval()], calibration=batches, method="mudsc", refit="none")
    batch = batches[0]
    assert relative_error(model_output(merged.eval(), batch)[:, :3], model_output(stock.eval(), batch)) < 1e-4


def test_the_writer_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    """save_merged(merged, DIR) set the process umask to 0 and back (publish.folder) to read it: another thread creating
    a file in that instant made it world-writable. Where /proc shows the umask it is read, never set; and the marker,
    which teammates' push/evaluate read, got 0600 where every other file got the umask's mode."""
    import os

    if not os.path.exists("/proc/self/status"):
        raise AssertionError("this test needs Linux's /proc (CI runs on Linux)")
    calls: list[int] = []
    real = os.umask
    previous = real(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
        model = make_model("vit_cls", 0)
        batches = make_batches("vit_cls", num_batches=1, batch_size=4)
        merged = hf_mudsc.merge([model, model], calibration=batches, method="mudsc", refit="none")
        hf_mudsc.save_merged(merged, tmp_path / "out")
        assert calls == []
        modes = {p.name: os.stat(p).st_mode & 0o777 for p in (tmp_path / "out").iterdir() if p.is_file()}
        assert modes and set(modes.values()) == {0o640}, modes
    finally:
        real(previous)


def test_a_switch_given_twice_means_what_it_means_once():
    """`hf-mudsc -q -q merge ...` / `--dry-run --dry-run` were refused as 'given twice' once repeated value flags
    were: a switch storing one constant cannot disagree with itself (a flag holding a value still is refused)."""
    from hf_mudsc.cli.main import build_parser

    parser = build_parser(["merge"])
    parsed = parser.parse_args(["-q", "-q", "merge", "a", "b", "--dry-run", "--dry-run"])
    assert parsed.dry_run is True
    try:
        parser.parse_args(["merge", "a", "b", "--alpha", "0.3", "--alpha", "0.7"])
    except SystemExit as stop:
        assert stop.code == 2
    else:
        raise AssertionError("--alpha given twice was accepted")


@pytest.mark.parametrize("argv", [
    ["push", "", "org/name"], ["inspect", ""], ["inspect", "x", "--output", " "], ["evaluate", "", "-d", "x:test"],
    ["serve", "--state-dir", ""], ["serve", "--local-root", ""], ["serve", "--output-root", ""],
    ["demo", "--output", ""], ["demo", "--cache-dir", ""],
], ids=lambda argv: " ".join(map(repr, argv)))
def test_an_empty_path_argument_is_refused_not_read_as_the_current_folder(argv, tmp_path, monkeypatch, capsys):
    """`hf-mudsc push "$DIR" org/x` with DIR unset read '' as '.', and pushed (inspected, served from) whatever folder
    the shell was in: refused in one line before any work."""
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(argv, capsys)
    errors = [line for line in lines if "error:" in line]
    assert code == 2 and len(errors) == 1, lines
    assert "is empty" in errors[0] and "unset shell variable" in errors[0], errors
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_merge_record_is_refused_before_the_evaluation_not_after_it(tmp_path, capsys):
    """hf-mudsc evaluate DIR (no README.md, a recipe; config.json's mudsc record holding `size_budget: "x"`) scored
    every task and the parents, then ended in a TypeError traceback while rendering the card."""
    import json
    import shutil

    import datasets
    import numpy as np
    from factories import vit_cli_case
    from PIL import Image

    from hf_mudsc.cli.main import main

    parents, calibration = vit_cli_case(tmp_path)
    folder = tmp_path / "merged"
    assert main(["merge", *parents, "--calibration", calibration, "--output", str(folder), "-q"]) == 0
    (folder / "README.md").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["mudsc"]["size_budget"] = "x"
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(6)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]})
    data.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "eval")
    tasks = list(config.get("task_label_ranges") or {})
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    flags = ([f for task in tasks for f in ("--dataset", f"{task}={tmp_path / 'eval'}")]
             or ["--dataset", str(tmp_path / "eval")])
    code = main(["evaluate", str(folder), *flags])
    captured = capsys.readouterr()
    assert code != 0
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "merge record" in errors[0] and "--no-card" in errors[0], captured.err
    assert "accuracy" not in captured.out, captured.out  # refused before any scoring
    assert sorted(p.name for p in folder.iterdir()) == before
    shutil.rmtree(tmp_path / "eval")


def test_tiny_constants_of_opposite_signs_are_not_one_unit():
    """MiniLM's last LayerNorm scales two residual units by ~5e-33: at that hook they are constant at -4.5e-32 and
    +3.8e-32. The constant-unit rule compared constants with an absolute 1e-5 and gave them similarity 1 with each
    other's twins: activation_align on MiniLM and its permuted copy swapped two live residual units (error 0.52, was
    exact). Constants match relative to the largest constant."""
    import torch

    from hf_mudsc.calibrate.correlation import match_constant_units

    mean = torch.tensor([-4.48e-32, 3.82e-32, -4.47999e-32, 3.82e-32], dtype=torch.float64)
    zeros = torch.zeros(4, dtype=torch.float64)
    correlation = match_constant_units(torch.zeros(4, 4, dtype=torch.float64), mean, zeros)
    assert correlation[0, 2] == correlation[1, 3] == 1  # the twins (to 1e-5) still match
    assert correlation[0, 1] == correlation[0, 3] == correlation[2, 1] == 0  # opposite signs do not


def test_a_broken_json_recipe_gets_json_s_complaint_not_yaml_s(tmp_path):
    """hf-mudsc merge --recipe r.json with a missing comma said "'r.json' is not valid YAML: ..." (the reader fell back
    to YAML after JSON failed): a .json file gets JSON's line and column."""
    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import Recipe

    path = tmp_path / "r.json"
    path.write_text('{\n\t"models": ["a", "b"]\n\t"alpha": 0.3\n}\n')
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path)
    message = str(caught.value)
    assert "not valid JSON" in message and "line 3" in message and "YAML" not in message, message


def test_a_base_with_non_finite_weights_is_refused_before_any_parent_is_loaded_whole(tmp_path, monkeypatch):
    """merge([a, b], base=folder with NaN) (method auto): the base's relations were judged from its NaN values, parent
    A was loaded whole, and only then `_check_base` refused the base."""
    import torch
    import transformers
    from factories import fine_tune

    from hf_mudsc.errors import MergeInputError

    base = make_model("vit_cls", seed=0)
    fine_tune(copy_of(base), 1, 0.05).save_pretrained(tmp_path / "a")
    fine_tune(copy_of(base), 2, 0.05).save_pretrained(tmp_path / "b")
    with torch.no_grad():
        base.vit.layers[1].mlp.fc1.weight[0, 0] = float("nan")
    base.save_pretrained(tmp_path / "base")
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("a model was loaded whole before the refusal"))
    with pytest.raises(MergeInputError) as refused:
        hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], base=str(tmp_path / "base"), progress=False)
    message = str(refused.value)
    assert "\n" not in message and "the base" in message and "NaN or infinite" in message, message
    assert "'vit.layers.1.mlp.fc1.weight'" in message, message


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_forward_wrappers_naming_only_non_inputs_or_set_on_the_instance_still_show_the_inputs():
    """Review of the wrapper fix: `forward(self, *args, labels=None, **kwargs)` (a custom-loss subclass) and a forward
    set on a stock model's instance (`model.forward = MethodType(logged, model)`) still hid 'pixel_values'."""
    import types

    from hf_mudsc.calibrate.layer_inputs import model_input_names

    stock = make_model("vit_cls", 0)

    class WithLoss(type(stock)):
        def forward(self, *args, labels=None, **kwargs):
            return super().forward(*args, **kwargs)

    assert "pixel_values" in model_input_names(WithLoss(stock.config))
    original = stock.forward
    stock.forward = types.MethodType(lambda self, *args, **kwargs: original(*args, **kwargs), stock)
    assert "pixel_values" in model_input_names(stock)


def test_parent_objects_all_loaded_to_return_tuples_give_a_stock_merged_folder(tmp_path):
    """Review: merge([from_pretrained(A, return_dict=False), from_pretrained(B, return_dict=False)]) wrote
    return_dict: false into the merged config.json (the parents' checkpoints hold no such setting): the folder's
    pipeline() failed on tuples."""
    import json

    from transformers import AutoModelForSequenceClassification

    stock = make_model("bert_cls", 0)
    stock.save_pretrained(tmp_path / "a")
    permuted_copy(stock, spec_for(stock), seed=3).save_pretrained(tmp_path / "b")
    a, b = (AutoModelForSequenceClassification.from_pretrained(tmp_path / name, return_dict=False) for name in "ab")
    merged = hf_mudsc.merge([a, b], calibration=make_batches("bert_cls", num_batches=2, batch_size=8),
                            method="mudsc", refit="none", progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("return_dict", True) is True
    assert a.config.return_dict is False  # the parent objects as given


def test_inspect_reads_a_recipe_whose_suffix_is_upper_case(tmp_path, capsys):
    """Review: `merge --recipe r.JSON` read the recipe, `inspect r.JSON` said it was neither a folder nor a recipe."""
    path = tmp_path / "r.JSON"
    path.write_text('{"models": ["org/a", "org/b"], "alpha": 0.3}')
    from cli_runs import run_cli_output

    code, out, err = run_cli_output(["inspect", str(path)], capsys)
    assert code == 0, err
    assert "would merge: org/a, org/b" in out, out  # the recipe read


def test_inspect_of_an_auto_recipe_shows_the_alpha_it_sets(tmp_path, capsys):
    """hf-mudsc inspect r.yaml (models, alpha: 0.3, method auto by default) said "other options: all at their
    defaults": alpha and matcher were left out of that line as shown on the method's line, which auto does not show."""
    from cli_runs import run_cli_output

    path = tmp_path / "r.yaml"
    path.write_text("models: [org/a, org/b]\nalpha: 0.3\n")
    code, out, err = run_cli_output(["inspect", str(path)], capsys)
    assert code == 0, err
    assert "alpha = 0.3" in out and "all at their defaults" not in out, out
