"""Hostile parent folders and calibration data found by the s15 review of loading: each test is a defect that was
real (a traceback, a silent wrong result, a file outside the folder read), its fix the smallest.

Every refusal is one line naming the problem and the fix, raised before any weights are loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import transformers
from factories import make_model, vit_folder
from safetensors.torch import load_file, save_file

from hf_mudsc.errors import LoadError
from hf_mudsc.load.parents import load_parent

INDEX = "model.safetensors.index.json"


def _sharded_vit(folder: Path) -> dict:
    """A tiny ViT saved in several shards; its index (`metadata`, `weight_map`) returned."""
    make_model("vit_cls", seed=0).save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    return index


def _refused(folder: Path, monkeypatch) -> str:
    """The one-line `LoadError` `load_parent(folder)` raises, failing the test if any weights were loaded first."""
    for name in ("ViTForImageClassification", "ViTModel"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained",
                            lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(LoadError) as caught:
        load_parent(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message, message
    return message


def test_a_tensor_stored_in_two_shards_is_refused_in_one_line(tmp_path, monkeypatch):
    """Two shards holding one tensor (which one would transformers load?) raised a bare ValueError traceback."""
    folder = tmp_path / "vit"
    index = _sharded_vit(folder)
    first, second = sorted(set(index["weight_map"].values()))[:2]
    held, other = load_file(folder / first), load_file(folder / second)
    name = sorted(held)[0]
    other[name] = held[name] + 1
    save_file(other, folder / second, metadata={"format": "pt"})
    message = _refused(folder, monkeypatch)
    assert f"tensor {name!r} is stored twice, in {first} and {second}" in message, message
    assert "re-save the model with save_pretrained" in message, message


def test_a_tensor_the_index_names_that_no_shard_holds_is_refused_before_any_weights(tmp_path, monkeypatch):
    """A shard re-saved without one of its tensors was found only by `from_pretrained`, after every parent was
    checked, and blamed on config.json; the index and the shard headers tell before any weights are read."""
    folder = tmp_path / "vit"
    index = _sharded_vit(folder)
    first = sorted(set(index["weight_map"].values()))[0]
    held = load_file(folder / first)
    name = sorted(held)[0]
    del held[name]
    save_file(held, folder / first, metadata={"format": "pt"})
    message = _refused(folder, monkeypatch)
    assert f"{INDEX} puts tensor {name!r} in {first}, but no shard holds it" in message, message


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda index: index.pop("metadata"), "has no 'metadata' object"),
    (lambda index: index.update(metadata=None), "has no 'metadata' object"),
    (lambda index: index.update(metadata=[]), "has no 'metadata' object"),
    (lambda index: index.update(weight_map={}), "names no shard"),
])
def test_a_shard_index_transformers_cannot_read_is_refused_before_any_weights(tmp_path, monkeypatch, edit, needle):
    """transformers reads `index["metadata"]` as a dict: without one it failed with `KeyError: 'metadata'` (an
    empty `weight_map` too, after every parent had been checked)."""
    folder = tmp_path / "vit"
    index = _sharded_vit(folder)
    edit(index)
    (folder / INDEX).write_text(json.dumps(index))
    message = _refused(folder, monkeypatch)
    assert f"{INDEX} {needle}" in message and "re-save the model with save_pretrained" in message, message


@pytest.mark.parametrize("shard", ["config.json", ".", "", "sub"])
def test_a_shard_index_naming_a_file_that_is_no_safetensors_is_refused(tmp_path, monkeypatch, shard):
    """A shard named `config.json`, `.` or a folder was skipped by the header check, then opened as safetensors:
    a SafetensorError or `OSError: No such device` traceback."""
    folder = tmp_path / "vit"
    index = _sharded_vit(folder)
    (folder / "sub").mkdir()
    index["weight_map"]["extra.weight"] = shard
    (folder / INDEX).write_text(json.dumps(index))
    message = _refused(folder, monkeypatch)
    assert f"{INDEX} names the shard {shard!r}, not a .safetensors file of the folder" in message, message


def test_a_shard_linked_out_of_the_folder_from_a_subfolder_is_refused(tmp_path, monkeypatch):
    """The folder's own links are refused (`refuse_links_out`), but a shard `sub/x.safetensors` linking elsewhere was
    read as the parent's weights: a file of this machine outside the folder."""
    folder = tmp_path / "vit"
    index = _sharded_vit(folder)
    first = sorted(set(index["weight_map"].values()))[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    (folder / first).rename(elsewhere)
    (folder / "sub").mkdir()
    os.symlink(elsewhere, folder / "sub" / first)
    index["weight_map"] = {k: f"sub/{v}" if v == first else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    message = _refused(folder, monkeypatch)
    assert f"sub/{first} is a symbolic link to {str(elsewhere)!r}, outside the folder" in message, message


def test_a_pickle_shard_linked_out_of_the_folder_from_a_subfolder_is_refused(tmp_path, monkeypatch):
    """With `allow_pickle=True` the shards an index names were not checked for links (only .safetensors names were):
    `sub/pytorch_model-00001-of-00001.bin` linking to a file elsewhere was unpickled as the parent's weights."""
    import torch

    folder = vit_folder(tmp_path / "vit")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    elsewhere = tmp_path / "someone_elses.bin"
    torch.save(state, elsewhere)
    (folder / "sub").mkdir()
    shard = "sub/pytorch_model-00001-of-00001.bin"
    os.symlink(elsewhere, folder / shard)
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": {name: shard for name in state}}))
    (folder / "unused.bin").write_bytes(b"")  # a top-level pickle name: the pickle index is what loads
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was read before refusing"))
    with pytest.raises(LoadError) as caught:
        load_parent(folder, allow_pickle=True)
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"{shard} is a symbolic link to {str(elsewhere)!r}, outside the folder" in message, message


def test_a_shard_in_a_subfolder_of_the_folder_still_loads(tmp_path):
    """What transformers reads (a shard path relative to the folder) keeps loading when it stays inside it."""
    folder = tmp_path / "vit"
    index = _sharded_vit(folder)
    first = sorted(set(index["weight_map"].values()))[0]
    (folder / "sub").mkdir()
    (folder / first).rename(folder / "sub" / first)
    index["weight_map"] = {k: f"sub/{v}" if v == first else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    expected = make_model("vit_cls", seed=0).state_dict()
    loaded = load_parent(folder).model.state_dict()
    assert set(loaded) == set(expected)
    assert all((loaded[name] == expected[name]).all() for name in expected)


# ---------------------------------------------------------------- config.json: read as transformers would act on it


def test_a_config_giving_a_key_twice_is_refused(tmp_path, monkeypatch):
    """JSON readers disagree on which of two values counts: `"model_type": "vit", ..., "model_type": "bert"` built a
    ViTModel around a BertConfig without a word."""
    folder = vit_folder(tmp_path / "vit")
    text = (folder / "config.json").read_text()
    twice = text.replace('"model_type": "vit"', '"model_type": "vit", "model_type": "bert"')
    assert twice != text
    (folder / "config.json").write_text(twice)
    message = _refused(folder, monkeypatch)
    assert "config.json gives the key 'model_type' twice" in message, message
    assert "restore the config.json saved with the weights" in message, message


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
@pytest.mark.parametrize("value", ["kernels-community/flash-attn", "flash_attention_2"])
def test_a_config_choosing_attention_code_is_refused(tmp_path, monkeypatch, key, value):
    """transformers reads `attn_implementation` from config.json: a Hub kernel id makes it download and run that
    repository's code (with the `kernels` package installed; an ImportError traceback without it), flash attention an
    ImportError traceback. hf-mudsc runs no code a model names."""
    folder = vit_folder(tmp_path / "vit", edit=lambda c: c.update({key: value}))
    message = _refused(folder, monkeypatch)
    assert f"config.json sets {key} to {value!r}" in message and "eager or sdpa" in message, message


@pytest.mark.parametrize("value", ["eager", "sdpa", None])
def test_a_config_choosing_transformers_own_attention_still_loads(tmp_path, value):
    folder = vit_folder(tmp_path / "vit", edit=lambda c: c.update(attn_implementation=value))
    assert type(load_parent(folder).model).__name__ == "ViTForImageClassification"


def test_a_config_declaring_a_quantization_is_refused_before_any_weights(tmp_path, monkeypatch):
    """`quantization_config` makes `from_pretrained` quantize the model as it loads it (bitsandbytes, ...): an
    ImportError traceback after every parent was checked, or a merge of quantized weights."""
    folder = vit_folder(tmp_path / "vit", edit=lambda c: c.update(
        quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}))
    message = _refused(folder, monkeypatch)
    assert "config.json declares a quantization (quantization_config, quant_method 'bitsandbytes')" in message, message
    assert "dequantize" in message, message


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: c.update(architectures=[1]), "names no transformers architecture ([1])"),
    (lambda c: c.update(architectures=["BertModel"]),
     "names the architecture BertModel, a class of 'bert' models, but its model_type is 'vit'"),
    (lambda c: c.update(num_attention_heads=0), "ZeroDivisionError"),
    (lambda c: c.update(patch_size=0), "ZeroDivisionError"),
    (lambda c: c.update(hidden_size=0), "ZeroDivisionError"),
])
def test_a_config_no_model_can_be_built_from_is_refused_in_one_line(tmp_path, monkeypatch, edit, needle):
    """A class of another model type, or sizes a model cannot have (zero heads, a patch of 0 pixels), raised
    TypeError, AttributeError or ZeroDivisionError tracebacks from transformers' model constructors."""
    folder = vit_folder(tmp_path / "vit", edit=edit)
    message = _refused(folder, monkeypatch)
    assert needle in message, message
    assert "config.json" in message, message


