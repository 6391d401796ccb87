"""Bad calibration data and bad parents reported in one line before heavy work (API and CLI)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from factories import make_model

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.errors import CalibrationError


def save_empty_split(folder: Path, as_dict: bool) -> Path:
    features = datasets.Features({"pixel_values": datasets.Array3D(shape=(1, 16, 16), dtype="float32")})
    empty = datasets.Dataset.from_dict({"pixel_values": np.zeros((0, 1, 16, 16), np.float32)}, features=features)
    if as_dict:
        full = datasets.Dataset.from_dict({"pixel_values": np.zeros((2, 1, 16, 16), np.float32)}, features=features)
        datasets.DatasetDict({"train": full, "test": empty}).save_to_disk(str(folder))
    else:
        empty.save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("as_dict", [False, True])
def test_empty_saved_split_is_refused_before_the_parents_load(tmp_path, monkeypatch, as_dict):
    folder = save_empty_split(tmp_path / "empty", as_dict)
    spec = f"{folder}:test" if as_dict else str(folder)
    import hf_mudsc.load.parents as loading

    def no_parents(*args, **kwargs):
        raise AssertionError("parents were loaded before the empty calibration split was reported")

    monkeypatch.setattr(loading, "load_parents", no_parents)
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], spec, method="zipit", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"calibration split {spec!r} is empty (0 rows)" in message
    assert "pass a split that holds examples" in message


def test_empty_in_memory_dataset_is_refused():
    features = datasets.Features({"pixel_values": datasets.Array3D(shape=(1, 16, 16), dtype="float32")})
    empty = datasets.Dataset.from_dict({"pixel_values": np.zeros((0, 1, 16, 16), np.float32)}, features=features)
    with pytest.raises(CalibrationError, match=r"calibration split 'dataset' is empty \(0 rows\)"):
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], empty, method="zipit", progress=False)


def test_cli_reports_an_empty_split_in_one_line(tmp_path, capsys):
    folder = save_empty_split(tmp_path / "empty", as_dict=False)
    parents = []
    for seed in (0, 1):
        make_model("vit_cls", seed).save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    code = main(["merge", *parents, "--calibration", str(folder), "--method", "zipit", "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hf-mudsc merge: error:")]
    assert len(lines) == 1 and "is empty (0 rows)" in lines[0]
    assert not (tmp_path / "out").exists()


def stream_refusal(bad_rows: dict[int, dict]) -> str:
    """The one-line refusal of a zipit merge of two tiny ViTs calibrated on 64 streamed rows, in batches of 16, whose
    rows at `bad_rows`' indices are replaced by the given rows (the others: one 16x16 image each)."""
    import torch

    def rows():
        for index in range(64):
            yield bad_rows.get(index) or {"pixel_values": torch.randn(1, 16, 16)}

    stream = datasets.IterableDataset.from_generator(rows).with_format("torch")
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([make_model("vit_cls", 0), make_model("vit_cls", 1)], stream, method="zipit", batch_size=16,
                       progress=False)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("bad", ["shape", "missing"])
def test_a_bad_row_mid_stream_is_refused_in_one_line_naming_the_column(bad):
    """QA s20: one row of another shape (or without the column) in a streamed calibration set crashed with torch's
    traceback ("stack expects each tensor to be equal size", "expected Tensor as element 3 ... got NoneType")."""
    import torch

    row = {"pixel_values": torch.randn(3, 5, 5)} if bad == "shape" else {"input_ids": torch.ones(4, dtype=torch.long)}
    message = stream_refusal({35: row})
    assert "'pixel_values'" in message and "rows 33-48" in message, message
    assert ("(1, 16, 16) and (3, 5, 5)" in message) if bad == "shape" else ("row 36 (of rows 33-48) has no value"
                                                                          in message), message


def test_a_batch_mid_stream_without_the_models_input_names_its_columns():
    """QA s20: a streamed batch none of whose rows holds the model's input said "calibration batch has no tensor column
    (columns: [])": the batch has columns, just not the one the model reads."""
    import torch

    message = stream_refusal({index: {"input_ids": torch.ones(4, dtype=torch.long)} for index in range(32, 48)})
    assert "rows 33-48" in message and "input_ids" in message and "pixel_values" in message, message
