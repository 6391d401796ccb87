"""Which data a calibration spec names: a bare name (`mnist:train`) is a Hub dataset or a datasets builder, a local
path must look like one (`./mnist:train`). A bare name that is also a folder or file of the working directory is
ambiguous — `datasets` would read the folder first — and refused in one line naming both spellings, by the API, the
CLI and a dry run alike, before any weights are loaded; `name@revision` is the Hub dataset, never the folder."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from test_cli import save_parents_and_data

import hf_mudsc
from hf_mudsc.calibrate.dataset_spec import DatasetSpec
from hf_mudsc.calibrate.datasets import load_calibration_dataset
from hf_mudsc.cli.main import main
from hf_mudsc.errors import CalibrationError


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """The working directory holding two parents and a saved dataset folder named like a Hub dataset (`mnist`)."""
    a, b, calibration = save_parents_and_data(tmp_path)
    calibration.rename(tmp_path / "mnist")
    monkeypatch.chdir(tmp_path)
    return a, b


def _no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the calibration spec was checked")

    monkeypatch.setattr("hf_mudsc.load.parents.load_parents", refuse)


AMBIGUOUS = ("calibration spec 'mnist:train' is ambiguous: 'mnist' is a Hub dataset name and also a folder in the "
             "working directory; write './mnist:train' to read the folder, or 'mnist@main:train' for the Hub dataset")


def test_a_bare_name_that_is_also_a_folder_here_is_refused_naming_both_spellings(workdir, tmp_path):
    with pytest.raises(CalibrationError) as caught:
        DatasetSpec.parse("mnist:train")
    assert str(caught.value) == AMBIGUOUS
    with pytest.raises(CalibrationError, match="is ambiguous"):
        DatasetSpec.parse("mnist")  # no split: the same name
    assert DatasetSpec.parse("./mnist:train") == DatasetSpec(path="./mnist", split="train")
    assert DatasetSpec.parse("mnist@main:train") == DatasetSpec(path="mnist", split="train", revision="main")
    # datasets reads its packaged builders by name before any folder: not ambiguous
    (tmp_path / "imagefolder").mkdir()
    assert DatasetSpec.parse("imagefolder:train") == DatasetSpec(path="imagefolder", split="train")


def test_a_path_object_is_local_data_never_a_hub_name(workdir, tmp_path):
    """QA s24: `merge(..., pathlib.Path("./mnist"))` was refused as ambiguous with advice to write './mnist', which a
    Path cannot keep (it normalises to 'mnist'). A Path is never a Hub id: it names the folder."""
    a, b = workdir
    assert DatasetSpec.parse(Path("./mnist")) == DatasetSpec(path="./mnist")
    assert DatasetSpec.parse(Path("mnist")) == DatasetSpec(path="./mnist")
    assert DatasetSpec.parse(tmp_path / "mnist") == DatasetSpec(path=str(tmp_path / "mnist"))
    merged = hf_mudsc.merge([str(a), str(b)], Path("./mnist"), method="zipit", refit="none", num_samples=8,
                            progress=False)
    assert merged.config.mudsc["num_calibration_samples"] == 8


def test_the_api_the_cli_and_a_dry_run_refuse_it_alike_before_weights(workdir, tmp_path, monkeypatch, capsys):
    a, b = workdir
    _no_weights(monkeypatch)
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([str(a), str(b)], "mnist:train", method="zipit")
    assert str(caught.value) == AMBIGUOUS
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        code = main(["merge", str(a), str(b), "--calibration", "mnist:train", "--method", "zipit", "--output",
                     str(out), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.endswith(AMBIGUOUS) and len(err.splitlines()) == 1, err  # with the options
        assert not out.exists()


def test_the_folder_written_as_a_path_is_read(workdir):
    data = load_calibration_dataset("./mnist:train")
    assert isinstance(data, datasets.Dataset) and len(data) == 32


def test_a_revision_names_the_hub_dataset_never_the_folder(workdir, monkeypatch):
    """Offline the Hub cannot provide it: refused as not found, and the folder `mnist` was not read instead."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(CalibrationError, match="'mnist@main:train' not found"):
        load_calibration_dataset("mnist@main:train")


def test_a_bare_data_file_name_looks_like_a_path_and_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert len(load_calibration_dataset("rows.jsonl:train", streaming=False)) == 2
