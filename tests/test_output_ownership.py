"""Issue 10, items 4 and 5 (rough edges): `--overwrite` replaces only what hf-mudsc provably wrote.

Ownership is proven by the writer's marker (`.hf_mudsc_output.json`, listing every file it wrote with size and
sha256), never by a `mudsc_recipe.yaml` that anyone may download into a folder. A folder holding anything the
writer did not write is refused, naming those files; the current directory is never replaced; the output
location is checked for writability before any work; leftovers of a killed run are cleaned on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hf_mudsc.publish.folder import MARKER_FILENAME, check_output, staged_output, write_file_atomically
from hf_mudsc.publish.recipe import RECIPE_FILENAME


def written_output(root: Path, name: str = "out") -> Path:
    """A folder as the writer leaves it: model files, a sub-folder, and the marker."""
    out = root / name
    with staged_output(out) as staging:
        (staging / RECIPE_FILENAME).write_text("method: mudsc\n")
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "sub").mkdir()
        (staging / "sub" / "notes.txt").write_text("mine")
    return out


def test_the_marker_lists_every_written_file_with_size_and_sha256(tmp_path):
    out = written_output(tmp_path)
    marker = json.loads((out / MARKER_FILENAME).read_text())
    assert marker["written_by"] == "hf-mudsc"
    assert sorted(marker["files"]) == ["model.safetensors", RECIPE_FILENAME, "sub/notes.txt"]
    assert marker["files"]["model.safetensors"] == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert str(tmp_path) not in (out / MARKER_FILENAME).read_text()  # no paths in it
    assert "host" not in marker and "pid" not in marker  # who wrote it matters only while writing


def test_a_folder_holding_only_a_downloaded_recipe_is_never_replaced(tmp_path, monkeypatch):
    """The README flow that deleted important.txt: a recipe downloaded into a folder of the user's own."""
    work = tmp_path / "work"
    work.mkdir()
    (work / RECIPE_FILENAME).write_text("models: [a, b]\n")
    (work / "important.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"no \.hf_mudsc_output\.json.*delete it yourself"):
        check_output(work, overwrite=True)
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="the current directory"):
        with staged_output(".", overwrite=True):
            raise AssertionError("the block ran although the output was refused")
    assert sorted(p.name for p in work.iterdir()) == ["important.txt", RECIPE_FILENAME]
    assert (work / "important.txt").read_text() == "precious"


def test_extra_files_in_a_written_folder_are_named_and_never_deleted(tmp_path):
    out = written_output(tmp_path)
    (out / "important.txt").write_text("precious")
    (out / "sub" / "draft.md").write_text("draft")
    with pytest.raises(FileExistsError, match=r"files hf-mudsc did not write: important\.txt, sub/draft\.md"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "model.safetensors").write_bytes(b"new")
    assert (out / "important.txt").read_text() == "precious" and (out / "sub" / "draft.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_the_user_made_in_a_written_folder_is_refused_not_deleted(tmp_path):
    """QA s19: `mkdir good/sub` (empty) in a written output, then `--overwrite`: the folder was silently deleted,
    while a non-empty one was refused. An entry the tool did not write is never deleted, empty or not."""
    out = written_output(tmp_path)
    (out / "mine").mkdir()
    (out / "sub" / "drafts").mkdir()
    with pytest.raises(FileExistsError, match=r"files hf-mudsc did not write: mine/, sub/drafts/;"):
        with staged_output(out, overwrite=True) as staging:
            (staging / "model.safetensors").write_bytes(b"new")
    assert (out / "mine").is_dir() and (out / "sub" / "drafts").is_dir()
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_the_tool_wrote_does_not_stop_overwrite(tmp_path):
    """The writer may leave a folder empty (`plots/` when there is nothing to draw): it is its own, so replaceable."""
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "plots" / "none").mkdir(parents=True)
    check_output(out, overwrite=True)
    with staged_output(out, overwrite=True) as staging:
        (staging / "model.safetensors").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILENAME, "model.safetensors"]
    (out / "mine").mkdir()  # an output with no sub-folder of its own: the user's empty one is still refused
    with pytest.raises(FileExistsError, match=r"did not write: mine/;"):
        check_output(out, overwrite=True)


