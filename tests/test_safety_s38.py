"""Session 38's data-safety leftovers: concurrent writers of one merged folder, the `--overwrite` swap, each proven
here before it was fixed."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_mudsc.publish import folder as folder_module
from hf_mudsc.publish.folder import (
    MARKER_FILENAME,
    changed_files,
    clean_leftovers,
    read_marker,
    record_files,
    replace_files_together,
    staged_output,
    unlisted_files,
    write_file_atomically,
)


def merged_folder(path: Path) -> Path:
    """A folder as a merge leaves it: a few files and a complete marker listing them."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}\n", encoding="utf-8")
    (path / "README.md").write_text("# card\n", encoding="utf-8")
    record_files(path)
    return path


def test_two_writers_of_one_merged_folder_never_lose_each_others_marker_entry(tmp_path, monkeypatch):
    """Two `evaluate`/`inspect` runs writing into one merged folder at once: each read the marker before the other
    renamed its own, the last one's marker dropped the other's file (pushed never, `--overwrite` refused it)."""
    out = merged_folder(tmp_path / "merged")
    listings = folder_module._marker_listings
    slow = threading.Event()

    def slow_listings(*args, **kwargs):
        made = listings(*args, **kwargs)
        if not slow.is_set():  # the first writer: read the marker, then is slow to rename
            slow.set()
            time.sleep(0.6)
        return made

    monkeypatch.setattr(folder_module, "_marker_listings", slow_listings)
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            if name == "eval_results.json":  # as `hf-mudsc evaluate` writes its results, chart and card
                replace_files_together([(out / name, lambda to: to.write_text(name, encoding="utf-8")),
                                        (out / "README.md", lambda to: to.write_text("# scored\n", encoding="utf-8"))],
                                       owner=out)
            else:  # as `inspect` writes a plot
                write_file_atomically(out / name, lambda to: to.write_text(name, encoding="utf-8"), owner=out)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    first = threading.Thread(target=write, args=("eval_results.json",))
    first.start()
    assert slow.wait(10)
    second = threading.Thread(target=write, args=("notes.json",))
    second.start()
    first.join(20)
    second.join(20)
    assert not errors
    assert unlisted_files(out, check_content=True) == ([], [])
    assert changed_files(out) == []
    assert {"eval_results.json", "notes.json"} <= set(read_marker(out)["files"])


def test_a_writer_waiting_too_long_for_another_process_is_refused_in_one_line(tmp_path, monkeypatch):
    """Another process still writing into the folder (its lock held) past the wait: this one is refused in one line,
    not left to race it; once that process ends (its lock with it), the write goes through."""
    import subprocess
    import sys

    out = merged_folder(tmp_path / "merged")
    monkeypatch.setattr(folder_module, "LOCK_WAIT_SECONDS", 0.3)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom hf_mudsc.publish.folder import "
         "folder_lock\nwith folder_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(60)\n",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError) as caught:
            write_file_atomically(out / "eval_results.json", lambda to: to.write_text("{}", encoding="utf-8"),
                                  owner=out)
    finally:
        holder.kill()
        holder.wait(10)
    message = str(caught.value)
    assert "another hf-mudsc run" in message and "run again" in message and "\n" not in message
    assert not (out / "eval_results.json").exists()
    assert unlisted_files(out, check_content=True) == ([], [])
    write_file_atomically(out / "eval_results.json", lambda to: to.write_text("{}", encoding="utf-8"), owner=out)
    assert "eval_results.json" in read_marker(out)["files"]


