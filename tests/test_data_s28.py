"""Calibration data and `hf-mudsc inspect` after the session-28 bug hunt: slices past the end, files that cannot be
parsed when sliced, TSV quotes, masks of another shape, labels in dict batches, a hostile folder's strings."""

from __future__ import annotations

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from factories import make_model

import hf_mudsc
from hf_mudsc.calibrate.datasets import load_calibration_dataset
from hf_mudsc.errors import CalibrationError

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("cut", ["[100:200]", "[20:]", "[12:]"])
def test_a_slice_beyond_the_end_of_a_saved_folder_is_an_empty_split_not_an_index_error(tmp_path, cut):
    """`./saved:train[100:200]` of a 12-row folder ended in datasets' `IndexError` traceback."""
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(12)]}).save_to_disk(tmp_path / "saved")
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(f"{tmp_path / 'saved'}:train{cut}")
    message = str(caught.value)
    assert "\n" not in message and "0 rows" in message, message
    assert len(load_calibration_dataset(f"{tmp_path / 'saved'}:train[10:]")) == 2


@pytest.mark.parametrize(("content", "needle"), [(b"text,label\ncaf\xe9 au lait,1\nthe end,0\n", "is not UTF-8 text"),
                                                 (b'text,label\n"unclosed,1\nmore,0\n', "cannot be read")])
def test_a_sliced_data_file_that_cannot_be_parsed_is_one_line(tmp_path, content, needle):
    """A slice loads the file whole (no streaming): its parse error came back as datasets' DatasetGenerationError
    traceback; unsliced, the same file got one line."""
    path = tmp_path / "texts.csv"
    path.write_bytes(content)
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(f"{path}:train[:2]")
    message = str(caught.value)
    assert "\n" not in message and needle in message, message


def test_a_tsv_reads_double_quotes_as_text(tmp_path):
    """TSV has no quoting: `"Yes," he said` lost its quotes and a lone `"` joined the next rows into one."""
    lines = ["text\tlabel", '"Yes," he said\t1', "w1 w2 w3\t0", '"a quote\t1', "w4 w5\t0", 'w6 w7" end\t1']
    path = tmp_path / "quotes.tsv"
    path.write_text("\n".join(lines) + "\n")
    rows = list(load_calibration_dataset(str(path)))
    assert [row["text"] for row in rows] == ['"Yes," he said', "w1 w2 w3", '"a quote', "w4 w5", 'w6 w7" end']


def test_an_attention_mask_of_another_shape_than_the_input_ids_is_refused():
    """A mask shorter than the ids was dropped as no mask: padding was read as tokens, without a word."""
    a, b = make_model("bert_cls", 1), make_model("bert_cls", 2)
    ids = torch.randint(5, 50, (8, 8))
    batches = [{"input_ids": ids, "attention_mask": torch.ones(8, 4, dtype=torch.long)}]
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", progress=False)
    message = str(caught.value)
    assert "\n" not in message and "attention_mask has shape (8, 4) but input_ids (8, 8)" in message, message


def test_labels_in_dict_batches_are_not_fed_to_the_parents():
    """A DataLoader over labelled data yields `labels`: they were passed to the parents, which computed a loss on
    every forward and failed on labels outside their classes (`Target 3 is out of bounds`)."""
    a, b = make_model("vit_cls", 1), make_model("vit_cls", 2)  # 3 classes each
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.randn(8, 1, 16, 16, generator=generator) for _ in range(2)]
    labelled = [{"pixel_values": p, "labels": torch.arange(8) % 10} for p in pixels]
    plain = [{"pixel_values": p} for p in pixels]
    merged = hf_mudsc.merge([a, b], labelled, method="mudsc", refit="none", progress=False)
    expected = hf_mudsc.merge([a, b], plain, method="mudsc", refit="none", progress=False)
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.state_dict().items())


