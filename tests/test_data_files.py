"""Reading calibration / evaluation data files as `datasets` would: TSV, split slices of saved datasets, 16-bit
images, image structs in parquet (an outside QA pass, session 22)."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessor

from hf_mudsc.calibrate.datasets import load_calibration_dataset, resolve_calibration
from hf_mudsc.errors import CalibrationError

VIT = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
                patch_size=4)


def vit_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def test_a_tsv_file_is_read_with_the_tab_separator(tmp_path):
    """`.tsv` went to the csv builder with its default ',' separator: text with commas was split into columns."""
    path = tmp_path / "pairs.tsv"
    path.write_text("text\tlabel\nthe cat sat, on the mat\t0\na good movie, very good\t1\n")
    rows = list(load_calibration_dataset(str(path), streaming=False))
    assert rows == [{"text": "the cat sat, on the mat", "label": 0}, {"text": "a good movie, very good", "label": 1}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved plain Dataset and a saved DatasetDict of 40 rows each (`row` = the row's index)."""
    root = tmp_path_factory.mktemp("saved")
    rows = datasets.Dataset.from_dict({"pixel_values": [[float(i)] for i in range(40)], "row": list(range(40))})
    rows.save_to_disk(str(root / "plain"))
    datasets.DatasetDict({"train": rows, "test": rows.select(range(10))}).save_to_disk(str(root / "splits"))
    return root


@pytest.mark.parametrize("split,expected", [("train[:8]", list(range(8))), ("train[5:9]", [5, 6, 7, 8]),
                                            ("train[-3:]", [37, 38, 39]), ("train[:25%]", list(range(10))),
                                            ("test[50%:]", list(range(5, 10)))])
def test_a_slice_of_a_saved_dataset_dict_is_applied_as_datasets_applies_it(saved, split, expected):
    data = load_calibration_dataset(f"{saved / 'splits'}:{split}")
    assert data["row"] == expected


def test_a_saved_plain_dataset_is_split_train_and_takes_its_slice(saved):
    """A saved Dataset has no splits: `plain:train[:8]` read all 40 rows and was recorded as `train[:8]`, and
    `plain:no_such_split` read them all too. Its rows are split `train` (as `datasets` names a data file's), sliced."""
    assert load_calibration_dataset(f"{saved / 'plain'}:train[:8]")["row"] == list(range(8))
    assert load_calibration_dataset(f"{saved / 'plain'}:train[-2:]")["row"] == [38, 39]
    assert load_calibration_dataset(f"{saved / 'plain'}:train[:10%]")["row"] == [0, 1, 2, 3]
    assert len(load_calibration_dataset(f"{saved / 'plain'}:train")) == 40
    for split in ("no_such_split", "test[:8]"):
        with pytest.raises(CalibrationError) as caught:
            load_calibration_dataset(f"{saved / 'plain'}:{split}")
        message = str(caught.value)
        assert "\n" not in message and "without splits (its rows are the split 'train')" in message, message
        assert f"drop the split ('{saved / 'plain'}')" in message, message


def test_the_split_a_saved_dataset_was_saved_from_names_it(tmp_path):
    """`load_dataset(..., split="test").save_to_disk(...)` keeps its split's name: `saved:test[:3]` is that split."""
    datasets.Dataset.from_dict({"row": list(range(10))}, split="test").save_to_disk(str(tmp_path / "test_split"))
    assert load_calibration_dataset(f"{tmp_path / 'test_split'}:test[:3]")["row"] == [0, 1, 2]
    with pytest.raises(CalibrationError, match="its rows are the split 'test'"):
        load_calibration_dataset(f"{tmp_path / 'test_split'}:train")


def test_a_slice_that_datasets_cannot_read_is_refused_in_one_line(saved):
    with pytest.raises(CalibrationError, match=r"the slice '\[1:2:3\]' cannot be read") as caught:
        load_calibration_dataset(f"{saved / 'splits'}:train[1:2:3]")
    assert "\n" not in str(caught.value)


def gradient(values: np.ndarray, mode_dtype: type) -> Image.Image:
    return Image.fromarray(values.astype(mode_dtype))


@pytest.mark.parametrize("dtype,scale", [(np.uint16, 1.0), (np.int32, 1.0), (np.float32, 1 / 65535)])
def test_16_bit_and_float_images_are_rescaled_to_8_bits_not_made_white(dtype, scale):
    """`convert("RGB")` clips I;16 / I / F images to 255: a 16-bit gradient became constant white."""
    values = np.linspace(1000, 60000, 256).reshape(16, 16) * scale
    image = gradient(values, dtype)
    assert image.mode in ("I;16", "I", "F")
    stream = resolve_calibration(datasets.Dataset.from_dict({"image": [image] * 2}), [vit_processor()],
                                 model_config=VIT)
    pixels = next(iter(stream))["pixel_values"]
    eight_bit = Image.fromarray(np.round(values / scale / 257).astype(np.uint8)).convert("RGB")
    expected = vit_processor()(images=[eight_bit], return_tensors="pt")["pixel_values"][0]
    assert float(pixels[0].std()) > 0.3
    assert float((pixels[0] - expected).abs().max()) <= 2 / 255 / 0.5 + 1e-6