@pytest.mark.parametrize("killed_at", [1, 2])
def test_overwrite_killed_between_the_swaps_steps_leaves_a_complete_output(tmp_path, monkeypatch, caplog, killed_at):
    """merge --overwrite killed (SIGKILL) between its two renames: no folder at the output path, the old one in
    `.DIR.old-*`. Now the new folder takes the old one's place in one step (`renameat2(RENAME_EXCHANGE)`); the old
    copy a kill after it leaves (at the staging name, or renamed aside) is removed by the next run, which proves it
    the writer's, and said."""
    if killed_at == 1:  # the kill lands after the one-step swap only where the system has it
        first, second = tmp_path / "probe-a", tmp_path / "probe-b"
        first.mkdir()
        second.mkdir()
        if not folder_module.exchange_paths(first, second):
            pytest.skip("no atomic exchange (renameat2) here: --overwrite renames twice, the case [2] covers")
        first.rmdir()
        second.rmdir()
    out = tmp_path / "merged"
    with staged_output(out) as staging:
        (staging / "config.json").write_text('{"old": true}\n', encoding="utf-8")

    class Killed(BaseException):
        """What a SIGKILL amounts to here: nothing after it runs (no handler, no clean-up)."""

    real_rename = os.rename
    calls = []

    def rename_then_die(source, destination):
        calls.append((source, destination))
        if len(calls) >= killed_at:
            raise Killed
        real_rename(source, destination)

    monkeypatch.setattr(folder_module.os, "rename", rename_then_die)
    monkeypatch.setattr(folder_module, "_remove_marker_last", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed), staged_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text('{"old": false}\n', encoding="utf-8")
    monkeypatch.undo()
    assert (out / "config.json").read_text(encoding="utf-8") == '{"old": false}\n'
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "merged")
    assert leftovers, "the old copy is somewhere beside the output"
    with caplog.at_level(logging.INFO, logger="hf_mudsc.publish.folder"):
        removed = clean_leftovers(out)
    assert [p.name for p in removed] == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert any("removed" in record.getMessage() for record in caplog.records)


def test_a_leftover_staging_folder_that_cannot_be_proven_the_writers_is_kept_and_said(tmp_path, caplog):
    """A `.DIR.partial-*` folder without the writer's marker (a run killed before writing it, or a copy someone
    made): it was skipped without a word; now it is kept and the next run says so."""
    out = merged_folder(tmp_path / "merged")
    stray = tmp_path / ".merged.partial-abcdefghij"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hf_mudsc.publish.folder"):
        assert clean_leftovers(out) == []
    assert (stray / "notes.txt").is_file()
    assert any(str(stray) in record.getMessage() and "yourself" in record.getMessage() for record in caplog.records)
    assert (out / MARKER_FILENAME).is_file()


def shared_backbone_plans(refit: str):
    """The dry runs of merge([A, B]) with B holding A's backbone object (`B.bert = A.bert`) and of the same merge with
    an unshared copy of B, and B."""
    import copy

    from factories import make_batches, make_model

    import hf_mudsc

    a, other = make_model("bert_cls", seed=0), make_model("bert_cls", seed=3)
    b = copy.deepcopy(a)
    b.classifier = copy.deepcopy(other.classifier)
    b.bert = a.bert
    twin = copy.deepcopy(b)
    batches = make_batches("bert_cls", num_batches=2, batch_size=8)
    shared = hf_mudsc.merge([a, b], batches, method="mudsc", refit=refit, dry_run=True)
    unshared = hf_mudsc.merge([a, twin], batches, method="mudsc", refit=refit, dry_run=True)
    return SimpleNamespace(a=a, b=b, twin=twin, batches=batches, shared=shared, unshared=unshared)


@pytest.mark.parametrize("refit", ["ridge", "gate"])
def test_the_dry_runs_memory_counts_a_parent_copied_for_the_refit(refit):
    """merge([A, B], data, refit="ridge", dry_run=True) with B holding A's backbone object (`B.bert = A.bert`): the
    refit runs a deep copy of B (`refit.replayed_parents`), 4 bytes per parameter more, which the estimate lacked."""
    import torch

    import hf_mudsc

    plans = shared_backbone_plans(refit)
    a, b, twin, batches = plans.a, plans.b, plans.twin, plans.batches
    one_parent = 4 * sum(p.numel() for p in b.parameters())
    assert plans.shared.estimate.peak_memory_bytes - plans.unshared.estimate.peak_memory_bytes == pytest.approx(
        one_parent, abs=8)
    none = hf_mudsc.merge([a, b], batches, method="mudsc", refit="none", dry_run=True)
    assert none.estimate.peak_memory_bytes == hf_mudsc.merge([a, twin], batches, method="mudsc", refit="none",
                                                             dry_run=True).estimate.peak_memory_bytes
    assert isinstance(a, torch.nn.Module) and b.bert is a.bert  # the parents are left as given


@pytest.mark.parametrize("refit", ["ridge", "repair"])
def test_a_refit_on_data_too_large_for_float32_names_the_data_not_the_options(refit):
    """merge([A, B], pixel_values × 1e20, method="average", refit="ridge"): "the options overflowed float32; use
    moderate weights= / scaling= values" — options the user never passed; the parents' activations overflowed."""
    from factories import fine_tune, make_batches, make_model

    import hf_mudsc
    from hf_mudsc.errors import CalibrationError

    base = make_model("vit_cls", seed=0)
    a, b = fine_tune(base, 1, 0.05), fine_tune(base, 2, 0.05)
    batches = [{key: value * 1e20 if key == "pixel_values" else value for key, value in batch.items()}
               for batch in make_batches("vit_cls", num_batches=1, batch_size=4)]
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([a, b], batches, method="average", refit=refit, progress=False)
    message = str(caught.value)
    assert "refit" in message and "too large for float32" in message and "weights=" not in message
    assert "calibration data" in message and "\n" not in message


