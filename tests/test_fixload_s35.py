"""Session 35's fixload fixes: hostile Hub safetensors headers refused in one line, chunked feed-forward parents
merged on whole sequences, the skipped config differences said, output switches recorded as config."""

from __future__ import annotations

import struct

import pytest
import torch
from factories import BERT, make_batches, make_model, randomize, same_weights
from test_scale_s30 import sharded_vit, shards

import hf_mudsc
from hf_mudsc.errors import LoadError, MergeInputError

HUB_FIX = "choose another revision or ask the repo's owner"

HOSTILE_HEADERS = {
    "json-list": b"[]",
    "json-int-entry": b'{"w": 5}',
    "offsets-int": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": 5}}',
    "offsets-strings": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}',
    "offsets-reversed": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}',
    "offsets-three": b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 2, 4]}}',
    "shape-strings": b'{"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}',
    "shape-negative": b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
    "shape-int": b'{"w": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}}',
    "dtype-int": b'{"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}',
    "json-string": b'"abc"',
}


def _hostile(path, raw_header: bytes) -> None:
    """Overwrite safetensors file `path` with a header `raw_header` (valid JSON) and four bytes of data."""
    path.write_bytes(struct.pack("<Q", len(raw_header)) + raw_header + b"\0" * 4)


def _refusals(parents: list[str]) -> list[str]:
    """The refusal lines of the dry run and of the merge of `parents`."""
    lines = []
    for dry_run in (True, False):
        with pytest.raises(LoadError) as refused:
            hf_mudsc.merge(parents, method="linear", progress=False, dry_run=dry_run)
        lines.append(str(refused.value))
    return lines


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_hostile_single_file_hub_header_is_refused_in_one_line(local_hub, tmp_path, case):
    """merge(['user/p1', 'user/c']) with user/c's model.safetensors header '[]' raised a bare AttributeError."""
    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")
    make_model("vit_cls", seed=2).save_pretrained(tmp_path / "c")
    _hostile(tmp_path / "c" / "model.safetensors", HOSTILE_HEADERS[case])
    local_hub.upload_folder("user/c", tmp_path / "c")
    for line in _refusals(["user/p1", "user/c"]):
        assert line.startswith("'user/c': model.safetensors is not a valid safetensors file ("), line
        assert line.endswith(f"it is truncated or corrupt; {HUB_FIX}"), line


@pytest.mark.parametrize("case", ["json-list", "json-int-entry", "shape-strings", "dtype-int"])
def test_a_hostile_shard_hub_header_is_refused_in_one_line(local_hub, tmp_path, case):
    """merge(['user/p1', 'user/c']) with a shard of user/c headed '{"w": 5}' raised a bare TypeError (dry run too)."""
    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")
    folder = sharded_vit(tmp_path / "c", seed=2)
    first = shards(folder)[0]
    _hostile(folder / first, HOSTILE_HEADERS[case])
    local_hub.upload_folder("user/c", folder)
    for line in _refusals(["user/p1", "user/c"]):
        assert line.startswith(f"'user/c': {first} is not a valid safetensors file ("), line


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_a_hostile_local_header_is_refused_in_one_line(tmp_path, case):
    """merge([p1, c]) with c/model.safetensors headed '[]' (a local folder): the safetensors parser's refusal."""
    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    make_model("vit_cls", seed=2).save_pretrained(tmp_path / "c")
    _hostile(tmp_path / "c" / "model.safetensors", HOSTILE_HEADERS[case])
    for line in _refusals([str(tmp_path / "p1"), str(tmp_path / "c")]):
        assert "model.safetensors is not a valid safetensors file (" in line, line