def test_an_image_beyond_the_16_bit_range_is_refused_in_one_line():
    image = Image.fromarray(np.full((16, 16), 200_000, dtype=np.int32))
    stream = resolve_calibration(datasets.Dataset.from_dict({"image": [image]}), [vit_processor()], model_config=VIT)
    with pytest.raises(CalibrationError, match=r"mode 'I'.*200000") as caught:
        next(iter(stream))
    assert "\n" not in str(caught.value)


def test_image_structs_of_a_parquet_file_get_a_short_message_saying_to_cast_the_column(tmp_path):
    """pandas' export of an HF image dataset holds {'bytes', 'path'} structs: the message showed every byte (1.7 MB)."""
    import pandas as pd

    rng = np.random.default_rng(0)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    pd.DataFrame({"image": [{"bytes": png(), "path": f"{i}.png"} for i in range(4)]}).to_parquet(
        tmp_path / "calib.parquet")
    for streaming in (True, False):
        with pytest.raises(CalibrationError) as caught:
            next(iter(resolve_calibration(str(tmp_path / "calib.parquet"), [vit_processor()], model_config=VIT,
                                          streaming=streaming)))
        message = str(caught.value)
        assert len(message) < 500 and "\n" not in message, message[:1000]
        assert "datasets.Image()" in message and "'image'" in message, message


def test_an_image_processor_error_shows_the_value_truncated():
    """Any value a processor's error embeds is cut short in the message."""
    data = datasets.Dataset.from_dict({"image": [{"caption": "x" * 50_000}] * 2})
    stream = resolve_calibration(data, [vit_processor()], model_config=VIT)
    with pytest.raises(CalibrationError) as caught:
        next(iter(stream))
    assert len(str(caught.value)) < 1000, str(caught.value)[:2000]


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    from test_cli import save_parents_and_data

    return save_parents_and_data(tmp_path_factory.mktemp("parents"))


def test_messages_name_the_data_file_as_given(tmp_path, monkeypatch, caplog):
    """A header-only CSV was `calibration split 'calibration data' is empty`; a file spec was logged as
    `calibration from csv`."""
    import logging

    from hf_mudsc.calibrate.datasets import check_calibration_columns

    monkeypatch.chdir(tmp_path)
    Path("header.csv").write_text("text,label\n")
    with pytest.raises(CalibrationError, match=r"^calibration split './header.csv' is empty"):
        check_calibration_columns(load_calibration_dataset("./header.csv"))
    Path("rows.csv").write_text("pixel_values\n1.0\n2.0\n")
    with caplog.at_level(logging.INFO, logger="hf_mudsc.calibrate.datasets"):
        stream = resolve_calibration(load_calibration_dataset("./rows.csv"))
    assert stream.source == "./rows.csv" and "calibration from ./rows.csv: columns" in caplog.text, caplog.text


def test_a_split_choice_echoes_the_path_as_typed(parents, tmp_path, monkeypatch):
    import hf_mudsc

    a, b, _ = parents
    monkeypatch.chdir(tmp_path)
    rows = datasets.Dataset.from_dict({"pixel_values": [[[[0.0] * 16] * 16] * 3] * 2})
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk("split_data")
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([a, b], "./split_data", method="zipit", progress=False)
    assert str(caught.value) == ("calibration dataset './split_data' has several splits ['train', 'test']; name one "
                                 "as './split_data:<split>'")


def test_a_dataset_dict_object_is_told_to_pass_one_split():
    rows = datasets.Dataset.from_dict({"pixel_values": [[1.0]]})
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(datasets.DatasetDict({"train": rows, "test": rows}))
    assert "pass one of them, e.g. dataset['train']" in str(caught.value) and "<split>" not in str(caught.value)


def pair_tokenizer():
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the cat sat on mat a dog ran".split()]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


PAIRS = {"sentence1": ["the cat sat", "a dog ran"], "sentence2": ["on the mat", "the dog sat"], "label": [0, 1]}


def test_two_text_columns_are_tokenized_as_text_pairs():
    """MRPC-style `sentence1`/`sentence2`: `text_column="sentence1"` silently dropped segment B."""
    from transformers import BertConfig

    tok = pair_tokenizer()
    config = BertConfig(vocab_size=13, max_position_embeddings=24)
    expected = tok(PAIRS["sentence1"], PAIRS["sentence2"], padding=True, return_tensors="pt")
    for text_column in ("sentence1,sentence2", " sentence1 , sentence2", None):  # None: detected
        batch = next(iter(resolve_calibration(datasets.Dataset.from_dict(PAIRS), [tok], model_config=config,
                                              inputs=("input_ids",), text_column=text_column)))
        assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
        assert batch["token_type_ids"].tolist() == expected["token_type_ids"].tolist()
        assert batch["token_type_ids"].max() == 1


