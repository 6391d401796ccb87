"""Session 34's review of the Hub shard-header pass: the headers read in parallel, a shard index naming a file that is
no safetensors refused at locate, an empty Hub shard refused as a corrupt file, and a Hub repo's broken file refused
with the fix a Hub repo has (nothing was cached to delete)."""

from __future__ import annotations

import json
import logging
import time

import pytest
from factories import make_model
from test_load_s34 import weight_downloads
from test_scale_s30 import sharded_vit, shards

import hf_mudsc
from hf_mudsc.errors import LoadError

HUB_FIX = "choose another revision or ask the repo's owner"


def _upload_p1(local_hub, tmp_path) -> None:
    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")


def test_a_hub_parents_shard_headers_are_read_in_parallel_with_one_log_line(local_hub, tmp_path, caplog):
    """check_hub_shard_headers(located 'user/s') with 0.3 s per Hub answer took shards x 0.3 s: one header at a time."""
    from hf_mudsc.load.parents import check_hub_shard_headers, locate_parents

    folder = tmp_path / "s"
    make_model("vit_cls", seed=2).save_pretrained(folder, max_shard_size="8KB")
    count = len(shards(folder))
    assert count >= 12, count
    local_hub.upload_folder("user/s", folder)
    located = locate_parents(["user/s"])[0][0]
    delay = 0.3
    local_hub.delay_next("resolve", delay, times=10**6)
    local_hub.requests.clear()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        check_hub_shard_headers(located, token=None)
    elapsed = time.monotonic() - started
    assert located.headers_read and len(local_hub.requests_for("resolve")) == count
    assert elapsed < count * delay / 2, (elapsed, count)  # serially: count x delay (3.6 s or more); 8 at once: 0.6 s
    said = [r.getMessage() for r in caplog.records if "shard headers" in r.getMessage()]
    assert said == [f"reading {count} shard headers of user/s"], said


@pytest.mark.parametrize("shard", ["pytorch_model.bin", "config.json"])
def test_a_hub_shard_index_naming_a_file_that_is_no_safetensors_is_refused_before_any_weights(local_hub, tmp_path,
                                                                                                shard):
    """merge(['user/p1', 'user/odd']) with an index mapping extra.weight to pytorch_model.bin downloaded every shard
    (and the pickle) before refusing; the dry run said 'not a valid safetensors file ... header too big'."""
    import torch

    _upload_p1(local_hub, tmp_path)
    folder = sharded_vit(tmp_path / "odd", seed=2)
    torch.save({"extra.weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    local_hub.upload_folder("user/odd", folder)
    lines = []
    for dry_run in (True, False):
        local_hub.requests.clear()
        with pytest.raises(LoadError) as refused:
            hf_mudsc.merge(["user/p1", "user/odd"], method="linear", progress=False, dry_run=dry_run)
        lines.append(str(refused.value))
        assert weight_downloads(local_hub) == [] and not [
            r.path for r in local_hub.requests if r.path.endswith((".safetensors", ".bin"))]
    assert lines[0] == lines[1], lines
    assert lines[0] == (f"'user/odd': model.safetensors.index.json names the shard {shard!r}, not a .safetensors "
                        f"file of the repository; {HUB_FIX}"), lines[0]


def test_an_empty_hub_shard_is_refused_as_a_corrupt_file_by_the_merge_and_the_dry_run(local_hub, tmp_path):
    """merge(['user/p1', 'user/e']) with a 0-byte shard: 'the Hub refused ... 416 Requested Range Not Satisfiable',
    naming no fix."""
    _upload_p1(local_hub, tmp_path)
    folder = sharded_vit(tmp_path / "e", seed=2)
    empty = shards(folder)[1]
    (folder / empty).write_bytes(b"")
    local_hub.upload_folder("user/e", folder)
    lines = []
    for dry_run in (True, False):
        local_hub.requests.clear()
        with pytest.raises(LoadError) as refused:
            hf_mudsc.merge(["user/p1", "user/e"], method="linear", progress=False, dry_run=dry_run)
        lines.append(str(refused.value))
        assert weight_downloads(local_hub) == []
    assert lines[0] == lines[1], lines
    assert lines[0] == (f"'user/e': {empty} is not a valid safetensors file (empty file): it is truncated or "
                        f"corrupt; {HUB_FIX}"), lines[0]


def test_a_corrupt_or_missing_hub_shard_names_the_hub_fix_not_the_cache(local_hub, tmp_path):
    """merge(['user/p1', 'user/c']) with a shard whose header is garbage, or one the repo lacks, said 'Download it
    again (for a Hub model, delete it from the cache first)' / 're-download the model': nothing was cached."""
    _upload_p1(local_hub, tmp_path)
    for name, edit in (("c", lambda path: path.write_bytes(b"\xff" * 64)), ("m", lambda path: path.unlink())):
        folder = sharded_vit(tmp_path / name, seed=2)
        broken = shards(folder)[1]
        edit(folder / broken)
        local_hub.upload_folder(f"user/{name}", folder)
        lines = []
        for dry_run in (True, False):
            with pytest.raises(LoadError) as refused:
                hf_mudsc.merge(["user/p1", f"user/{name}"], method="linear", progress=False, dry_run=dry_run)
            lines.append(str(refused.value))
        assert lines[0] == lines[1], lines
        assert lines[0].startswith(f"'user/{name}': ") and broken in lines[0], lines[0]
        assert lines[0].endswith(HUB_FIX) and "cache" not in lines[0] and "re-download" not in lines[0], lines[0]


def test_a_hub_shard_index_placing_a_tensor_no_shard_holds_is_refused_by_the_dry_run_as_by_the_merge(local_hub,
                                                                                                    tmp_path):
    """merge(['user/p1', 'user/lost'], dry_run=True) with an index placing extra.weight in a shard lacking it said
    the merge would run; the merge refused it from the headers."""
    from test_load_s34 import doubled

    _upload_p1(local_hub, tmp_path)
    for name in ("lost", "twice"):
        folder = sharded_vit(tmp_path / name, seed=2)
        if name == "lost":
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            index["weight_map"]["extra.weight"] = shards(folder)[0]
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            doubled(folder)
        local_hub.upload_folder(f"user/{name}", folder)
        lines = []
        for dry_run in (True, False):
            local_hub.requests.clear()
            with pytest.raises(LoadError) as refused:
                hf_mudsc.merge(["user/p1", f"user/{name}"], method="linear", progress=False, dry_run=dry_run)
            lines.append(str(refused.value))
            assert weight_downloads(local_hub) == []
        assert lines[0] == lines[1], lines
        assert lines[0].startswith(f"'user/{name}': ") and lines[0].endswith(HUB_FIX), lines[0]