def test_a_copied_marker_does_not_make_someone_elses_folder_replaceable(tmp_path):
    out = written_output(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(b"jpg")
    (photos / MARKER_FILENAME).write_bytes((out / MARKER_FILENAME).read_bytes())
    with pytest.raises(FileExistsError, match=r"did not write: cat\.jpg"):
        check_output(photos, overwrite=True)
    (photos / RECIPE_FILENAME).write_text("method: zipit\n")  # same name, other bytes than the marker lists
    with pytest.raises(FileExistsError,
                       match=rf"did not write: cat\.jpg; files changed since hf-mudsc wrote them: {RECIPE_FILENAME}"):
        check_output(photos, overwrite=True)
    assert (photos / "cat.jpg").read_bytes() == b"jpg"


def test_a_marker_of_gigabytes_is_not_read(tmp_path, monkeypatch):
    """The marker is read whole (for --overwrite, push, evaluate): a folder handed over with a 2 GB (sparse) marker
    was read into memory. Past `MARKER_MAX_BYTES` a folder has no marker that counts."""
    from hf_mudsc.publish.folder import MARKER_MAX_BYTES, read_marker

    out = written_output(tmp_path)
    with (out / MARKER_FILENAME).open("ab") as handle:
        handle.truncate(MARKER_MAX_BYTES + 1)  # sparse: no disk used
    monkeypatch.setattr(Path, "read_text", lambda *a, **k: pytest.fail("the marker was read whole"))
    assert read_marker(out) is None
    with pytest.raises(FileExistsError, match=f"no {MARKER_FILENAME} listing its files"):
        check_output(out, overwrite=True)


def test_a_symlink_inside_a_written_folder_is_refused(tmp_path):
    out = written_output(tmp_path)
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(FileExistsError, match=r"did not write: link"):
        check_output(out, overwrite=True)


def test_files_the_tool_writes_later_are_recorded_so_overwrite_still_works(tmp_path):
    """`hf-mudsc evaluate` adds eval_results.json and rewrites the card in a written folder."""
    out = written_output(tmp_path)
    write_file_atomically(out / "eval_results.json", lambda path: path.write_text("{}"))
    write_file_atomically(out / RECIPE_FILENAME, lambda path: path.write_text("method: zipit\n"))
    check_output(out, overwrite=True)
    with staged_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILENAME, "config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_current_directory_and_its_parents_are_never_outputs(tmp_path, monkeypatch):
    out = written_output(tmp_path)
    (out / "sub" / "deeper").mkdir()
    monkeypatch.chdir(out / "sub" / "deeper")
    for target in (".", "..", "../.."):
        with pytest.raises(FileExistsError, match="the current directory"):
            check_output(target, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"weights"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "file.txt" / "out", "is under the file"),
        (lambda root: root / ("x" * 300), "too long"),
        (lambda root: Path("/proc/hf-mudsc-no-such-dir/out"), "cannot create"),
    ],
    ids=["under-a-file", "name-too-long", "unwritable"],
)
def test_an_unusable_output_location_is_refused_before_any_work(tmp_path, make, message):
    (tmp_path / "file.txt").write_text("x")
    target = make(tmp_path)
    with pytest.raises(ValueError, match=message):
        check_output(target, overwrite=False)
    with pytest.raises(ValueError, match=message):
        with staged_output(target):
            raise AssertionError("the block ran although the output location is unusable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


KILLED_WRITER = """
import os, signal, sys
from hf_mudsc.publish.folder import record_files, staged_output
with staged_output(sys.argv[1]) as staging:
    (staging / "model.safetensors").write_bytes(b"half")
    if sys.argv[2] == "pushing":  # killed during the push, which happens on the sealed staging folder
        record_files(staging, staging=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["writing", "pushing"])
def test_leftovers_of_a_killed_run_of_this_output_are_cleaned_on_the_next_run(tmp_path, when):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(out), when], env=env)
    assert proc.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.partial-")
    # Not ours to delete: a look-alike without the marker, and another output's leftover.
    (tmp_path / ".out.partial-userdata").mkdir()
    (tmp_path / ".out.partial-userdata" / "keep.txt").write_text("keep")
    other = tmp_path / ".other.partial-x"
    other.mkdir()
    (other / MARKER_FILENAME).write_bytes((tmp_path / left[0] / MARKER_FILENAME).read_bytes())
    with staged_output(out) as staging:
        (staging / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x", ".out.partial-userdata", "out"]
    assert (out / "model.safetensors").read_bytes() == b"whole"


def test_a_leftover_holding_a_file_the_writer_never_writes_is_kept_and_names_are_not_patterns(tmp_path, caplog):
    """QA s23: leftover cleanup `rmtree`d a killed run's staging folder whatever it held (a user file copied into it
    went too), and read the output's name as a glob pattern (`o[u]t` removed `out`'s leftover)."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(out), "writing"],
                          env=env).returncode == -9
    [left] = [p for p in tmp_path.iterdir()]
    mine = tmp_path / ".out.partial-mine"
    shutil.copytree(left, mine)
    (mine / "precious.txt").write_text("keep")
    with staged_output(tmp_path / "o[u]t") as staging:  # another output, whose name is a glob pattern
        (staging / "config.json").write_text("{}")
    assert left.is_dir() and mine.is_dir()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        with staged_output(out) as staging:
            (staging / "model.safetensors").write_bytes(b"whole")
    assert not left.exists() and (mine / "precious.txt").read_text() == "keep"
    assert [r.getMessage() for r in caplog.records if "precious.txt" in r.getMessage()], caplog.text