# ---------------------------------------------------------------- calibration data: columns of the wrong kind


def _tokenizer():
    from test_data import tokenizer

    return tokenizer()


def _vit_processor():
    from test_data import vit_processor

    return vit_processor()


def _reading_error(data, kind: str) -> str:
    """The one-line CalibrationError reading `data` (a dataset or a spec) as `kind`'s calibration batches raises."""
    from hf_mudsc.calibrate.datasets import resolve_calibration
    from hf_mudsc.errors import CalibrationError

    processor, inputs = (_tokenizer(), ("input_ids",)) if kind == "bert_cls" else (_vit_processor(), ("pixel_values",))
    with pytest.raises(CalibrationError) as caught:
        list(resolve_calibration(data, [processor], inputs=inputs, model_config=make_model(kind).config).batches(8))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(("values", "shown_as"), [
    ([1, 2, 3], "int64"), ([["w1"], ["w2"], ["w3"]], "a list"), ([None, None, None], "null"),
    ([1.5, 2.5, 3.5], "float64"),
])
def test_a_text_column_that_holds_no_text_is_refused_before_any_weights(values, shown_as):
    """`str(value)` made the text `"1"`, `"['w1']"` or `"None"`: the parents were calibrated on that, without a
    word. The column's type is in the dataset's features, known before any weights are read."""
    import datasets

    from hf_mudsc.calibrate.datasets import check_calibration_columns
    from hf_mudsc.errors import CalibrationError

    data = datasets.Dataset.from_dict({"text": values})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [_tokenizer()], inputs=("input_ids",))
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"column 'text' of the calibration data holds {shown_as}, not text" in message, message
    assert "text_column=" in message, message


