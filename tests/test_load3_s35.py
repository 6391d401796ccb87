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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_parent_with_non_finite_weights_is_refused_before_any_parent_is_loaded_whole(tmp_path, monkeypatch, bad):
    """merge([a, b with NaN in fc1], data) (method auto) judged the parents 'permuted copy (relative weight distance
    0)' from the NaN weights, chose mudsc, loaded every parent whole, and only then refused parent B."""
    import torch
    import transformers
    from factories import make_batches

    from hf_mudsc.errors import MergeInputError

    a, b = make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)
    with torch.no_grad():
        b.vit.layers[1].mlp.fc1.weight[0, 0] = bad
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("a parent was loaded whole before the refusal"))
    with pytest.raises(MergeInputError) as refused:
        hf_mudsc.merge([str(tmp_path / "a"), str(tmp_path / "b")], make_batches("vit_cls", 1), progress=False)
    assert str(refused.value) == ("parent B has NaN or infinite values in 'vit.layers.1.mlp.fc1.weight'; the "
                                  "checkpoint is corrupt or diverged in training — fix or re-export it before "
                                  "merging"), refused.value


@pytest.mark.parametrize("as_folders", [False, True])
def test_an_inf_attention_weight_is_refused_as_non_finite_not_with_a_traceback(tmp_path, as_folders):
    """merge([folder a, folder b with inf in a query weight]) (method auto) crashed with 'LinAlgError: linalg.svd: The
    algorithm failed to converge' from the head-factor balance check, before the NaN/inf check."""
    import torch

    from hf_mudsc.errors import MergeInputError

    a, b = make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)
    name = next(n for n, _ in b.named_parameters() if "q_proj.weight" in n or "query.weight" in n)
    with torch.no_grad():
        dict(b.named_parameters())[name][0, 0] = float("inf")
    parents = [a, b]
    if as_folders:
        a.save_pretrained(tmp_path / "a")
        b.save_pretrained(tmp_path / "b")
        parents = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(MergeInputError) as refused:
        hf_mudsc.merge(parents, progress=False)
    assert str(refused.value).startswith(f"parent B has NaN or infinite values in {name!r}; "), refused.value