def test_a_dot_dot_through_a_missing_folder_creates_no_folder(tmp_path):
    """QA s23: `--output nope/../m10` wrote `m10` and left an empty `nope` behind (the staging parent was created
    before `..` was resolved); `--output-json` alike."""
    with staged_output(tmp_path / "nope" / ".." / "m10") as staging:
        (staging / "config.json").write_text("{}")
    write_file_atomically(tmp_path / "gone" / ".." / "r.json", lambda path: path.write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m10", "r.json"]
    assert (tmp_path / "m10" / "config.json").read_text() == "{}"


KILLED_PUSH_ONLY_WRITER = """
import os, signal
from hf_mudsc.publish.folder import record_files, staged_output
with staged_output(None) as staging:  # a push without --output stages in the temp folder
    (staging / "model.safetensors").write_bytes(b"half")
    record_files(staging, staging=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_killed_push_only_run_are_cleaned_on_the_next_push_only_run(tmp_path, monkeypatch):
    """A push-only merge (CLI `--push-to-hub` without `--output`, every such service job) killed mid-write left its
    whole staged model in the temp folder for good: no later run ever looked there. The next push-only run removes
    it (the writer's own, its process gone), never a look-alike it did not write."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TMPDIR": str(scratch)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_PUSH_ONLY_WRITER)], env=env)
    assert proc.returncode == -9
    [left] = list(scratch.iterdir())
    assert left.name.startswith(".hf-mudsc.partial-")
    (scratch / ".hf-mudsc.partial-userdata").mkdir()
    (scratch / ".hf-mudsc.partial-userdata" / "keep.txt").write_text("keep")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with staged_output(None) as staging:
        (staging / "model.safetensors").write_bytes(b"whole")
        assert not left.exists()  # cleaned before this run staged its own
    assert [p.name for p in scratch.iterdir()] == [".hf-mudsc.partial-userdata"]
