"""The README's "Same-base merging" examples run as printed (offline), in Python and on the command line, and give
the merges they say they give."""

from __future__ import annotations

import shlex

import torch
from readme_examples import readme_blocks, readme_example
from safetensors.torch import load_file

import hf_mudsc
from hf_mudsc.cli.main import main


def test_the_readme_same_base_examples_run_and_give_what_they_say(tmp_path, monkeypatch):
    python = readme_example("same-base")
    commands = [line for block in readme_blocks("bash") for line in block.splitlines()
                if line.startswith("hf-mudsc merge tuned-0 tuned-1 tuned-2")]
    assert len(commands) == 3
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_same_base"}
    exec(compile(python, "README.md (same-base example)", "exec"), scope)

    parents = [load_file(tmp_path / f"tuned-{i}" / "model.safetensors") for i in range(3)]
    base = load_file(tmp_path / "base" / "model.safetensors")
    key = "bert.encoder.layer.0.attention.self.query.weight"

    # linear with weights [2, 1, 1]: the weighted mean, normalised by the weights.
    soup = scope["soup"].state_dict()
    assert torch.allclose(soup[key], (2 * parents[0][key] + parents[1][key] + parents[2][key]) / 4, atol=1e-6)
    # task arithmetic with scaling 0.5: base + 0.5 * the summed task vectors.
    tv = scope["tv"].state_dict()
    assert torch.allclose(tv[key], base[key] + 0.5 * sum(p[key] - base[key] for p in parents), atol=1e-6)
    # layer_swap "1:1": block 1 from parent 1, block 0 from parent 0.
    swapped = scope["swapped"].state_dict()
    block1 = key.replace("layer.0", "layer.1")
    assert torch.equal(swapped[block1], parents[1][block1]) and torch.equal(swapped[key], parents[0][key])
    # slerp's layer gradient [0, 0.5, 1]: the first block at t=0 (parent 0), the last at t=1 (parent 1), the
    # embeddings at the list's first value (parent 0).
    graded = scope["graded"].state_dict()
    last = key.replace("layer.0", f"layer.{scope['graded'].config.num_hidden_layers - 1}")
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert torch.allclose(graded[key], parents[0][key], atol=1e-6)
    assert torch.allclose(graded[last], parents[1][last], atol=1e-6)
    assert torch.allclose(graded[embeddings], parents[0][embeddings], atol=1e-6)
    assert not torch.allclose(parents[0][last], parents[1][last], atol=1e-6)
    for name in ("ties", "dare", "regmean", "fisher", "slerped"):
        merged = scope[name]
        assert merged.config.mudsc["method"] == {"dare": "dare_ties", "slerped": "slerp"}.get(name, name)
        assert not any(torch.equal(merged.state_dict()[key], p[key]) for p in parents), name

    card = (tmp_path / "tuned-ties" / "README.md").read_text()  # local folders: in the table, not in base_model
    for row in ("| A | `tuned-0` (local folder) |", "| C | `tuned-2` (local folder) |",
                "| base | `base` (local folder) |", "| Method | `ties` ", "| Density | 0.5 |"):
        assert row in card, row

    for command in commands:
        assert main(shlex.split(command)[1:]) == 0, command
    cli = load_file(tmp_path / "tuned-ties-cli" / "model.safetensors")
    api = load_file(tmp_path / "tuned-ties" / "model.safetensors")
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in api)
    regmean_cli = load_file(tmp_path / "tuned-regmean-cli" / "model.safetensors")
    regmean_api = scope["regmean"].state_dict()
    assert all(torch.allclose(regmean_cli[k], regmean_api[k], atol=1e-6) for k in regmean_cli)
    dare_cli = load_file(tmp_path / "tuned-dare-cli" / "model.safetensors")
    assert not torch.equal(dare_cli[key], scope["dare"].state_dict()[key])  # other weights (1 1 2): other merge


def test_the_readme_default_for_two_fine_tunes_runs_and_is_regmean_then_the_refit(tmp_path, monkeypatch, capsys):
    """README "Same-base merging": the default merge of two and of three fine-tunes given data (regmean, then the
    refit) and of two weighted unequally (regmean alone), printed as it says."""
    setup = readme_example("same-base")
    python = readme_example("default-same-base")
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_same_base"}
    exec(compile(setup, "README.md (same-base example)", "exec"), scope)
    capsys.readouterr()
    exec(compile(python, "README.md (same-base default)", "exec"), scope)
    assert capsys.readouterr().out == "regmean gate\nregmean gate\nregmean none\n"
    assert scope["three"].merge_report.refit is not None and scope["weighted"].merge_report.refit is None
    default = scope["default"]
    assert default.merge_report.refit is not None and default.merge_report.refit.head_kept is False  # one label set
    plain = hf_mudsc.merge(scope["parents"][:2], scope["calibration"], batch_size=8, refit="none")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    # the gate's refit changed the regmean merge if it kept it, else the merge is regmean's
    kept = default.config.mudsc["refit_gate"]["kept"]
    assert torch.equal(default.state_dict()[key], plain.state_dict()[key]) is not kept
