"""Session 34, publish/evaluate file safety: a SIGKILL while `evaluate` replaces the card, a push while another run
replaces the folder, leftovers the next run must recognise as its own (and nothing else)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_mudsc.publish.folder import (
    MARKER_FILENAME,
    changed_files,
    check_output,
    interrupted_replacement,
    replace_files_together,
    staged_output,
    unlisted_files,
    written_unchanged,
)

ROOT = Path(__file__).resolve().parents[1]

# A child that replaces the card and results as `evaluate` does (`replace_files_together`) and SIGKILLs itself right
# after its N-th rename/replace (`op N`) or half-way through writing the new card (`write`).
_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from hf_mudsc.publish.folder import replace_files_together

    folder, at = Path(sys.argv[1]), sys.argv[2]
    done = [0]
    if at.startswith("op"):
        for name in ("rename", "replace"):
            def hooked(source, target, *args, _real=getattr(os, name), **kwargs):
                _real(source, target, *args, **kwargs)
                done[0] += 1
                if done[0] == int(at[2:]):
                    os.kill(os.getpid(), signal.SIGKILL)
            setattr(os, name, hooked)

    def card(to):
        to.write_text("# new card\\n")
        if at == "write":
            os.kill(os.getpid(), signal.SIGKILL)
        to.write_text("# new card\\n" + "scores\\n" * 100)

    results = '{"hf_mudsc_version": "0", "scores": {}, "run": "new"}'  # shaped as a results file
    replace_files_together([(folder / "eval_results.json", lambda to: to.write_text(results)),
                            (folder / "README.md", card)], owner=folder)
""")

OLD_CARD = "# old card\n"
NEW_CARD = "# new card\n" + "scores\n" * 100


def _evaluated_folder(path: Path) -> Path:
    with staged_output(path) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "README.md").write_text(OLD_CARD)
        (staging / "eval_results.json").write_text('{"run": "old"}')
    return path


def _killed(folder: Path, at: str) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(folder), at], env=env, timeout=120).returncode


@pytest.mark.parametrize("at", ["write", "op1", "op2", "op3", "op4"])
def test_sigkill_while_evaluate_replaces_the_card_leaves_a_card_and_nothing_the_next_run_cannot_clean(tmp_path, at):
    """Repro: a child running replace_files_together(results, card) SIGKILLs itself after its N-th rename/mid-write.

    It left `.README.md.old-*` — or no README.md, or no marker — and temporaries `--overwrite` refused as foreign."""
    folder = _evaluated_folder(tmp_path / "merged")
    code = _killed(folder, at)
    assert code == -9, f"the child was not killed at {at} (exit {code}): the test no longer reaches that point"
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if ".old-" in n], names
    assert (folder / "README.md").read_text() in (OLD_CARD, NEW_CARD)  # the old card or the whole new one
    # Whatever the kill left is the writer's own: the card still counts as written (evaluate may rewrite it), and
    # --overwrite of the folder is accepted (it deletes no file hf-mudsc did not write).
    # Killed among the renames, the marker says which files may be of either run (`push` refuses the folder then).
    stopped = ["README.md", "eval_results.json"] if at in ("op1", "op2", "op3") else []
    assert interrupted_replacement(folder) == stopped
    assert written_unchanged(folder / "README.md")
    assert unlisted_files(folder, check_content=True) == ([], [])
    check_output(folder, overwrite=True)
    # The next run puts its files in place and removes the killed run's temporary files: nothing else is left.
    replace_files_together([(folder / "eval_results.json", lambda to: to.write_text('{"run": "next"}')),
                            (folder / "README.md", lambda to: to.write_text("# next card\n"))], owner=folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "README.md", "eval_results.json",
                                                               MARKER_FILENAME])
    assert changed_files(folder) == [] and interrupted_replacement(folder) == []
    assert json.loads((folder / "eval_results.json").read_text()) == {"run": "next"}


