"""`device=` / `--device`: where calibration runs. Checked on CPU; bad devices fail before any loading."""

from __future__ import annotations

import importlib

import pytest
import torch
from factories import make_batches, make_model

import hf_mudsc
from hf_mudsc.calibrate.device import resolve_device
from hf_mudsc.cli.main import build_parser, main
from hf_mudsc.cli.merge import build_recipe
from hf_mudsc.errors import MergeInputError, RecipeError
from hf_mudsc.publish.recipe import Recipe


def _no_loading(*args, **kwargs):
    raise AssertionError("parents were loaded although the device check should have failed first")


@pytest.fixture(scope="module")
def parents():
    return make_model("vit_cls", 0), make_model("vit_cls", 1), make_batches("vit_cls", 2)


def test_explicit_cpu_devices_give_the_same_merge_on_the_cpu(parents):
    a, b, batches = parents
    merges = [hf_mudsc.merge([a, b], batches, method="mudsc", matcher="zip", progress=False, device=device)
              for device in ("cpu", torch.device("cpu"))]
    for merged in merges:
        assert {p.device for p in merged.parameters()} == {torch.device("cpu")}
    for (name, x), y in zip(merges[0].named_parameters(), merges[1].parameters()):
        assert torch.equal(x, y), name
    # The parents are where they were, and the auto choice on a machine without CUDA is the same merge.
    assert {p.device for p in a.parameters()} == {torch.device("cpu")}
    if not torch.cuda.is_available():
        default = hf_mudsc.merge([a, b], batches, method="mudsc", matcher="zip", progress=False)
        for (name, x), y in zip(default.named_parameters(), merges[0].parameters()):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("device,message", [
    ("tpu7", "unknown device 'tpu7'; use 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda", "device 'cuda': CUDA is not available on this machine; pass device='cpu'"),
    ("meta", "unsupported device 'meta'; use 'cpu', 'cuda' or 'cuda:N'"),
    ("cuda:0", "device 'cuda:0': CUDA is not available on this machine"),
    (torch.device("cuda", 1), "device 'cuda:1': CUDA is not available on this machine"),
    (3, "device must be a string like 'cpu' or 'cuda:0' or a torch.device, got 3"),
])
def test_bad_devices_are_refused_before_loading(monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("hf_mudsc.load.parents.load_parents", _no_loading)
    with pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge(["/no/such/a", "/no/such/b"], [{"pixel_values": torch.zeros(1)}], device=device)
    text = str(caught.value)
    assert message in text and "\n" not in text
    if "CUDA" in message:
        assert "pass device='cpu'" in text


def test_auto_device_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    # Unindexed "cuda" is torch's current CUDA device ...
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    # One process per GPU under torchrun / accelerate launch: each takes its own.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"device 'cuda:2': there is no CUDA device 2 \(2 available: 0-1\)"):
        resolve_device("cuda:2")


def test_auto_device_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")


def test_recipe_key_and_cli_flag(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = build_parser().parse_args(["merge", "a", "b", "--method", "average", "--device", "cpu",
                                      "--output", str(tmp_path / "out")])
    recipe = build_recipe(args)
    assert recipe.device == "cpu" and recipe.merge_options()["device"] == "cpu"
    assert Recipe().device is None and Recipe().merge_options()["device"] is None
    assert Recipe.from_dict({"models": ["a", "b"], "device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(RecipeError, match=r"device must be a string like 'cpu' or 'cuda:0' \(CLI: --device\)"):
        Recipe.from_dict({"models": ["a", "b"], "device": 0})
    with pytest.raises(RecipeError, match=r"unknown device 'tpu7' \(CLI: --device\); use 'cpu', 'cuda' or 'cuda:N'"):
        Recipe(models=["a", "b"], method="average", device="tpu7").validate()
    # From the command line: one line naming the flag, before any parent is loaded.
    monkeypatch.setattr("hf_mudsc.load.parents.load_parents", _no_loading)
    code = main(["merge", "a", "b", "--method", "average", "--device", "cuda", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in err
    assert not (tmp_path / "o").exists()


def test_the_device_reaches_calibration_and_the_solve(monkeypatch, parents):
    a, b, batches = parents
    distributed = importlib.import_module("hf_mudsc.calibrate.distributed")
    loop = importlib.import_module("hf_mudsc.solve.loop")  # the matching methods build their Solver from here

    seen: dict[str, object] = {}
    collect, solver = distributed.collect_statistics, loop.Solver

    def spy_collect(*args, **kwargs):
        seen["calibration"] = kwargs.get("device")
        return collect(*args, **kwargs)

    def spy_solver(spec, params_a, params_b, correlations, options):
        seen["solve"] = options.device
        seen["params"] = {t.device for t in [*params_a.values(), *params_b.values()]}
        return solver(spec, params_a, params_b, correlations, options)

    monkeypatch.setattr(distributed, "collect_statistics", spy_collect)
    monkeypatch.setattr(loop, "Solver", spy_solver)
    hf_mudsc.merge([a, b], batches, method="mudsc", matcher="align", progress=False, device=torch.device("cpu"))
    assert seen == {"calibration": torch.device("cpu"), "solve": "cpu", "params": {torch.device("cpu")}}
