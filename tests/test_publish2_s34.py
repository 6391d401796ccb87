"""Session 34 review fixes of publish/folder.py: files `evaluate` writes into a new output while `merge --overwrite`
still deletes the old copy keep their marker entries; the `replacing` entries a killed `replace_files_together` left
are settled by what the files hold when the next run finishes, not thrown away."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_mudsc.publish.folder as folder_module
from hf_mudsc.publish.folder import (
    MARKER_FILENAME,
    OLD_MARK,
    PARTIAL_MARK,
    changed_files,
    interrupted_replacement,
    read_marker,
    replace_files_together,
    staged_output,
    unlisted_files,
)
from hf_mudsc.publish.hub import check_folder, check_unchanged

ROOT = Path(__file__).resolve().parents[1]


def _evaluate(out: Path) -> None:
    """What `hf-mudsc evaluate OUT` writes into a merged folder: its results file and a new card."""
    replace_files_together([(out / "eval_results.json", lambda to: to.write_text('{"run": "eval"}')),
                            (out / "README.md", lambda to: to.write_text("# card with results\n"))], owner=out)


def _merged(out: Path, card: str = "# card\n") -> None:
    with staged_output(out, overwrite=out.exists()) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "README.md").write_text(card)


def _assert_all_listed(out: Path) -> None:
    assert unlisted_files(out, check_content=True) == ([], [])
    assert changed_files(out) == []
    marker = json.loads((out / MARKER_FILENAME).read_text())
    assert "pid" not in marker and "host" not in marker  # the output names no process once in place
    assert sorted(marker["files"]) == ["README.md", "config.json", "eval_results.json"]


# ------------------------------------------------------------ 3: an evaluate racing the end of a merge
def test_files_evaluated_into_the_output_while_overwrite_deletes_the_old_copy_stay_listed(tmp_path, monkeypatch):
    """Repro: `evaluate OUT` (replace_files_together) while staged_output(OUT, overwrite=True) deletes the old copy.

    The merge then wrote back the marker it recorded before the rename: eval_results.json unlisted, README.md changed,
    and push and later --overwrite refused the folder."""
    out = tmp_path / "out"
    _merged(out, "# old card\n")
    real = folder_module._remove_marker_last

    def slow_delete(folder: Path, **kwargs):  # a big model's old copy takes seconds to delete
        if OLD_MARK in folder.name:
            _evaluate(out)
        return real(folder, **kwargs)

    monkeypatch.setattr(folder_module, "_remove_marker_last", slow_delete)
    _merged(out, "# new card\n")
    assert (out / "README.md").read_text() == "# card with results\n"
    _assert_all_listed(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existed", [False, True], ids=["new-output", "overwrite"])
def test_files_evaluated_into_the_output_right_after_its_rename_stay_listed(tmp_path, monkeypatch, existed):
    """Repro: `evaluate OUT` runs right after staged_output renamed its staging folder onto OUT (os.rename hooked).

    The marker recorded before the rename was written over the evaluate's: its files unlisted or changed."""
    out = tmp_path / "out"
    if existed:
        _merged(out, "# old card\n")
    real = os.rename

    def rename_then_evaluate(source, target, *args, **kwargs):
        real(source, target, *args, **kwargs)
        if PARTIAL_MARK in Path(source).name and Path(target) == out:
            _evaluate(out)

    from hf_mudsc.publish import folder as folder_module

    real_exchange = folder_module.exchange_paths

    def exchange_then_evaluate(first, second):  # the swap in one step, where the system has it (session 38)
        exchanged = real_exchange(first, second)
        if exchanged and Path(second) == out:
            _evaluate(out)
        return exchanged

    monkeypatch.setattr(os, "rename", rename_then_evaluate)
    monkeypatch.setattr(folder_module, "exchange_paths", exchange_then_evaluate)
    _merged(out, "# new card\n")
    monkeypatch.undo()
    _assert_all_listed(out)


def test_a_folder_put_in_place_by_another_run_meanwhile_keeps_its_marker(tmp_path, monkeypatch):
    """Repro: right after staged_output renamed its folder onto OUT, another run's folder replaced it (rename hooked).

    A guard: the writer's process and host are dropped only from the folder this run renamed in."""
    out, other = tmp_path / "out", tmp_path / "other"
    other.mkdir()
    foreign_marker = {"written_by": "hf-mudsc", "complete": True, "files": {}, "pid": 1, "host": "elsewhere"}
    (other / MARKER_FILENAME).write_text(json.dumps(foreign_marker))
    real = os.rename

    def rename_then_replaced(source, target, *args, **kwargs):
        real(source, target, *args, **kwargs)
        if PARTIAL_MARK in Path(source).name and Path(target) == out:
            real(out, tmp_path / "aside")
            real(other, out)

    monkeypatch.setattr(os, "rename", rename_then_replaced)
    _merged(out)
    monkeypatch.undo()
    assert json.loads((out / MARKER_FILENAME).read_text()) == foreign_marker