@pytest.fixture(scope="module")
def merged_folder(tmp_path_factory):
    from factories import vit_cli_case

    from hf_mudsc.cli.main import main

    root = tmp_path_factory.mktemp("inspect_s28")
    parents, calibration = vit_cli_case(root)
    assert main(["merge", *parents, "--calibration", calibration, "--output", str(root / "merged"), "-q"]) == 0
    return root / "merged"


def _edited(merged_folder, tmp_path, edit):
    folder = tmp_path / "copy"
    shutil.copytree(merged_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["mudsc"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_inspect_shows_a_hostile_folders_control_characters_escaped(merged_folder, tmp_path, capsys):
    """A downloaded folder naming a parent `org/a\\x1b[2J...` cleared the screen, and one holding a newline printed a
    forged line of its own (`joint accuracy ... merged 0.990`)."""
    from hf_mudsc.cli.main import main

    def edit(mudsc):
        mudsc["parents"] = ["org/a\x1b[2J\x1b]0;owned\x07", "org/b\n  joint accuracy: merged 0.990\u202e"]

    folder = _edited(merged_folder, tmp_path, edit)
    capsys.readouterr()
    assert main(["inspect", str(folder), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "org/a\\x1b[2J\\x1b]0;owned\\x07" in out, out
    assert not any(line.lstrip().startswith("joint accuracy: merged 0.990") for line in out.splitlines()), out
    assert "org/b\\n  joint accuracy: merged 0.990\\u202e" in out


def test_inspect_names_the_file_when_a_number_field_holds_text(merged_folder, tmp_path, capsys):
    """`weight_distance: "n/a"` gave `could not convert string to float: 'n/a'`, naming neither file nor fix."""
    from hf_mudsc.cli.main import main

    def edit(mudsc):
        mudsc["parent_relation"] = {"relation": "independent", "weight_distance": "n/a"}

    folder = _edited(merged_folder, tmp_path, edit)
    capsys.readouterr()
    assert main(["inspect", str(folder), "--no-plots"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and "n/a" in err, err


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_an_image_column_declared_16_or_8_bit_is_read_at_that_depth_for_every_image(tmp_path, dtype):
    """`datasets` hands uint16 array rows back as Python ints, and each image's own range decided its bit depth: a
    dark 16-bit frame (200) was read as 8-bit and came out brighter than a bright one (20000)."""
    from transformers import ViTConfig, ViTImageProcessor

    from hf_mudsc.calibrate.datasets import resolve_calibration

    values = (200, 20000) if dtype == np.uint16 else (20, 200)
    data = datasets.Dataset.from_dict({"image": [np.full((16, 16), v, dtype) for v in values]})
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    config = ViTConfig(image_size=16, patch_size=8, num_channels=1)
    batch = next(resolve_calibration(data, processor, model_config=config, shuffle=False).batches(2))
    scale = 257 if dtype == np.uint16 else 1
    expected = [(round(v / scale) / 255 - 0.5) / 0.5 for v in values]
    assert batch["pixel_values"].mean(dim=(1, 2, 3)).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("as_tensors", [False, True])
def test_unpadded_token_lists_are_named_as_rows_that_do_not_stack(as_tensors):
    """Invariance bug hunt s29: a dict batch of unpadded Python lists (a tokenizer called without padding) was refused
    as holding "no input column the models read" — although input_ids is one — while the same rows as tensors were
    named right. Both: the rows' shapes, which do not stack, and the fix (pad them)."""
    rows = [[2, 7, 9, 3], [2, 5, 3]]
    batch = {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
    if as_tensors:
        batch = {key: [torch.tensor(row) for row in value] for key, value in batch.items()}
    with pytest.raises(CalibrationError) as error:
        hf_mudsc.merge([make_model("bert_cls", 1), make_model("bert_cls", 2)], [batch], method="zipit", refit="none",
                       progress=False)
    said = str(error.value)
    assert "(4,) and (3,), which do not stack into one batch" in said and "pad them" in said, said
    assert "no input column" not in said and "\n" not in said