def test_a_text_column_with_missing_values_is_refused_at_the_batch_that_holds_one():
    """A string column may hold None (a missing value): it was tokenized as the word "None"."""
    import datasets


    data = datasets.Dataset.from_dict({"text": ["w1 w2", None, "w3"]})
    message = _reading_error(data, "bert_cls")
    assert "column 'text' of the calibration data holds a missing value (None), not text" in message, message


@pytest.mark.parametrize(("values", "shown_as"), [([1, 2, 3], "int64"), (["a.png", "b.png", "c.png"], "string")])
def test_an_image_column_of_numbers_or_strings_is_refused_before_any_weights(tmp_path, monkeypatch, values,
                                                                              shown_as):
    """An `image` column of ints or strings failed in the image processor, after every parent was loaded."""
    import datasets
    from test_cli import save_parents_and_data

    import hf_mudsc
    import hf_mudsc.load.parents as parents
    from hf_mudsc.errors import CalibrationError

    a, b, _ = save_parents_and_data(tmp_path / "inputs")
    data = tmp_path / "data"
    datasets.Dataset.from_dict({"image": values}).save_to_disk(data)
    monkeypatch.setattr(parents, "_finish", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([a, b], str(data), method="zipit", progress=False)
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"column 'image' of the calibration data holds {shown_as}, not images" in message, message
    assert "image_column=" in message, message


@pytest.mark.parametrize("size", [{"height": 100_000, "width": 100_000}, {"shortest_edge": 1_000_000}])
def test_an_image_processor_asking_for_huge_images_is_refused_before_any_weights(tmp_path, monkeypatch, size):
    """A parent's preprocessor_config.json is data: `size: 100000x100000` made calibration resize every image to
    10**10 pixels (an 8 GB address-space limit ended it as "out of memory ... use fewer parents"; without one the
    machine's memory went first), although the model (image_size 16) reads 16x16 images only."""
    from test_cli import save_parents_and_data

    import hf_mudsc
    import hf_mudsc.load.parents as parents
    from hf_mudsc.errors import CalibrationError

    a, b, calibration = save_parents_and_data(tmp_path / "inputs")
    config = json.loads((a / "preprocessor_config.json").read_text())
    config["size"] = size
    (a / "preprocessor_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(parents, "_finish", lambda *a, **k: pytest.fail("weights loaded before refusing"))
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([a, b], str(calibration), method="zipit", progress=False)
    message = str(caught.value)
    key, value = next(iter(size.items()))
    assert "\n" not in message, message
    assert f"image processor resizes images to {key} {value:,} pixels, but the model reads images of 16" in message


def test_an_image_that_cannot_be_decoded_is_named_in_one_line():
    """Bytes Pillow cannot identify raised PIL.UnidentifiedImageError with a traceback."""
    import datasets


    features = datasets.Features({"image": datasets.Image()})
    data = datasets.Dataset.from_dict({"image": [{"bytes": b"not an image", "path": None}] * 2}, features=features)
    message = _reading_error(data, "vit_cls")
    assert "an image of dataset" in message and "cannot be decoded" in message, message


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", b""), ("empty.csv", b""), ("blank.jsonl", b"\n\n"),
                                               ("latin1.txt", b"caf\xe9 w1\n")])