@pytest.fixture(scope="module")
def pushable(tmp_path_factory):
    """A merged folder as `hf-mudsc merge --output` writes it (two tiny ViTs averaged)."""
    from factories import make_model

    import hf_mudsc

    merged = hf_mudsc.merge([make_model("vit_cls", seed=0), make_model("vit_cls", seed=1)], None, method="average",
                            progress=False)
    return hf_mudsc.save_merged(merged, tmp_path_factory.mktemp("safety38_push") / "merged")


def test_a_push_to_a_new_branch_leaves_mains_other_files_off_it_says_so_and_main_keeps_them(hub_cli, local_hub,
                                                                                             pushable):
    """hf-mudsc push DIR user/m --revision exp (no such branch): main's files the folder lacks (another model's shard
    index, a user's notes) were deleted on the new branch without a word on stdout. Kept so (a stale index would load
    main's weights from the branch), main keeps them, and the printed line now says how many left the branch."""
    hub = local_hub
    hub.create_repo("user/m38")
    hub.commit_files("user/m38", {"model.safetensors.index.json": b'{"weight_map": {}}', "notes.md": b"mine"},
                     "main's model")
    main_head = hub.head("user/m38")
    pushed = hub_cli("push", str(pushable), "user/m38", "--revision", "exp")
    assert pushed.returncode == 0, pushed.stderr
    on_branch = hub.list_files("user/m38", revision="exp")
    assert "model.safetensors.index.json" not in on_branch and "notes.md" not in on_branch
    assert hub.head("user/m38") == main_head
    assert {"model.safetensors.index.json", "notes.md"} <= set(hub.list_files("user/m38"))
    line = pushed.stdout.strip().splitlines()[-1]
    assert "(branch exp)" in line and "2 files" in line and "main keeps" in line


# ----------------------------------------------------------------------------------------------- fix round


def test_a_users_copy_under_a_staging_like_name_survives_the_next_overwrite(tmp_path):
    """cp -a out .out.partial-keep, then merge --overwrite out: the copy (a finished output's marker, no writer) was
    deleted as "an old copy left by an interrupted --overwrite"; only the folder the swap itself named is."""
    import shutil

    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "config.json").write_text("{}", encoding="utf-8")
    kept = [tmp_path / ".out.partial-keep", tmp_path / ".out.partial-abcd_123"]  # the second: mkdtemp's shape
    for copy in kept:
        shutil.copytree(out, copy)
    with staged_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text('{"new": 1}', encoding="utf-8")
    assert all((copy / "config.json").read_text(encoding="utf-8") == "{}" for copy in kept)
    assert (out / "config.json").read_text(encoding="utf-8") == '{"new": 1}'
    assert clean_leftovers(out) == [] and all(copy.is_dir() for copy in kept)