def _chunked_bert(seed: int, chunk: int):
    """Tiny BERT classifier `seed` whose layers run their feed-forward in chunks of `chunk` positions (0: whole)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = randomize(BertForSequenceClassification(BertConfig(**BERT, num_labels=3, chunk_size_feed_forward=chunk)),
                      seed)
    return model.eval()


def _chunks(model) -> list[int]:
    return [module.chunk_size_feed_forward for module in model.modules() if hasattr(module, "chunk_size_feed_forward")]


@pytest.mark.parametrize("refit", ["none", "repair"])
def test_parents_chunking_their_feed_forward_merge_as_unchunked_ones(refit):
    """merge([A, B]) of BERTs with chunk_size_feed_forward=4 gave other weights than with 0 (hooks saw chunks)."""
    batches = make_batches("bert_cls", num_batches=2, batch_size=8)
    whole = hf_mudsc.merge([_chunked_bert(0, 0), _chunked_bert(1, 0)], batches, method="mudsc", refit=refit,
                           progress=False)
    a, b = _chunked_bert(0, 4), _chunked_bert(1, 4)
    chunked = hf_mudsc.merge([a, b], batches, method="mudsc", refit=refit, progress=False)
    assert same_weights(whole, chunked)
    assert _chunks(a) == _chunks(b) == [4] * BERT["num_hidden_layers"]  # the objects as given
    assert chunked.config.chunk_size_feed_forward == 4 and _chunks(chunked) == [4] * BERT["num_hidden_layers"]


def test_parents_differing_in_feed_forward_chunking_are_refused(tmp_path):
    """merge([A, B]) with A chunk_size_feed_forward=0 and B 4 crashed: RuntimeError: Sizes of tensors must match."""
    batches = make_batches("bert_cls", num_batches=1, batch_size=8)
    _chunked_bert(0, 0).save_pretrained(tmp_path / "a")
    _chunked_bert(1, 4).save_pretrained(tmp_path / "b")
    with pytest.raises(MergeInputError, match="chunk_size_feed_forward"):
        hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], batches, method="mudsc", progress=False)


def test_the_config_differences_the_merge_skips_are_said_in_one_info_line(tmp_path, caplog):
    """merge([A, B]) with B's config.json holding another initializer_range and use_cache merged with no word of it."""
    import json
    import logging

    for seed, name in ((0, "a"), (1, "b")):
        _chunked_bert(seed, 0).save_pretrained(tmp_path / name)
    path = tmp_path / "b" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "initializer_range": 0.5, "use_cache": False}))
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], method="linear", progress=False)
    lines = [r.getMessage() for r in caplog.records if "initializer_range" in r.getMessage()
             and r.levelno == logging.INFO]
    assert len(lines) == 1, lines
    assert "initializer_range: 0.02 vs 0.5" in lines[0] and "use_cache: True vs False" in lines[0], lines
    assert "parent A's" in lines[0], lines


@pytest.mark.parametrize("switch", [{"return_dict": False}, {"output_hidden_states": True},
                                    {"output_attentions": True}])
def test_a_parent_loaded_with_output_switches_still_holds_its_folder_s_config(tmp_path, switch):
    """holds_config(from_pretrained(folder, return_dict=False), folder) was False: its recipe named it an object."""
    from transformers import AutoModelForSequenceClassification

    from hf_mudsc.load.objects import holds_config, object_source

    _chunked_bert(0, 0).save_pretrained(tmp_path / "a")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a", **switch)
    assert holds_config(loaded, tmp_path / "a")
    assert object_source(loaded, str(tmp_path / "a")) is not None  # the recipe names the folder, not an object


@pytest.mark.parametrize("switch", [{}, {"return_dict": False}])
def test_a_clip_parent_loaded_from_its_folder_holds_that_folder_s_config(tmp_path, switch):
    """holds_config(CLIPModel.from_pretrained(folder), folder) was False: text_config records its loaded dtype."""
    from transformers import CLIPModel

    from hf_mudsc.load.objects import holds_config

    make_model("clip", 0).save_pretrained(tmp_path / "a")
    assert holds_config(CLIPModel.from_pretrained(tmp_path / "a", **switch), tmp_path / "a")