def test_a_calibration_file_that_is_empty_or_not_utf8_is_refused_in_one_line(tmp_path, name, content):
    """An empty .jsonl raised a bare StopIteration (an empty message), an empty .csv pandas' EmptyDataError, a
    .txt that is not UTF-8 a UnicodeDecodeError — tracebacks from the packaged builders."""
    from hf_mudsc.calibrate.datasets import check_calibration_columns, resolve_calibration
    from hf_mudsc.errors import CalibrationError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CalibrationError) as caught:
        data = resolve_calibration(str(path), [_tokenizer()], inputs=("input_ids",),
                                   model_config=make_model("bert_cls").config)
        check_calibration_columns(data.dataset, [_tokenizer()], inputs=("input_ids",))
        list(data.batches(8))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message


@pytest.mark.parametrize("keys", [["0", "5", "9"], ["-1", "0", "1"], ["1", "2", "3"]])
def test_labels_not_numbered_by_classifier_row_are_refused(tmp_path, monkeypatch, keys):
    """`id2label` names classifier row `i` by key `i`; keys `-1, 0, 1` were read in sorted order, so row 0 was named
    by key -1 — the merged head's labels (and a reorder by label name) silently off by one row from what transformers
    itself reads the parent as."""
    folder = vit_folder(tmp_path / "vit", edit=lambda c: c.update(id2label=dict(zip(keys, ["x", "y", "z"]))))
    message = _refused(folder, monkeypatch)
    assert f"config.json: id2label numbers its labels {[int(k) for k in keys]}, not 0 to 2" in message, message