# ------------------------------------------------------------------- push while another run replaces the folder
@pytest.fixture(scope="module")
def two_merges(tmp_path_factory):
    """Two merged folders of the same toy ViT parents (average, and linear 0.3/0.7): what a `merge --overwrite` of the
    same --output would put in place of the other."""
    from factories import make_model
    from transformers import ViTImageProcessor

    from hf_mudsc.cli.main import main

    root = tmp_path_factory.mktemp("publish_s34")
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    for seed, name in enumerate(("vit-a", "vit-b"), start=1):
        make_model("vit_cls", seed).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    assert main(["merge", str(root / "vit-a"), str(root / "vit-b"), "--method", "average", "--output",
                 str(root / "merged"), "-q"]) == 0
    assert main(["merge", str(root / "vit-a"), str(root / "vit-b"), "--method", "linear", "--weights", "0.3", "0.7",
                 "--output", str(root / "merged-other"), "-q"]) == 0
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER_FILENAME}


def _replace(folder: Path, other: Path, aside: Path) -> None:
    """What `merge --output DIR --overwrite` does to DIR: the new folder renamed in, the old one deleted."""
    import shutil

    os.rename(folder, aside)
    os.rename(other, folder)
    shutil.rmtree(aside)


def test_a_push_while_a_merge_replaces_the_folder_uploads_the_one_merge_it_checked(two_merges, tmp_path, local_hub,
                                                                                   monkeypatch):
    """Repro: push_folder(DIR) with DIR swapped for another merge's folder inside HfApi.preupload_lfs_files.

    The push read each file by name when uploading it: the commit held the other merge's weights and card."""
    import shutil

    from huggingface_hub import HfApi

    from hf_mudsc.publish.hub import CARD_FILENAME, push_folder, pushed_card
    from hf_mudsc.publish.recipe import RECIPE_FILENAME, published_text

    folder, other = tmp_path / "merged", tmp_path / "other"
    shutil.copytree(two_merges / "merged", folder)
    shutil.copytree(two_merges / "merged-other", other)
    expected = _files(folder)
    expected[RECIPE_FILENAME] = published_text(expected[RECIPE_FILENAME].decode(), name=RECIPE_FILENAME).encode()
    expected[CARD_FILENAME] = pushed_card(expected[CARD_FILENAME].decode(), "user/merged").encode()
    real = HfApi.preupload_lfs_files

    def replaced_then_uploaded(self, *args, **kwargs):
        if other.exists():
            _replace(folder, other, tmp_path / "aside")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "preupload_lfs_files", replaced_then_uploaded)
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    push_folder(folder, "user/merged", flag="ORG/NAME")
    pushed = {name: local_hub.file_bytes("user/merged", name) for name in local_hub.list_files("user/merged")
              if name != ".gitattributes"}
    assert pushed == expected  # every file of the merge it checked, none of the other


