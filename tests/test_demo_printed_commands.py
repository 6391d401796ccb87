"""The commands `hf-mudsc demo` prints at its end (`hf-mudsc inspect ...`, the recipe re-run) work when pasted into
the shell it ran in, whatever `--output` was given: they named the output folder by its last part only, so with
`--output runs/demo` or an absolute path elsewhere they pointed at a folder that does not exist."""

from __future__ import annotations

import re
import shlex

import pytest
import torch

from hf_mudsc.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def printed_commands(text: str) -> list[str]:
    """The `hf-mudsc ...` commands the demo printed between backquotes (an env assignment before one dropped)."""
    commands = [command for command in re.findall(r"`([^`]*hf-mudsc [^`]*)`", text)]
    return [re.sub(r"^(\w+=\S+\s+)+", "", command) for command in commands]


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_the_commands_the_demo_prints_run_from_where_it_ran(tmp_path, monkeypatch, capsys, where):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    output = "runs/my demo" if where == "relative" else str(tmp_path / "elsewhere" / "my demo")
    argv = ["demo", "--output", output, "--hidden-size", "8", "--epochs", "1", "--num-samples", "64",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    commands = printed_commands(capsys.readouterr().out)
    assert [shlex.split(c)[1] for c in commands] == ["inspect", "merge"], commands

    inspect, rerun = (shlex.split(c)[1:] for c in commands)
    assert main([*inspect, "--no-plots"]) == 0
    assert "Merged model" in capsys.readouterr().out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the printed OMP_NUM_THREADS=1
    try:
        assert main(rerun) == 0
    finally:
        torch.set_num_threads(threads)
    written = (work / output if where == "relative" else tmp_path / "elsewhere" / "my demo") / "model.safetensors"
    assert (work / "merged" / "model.safetensors").read_bytes() == written.read_bytes()


def test_num_samples_beyond_the_calibration_set_prints_the_count_used(tmp_path, monkeypatch, capsys, caplog):
    """QA s19: `--num-samples 100000` printed "(100000 calibration images)" while the merge used the 1258 the set
    holds (config and card said 1258). Now the printout, the recipe and the card say the count used, and one warning
    names the option."""
    import json
    import logging

    import yaml

    monkeypatch.setattr("hf_mudsc.cli.demo.demo_methods", lambda: [("mudsc (zip)", {"method": "mudsc"})])
    output = tmp_path / "d"
    argv = ["demo", "--output", str(output), "--hidden-size", "8", "--epochs", "1", "--num-samples", "100000",
            "--cache-dir", str(tmp_path / "cache")]
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        assert main(argv) == 0
    used = json.loads((output / "config.json").read_text())["mudsc"]["num_calibration_samples"]
    assert 0 < used < 100000
    out = capsys.readouterr().out
    assert f"({used} calibration images" in out and "100000" not in out.split("Accuracy")[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "100000" in r.getMessage()]
    assert len(warnings) == 1 and "--num-samples" in warnings[0] and str(used) in warnings[0], warnings
    assert yaml.safe_load((output / "mudsc_recipe.yaml").read_text())["num_samples"] == used
    # `demo --help` says how many the set holds (it did not), and that is the count a merge used.
    from hf_mudsc.cli.demo import CALIBRATION_IMAGES

    assert used == CALIBRATION_IMAGES
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"the set holds {CALIBRATION_IMAGES}" in " ".join(capsys.readouterr().out.split())