def test_an_image_whose_file_is_missing_is_named_in_one_line(tmp_path):
    """An Image column row naming a file that is not there raised FileNotFoundError with a traceback."""
    import datasets


    missing = tmp_path / "gone.png"
    features = datasets.Features({"image": datasets.Image()})
    data = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": str(missing)}] * 2}, features=features)
    message = _reading_error(data, "vit_cls")
    assert f"dataset 'dataset' names a file that does not exist ({str(missing)!r})" in message, message


# ---------------------------------------------------------------- a token given where a reference goes

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


@pytest.mark.parametrize("reference", [TOKEN, f"{TOKEN}@main", f"org/{TOKEN}"])
def test_a_token_given_as_a_parent_is_refused_without_echoing_it(reference):
    """`hf-mudsc merge a b $HF_TOKEN` printed the token back in its error ('hf_...' is not in the local cache)."""
    from hf_mudsc.load.references import parse_reference

    with pytest.raises(LoadError) as caught:
        parse_reference(reference)
    message = str(caught.value)
    assert TOKEN not in message and TOKEN[:10] not in message, message
    assert "looks like a Hugging Face access token" in message and "--token" in message, message


@pytest.mark.parametrize("spec", [TOKEN, f"{TOKEN}:train", f"org/data@{TOKEN}:train"])
def test_a_token_given_as_calibration_data_is_refused_without_echoing_it(spec, capsys):
    from hf_mudsc.calibrate.dataset_spec import DatasetSpec
    from hf_mudsc.errors import CalibrationError

    with pytest.raises(CalibrationError) as caught:
        DatasetSpec.parse(spec)
    message = str(caught.value)
    assert TOKEN not in message and TOKEN[:10] not in message, message
    assert "looks like a Hugging Face access token" in message, message


def test_the_cli_never_echoes_a_token_given_as_a_parent(tmp_path, capsys):
    from hf_mudsc.cli.main import main

    folder = vit_folder(tmp_path / "vit")
    # Refused with the recipe's checks, before anything is loaded: exit 2, as `inspect RECIPE` refuses it (QA s21)
    assert main(["merge", str(folder), TOKEN, "--method", "linear", "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert TOKEN[:10] not in captured.err + captured.out, captured.err


# ---------------------------------------------------------------- model cards read for the base


def test_a_parent_card_that_is_not_utf8_names_no_base(tmp_path, caplog):
    """A method that needs a base, given none, reads each parent's README.md: one that is not UTF-8 raised a
    UnicodeDecodeError traceback naming no file. It names no base (logged): the merge asks for one."""
    import hf_mudsc
    from hf_mudsc.errors import MergeInputError

    a, b = vit_folder(tmp_path / "a"), vit_folder(tmp_path / "b")
    (a / "README.md").write_text("---\nbase_model: org/base\n---\n# a\n")
    (b / "README.md").write_bytes(b"---\nbase_model: org/base\n---\n# caf\xe9\n")
    with caplog.at_level("WARNING", logger="hf_mudsc"), pytest.raises(MergeInputError) as caught:
        hf_mudsc.merge([a, b], None, method="task_arithmetic", progress=False)
    assert "needs the parents' common base model and none was given" in str(caught.value)
    assert f"{str(b / 'README.md')!r} is not UTF-8" in caplog.text, caplog.text


# ---------------------------------------------------------------- processor files


@pytest.mark.parametrize(("name", "kind"), [("tokenizer_config.json", "bert_cls"),
                                            ("preprocessor_config.json", "vit_cls")])
def test_a_processor_file_that_is_no_json_object_is_skipped_like_any_unreadable_one(tmp_path, name, kind):
    """`[1]` as a processor's JSON raised transformers' AttributeError ('list' object has no attribute 'get') with a
    traceback; an unreadable processor file is skipped (the parent then ships no processor), as other bad ones are."""
    from test_data import tokenizer, vit_processor

    folder = tmp_path / "parent"
    make_model(kind).save_pretrained(folder)
    (tokenizer() if kind == "bert_cls" else vit_processor()).save_pretrained(folder)
    (folder / name).write_text("[1]")
    assert load_parent(folder).processor is None


def _saved_dataset(folder: Path) -> Path:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["w1 w2"] * 4})}).save_to_disk(folder)
    return folder