def test_a_push_whose_folder_is_replaced_while_it_is_checked_is_refused_in_one_line(two_merges, tmp_path, local_hub,
                                                                                   monkeypatch, capsys):
    """Repro: `hf-mudsc push DIR` with DIR swapped for another merge's folder right after its NaN check.

    The checks read one merge, the upload the other (exit 0). Now refused in one line before any Hub call."""
    import shutil

    import hf_mudsc.publish.hub as hub
    from hf_mudsc.cli.main import main

    folder, other = tmp_path / "merged", tmp_path / "other"
    shutil.copytree(two_merges / "merged", folder)
    shutil.copytree(two_merges / "merged-other", other)
    real = hub.refuse_non_finite_files

    def checked_then_replaced(*args, **kwargs):
        real(*args, **kwargs)
        _replace(folder, other, tmp_path / "aside")

    monkeypatch.setattr(hub, "refuse_non_finite_files", checked_then_replaced)
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    code = main(["push", str(folder), "user/merged"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert "changed while the push read it" in err[0] and "nothing was pushed" in err[0]
    assert not local_hub.repo_exists("user/merged")


# ----------------------------------------------- a run killed after its folder was complete, before it was in place
_KILLED_BEFORE_RENAME = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import hf_mudsc.publish.folder as folder

    out, real, calls = Path(sys.argv[1]), folder.check_output, []

    def check_output(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the old folder checked again before the swap (hashing it: seconds for a big model)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    folder.check_output = check_output
    with folder.staged_output(out, overwrite=True) as staging:
        (staging / "config.json").write_text('{"run": 2}')
""")


def test_a_staging_folder_of_a_run_killed_just_before_its_rename_is_removed_by_the_next_run(tmp_path):
    """Repro: staged_output(DIR, overwrite=True) SIGKILLed in its second check_output (the old DIR hashed again).

    Its complete marker no longer named the process: the `.DIR.partial-*` folder, a whole model, stayed for good."""
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "config.json").write_text('{"run": 1}')
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = subprocess.run([sys.executable, "-c", _KILLED_BEFORE_RENAME, str(out)], env=env, timeout=120).returncode
    assert code == -9
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # what the kill left
    with staged_output(out, overwrite=True) as staging:  # the next run of that output
        (staging / "config.json").write_text('{"run": 3}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((out / "config.json").read_text()) == {"run": 3}
    assert "pid" not in json.loads((out / MARKER_FILENAME).read_text())  # the output names no process


def test_the_pinned_files_still_go_through_the_xet_upload(two_merges, tmp_path, local_hub, monkeypatch):
    """Repro: push_folder with huggingface_hub's Xet upload made available (monkeypatched) records what it is handed.

    A guard: open files handed as file objects would make huggingface_hub leave Xet for LFS (a warning each push)."""
    import shutil

    import huggingface_hub._commit_api as commit_api

    from hf_mudsc.errors import PushError
    from hf_mudsc.publish.hub import push_folder

    folder = tmp_path / "merged"
    shutil.copytree(two_merges / "merged", folder)
    handed: dict[str, bytes | None] = {}

    def xet(additions, **kwargs):  # what Xet would read: a path's bytes (None: not a path)
        handed.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                       if isinstance(op.path_or_fileobj, str) else None for op in additions})
        raise RuntimeError("no Xet server here")

    monkeypatch.setattr(commit_api, "is_xet_available", lambda: True)
    monkeypatch.setattr(commit_api, "_upload_xet_files", xet)
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    with pytest.raises(PushError, match="no Xet server here"):
        push_folder(folder, "user/merged", flag="ORG/NAME")
    assert handed["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert None not in handed.values(), handed


def test_a_folder_whose_card_replacement_was_killed_is_refused_by_push_until_the_writer_runs_again(
        two_merges, tmp_path, local_hub, monkeypatch, capsys):
    """Repro: the replace_files_together child SIGKILLed after its 2nd rename, then evaluate's check and `push DIR`.

    The results file was not in the marker: evaluate refused it for good ("hf-mudsc did not write it"). Now it runs
    again, and push refuses in one line until it has (the pair may be of two runs)."""
    import shutil

    from hf_mudsc.cli.evaluate import check_replaceable
    from hf_mudsc.cli.main import main

    folder = tmp_path / "merged"
    shutil.copytree(two_merges / "merged", folder)
    assert _killed(folder, "op2") == -9  # the results file is the new one, the card the old one
    check_replaceable([folder / "eval_results.json"], folder / "README.md")  # evaluate may run again
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    assert main(["push", str(folder), "user/merged"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "a run was stopped while it replaced README.md, eval_results.json" in err[0], err
    assert not local_hub.repo_exists("user/merged")
    replace_files_together([(folder / "eval_results.json", lambda to: to.write_text('{"run": "next"}')),
                            (folder / "README.md", lambda to: to.write_text((two_merges / "merged" / "README.md")
                                                                            .read_text()))], owner=folder)
    assert main(["push", str(folder), "user/merged"]) == 0
