"""A local input that does not exist — a parent folder, the calibration data, an evaluation dataset — is named in one
line with exit 2 (an invalid command line) before anything is loaded: it took 15-20 s (torch, transformers, the
other parents) to be told one at a time, with exit 1."""

from __future__ import annotations

import pytest
from cli_runs import run_cli

from hf_mudsc.calibrate.dataset_spec import missing_local_data


@pytest.mark.parametrize(("spec", "missing"), [
    ("./gone", "./gone"), ("./gone:train", "./gone"), ("~/gone-hf-mudsc-test:c:test[:10]", "~/gone-hf-mudsc-test"),
    ("/no/such/dir:test", "/no/such/dir"), ("rows.jsonl", "rows.jsonl"), ("a/b/c:train", "a/b/c"),
    ("org/name:train", None), ("mnist:test", None), ("imagefolder", None), ("org/ds@main:train", None),
    ("", None), ("a:b:c:d", None),
])
def test_a_spec_naming_local_data_that_is_not_there_is_found_by_its_shape(tmp_path, monkeypatch, spec, missing):
    monkeypatch.chdir(tmp_path)
    assert missing_local_data(spec) == missing


def test_an_existing_local_spec_is_not_missing(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert missing_local_data("./data:train") is None and missing_local_data(f"{tmp_path / 'data'}") is None


def test_merge_names_every_missing_local_input_before_loading(tmp_path, monkeypatch, capsys):
    (tmp_path / "vit-b").mkdir()
    (tmp_path / "vit-b" / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["merge", "./vit-a", "vit-b", "--calibration", "./gone:train", "--output", "m"], capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert "./vit-a" in err[0] and "./gone" in err[0] and "missing" in err[0] and "vit-b`" not in err[0], err
    assert not (tmp_path / "m").exists()


def test_evaluate_names_a_missing_local_dataset_before_loading(tmp_path, monkeypatch, capsys):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["evaluate", "m", "--dataset", "pets=./gone:test", "--dataset", "cars=org/cars:test"], capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert "'./gone'" in err[0] and "pets" in err[0] and "org/cars" not in err[0], err


def test_a_pickle_only_parent_is_not_told_to_pass_a_path_that_exists(tmp_path, monkeypatch, capsys):
    """README hunt s29: the one-line refusal of a pickle-only parent folder (it exists) ended with "pass paths that
    exist from this working directory"; that fix follows only an entry that is missing."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "pytorch_model.bin").write_bytes(b"\0")
    code, lines = run_cli(["merge", "./a", "./b", "--output", "out"], capsys)
    assert code == 2 and len(lines) == 1 and "--allow-pickle" in lines[0], lines
    assert "paths that exist" not in lines[0]
    code, lines = run_cli(["merge", "./a", "./gone", "--output", "out"], capsys)
    assert code == 2 and "--allow-pickle" in lines[0] and "pass paths that exist" in lines[0], lines