def _truncate_arrow(folder: Path) -> None:
    data = next((folder / "train").glob("*.arrow"))
    data.write_bytes(data.read_bytes()[:50])


@pytest.mark.parametrize("damage", [
    lambda f: (f / "dataset_dict.json").write_text("{"),
    lambda f: (f / "dataset_dict.json").write_text("[]"),
    lambda f: (f / "dataset_dict.json").write_text('{"splits": "train"}'),
    lambda f: (f / "train" / "state.json").write_text("{"),
    lambda f: (f / "train" / "state.json").write_text("[]"),
    lambda f: (f / "train" / "dataset_info.json").write_text("{"),
    _truncate_arrow,
    lambda f: next((f / "train").glob("*.arrow")).unlink(),
])
def test_a_damaged_save_to_disk_folder_is_refused_in_one_line(tmp_path, damage):
    """`load_from_disk` of a damaged folder raised JSONDecodeError, TypeError, pyarrow's ArrowInvalid or
    FileNotFoundError tracebacks."""
    from hf_mudsc.calibrate.datasets import load_calibration_dataset
    from hf_mudsc.errors import CalibrationError

    folder = _saved_dataset(tmp_path / "data")
    damage(folder)
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(f"{folder}:train")
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"calibration dataset '{folder}:train' is a Dataset.save_to_disk folder that cannot be read" in message, (
        message)
    assert "save it again with Dataset.save_to_disk" in message, message


@pytest.mark.parametrize("name", ["dataset_dict.json", "train/state.json", "train/dataset_info.json"])
def test_a_save_to_disk_folder_with_a_json_file_of_gigabytes_is_refused_before_it_is_read(tmp_path, monkeypatch,
                                                                                         name):
    """Its JSON files are read whole (by hf-mudsc and by `load_from_disk`): a 2 GB (sparse) state.json took 4.7 GB of
    memory before "cannot be read (JSONDecodeError ...)"."""
    from hf_mudsc.calibrate.datasets import load_calibration_dataset
    from hf_mudsc.errors import CalibrationError
    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES

    folder = _saved_dataset(tmp_path / "data")
    with (folder / name).open("ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)  # sparse: no disk used
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail(f"{name} was read whole"))
    monkeypatch.setattr("datasets.load_from_disk", lambda *a, **k: pytest.fail("load_from_disk read it"))
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(f"{folder}:train")
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"is a Dataset.save_to_disk folder that cannot be read ({name} is {SIDE_FILE_MAX_BYTES + 1:,} bytes" in (
        message), message


@pytest.mark.parametrize("content", ['text,x\n"a b",1\n"c",2,3,4\n', 'text\n\n"a"\n,\n'])
def test_a_csv_file_pandas_cannot_parse_is_refused_in_one_line(tmp_path, content):
    """A row with more fields than the header raised pandas' ParserError with a traceback."""

    path = tmp_path / "rows.csv"
    path.write_text(content)
    message = _reading_error(str(path), "bert_cls")
    assert f"dataset {str(path)!r} cannot be read (ParserError: " in message, message