def test_a_writer_waiting_while_overwrite_swaps_the_folder_refuses_in_one_line_and_the_new_output_stays_clean(
        tmp_path, monkeypatch):
    """evaluate writing into out while merge --overwrite out checks the old folder and swaps: evaluate ended in a bare
    FileNotFoundError and its rollback put the OLD folder's marker into the new output (push/--overwrite refused it)."""
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "config.json").write_text('{"old": 1}', encoding="utf-8")
    real_check = folder_module.check_output
    started, errors = threading.Event(), []
    calls = []

    def evaluate() -> None:
        try:
            write_file_atomically(out / "eval_results.json", lambda to: to.write_text("{}", encoding="utf-8"),
                                  owner=out)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    def check(*args, **kwargs):  # merge's re-check right before the swap: evaluate starts during it
        result = real_check(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            thread = threading.Thread(target=evaluate)
            thread.start()
            started.set()
            time.sleep(0.5)  # evaluate reaches the lock (or, unlocked, its renames) meanwhile
            calls.append(thread)
        return result

    monkeypatch.setattr(folder_module, "check_output", check)
    with staged_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text('{"new": 1}', encoding="utf-8")
    assert started.wait(5)
    calls[-1].join(20)
    monkeypatch.undo()
    assert unlisted_files(out, check_content=True) == ([], [])
    assert changed_files(out) == []
    assert (out / "config.json").read_text(encoding="utf-8") == '{"new": 1}'
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    message = str(errors[0])
    assert "replaced" in message and "run again" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_folder_lock_follows_the_folder_now_at_the_path(tmp_path):
    """A writer that waited on the old folder's lock while --overwrite swapped in a new one got the lock of the old
    folder (now elsewhere): it then rewrote the new folder's marker unlocked."""
    import fcntl

    out = merged_folder(tmp_path / "out")
    aside = tmp_path / "aside"
    held = os.open(out, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    got = threading.Event()

    def wait_for_lock() -> None:
        with folder_module.folder_lock(out):
            got.set()
            time.sleep(0.3)

    thread = threading.Thread(target=wait_for_lock)
    thread.start()
    time.sleep(0.2)
    out.rename(aside)
    merged_folder(out)
    probe = os.open(out, os.O_RDONLY)
    os.close(held)  # the old folder's lock released: the waiter must now lock the new one
    assert got.wait(5)
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    thread.join(5)
    os.close(probe)


def test_a_push_onto_an_existing_branch_says_its_own_files_left_it(hub_cli, local_hub, pushable):
    """hf-mudsc push DIR user/m --revision dev --overwrite with dev holding other files: stdout said they were "not on
    the branch (main keeps its own)" — they were dev's, and main never had them."""
    hub = local_hub
    hub.create_repo("user/m38b")
    hub.commit_files("user/m38b", {"notes.md": b"main's"}, "main")
    first = hub_cli("push", str(pushable), "user/m38b", "--revision", "dev")
    assert first.returncode == 0, first.stderr
    assert "main keeps" in first.stdout.strip().splitlines()[-1]
    hub.commit_files("user/m38b", {"dev-notes.md": b"dev's"}, "dev's own file", revision="dev")
    pushed = hub_cli("push", str(pushable), "user/m38b", "--revision", "dev", "--overwrite")
    assert pushed.returncode == 0, pushed.stderr
    line = pushed.stdout.strip().splitlines()[-1]
    assert "main keeps" not in line and "1 file" in line and "deleted from the branch" in line
    assert "dev-notes.md" not in hub.list_files("user/m38b", revision="dev")


def test_the_dry_run_counts_no_refit_copy_for_repair_which_copies_nothing():
    """merge([A, B], data, refit="repair", dry_run=True), B holding A's backbone object: the estimate counted a copy
    of B that REPAIR never makes (it reads each parent's moments in place)."""
    plans = shared_backbone_plans("repair")
    assert plans.shared.estimate.peak_memory_bytes == plans.unshared.estimate.peak_memory_bytes


@pytest.mark.parametrize("writer", ["together", "one file"])
def test_a_writer_into_a_folder_given_through_a_symlink_finishes(tmp_path, writer):
    """`hf-mudsc inspect LINK` / `evaluate LINK` (LINK a symlink to a merged folder) never returned: the lock compared
    the link's own inode (lstat) with the folder's it had opened (open follows the link), found them different
    forever and retried without a pause or a deadline."""
    out = merged_folder(tmp_path / "out")
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    done = threading.Event()

    def write() -> None:
        if writer == "together":
            replace_files_together([(link / "r.json", lambda p: p.write_text("{}"))], owner=link)
        else:
            write_file_atomically(link / "README.md", lambda p: p.write_text("# new card\n"), owner=link)
        done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    assert done.wait(10), "the write into the folder given through a symlink did not finish"
    name = "r.json" if writer == "together" else "README.md"
    assert name in read_marker(out)["files"] and not changed_files(out)


def test_two_runs_writing_the_same_files_leave_the_same_marker_without_a_staging_name(tmp_path):
    """The staging name recorded for the swap (`swaps_out_as`, random) stayed in every finished output's marker: two
    runs writing the same model left different `.hf_mudsc_output.json` files (test_cli's "writes what it wrote
    before" failed)."""
    markers = []
    for _ in range(3):  # a new output, then two --overwrite swaps
        with staged_output(tmp_path / "out", overwrite=True) as staging:
            (staging / "config.json").write_text("{}\n", encoding="utf-8")
        markers.append((tmp_path / "out" / MARKER_FILENAME).read_bytes())
        assert folder_module.SWAPS_OUT_AS not in read_marker(tmp_path / "out")
    assert markers[1] == markers[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
