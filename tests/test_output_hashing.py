"""Each output file is read and hashed once per run (review follow-up): the ownership marker's fingerprints
(size + sha256, `hf_mudsc/publish/folder.py`) are reused within a run while a file's stat is unchanged, and
`--overwrite` still refuses a folder whose files changed after hf-mudsc wrote them.

The hashing is counted by wrapping `folder._fingerprint` (the one function that reads and hashes a file)
through the module attribute, per absolute path: the staging folder and the replaced output are told apart.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_cli import FAST, save_parents_and_data

from hf_mudsc.cli.main import main
from hf_mudsc.publish import folder as folder_module
from hf_mudsc.publish.folder import MARKER_FILENAME, check_output, read_marker, staged_output
from hf_mudsc.publish.recipe import RECIPE_FILENAME

HOUR_NS = 3600 * 10**9


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("hashing_inputs"))


@pytest.fixture()
def hashed(monkeypatch) -> Counter:
    """Absolute path -> how many times its bytes were read and hashed."""
    counts: Counter = Counter()
    real = folder_module._fingerprint

    def counting(path: Path):
        counts[str(Path(path).absolute())] += 1
        return real(path)

    monkeypatch.setattr(folder_module, "_fingerprint", counting)
    return counts


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backdate(folder: Path) -> None:
    """Make every file look written an hour ago, as an output of an earlier run is."""
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns - HOUR_NS, stat.st_mtime_ns - HOUR_NS))


def written_files(folder: Path) -> list[str]:
    return sorted(read_marker(folder)["files"])


def test_merge_then_overwrite_hash_each_file_once(inputs, tmp_path, hashed, one_thread):
    a, b, calibration = inputs
    out = tmp_path / "merged"
    argv = ["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out), *FAST]
    assert main(argv) == 0
    names = written_files(out)
    assert {"model.safetensors", "README.md", RECIPE_FILENAME, "plots/match_quality.png"} <= set(names)
    assert sorted(hashed.values()) == [1] * len(names)  # each new file hashed once, when the marker is written
    assert sorted(Path(p).name for p in hashed) == sorted(Path(n).name for n in names)
    hashed.clear()
    backdate(out)  # an output of an earlier run
    old = {str(out / name) for name in names}
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    # The old files: checked by the CLI before any work, again when the staging folder is made, again just before
    # the rename — read once; the new files: read once, for the marker.
    assert {p: n for p, n in hashed.items() if p in old} == dict.fromkeys(old, 1)
    new = {p: n for p, n in hashed.items() if p not in old}
    assert sorted(new.values()) == [1] * len(names) and all(".merged.partial-" in p for p in new)
    assert written_files(out) == names and read_marker(out)["complete"] is True


def test_merge_with_push_hashes_each_file_once(local_hub, inputs, tmp_path, hashed, monkeypatch, one_thread):
    """`--output DIR --push-to-hub`: the marker the push reads and the final one share one hashing per file."""
    a, b, calibration = inputs
    out = tmp_path / "merged"
    monkeypatch.setenv("HF_TOKEN", local_hub.token)  # the CLI runs in this process against the emulator
    assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out), "--push-to-hub",
                 "user/merged", *FAST]) == 0
    names = written_files(out)
    assert set(local_hub.list_files("user/merged")) == set(names) | {".gitattributes"}
    assert sorted(Path(p).name for p in hashed) == sorted(Path(n).name for n in names)
    assert sorted(hashed.values()) == [1] * len(names)


def written_output(root: Path) -> Path:
    out = root / "out"
    with staged_output(out) as staging:
        (staging / RECIPE_FILENAME).write_text("method: mudsc\n")
        (staging / "model.safetensors").write_bytes(b"weights")
    return out


def test_a_file_changed_during_the_run_is_still_refused(tmp_path, hashed):
    """The reuse never hides a change: same size, the old mtime put back — the changed ctime still shows it."""
    out = written_output(tmp_path)
    backdate(out)
    check_output(out, overwrite=True)  # hashes and remembers the old files
    weights = out / "model.safetensors"
    before = weights.stat()
    weights.write_bytes(b"WEIGHTS")  # same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(FileExistsError, match="files changed since hf-mudsc wrote them: model.safetensors"):
        check_output(out, overwrite=True)
    with pytest.raises(FileExistsError, match="files changed since hf-mudsc wrote them: model.safetensors"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
    assert weights.read_bytes() == b"WEIGHTS" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_change_during_the_swap_is_refused(tmp_path, hashed):
    """Checked on entry, changed while the block runs: the check just before the rename sees it."""
    out = written_output(tmp_path)
    backdate(out)
    with pytest.raises(FileExistsError, match=f"files changed since hf-mudsc wrote them: {RECIPE_FILENAME}"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
            (out / RECIPE_FILENAME).write_text("method: zipt\n")  # same size as before
    assert (out / RECIPE_FILENAME).read_text() == "method: zipt\n" and (out / "model.safetensors").exists()


def test_a_file_changed_just_before_the_check_is_hashed_at_every_check(tmp_path, hashed):
    """File times are a clock tick coarse: a file written within the last seconds could change again without its
    stat showing it, so its fingerprint is never reused to accept a folder for replacing."""
    out = written_output(tmp_path)
    weights = str((out / "model.safetensors").absolute())
    hashed.clear()
    check_output(out, overwrite=True)
    check_output(out, overwrite=True)
    assert hashed[weights] == 2
    backdate(out)
    hashed.clear()
    check_output(out, overwrite=True)
    check_output(out, overwrite=True)
    assert hashed[weights] == 1


def test_the_marker_lists_what_is_there_when_a_file_is_rewritten_in_the_block(tmp_path, hashed):
    """A file recorded for a push and rewritten before the block ends is recorded again, with its new bytes."""
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "model.safetensors").write_bytes(b"first")
        folder_module.record_files(staging, staging=True)
        (staging / "model.safetensors").write_bytes(b"second!")
    marker = json.loads((out / MARKER_FILENAME).read_text())
    assert marker["files"]["model.safetensors"]["size"] == 7
    check_output(out, overwrite=True)  # the marker matches the bytes
