"""Calibration data after the session-30 hunt: a processor disagreeing with its config, image rows that cannot be
read, DatasetDict and in-memory objects in the dry run, a vision folder with tokenizer files, mixed raw and
preprocessed columns, on-the-fly transforms, a DatasetDict's folder, a processor passed to merge()."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertTokenizerFast,
    CLIPImageProcessor,
    CLIPProcessor,
    CLIPTokenizerFast,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

import hf_mudsc
from hf_mudsc.calibrate.datasets import check_calibration_columns, dataset_folders, resolve_calibration
from hf_mudsc.errors import CalibrationError
from hf_mudsc.load.processors import image_processor_of, load_processor

pytestmark = pytest.mark.usefixtures("one_thread_module")

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
           patch_size=4, num_channels=1, num_labels=3)


def vit_processor(side: int = 16) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5], image_std=[0.5])


def images(count: int = 8, shape: tuple[int, ...] = (20, 20)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("vits")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = work / f"vit{seed}"
        ViTForImageClassification(ViTConfig(**VIT)).save_pretrained(folder)
        vit_processor().save_pretrained(folder)
        folders.append(str(folder))
    return folders


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert isinstance(caught.value, CalibrationError) and "\n" not in message, message
    return message


# 1: a processor disagreeing with the config, refused before weights, naming both settings
def test_an_image_processor_resizing_to_another_size_than_image_size_is_refused_before_reading():
    data = datasets.Dataset.from_dict({"image": images()})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [vit_processor(32)], inputs=("pixel_values",), model_config=ViTConfig(**VIT))
    message = one_line(caught)
    assert "32" in message and "image_size" in message and "16" in message, message
    assert "which are)" not in message, message
    check_calibration_columns(data, [vit_processor(16)], inputs=("pixel_values",), model_config=ViTConfig(**VIT))


def test_a_center_crop_to_image_size_is_what_the_model_reads():
    processor = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16})
    config = CLIPVisionConfig(image_size=16, patch_size=4, num_channels=3)
    data = datasets.Dataset.from_dict({"image": images(shape=(20, 20, 3))})
    check_calibration_columns(data, [processor], inputs=("pixel_values",), model_config=config)
    bad = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 18, "width": 18})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [bad], inputs=("pixel_values",), model_config=config)
    assert "crop_size" in one_line(caught) and "18" in str(caught.value)


def test_a_tokenizer_knowing_more_tokens_than_vocab_size_is_said_before_reading_and_refused_only_if_used(caplog):
    """Review s30: refusing such a tokenizer up front also refused text that never produces the extra ids (tokens
    added without resizing the embeddings), which merged before; it is said before reading, with the real fix, and a
    batch holding an id past vocab_size is refused with that fix (not "pass the tokenizer saved with the model")."""
    import logging

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(70)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(vocab_size=60)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        stream = resolve_calibration(datasets.Dataset.from_dict({"text": ["w1 w2", "w3"]}), [tokenizer],
                                     model_config=config, inputs=("input_ids",))
    said = [r.getMessage() for r in caplog.records if "vocab_size 60" in r.getMessage()]
    assert len(said) == 1 and "75 tokens" in said[0] and "resize_token_embeddings" in said[0], said
    assert next(iter(stream.batches(2)))["input_ids"].max() < 60  # text without the extra ids reads as before
    from hf_mudsc.calibrate.statistics import ModelInputCheck

    check = ModelInputCheck.of(config)
    check.preprocessed = ("input_ids",)
    batch = next(iter(resolve_calibration(datasets.Dataset.from_dict({"text": ["w69"]}), [tokenizer],
                                          model_config=config, inputs=("input_ids",)).batches(1)))
    with pytest.raises(CalibrationError) as caught:
        check(batch)
    message = one_line(caught)
    assert "resize_token_embeddings" in message and "which is)" not in message, message


def test_the_processor_disagreeing_with_the_config_is_refused_by_the_dry_run(tmp_path):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"vit{seed}"
        ViTForImageClassification(ViTConfig(**VIT)).save_pretrained(folder)
        vit_processor(32).save_pretrained(folder)
        folders.append(str(folder))
    with pytest.raises(CalibrationError, match="image_size"):
        hf_mudsc.merge(folders, datasets.Dataset.from_dict({"image": images()}), method="mudsc", progress=False,
                       dry_run=True)


# 2: image rows that cannot be read
@pytest.mark.parametrize("bad", [None, Image.new("LAB", (16, 16), (50, 10, 20))], ids=["none", "lab"])
def test_an_image_row_that_cannot_be_read_is_one_line_naming_the_column_and_the_fix(bad):
    data = datasets.Dataset.from_dict({"image": [Image.new("L", (16, 16), 7), bad]},
                                      features=datasets.Features({"image": datasets.Image()}))
    stream = resolve_calibration(data, [vit_processor()], model_config=ViTConfig(**VIT), inputs=("pixel_values",))
    with pytest.raises(CalibrationError) as caught:
        next(iter(stream.batches(2)))
    message = one_line(caught)
    assert "'image'" in message and "Dataset.filter" in message, message


# 3: DatasetDict and in-memory objects: checked before weights, and by the dry run
@pytest.mark.parametrize("kind", ["two splits", "one split without images"])
def test_a_datasetdict_is_checked_before_weights(kind):
    images_ = datasets.Dataset.from_dict({"image": images()})
    data = (datasets.DatasetDict({"train": images_, "test": images_}) if kind == "two splits"
            else datasets.DatasetDict({"train": datasets.Dataset.from_dict({"caption": ["a"] * 4})}))
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [vit_processor()], inputs=("pixel_values",), model_config=ViTConfig(**VIT))
    one_line(caught)


def test_the_dry_run_checks_datasetdict_and_iterable_objects(vit_folders):
    no_image = datasets.Dataset.from_dict({"caption": ["a"] * 8})
    for data in (datasets.DatasetDict({"train": no_image}), no_image.to_iterable_dataset()):
        with pytest.raises(CalibrationError, match="caption"):
            hf_mudsc.merge(vit_folders, data, method="mudsc", dry_run=True, progress=False)
    plan = hf_mudsc.merge(vit_folders, datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images()})}),
                          method="mudsc", dry_run=True, progress=False)
    assert "not downloaded" not in str(plan), str(plan)


# 4: a vision folder with tokenizer files keeps its image processor
def test_a_vision_folder_with_tokenizer_files_loads_its_image_processor(tmp_path):
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "!"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path / f"vision{seed}"
        CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=40, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=56, image_size=16, patch_size=4,
                                                       projection_dim=24)).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
        CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"),
                          merges_file=str(tmp_path / "merges.txt")).save_pretrained(folder)
        folders.append(str(folder))
    assert image_processor_of(load_processor(folders[0])) is not None
    merged = hf_mudsc.merge(folders, datasets.Dataset.from_dict({"image": images(16, (20, 20, 3))}), method="mudsc",
                            refit="none", progress=False)
    hf_mudsc.save_merged(merged, tmp_path / "merged")
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()


# 5: one input preprocessed, the other raw
def test_mixed_raw_and_preprocessed_columns_are_read_each_as_it_is(tmp_path):
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "!"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    from transformers import CLIPConfig
    config = CLIPConfig(text_config={"vocab_size": 5, "max_position_embeddings": 16},
                        vision_config={"image_size": 16, "patch_size": 4})
    raw = images(4, (20, 20, 3))
    encoded = tokenizer(["a b", "a", "b b a", "a a"], padding=True)
    pixels = image_processor(raw, return_tensors="np")["pixel_values"]
    for columns in ({"image": raw, "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]},
                    {"pixel_values": pixels.tolist(), "text": ["a b", "a", "b", "a"]}):
        stream = resolve_calibration(datasets.Dataset.from_dict(columns), [processor], model_config=config,
                                     inputs=("pixel_values", "input_ids"))
        batch = next(iter(stream.batches(4)))
        assert tuple(batch["pixel_values"].shape) == (4, 3, 16, 16) and batch["input_ids"].shape[0] == 4, batch
        if "input_ids" in columns:
            assert batch["input_ids"].tolist() == encoded["input_ids"]
        else:
            assert torch.allclose(batch["pixel_values"], torch.as_tensor(pixels))


# 6: an on-the-fly transform
def test_a_dataset_with_a_transform_is_refused_in_one_line_before_weights():
    data = datasets.Dataset.from_dict({"image": images(), "label": [0, 1] * 4}).with_transform(
        lambda batch: {"pixel_values": vit_processor()(batch["image"], return_tensors="pt")["pixel_values"]})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [vit_processor()], model_config=ViTConfig(**VIT))
    message = one_line(caught)
    assert "with_transform" in message and "Dataset.map" in message, message


# 7: a DatasetDict's folder is protected
def test_the_folders_of_a_datasetdict_object_are_its_splits_folders(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2]})}).save_to_disk(tmp_path / "saved")
    assert dataset_folders(datasets.load_from_disk(str(tmp_path / "saved"))) == [str(tmp_path / "saved" / "train")]


# 8: the processor passed to merge() is named, not the parents
def test_a_processor_passed_to_merge_that_cannot_read_the_data_is_named(vit_folders):
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])})
    data = datasets.Dataset.from_dict({"image": images()})
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(vit_folders, data, method="mudsc", refit="none", progress=False, processor=tokenizer)
    message = one_line(caught)
    assert "processor=" in message and type(tokenizer).__name__ in message and "parents ship" not in message, message


def test_batches_made_by_the_processor_are_not_refused_with_advice_to_use_that_processor():
    from hf_mudsc.calibrate.statistics import ModelInputCheck

    config = BertConfig(vocab_size=60)
    for preprocessed in ((), ("pixel_values",), ("input_ids",)):
        check = ModelInputCheck.of(config, preprocessed=preprocessed)
        with pytest.raises(CalibrationError) as caught:
            check({"input_ids": torch.tensor([[1, 70]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)})
        assert ("which is)" in str(caught.value)) is ("input_ids" not in preprocessed), str(caught.value)


# review s30 of the fixes above
def test_a_vit_reads_only_its_image_column_beside_tokens_made_for_another_model():
    """Review s30: the mixed-columns fix passed every model-input column of the other kind, even to a model that
    reads none: a ViT's data holding unpadded caption ids (tokenized for another model) crashed with numpy's error;
    before it the ViT read its images only."""
    captions = [[49406] + [320] * (1 + i % 3) + [49407] for i in range(8)]
    data = datasets.Dataset.from_dict({"image": images(8), "input_ids": captions})
    stream = resolve_calibration(data, [vit_processor()], model_config=ViTConfig(**VIT), inputs=("pixel_values",))
    batch = next(iter(stream.batches(8)))
    assert set(batch) == {"pixel_values"} and tuple(batch["pixel_values"].shape) == (8, 1, 16, 16)


def test_unpadded_token_ids_beside_raw_images_are_one_line_naming_the_fix(tmp_path):
    """Review s30: raw images with unpadded input_ids (CLIP) ended in numpy's bare ValueError at the first batch."""
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "!"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                                 crop_size={"height": 16, "width": 16}),
                              tokenizer=tokenizer)
    from transformers import CLIPConfig

    config = CLIPConfig(text_config={"vocab_size": 5, "max_position_embeddings": 16},
                        vision_config={"image_size": 16, "patch_size": 4})
    encoded = tokenizer(["a b", "a", "b b a", "a a"])  # not padded
    data = datasets.Dataset.from_dict({"image": images(4, (20, 20, 3)), "input_ids": encoded["input_ids"]})
    stream = resolve_calibration(data, [processor], model_config=config, inputs=("pixel_values", "input_ids"))
    with pytest.raises(CalibrationError) as caught:
        next(iter(stream.batches(4)))
    message = one_line(caught)
    assert "'input_ids'" in message and "padding=True" in message, message


def test_a_text_tower_folder_with_a_preprocessor_config_keeps_its_tokenizer(tmp_path):
    """Review s30: the fix keeping a vision tower's image processor made a text tower's folder (tokenizer files and a
    preprocessor_config.json saved beside them) load the image processor only: raw text was refused ("the parents
    ship no tokenizer"). What the model reads (its config) decides."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "!"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    folder = tmp_path / "text"
    CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=5, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, intermediate_size=48,
                                               projection_dim=16)).save_pretrained(folder)
    CLIPTokenizerFast(vocab_file=str(tmp_path / "vocab.json"),
                      merges_file=str(tmp_path / "merges.txt")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    from hf_mudsc.load.processors import tokenizer_of

    assert tokenizer_of(load_processor(folder)) is not None
