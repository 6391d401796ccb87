"""`hf_mudsc.output`: an output folder appears whole or not at all, and an existing one is never harmed."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from hf_mudsc.publish.folder import MARKER_FILENAME, check_output, staged_output, write_file_atomically
from hf_mudsc.publish.recipe import RECIPE_FILENAME


def digest(folder: Path) -> str:
    """Names, bytes and modification times of everything in `folder`."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
            h.update(str(path.stat().st_mtime_ns).encode())
    return h.hexdigest()


def previous_output(root: Path) -> Path:
    """A folder as an earlier run of the writer leaves it (with its marker listing the files)."""
    out = root / "out"
    with staged_output(out) as staging:
        (staging / "sub").mkdir()
        (staging / RECIPE_FILENAME).write_text("method: mudsc\n")
        (staging / "model.safetensors").write_bytes(b"old weights")
        (staging / "sub" / "notes.txt").write_text("old")
    return out


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_a_new_output_appears_complete_with_the_usual_permissions(tmp_path):
    out = tmp_path / "deep" / "out"
    with staged_output(out) as staging:
        assert staging.parent == out.parent and ".out.partial-" in staging.name and not out.exists()
        (staging / "model.safetensors").write_bytes(b"weights")
        fd, name = tempfile.mkstemp(dir=staging)  # writers using mkstemp leave 0600 files
        os.close(fd)
        (staging / "sub").mkdir(mode=0o700)
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", Path(name).name, "sub",
                                                            MARKER_FILENAME])
    umask = os.umask(0)
    os.umask(umask)
    assert (out / Path(name).name).stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == (out / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert hidden(out.parent) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_while_writing_leaves_the_existing_output_untouched(tmp_path, error):
    out = previous_output(tmp_path)
    before = digest(out)
    with pytest.raises(type(error)) as caught:
        with staged_output(out, overwrite=True) as staging:
            (staging / RECIPE_FILENAME).write_text("method: zipit\n")
            (staging / "model.safetensors").write_bytes(b"half")
            raise error
    assert caught.value is error
    assert digest(out) == before and (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup folder left


def test_a_failure_while_writing_a_new_output_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        with staged_output(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
            raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_failure_leaves_no_folder_it_created_on_the_way_to_the_output(tmp_path):
    """`--output new1/new2/out` made `new1/new2` for the staging folder; a failure left them behind, empty."""
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match="disk full"):
        with staged_output(tmp_path / "kept" / "new1" / "new2" / "out") as staging:
            (staging / "config.json").write_text("{}")
            raise OSError("disk full")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]
    with staged_output(tmp_path / "kept" / "new1" / "out") as staging:  # a success keeps them
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "kept" / "new1" / "out" / "config.json").is_file()


def test_an_output_name_that_is_not_utf8_is_refused_before_the_work(tmp_path):
    """The card and the recipe name the folder in UTF-8: a name with undecodable bytes failed after the merge."""
    from hf_mudsc.errors import OutputLocationError

    name = os.fsdecode(b"merged-\xff")
    with pytest.raises(OutputLocationError) as caught:
        check_output(tmp_path / name, overwrite=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "choose a --output of UTF-8 characters" in message, message


def test_an_output_that_is_a_link_loop_is_refused_in_one_line(tmp_path):
    from hf_mudsc.errors import OutputLocationError

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(OutputLocationError) as caught:
        check_output(tmp_path / "a", overwrite=True)
    message = str(caught.value)
    assert "\n" not in message
    assert f"--output {str(tmp_path / 'a')!r} is a symbolic link that never reaches a folder (a loop)" in message


def test_a_failure_of_the_final_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    """Where the system cannot swap the folders in one step (`exchange_paths` False), the two renames' fallback."""
    from hf_mudsc.publish import folder as folder_module

    monkeypatch.setattr(folder_module, "exchange_paths", lambda first, second: False)
    out = previous_output(tmp_path)
    before = digest(out)
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in Path(src).name:  # the staged folder moving into place
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with staged_output(out, overwrite=True) as staging:
            (staging / RECIPE_FILENAME).write_text("method: zipit\n")
    monkeypatch.undo()
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_the_whole_folder(tmp_path):
    out = previous_output(tmp_path)
    with staged_output(out, overwrite=True) as staging:
        (staging / RECIPE_FILENAME).write_text("method: zipit\n")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILENAME, RECIPE_FILENAME]  # old files are gone
    assert (out / RECIPE_FILENAME).read_text() == "method: zipit\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_outputs_are_refused_before_the_block_runs(tmp_path):
    out = previous_output(tmp_path)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpg")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    before = digest(tmp_path)
    cases = [
        (out, False, "already exists; pass --overwrite"),
        (foreign, True, "not a folder written by hf-mudsc"),
        (a_file, True, "not a folder written by hf-mudsc"),
        (link, True, "symbolic link"),
    ]
    for target, overwrite, message in cases:
        with pytest.raises(FileExistsError, match=message):
            check_output(target, overwrite=overwrite)
        with pytest.raises(FileExistsError, match=message):
            with staged_output(target, overwrite=overwrite):
                raise AssertionError("the block ran although the output was refused")
    assert digest(tmp_path) == before and hidden(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty, overwrite=True)  # an empty folder may be replaced
    check_output(tmp_path / "absent", overwrite=False)


def test_an_output_written_meanwhile_by_someone_else_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileExistsError) as refused:
        with staged_output(out) as staging:
            (staging / "mine.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and hidden(tmp_path) == []
    # The advice fits the folder that appeared: --overwrite would refuse a folder of someone else's files too.
    message = str(refused.value)
    assert message.startswith(f"the output folder {str(out)!r} appeared while this run was writing it")
    assert "not a folder written by hf-mudsc" in message and "--overwrite" not in message
    # A folder another hf-mudsc run finished meanwhile: --overwrite would replace it, and the message says so.
    other = tmp_path / "other"
    with pytest.raises(FileExistsError, match="appeared while this run was writing it; pass --overwrite"):
        with staged_output(other) as staging:
            (staging / "mine.txt").write_text("mine")
            with staged_output(other) as first:
                (first / "theirs.txt").write_text("theirs")
    assert [p.name for p in other.iterdir() if p.name != MARKER_FILENAME] == ["theirs.txt"]
    assert hidden(tmp_path) == []


def test_keep_existing_lets_a_cache_entry_written_first_win(tmp_path):
    entry = tmp_path / "cache" / "pair"
    with staged_output(entry, keep_existing=True) as staging:
        (staging / "config.json").write_text("first")
    with staged_output(entry, keep_existing=True) as staging:  # a concurrent second run
        (staging / "config.json").write_text("second")
    assert (entry / "config.json").read_text() == "first" and hidden(entry.parent) == []


def test_without_an_output_the_scratch_folder_is_always_removed(tmp_path):
    with staged_output(None) as staging:
        assert staging.is_dir() and Path(tempfile.gettempdir()) == staging.parent
        (staging / "README.md").write_text("card")
    assert not staging.exists()
    with pytest.raises(ValueError):
        with staged_output(None) as staging:
            raise ValueError
    assert not staging.exists()


def test_a_single_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def fail(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_file_atomically(target, lambda temporary: temporary.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