# --------------------------------------- 4: a killed replace_files_together, then one that rewrites fewer files
# A child that replaces the card, the results and the chart as `evaluate` does, SIGKILLed right after its N-th
# os.replace (1: the marker naming them as being replaced; 2-4: the files; 5 would be the final marker).
_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from hf_mudsc.publish.folder import replace_files_together

    folder, at = Path(sys.argv[1]), int(sys.argv[2])
    done, real = [0], os.replace

    def replace(source, target):
        real(source, target)
        done[0] += 1
        if done[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    replace_files_together([(folder / "README.md", lambda to: to.write_text("# killed run's card\\n")),
                            (folder / "eval_results.json", lambda to: to.write_text('{"run": "killed"}')),
                            (folder / "plots" / "accuracy.png", lambda to: to.write_bytes(b"killed run's chart"))],
                           owner=folder)
""")


def _pushable(path: Path, *, chart: bool) -> Path:
    """A folder as `hf-mudsc merge` and an `evaluate` wrote it (the weights' bytes do not matter here)."""
    with staged_output(path) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "mudsc_recipe.yaml").write_text("method: average\n")
        (staging / "README.md").write_text("# card\n")
        (staging / "eval_results.json").write_text('{"run": "first"}')
        if chart:
            (staging / "plots").mkdir()
            (staging / "plots" / "accuracy.png").write_bytes(b"first chart")
    return path


def _kill_while_replacing(folder: Path, at: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(folder), str(at)], env=env,
                          timeout=120).returncode
    assert code == -signal.SIGKILL, f"the child was not killed after its os.replace {at} (exit {code})"
    assert interrupted_replacement(folder) == ["README.md", "eval_results.json", "plots/accuracy.png"]


def _rerun_without_the_chart(folder: Path) -> None:
    """The command run again, as the refusal advised: an `evaluate` that does not redraw the chart."""
    replace_files_together([(folder / "README.md", lambda to: to.write_text("# card again\n")),
                            (folder / "eval_results.json", lambda to: to.write_text('{"run": "again"}'))],
                           owner=folder)


@pytest.mark.parametrize("chart", [False, True], ids=["no-chart-before", "chart-before"])
@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_a_killed_replacement_run_again_without_the_chart_leaves_a_pushable_folder(tmp_path, at, chart):
    """Repro: replace_files_together(card, results, chart) SIGKILLed after os.replace N, then rerun without the chart.

    The rerun threw the chart's `replacing` entry away: the killed run's chart was then unlisted ("holds files
    hf-mudsc did not write (plots/accuracy.png)") or changed, and push refused though the advice was followed."""
    folder = _pushable(tmp_path / "merged", chart=chart)
    _kill_while_replacing(folder, at)
    _rerun_without_the_chart(folder)
    assert interrupted_replacement(folder) == []
    assert unlisted_files(folder, check_content=True) == ([], [])
    assert changed_files(folder) == []
    check_folder(folder)
    check_unchanged(folder)
    listed = read_marker(folder)["files"]
    chart_path = folder / "plots" / "accuracy.png"
    assert ("plots/accuracy.png" in listed) == chart_path.exists()


@pytest.mark.parametrize("chart", [False, True], ids=["no-chart-before", "chart-before"])
def test_a_file_changed_after_the_killed_replacement_is_not_vouched_for_by_the_next_run(tmp_path, chart):
    """Repro: the replacement SIGKILLed after its last file, the chart then edited by hand, the command run again.

    A guard: a leftover `replacing` entry is kept only for a file that holds what it lists; an edited chart is
    refused by push (unlisted, or changed), never listed as the writer's."""
    folder = _pushable(tmp_path / "merged", chart=chart)
    _kill_while_replacing(folder, 4)
    (folder / "plots" / "accuracy.png").write_bytes(b"edited by hand")
    _rerun_without_the_chart(folder)
    assert interrupted_replacement(folder) == []
    foreign, changed = unlisted_files(folder, check_content=True)
    assert (foreign, changed) == (([], ["plots/accuracy.png"]) if chart else (["plots/accuracy.png"], []))
    with pytest.raises(ValueError, match="accuracy.png"):
        check_folder(folder)
        check_unchanged(folder)


def test_a_kept_replacement_of_a_file_removed_since_is_dropped(tmp_path):
    """Repro: the replacement SIGKILLed after its last file, the new chart deleted, the command run again.

    A guard: the entry of a file that is gone is not listed (push would upload a file named but absent)."""
    folder = _pushable(tmp_path / "merged", chart=False)
    _kill_while_replacing(folder, 4)
    shutil.rmtree(folder / "plots")
    _rerun_without_the_chart(folder)
    assert "plots/accuracy.png" not in read_marker(folder)["files"]
    assert interrupted_replacement(folder) == [] and changed_files(folder) == []
