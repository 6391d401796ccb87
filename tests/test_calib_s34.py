"""Calibration data after the session-34 hunt (helper "calib"): DataLoaders and batches holding raw rows (PIL images,
text), and a streamed dataset whose connection drops mid-way. Each is refused in one line naming the real problem."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from factories import BERT, make_model
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BertTokenizer, ViTImageProcessor

import hf_mudsc
from hf_mudsc.calibrate.datasets import (
    RESHUFFLED,
    SamePasses,
    batch_digest,
    load_calibration_dataset,
    resolve_calibration,
)
from hf_mudsc.errors import CalibrationError

pytestmark = pytest.mark.usefixtures("one_thread_module")


def image_rows(count: int = 8) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(count)]
    return datasets.Dataset.from_dict({"image": pictures}).cast_column("image", datasets.Image())


def processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])


def bert_tokenizer() -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(BERT["vocab_size"] - 5)]
    return BertTokenizer(vocab={word: index for index, word in enumerate(words)})


def listed(rows: list[dict]) -> dict:
    """A collate_fn keeping raw values as lists (a DataLoader over raw rows cannot stack PIL images)."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert isinstance(caught.value, CalibrationError) and "\n" not in message, message
    return message


def test_an_unshuffled_dataloader_of_pil_images_is_not_called_reshuffling():
    """SamePasses(DataLoader(Dataset(image=PIL), shuffle=False, collate_fn=listed)).check_now() said 'another order'."""
    loader = DataLoader(image_rows(), batch_size=4, collate_fn=listed)
    SamePasses(loader).check_now()  # the same images each pass: their digests agree (not their object addresses)
    first = next(iter(loader))
    assert batch_digest(first) == batch_digest(next(iter(loader)))
    other = dict(first, image=[first["image"][1], first["image"][0], *first["image"][2:]])
    assert batch_digest(other) != batch_digest(first)  # and other images (or another order) still differ
    shuffled = DataLoader(image_rows(), batch_size=4, collate_fn=listed, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    with pytest.raises(CalibrationError, match="another order"):
        SamePasses(shuffled).check_now()


def test_raw_images_in_a_dataloader_are_refused_as_raw_data_not_as_reshuffled():
    """merge([vit, vit], DataLoader(Dataset(image=PIL), collate_fn=listed)) said 'a DataLoader with shuffle=True?'."""
    models = [make_model("vit_cls", 0), make_model("vit_cls", 1)]
    loader = DataLoader(image_rows(), batch_size=4, collate_fn=listed)
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(models, loader, method="mudsc", progress=False, processor=processor())
    message = one_line(caught)
    assert RESHUFFLED not in message and "'image'" in message and "datasets.Dataset" in message, message


def test_a_dataloader_that_cannot_collate_raw_images_is_one_line():
    """merge([vit, vit], DataLoader(Dataset(image=PIL), batch_size=4)) ended in default_collate's TypeError."""
    models = [make_model("vit_cls", 0), make_model("vit_cls", 1)]
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(models, DataLoader(image_rows(), batch_size=4), method="mudsc", progress=False,
                       processor=processor())
    message = one_line(caught)
    assert "collate" in message and "datasets.Dataset" in message, message


def test_raw_text_in_a_list_of_batches_names_the_dataset_as_the_fix():
    """merge([bert, bert], [{'text': [...]}]) said only 'provide preprocessed model inputs', not: a Dataset."""
    models = [make_model("bert_cls", 0), make_model("bert_cls", 1)]
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(models, [{"text": ["w1 w2", "w3"]}] * 2, method="mudsc", progress=False)
    message = one_line(caught)
    assert "'text'" in message and "datasets.Dataset" in message, message


def test_a_stream_whose_connection_drops_midway_says_so_not_to_fix_the_file():
    """A streamed split raising ConnectionError('Server Disconnected') at row 12 said 'fix or replace the data file'."""
    def rows():
        for index in range(20):
            if index == 12:
                raise ConnectionError("Server Disconnected")  # what datasets raises once its read retries run out
            yield {"image": Image.new("RGB", (20, 20), index)}

    stream = resolve_calibration(datasets.IterableDataset.from_generator(rows), [processor()],
                                 model_config=make_model("vit_cls").config, inputs=("pixel_values",))
    with pytest.raises(CalibrationError) as caught:
        list(stream.batches(4))
    message = one_line(caught)
    assert "connection" in message.lower() and "retry" in message and "fix or replace" not in message, message


def streamed(values: list) -> datasets.IterableDataset:
    """A stream declaring no features (as a generator or a JSON file streams): its image values are known only read."""
    def rows():
        for value in values:
            yield {"image": value}

    return datasets.IterableDataset.from_generator(rows)


@pytest.mark.parametrize(("values", "needle"), [
    ([[[1, 2, 3], [4, 5]]] * 4, "ragged"),
    (["photos/cat.png"] * 4, "datasets.Image()"),
])
def test_a_streamed_image_value_that_is_no_image_is_one_line_naming_the_fix(values, needle):
    """A stream of image=[[1,2,3],[4,5]] raised numpy's ValueError; image='x.png' dumped the processor's arrays."""
    stream = resolve_calibration(streamed(values), [processor()], model_config=make_model("vit_cls").config,
                                 inputs=("pixel_values",))
    with pytest.raises(CalibrationError) as caught:
        list(stream.batches(4))
    message = one_line(caught)
    assert needle in message and "'image'" in message and "array(" not in message, message


@pytest.mark.parametrize("saved", [True, False])
def test_a_slice_reaching_past_the_end_of_its_split_says_how_many_rows_it_gave(tmp_path, caplog, saved):
    """resolve_calibration('rows:train[95:200]') of a 100-row split read 5 rows without a word (105 asked)."""
    rows = datasets.Dataset.from_dict({"text": [f"w{index % 9 + 1} w2" for index in range(100)]})
    if saved:
        rows.save_to_disk(tmp_path / "rows")
        spec = f"{tmp_path / 'rows'}:train[95:200]"
    else:
        rows.to_csv(tmp_path / "rows.csv", index=False)
        spec = f"{tmp_path / 'rows.csv'}:train[95:200]"
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        loaded = load_calibration_dataset(spec)
    assert len(loaded) == 5
    said = [r.getMessage() for r in caplog.records if "[95:200]" in r.getMessage()]
    assert len(said) == 1 and "100 rows" in said[0] and "5" in said[0], caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        assert len(load_calibration_dataset(spec.replace("[95:200]", "[90:100]"))) == 10
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


@pytest.mark.parametrize("slice_", ["[5000:]", "[:0]"])
def test_a_slice_of_a_data_file_that_selects_no_row_is_refused_as_the_saved_one_is(tmp_path, slice_):
    """load_calibration_dataset('rows.csv:train[5000:]') said only 'Instruction ... corresponds to no data!'."""
    datasets.Dataset.from_dict({"text": ["w1 w2"] * 100}).to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(f"{tmp_path / 'rows.csv'}:train{slice_}")
    message = one_line(caught)
    assert "empty (0 rows)" in message and "100 rows" in message and "corresponds to no data" not in message, message


@pytest.mark.parametrize("formatted", [
    lambda data: data.with_format("numpy", columns=["label"]),  # set_format(columns=...) leaving the raw column out
    lambda data: data.with_format("arrow"),  # rows as pyarrow scalars: the text was called 'StringScalar, not text'
    lambda data: data.to_iterable_dataset().with_format("arrow"),  # a stream likewise
])
def test_a_formatted_dataset_is_read_with_its_raw_columns_as_python_values(formatted):
    """resolve_calibration(ds.with_format('numpy', columns=['label'])) crashed with KeyError 'text' when read."""
    tokenizer = bert_tokenizer()
    rows = datasets.Dataset.from_dict({"text": ["w1 w2", "w3 w4 w5"] * 4, "label": [0, 1] * 4})
    config = make_model("bert_cls").config
    plain = list(resolve_calibration(rows, [tokenizer], model_config=config).batches(4))
    read = list(resolve_calibration(formatted(rows), [tokenizer], model_config=config).batches(4))
    assert len(read) == len(plain) == 2
    assert all(torch.equal(a[key], b[key]) for a, b in zip(plain, read, strict=True) for key in a)


@pytest.mark.parametrize("named", ["text,text", "sentence1, sentence1"])
def test_a_text_pair_naming_one_column_twice_is_refused(named):
    """resolve_calibration(ds, text_column='text,text') read each text paired with itself ([CLS] t [SEP] t [SEP])."""
    rows = datasets.Dataset.from_dict({"text": ["w1 w2"] * 4, "sentence1": ["w1"] * 4, "sentence2": ["w2"] * 4})
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(rows, [bert_tokenizer()], text_column=named, inputs=("input_ids",))
    message = one_line(caught)
    assert "twice" in message and "text_column" in message, message


def test_the_cli_refuses_a_text_pair_naming_one_column_twice_before_opening_anything(tmp_path, capsys):
    """hf-mudsc merge a b --calibration x:train --text-column text,text went on to open the parents and the data."""
    from hf_mudsc.cli.main import main

    code = main(["merge", str(tmp_path / "missing-a"), str(tmp_path / "missing-b"), "--calibration", "x:train",
                 "--text-column", "text,text", "--output", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "twice" in err[0] and "--text-column" in err[0], err


def test_rows_of_token_ids_given_as_batches_are_refused_as_rows():
    """merge([bert, bert], [{'input_ids': tensor([2, 7, 8, 3])}] * 8) said only 'not enough values to unpack'."""
    models = [make_model("bert_cls", 0), make_model("bert_cls", 1)]
    rows = [{"input_ids": torch.tensor([2, 7, 8, 3]), "attention_mask": torch.ones(4, dtype=torch.long)}] * 8
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(models, rows, method="mudsc", progress=False)
    message = one_line(caught)
    assert "(4,)" in message and "(batch, tokens)" in message and "unpack" not in message, message


def test_a_datasetdict_without_splits_is_refused_as_empty():
    """resolve_calibration(datasets.DatasetDict()) said 'pass one of them, e.g. dataset['train']' of its 0 splits."""
    with pytest.raises(CalibrationError) as caught:
        resolve_calibration(datasets.DatasetDict(), [bert_tokenizer()])
    message = one_line(caught)
    assert "no split" in message and "pass one of them" not in message, message


def test_an_arrow_stream_without_declared_features_is_checked_as_plain_rows():
    """(review) check_calibration_columns(IterableDataset.from_generator(gen).with_format("arrow")): refused in
    several lines ("lacks column(s) ['input_ids'] ... found columns [<pyarrow.lib.ChunkedArray ...") though its rows
    hold raw text a tokenizer reads; the check now reads the rows as plain values, as the merge does."""
    from hf_mudsc.calibrate.datasets import check_calibration_columns

    def rows():
        for i in range(8):
            yield {"text": f"w{i} w{i + 1}", "label": i % 2}

    stream = datasets.IterableDataset.from_generator(rows).with_format("arrow")
    config = make_model("bert_cls").config
    check_calibration_columns(stream, [bert_tokenizer()], inputs=("input_ids",), model_config=config)
