"""Session 35's load3 fixes: one reader of Hub safetensors headers for the merge and the dry run (the same requests,
no HEAD), a corrupt single-file Hub checkpoint refused before its download, and NaN/inf weights refused before
calibration."""

from __future__ import annotations

import pytest
from factories import make_model
from test_load_s34 import weight_downloads
from test_scale_s30 import sharded_vit, shards

import hf_mudsc
from hf_mudsc.errors import LoadError

HUB_FIX = "choose another revision or ask the repo's owner"


def _upload(local_hub, tmp_path, repo: str, seed: int) -> None:
    make_model("vit_cls", seed=seed).save_pretrained(tmp_path / repo)
    local_hub.upload_folder(repo, tmp_path / repo)


def _weight_requests(hub) -> list[tuple[str, str, bool]]:
    """(method, file, ranged) of every request for a weight file, in order."""
    return [(r.method, r.path.rsplit("/", 1)[-1], "range" in r.headers) for r in hub.requests
            if r.path.endswith((".safetensors", ".bin"))]


def test_a_corrupt_single_file_hub_checkpoint_is_refused_before_its_download(local_hub, tmp_path):
    """merge(['user/p1', 'user/c']) with user/c's model.safetensors garbage downloaded both files, then refused."""
    _upload(local_hub, tmp_path, "user/p1", 1)
    folder = tmp_path / "c"
    make_model("vit_cls", seed=2).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    local_hub.upload_folder("user/c", folder)
    lines = []
    for dry_run in (True, False):
        local_hub.requests.clear()
        with pytest.raises(LoadError) as refused:
            hf_mudsc.merge(["user/p1", "user/c"], method="linear", progress=False, dry_run=dry_run)
        lines.append(str(refused.value))
        assert weight_downloads(local_hub) == [], _weight_requests(local_hub)
    assert lines[0] == lines[1], lines
    assert lines[0].startswith("'user/c': model.safetensors is not a valid safetensors file (") and lines[0].endswith(
        f"it is truncated or corrupt; {HUB_FIX}"), lines[0]


@pytest.mark.parametrize("sharded", [False, True])
def test_the_dry_run_reads_hub_headers_with_the_merges_requests_and_no_head(local_hub, tmp_path, sharded):
    """merge(['user/p', 'user/p'], dry_run=True) asked HEAD model.safetensors (sharded: and HEAD of the index) of each
    parent through get_safetensors_metadata before the ranged GETs the merge's own header reader asks: two readers."""
    if sharded:
        local_hub.upload_folder("user/p", sharded_vit(tmp_path / "p", seed=1))
        names = shards(tmp_path / "p")
    else:
        _upload(local_hub, tmp_path, "user/p", 1)
        names = ["model.safetensors"]
    local_hub.requests.clear()
    hf_mudsc.merge(["user/p", "user/p"], method="linear", progress=False, dry_run=True)
    planned = _weight_requests(local_hub)
    gets = sorted(request for request in planned if request[0] == "GET")
    assert gets == sorted([("GET", name, True) for name in names] * 2), planned  # one ranged GET a file a parent
    # the only HEAD left: the ETag of a single weight file, comparing the two parents (`plan._identical_weights`)
    heads = [request for request in planned if request[0] == "HEAD"]
    assert heads == ([] if sharded else [("HEAD", "model.safetensors", False)] * 2), planned
    from hf_mudsc.load.parents import check_hub_shard_headers, locate_parents

    located = locate_parents(["user/p"])[0][0]
    local_hub.requests.clear()
    check_hub_shard_headers(located, token=None)
    assert located.headers_read
    assert sorted(_weight_requests(local_hub)) == sorted(("GET", name, True) for name in names)