@pytest.mark.parametrize("files", [{}, {"notes.md": "hi"}])
def test_a_local_folder_without_data_files_is_not_called_missing(tmp_path, files):
    """A folder holding no data file was reported as 'not found: it is no local folder or file'."""
    from hf_mudsc.calibrate.datasets import load_calibration_dataset
    from hf_mudsc.errors import CalibrationError

    folder = tmp_path / "data"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(str(folder))
    message = str(caught.value)
    assert "\n" not in message and "not found" not in message, message
    assert f"calibration folder {str(folder)!r} holds no data files datasets can read" in message, message


@pytest.mark.parametrize("kind", ["file", "saved"])
def test_a_config_named_for_local_data_is_refused_not_ignored(tmp_path, kind):
    """`data.csv:cfg:train` read data.csv whatever `cfg` said (a local file or save_to_disk folder has no configs):
    the spec did not say what was read."""
    from hf_mudsc.calibrate.datasets import load_calibration_dataset
    from hf_mudsc.errors import CalibrationError

    if kind == "file":
        data = tmp_path / "data.csv"
        data.write_text("text\nw1 w2\n")
    else:
        data = _saved_dataset(tmp_path / "data")
    with pytest.raises(CalibrationError) as caught:
        load_calibration_dataset(f"{data}:cfg:train")
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"names the config 'cfg', but {str(data)!r} is local data without configs; use '{data}:train'" in message


# ---------------------------------------------------------------- model cards: read for the base they name


def test_a_model_card_of_gigabytes_is_not_read_for_its_base(tmp_path, caplog):
    """The base a method needs is read from the parents' cards (README.md), each read whole: a card padded to
    gigabytes (sparse) was read into memory. Over `SIDE_FILE_MAX_BYTES` a card names no base (logged)."""
    from hf_mudsc.errors import MergeInputError
    from hf_mudsc.load.parents import SIDE_FILE_MAX_BYTES, load_parents_and_base

    parents = []
    for name in ("a", "b"):
        folder = vit_folder(tmp_path / name)
        (folder / "README.md").write_text("---\nbase_model: org/base\n---\n# a card\n")
        parents.append(str(folder))
    with open(Path(parents[1]) / "README.md", "ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)  # sparse: no disk used; its front matter still names the base
    with pytest.raises(MergeInputError, match="needs the parents' common base model and none was given"):
        load_parents_and_base(parents, None, base_needed_for="task_arithmetic")
    assert f"README.md is {SIDE_FILE_MAX_BYTES + 1:,} bytes" in caplog.text, caplog.text


def test_a_folder_with_one_file_and_shards_is_read_as_transformers_reads_it(tmp_path):
    """QA s21: a folder holding `model.safetensors` and a shard index of other weights was two checkpoints in one
    merge: the lazy reader (relation check, auto's choice, streamed apply) took the shards, transformers the single
    file. Every path now reads the single file, as `from_pretrained` does (and fetches only it from the Hub)."""
    import torch

    import hf_mudsc
    from hf_mudsc.load.lazy import safetensors_files

    folder = tmp_path / "both"
    _sharded_vit(folder)  # seed 0 in shards
    other = make_model("vit_cls", seed=1)
    other.save_pretrained(tmp_path / "single")
    (folder / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
    assert safetensors_files(folder) == [folder / "model.safetensors"]
    merged = hf_mudsc.merge([folder, tmp_path / "single"], method="linear", progress=False)
    expected = other.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected[name]), name  # the average of one model with itself


def test_an_unused_checkpoint_tensor_is_named_as_the_file_stores_it(tmp_path, caplog):
    """QA s21: an extra tensor `vit.encoder.layer.0.extra_buffer` was warned as 'vit.layers.0.extra_buffer' — the
    name after transformers' renaming on load, which the user cannot find in the file."""
    import logging

    folder = tmp_path / "vit"
    vit_folder(folder)
    weights = load_file(folder / "model.safetensors")
    weights["vit.encoder.layer.0.extra_buffer"] = weights["vit.embeddings.cls_token"].clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        load_parent(folder)
    assert "'vit.encoder.layer.0.extra_buffer'" in caplog.text, caplog.text
