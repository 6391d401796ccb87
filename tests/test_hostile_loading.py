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
from factories import make_model
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
