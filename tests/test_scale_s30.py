"""The big-model path's defects the s30 scale hunt found: a Hub parent's corrupt, missing or doubled shard must be
refused by the dry run and by every merge in one line, as the loader refuses it (never a traceback)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cli_runs import run_cli
from test_loading import make_model

import hf_mudsc
from hf_mudsc.errors import LoadError


def sharded_vit(folder, seed):
    make_model("vit_cls", seed=seed).save_pretrained(folder, max_shard_size="20KB")
    return folder


def shards(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


def one_line_refusal(code, lines):
    assert code == 1, lines
    assert not [line for line in lines if "Traceback" in line], lines
    errors = [line for line in lines if line.startswith("hf-mudsc merge: error:")]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.fixture
def p1(local_hub, tmp_path):
    make_model("vit_cls", seed=1).save_pretrained(tmp_path / "p1")
    local_hub.upload_folder("user/p1", tmp_path / "p1")
    return local_hub


def test_a_corrupt_hub_shard_is_refused_in_one_line_by_the_dry_run_and_by_every_merge(p1, tmp_path, capsys):
    folder = sharded_vit(tmp_path / "bad", seed=2)
    corrupt = shards(folder)[1]
    (folder / corrupt).write_bytes(b"garbage" * 3)
    p1.upload_folder("user/bad", folder)
    argv = ["merge", "user/p1", "user/bad", "--method", "linear"]
    line = one_line_refusal(*run_cli([*argv, "--dry-run"], capsys))  # headers read from the Hub
    assert "'user/bad'" in line and corrupt in line and "corrupt" in line, line
    for _ in range(2):  # the first merge downloads the shard; the second reads the cached snapshot's headers
        with pytest.raises(LoadError, match=f"'user/bad': {corrupt} is not a valid safetensors file"):
            hf_mudsc.merge(["user/p1", "user/bad"], method="linear", progress=False)
    line = one_line_refusal(*run_cli([*argv, "--dry-run"], capsys))
    assert corrupt in line and "corrupt" in line, line
    line = one_line_refusal(*run_cli([*argv, "--output", str(tmp_path / "out")], capsys))
    assert corrupt in line, line


def test_a_hub_shard_the_index_lists_but_the_repo_lacks_is_refused_in_one_line_by_the_dry_run(p1, tmp_path, capsys):
    folder = sharded_vit(tmp_path / "broken", seed=2)
    missing = shards(folder)[-1]
    (folder / missing).unlink()
    p1.upload_folder("user/broken", folder)
    with pytest.raises(LoadError) as merged:
        hf_mudsc.merge(["user/p1", "user/broken"], method="linear", progress=False)
    with pytest.raises(LoadError) as planned:
        hf_mudsc.merge(["user/p1", "user/broken"], method="linear", progress=False, dry_run=True)
    for error in (merged.value, planned.value):
        assert "\n" not in str(error) and "user/broken" in str(error) and missing in str(error), str(error)
    line = one_line_refusal(*run_cli(["merge", "user/p1", "user/broken", "--method", "linear", "--dry-run"], capsys))
    assert "user/broken" in line and missing in line, line


def test_a_tensor_stored_twice_in_hub_shards_is_refused_by_the_dry_run_as_the_merge_refuses_it(p1, tmp_path):
    folder = sharded_vit(tmp_path / "dup", seed=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "classifier.bias"
    holder = index["weight_map"][key]
    other = next(name for name in shards(folder) if name != holder)
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / other)
    tensors[key] = load_file(folder / holder)[key]
    save_file(tensors, folder / other, metadata={"format": "pt"})
    p1.upload_folder("user/dup", folder)
    first, second = sorted((holder, other))
    wording = f"'user/dup': tensor '{key}' is stored twice, in {first} and {second}"
    with pytest.raises(LoadError, match=wording):
        hf_mudsc.merge(["user/p1", "user/dup"], method="linear", progress=False, dry_run=True)
    with pytest.raises(LoadError, match=wording):
        hf_mudsc.merge(["user/p1", "user/dup"], method="linear", progress=False)
    shutil.rmtree(tmp_path / "dup")


def test_the_dry_run_warns_in_the_merges_words_of_a_merge_the_memory_available_refuses(tmp_path, monkeypatch):
    from factories import make_batches

    import hf_mudsc.plan as plan
    from hf_mudsc.errors import MergeInputError

    parents = []
    for seed in (1, 2, 3):
        make_model("vit_cls", seed=seed).save_pretrained(tmp_path / f"p{seed}")
        parents.append(str(tmp_path / f"p{seed}"))
    batches = make_batches("vit_cls", num_batches=1)
    monkeypatch.setattr(plan, "available_memory", lambda: 1_000_000)
    with pytest.raises(MergeInputError, match="but 1.00 MB of memory is available") as merged:
        hf_mudsc.merge(parents, batches, method="mudsc", progress=False)
    planned = hf_mudsc.merge(parents, batches, method="mudsc", progress=False, dry_run=True)
    assert f"the merge would refuse at once: {merged.value}" in planned.warnings  # the plan, with the merge's line
    assert f"the merge would refuse at once: {merged.value}" in str(planned)
    monkeypatch.setattr(plan, "available_memory", lambda: None)  # unknown: no such warning
    planned = hf_mudsc.merge(parents, batches, method="mudsc", progress=False, dry_run=True)
    assert not [w for w in planned.warnings if "would refuse" in w]


def test_out_dtype_auto_reads_only_the_stored_tensors_that_are_model_weights(tmp_path):
    """An unused float32 tensor in float16 checkpoints (from_pretrained drops it) must not make the merge float32."""
    import torch
    from safetensors.torch import load_file, save_file

    parents = []
    for seed in (1, 2):
        folder = tmp_path / f"p{seed}"
        make_model("bert_cls", seed=seed).to(torch.float16).save_pretrained(folder)
        tensors = load_file(folder / "model.safetensors")
        tensors["unused.scale"] = torch.ones(4)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        parents.append(str(folder))
    plan = hf_mudsc.merge(parents, method="linear", progress=False, dry_run=True)
    assert plan.out_dtype == "float16", plan.out_dtype_reason
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    assert merged.dtype == torch.float16, merged.config.mudsc["out_dtype_reason"]


def test_an_offline_rerun_of_a_merge_that_ran_online_finds_the_parents_in_the_cache(p1, tmp_path, monkeypatch):
    import torch
    from huggingface_hub import constants

    make_model("vit_cls", seed=2).save_pretrained(tmp_path / "p2")
    p1.upload_folder("user/p2", tmp_path / "p2")
    online = hf_mudsc.merge(["user/p1", "user/p2"], method="linear", progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = hf_mudsc.merge(["user/p1", "user/p2"], method="linear", progress=False)
    for name, tensor in online.state_dict().items():
        assert torch.equal(tensor, offline.state_dict()[name]), name