@pytest.mark.parametrize("columns,needle", [
    ({"sentence1": ["a"], "sentence2": ["a"], "premise": ["a"], "hypothesis": ["a"]}, "several text pair layouts"),
    ({"text": ["a"], "premise": ["a"], "hypothesis": ["a"]}, "both a text column .text. and the text pair"),
])
def test_an_ambiguous_text_layout_is_refused_naming_the_fix(columns, needle):
    with pytest.raises(CalibrationError, match=needle) as caught:
        resolve_calibration(datasets.Dataset.from_dict(columns), [pair_tokenizer()], inputs=("input_ids",))
    assert "text_column=" in str(caught.value) and "\n" not in str(caught.value)


def test_more_than_two_text_columns_are_refused():
    with pytest.raises(CalibrationError, match="one text column or two"):
        resolve_calibration(datasets.Dataset.from_dict(PAIRS), [pair_tokenizer()], inputs=("input_ids",),
                            text_column="sentence1,sentence2,label")


def test_one_segment_of_a_text_pair_is_read_with_a_warning(caplog):
    """`text_column="sentence1"` silently dropped `sentence2`: the user is told how to read both."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hf_mudsc.calibrate.datasets"):
        stream = resolve_calibration(datasets.Dataset.from_dict(PAIRS), [pair_tokenizer()], inputs=("input_ids",),
                                     text_column="sentence1")
    assert stream.dataset.column_names == ["sentence1"]
    assert "reads one segment of the text pairs 'sentence1,sentence2'" in caplog.text, caplog.text
    assert "text_column='sentence1,sentence2' (CLI: --text-column sentence1,sentence2)" in caplog.text, caplog.text


GRADIENT = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)


def pixels_of(column: list, processor: ViTImageProcessor | None = None, numpy: bool = False) -> torch.Tensor:
    dataset = datasets.Dataset.from_dict({"image": column})
    dataset = dataset.with_format("numpy") if numpy else dataset
    stream = resolve_calibration(dataset, [processor or vit_processor()], model_config=VIT)
    return next(iter(stream))["pixel_values"][0]


def expected_pixels(unit: np.ndarray) -> torch.Tensor:
    """What the processor makes of the 8-bit RGB image of `unit` (values in 0..1, H x W)."""
    image = Image.fromarray(np.round(unit * 255).astype(np.uint8)).convert("RGB")
    return vit_processor()(images=[image], return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("numpy_format", [False, True])
@pytest.mark.parametrize("name,array", [
    ("float 0..1, H x W x 3", np.repeat(GRADIENT[..., None], 3, axis=2)),
    ("float 0..1, 3 x H x W", np.repeat(GRADIENT[None], 3, axis=0)),
    ("float 0..1, H x W", GRADIENT),
    ("float 0..255, H x W x 3", np.repeat(GRADIENT[..., None], 3, axis=2) * 255),
    ("uint8, H x W", np.round(GRADIENT * 255).astype(np.uint8)),
    ("uint16 full range, H x W x 3", np.repeat(np.round(GRADIENT[..., None] * 255).astype(np.uint16) * 257, 3, 2)),
])
def test_images_given_as_arrays_are_read_by_the_rule_images_are_read_by(name, array, numpy_format):
    """Arrays are read like images of the same values: float pixels in 0..1 were rescaled by 1/255 again (a
    constant image, silently), grayscale arrays were refused, 16-bit arrays refused."""
    pixels = pixels_of([array] * 2, numpy=numpy_format)
    assert float(pixels.std()) > 0.3, name
    assert float((pixels - expected_pixels(GRADIENT)).abs().max()) <= 2 / 255 / 0.5 + 1e-6, name


def test_an_array_image_outside_every_pixel_range_is_refused_in_one_line():
    with pytest.raises(CalibrationError, match=r"column 'image'.*-3.*200") as caught:
        pixels_of([np.linspace(-3, 200, 256, dtype=np.float32).reshape(16, 16)] * 2)
    assert "\n" not in str(caught.value)


def test_a_processor_that_does_not_rescale_gets_float_arrays_as_given():
    """`do_rescale=False`: the processor expects pixels already in its range; an array is not touched."""
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  do_rescale=False)
    array = np.repeat(GRADIENT[..., None], 3, axis=2)
    pixels = pixels_of([array] * 2, processor)
    assert float((pixels - expected_pixels(GRADIENT)).abs().max()) <= 1e-5
