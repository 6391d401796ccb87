"""Issue 10, items 8 and 9 (and the push rough edges): what `push` uploads, and what a failed push reports.

- A folder holding symlinks or files the writer did not write is refused, naming them, before the Hub is
  contacted (the writer's marker lists the folder's own files); the marker itself is never uploaded.
- A commit applied whose answer was lost is reported as applied (the repo head is checked), and the local
  output is kept, and named, on any push failure.
- An empty repo left by a killed push is pushed into on the rerun; stalled Hub calls time out and say what
  they waited for; `push` names its own ORG/NAME argument.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from test_cli import FAST, leftovers, save_parents_and_data

from hf_mudsc.cli.main import main
from hf_mudsc.publish.folder import MARKER_FILENAME
from hf_mudsc.publish.recipe import RECIPE_FILENAME
from hf_mudsc.solve.diagnostics import DIAGNOSTICS_FILENAME, PLOTS_FOLDER

SECRET = "hf_secretPushSafetyTokenNeverLeaks0123"
MERGED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", RECIPE_FILENAME,
                DIAGNOSTICS_FILENAME}
# The plots a zipit merge of the fixtures draws: uploaded with the model (no sweeps, so no objective plot).
PUSHED = MERGED_FILES | {f"{PLOTS_FOLDER}/{n}.png" for n in ("match_quality", "similarity_heatmaps", "attention_heads")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("push_inputs"))


@pytest.fixture(scope="module")
def merged(inputs, tmp_path_factory):
    a, b, calibration = inputs
    out = tmp_path_factory.mktemp("push_merged") / "merged"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out),
                     *FAST]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture()
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was contacted for a folder that must be refused")

    for name in ("repo_exists", "create_repo", "upload_folder", "create_commit"):
        monkeypatch.setattr(f"huggingface_hub.HfApi.{name}", refuse)


def test_push_refuses_symlinks_and_files_the_writer_did_not_write(merged, tmp_path, no_hub, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    folder = tmp_path / "folder"
    shutil.copytree(merged, folder)
    (folder / "extra.safetensors").symlink_to(secret)
    assert main(["push", str(folder), "user/x"]) == 1
    err = capsys.readouterr().err
    assert "symbolic links (extra.safetensors)" in err and len(err.strip().splitlines()) == 1
    (folder / "extra.safetensors").unlink()
    (folder / "notes").mkdir()
    (folder / "notes" / "secret.txt").write_text("mine")
    assert main(["push", str(folder), "user/x"]) == 1
    assert "files hf-mudsc did not write (notes/secret.txt)" in capsys.readouterr().err
    shutil.rmtree(folder / "notes")
    (folder / MARKER_FILENAME).unlink()  # a folder nobody can vouch for (e.g. from an older version)
    assert main(["push", str(folder), "user/x"]) == 1
    assert f"no {MARKER_FILENAME} listing its files" in capsys.readouterr().err
    assert secret.read_text() == "PRIVATE KEY"


def run_cli(hub, *argv: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    env = hub.client_env(token=SECRET, extra={"OMP_NUM_THREADS": "1", **(extra or {})})
    return subprocess.run([sys.executable, "-m", "hf_mudsc", *argv], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_the_marker_is_not_uploaded(hub_emulator, merged):
    proc = run_cli(hub_emulator, "push", str(merged), "user/pushed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(hub_emulator.list_files("user/pushed")) == PUSHED | {".gitattributes"}


@pytest.mark.parametrize("drop", [False, True], ids=["answer-500", "connection-dropped"])
def test_a_commit_applied_whose_answer_was_lost_is_reported_as_applied(hub_emulator, merged, drop):
    hub = hub_emulator
    hub.fail_next("commit", status=500, repo_id="user/merged", apply=True, drop=drop)
    proc = run_cli(hub, "push", str(merged), "user/merged")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    head = hub.head("user/merged")
    assert [c.title for c in hub.commits("user/merged")][1:] == ["initial commit"]  # it was applied
    assert f"the commit was applied although its answer was lost: the repo's head is now {head}" in proc.stderr
    assert "nothing was committed" not in proc.stderr and "deleted" not in proc.stderr
    assert set(hub.list_files("user/merged")) == PUSHED | {".gitattributes"}
    assert not hub.pending_faults() and SECRET not in proc.stdout + proc.stderr


def test_a_failed_push_keeps_the_local_output_and_says_where(hub_emulator, inputs, tmp_path):
    hub = hub_emulator
    a, b, calibration = inputs
    out = tmp_path / "merged"
    hub.fail_next("commit", status=500, repo_id="user/m1", apply=True)
    proc = run_cli(hub, "merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out),
                   "--push-to-hub", "user/m1", *FAST)
    assert proc.returncode == 1 and "the commit was applied" in proc.stderr
    assert f"the merged model is kept in {out}" in proc.stderr
    assert MERGED_FILES <= {p.name for p in out.iterdir()} and leftovers(tmp_path) == []
    # Without --output: kept in a folder of its own, named in the message, ready for `hf-mudsc push`.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    hub.fail_next("commit", status=500, repo_id="user/m2")
    proc = run_cli(hub, "merge", str(a), str(b), "--calibration", str(calibration), "--push-to-hub", "user/m2",
                   *FAST, extra={"TMPDIR": str(scratch)})
    assert proc.returncode == 1
    assert "nothing was committed; the repo 'user/m2' created by this run was deleted" in proc.stderr
    kept = [p for p in scratch.iterdir() if p.name.startswith("hf-mudsc-unpushed-")]
    assert len(kept) == 1 and MERGED_FILES <= {p.name for p in kept[0].iterdir()}
    assert f"the merged model is kept in {kept[0]}" in proc.stderr
    assert f"hf-mudsc push {kept[0]} user/m2" in proc.stderr
    assert not hub.repo_exists("user/m2") and not hub.pending_faults()


def test_an_empty_repo_left_by_a_killed_push_is_pushed_into_and_wording_names_the_argument(hub_emulator, merged):
    hub = hub_emulator
    hub.create_repo("user/empty")  # only the initial commit, as a push killed after create_repo leaves it
    proc = run_cli(hub, "push", str(merged), "user/empty")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c.title for c in hub.commits("user/empty")][1:] == ["initial commit"]
    assert set(hub.list_files("user/empty")) == PUSHED | {".gitattributes"}
    proc = run_cli(hub, "push", str(merged), "user/empty")  # now it holds a model: refused
    assert proc.returncode == 1
    assert "already exists; pass --overwrite to replace its files (in one commit), or choose another ORG/NAME" \
        in proc.stderr
    assert "--push-to-hub" not in proc.stderr


def test_a_stalled_hub_times_out_and_says_what_it_waited_for(hub_emulator, merged):
    hub = hub_emulator
    hub.delay_next("create_repo", 8)
    proc = run_cli(hub, "push", str(merged), "user/slow", extra={"HF_MUDSC_HUB_TIMEOUT": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the Hub did not answer within 1 s while creating the repo 'user/slow'" in proc.stderr
    assert "HF_MUDSC_HUB_TIMEOUT" in proc.stderr


def test_a_push_in_offline_mode_is_one_line_naming_the_setting(merged, inputs, tmp_path, monkeypatch, capsys):
    """With HF_HUB_OFFLINE=1 `push` (and `merge --push-to-hub`) ended in huggingface_hub's traceback; now one line,
    before anything is merged or written."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["push", str(merged), "user/offline"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-mudsc push: error: ") and len(err.splitlines()) == 1, err
    assert "HF_HUB_OFFLINE" in err and "Traceback" not in err
    a, b, calibration = inputs
    out = tmp_path / "never"
    assert main(["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out),
                 "--push-to-hub", "user/offline", *FAST]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("hf-mudsc merge: error: ") and "HF_HUB_OFFLINE" in err, err
    assert "Traceback" not in err and "Calibrated" not in err and not out.exists()


def _corrupt_weights(folder, dtype=None):
    """Rewrite the folder's weights with a NaN as the last entry of one tensor and an inf in another."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    matrices = sorted(name for name, tensor in tensors.items() if tensor.dim() == 2)
    nan_name, inf_name = matrices[0], matrices[-1]
    tensors[nan_name].view(-1)[-1] = float("nan")
    tensors[inf_name].view(-1)[0] = float("-inf")
    if dtype is not None:
        tensors = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    return nan_name, inf_name


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_push_refuses_a_folder_with_nan_or_inf_weights_before_the_hub(merged, tmp_path, no_hub, capsys,
                                                                    monkeypatch, dtype):
    """`save` and merge --push-to-hub refuse NaN/inf weights; `push DIR` published them. The check reads each tensor
    in chunks (here a few hundred entries), so a NaN in the last chunk of a tensor is found too."""
    monkeypatch.setattr("hf_mudsc.load.lazy.FINITE_CHECK_ELEMENTS", 100)
    folder = tmp_path / "folder"
    shutil.copytree(merged, folder)
    nan_name, inf_name = _corrupt_weights(folder, dtype)
    before = (folder / "model.safetensors").read_bytes()
    assert main(["push", str(folder), "user/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-mudsc push: error: refusing to push") and len(err.splitlines()) == 1, err
    assert "NaN or infinite values in 2 tensors" in err and nan_name in err and inf_name in err
    assert "model.safetensors" in err and "hf-mudsc merge" in err
    assert (folder / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("listed", ["absolute", "../outside", "sub/../../outside"])
def test_a_marker_listing_a_file_outside_the_folder_is_refused_before_the_hub(merged, tmp_path, no_hub, capsys,
                                                                             listed):
    """The marker is a file in the folder: one crafted by whoever handed the folder over (an archive, a shared
    drive) listed `/home/user/.cache/huggingface/token` beside the model's files, and `push` uploaded that file
    (as `home/user/.cache/huggingface/token`) to the user's repo."""
    import json

    secret = tmp_path / "outside"
    secret.write_text(SECRET)
    folder = tmp_path / "folder"
    shutil.copytree(merged, folder)
    marker = json.loads((folder / MARKER_FILENAME).read_text())
    name = str(secret) if listed == "absolute" else listed
    marker["files"][name] = {"size": len(SECRET), "sha256": "0" * 64}
    (folder / MARKER_FILENAME).write_text(json.dumps(marker))
    assert main(["push", str(folder), "user/x"]) == 1
    err = capsys.readouterr().err
    assert f"its {MARKER_FILENAME} lists files that are not in it ({name!r})" in err, err
    assert len(err.strip().splitlines()) == 1 and SECRET not in err


TOKEN_SHAPED = "hf_" + "Q" * 34  # what `--push-to-hub $HF_TOKEN` (meant: `--token`) passes


@pytest.mark.parametrize("repo", [TOKEN_SHAPED, f"user/{TOKEN_SHAPED}", f"{TOKEN_SHAPED}/merged"])
def test_a_token_given_as_the_repo_to_push_to_is_refused_without_echoing_it(merged, inputs, tmp_path, no_hub, capsys,
                                                                             repo):
    """A token pasted where the repo id goes was echoed in the error, and `org/<token>` was sent to the Hub in the
    URL of every call, then created as a (public) repo named after the token."""
    a, b, calibration = inputs
    argvs = [(2, ["push", str(merged), repo]),  # an invalid command line (exit code 2), as merge says it
             (2, ["merge", str(a), str(b), "--calibration", str(calibration), "--push-to-hub", repo, *FAST]),
             (2, ["merge", str(a), str(b), "--calibration", str(calibration), "--output", str(tmp_path / "out"),
                  "--push-to-hub", repo, *FAST])]
    for code, argv in argvs:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert "looks like a Hugging Face access token (not shown)" in err, err
        assert TOKEN_SHAPED not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    from hf_mudsc.publish.writer import push_merged

    with pytest.raises(ValueError, match=r"looks like a Hugging Face access token \(not shown\)") as caught:
        push_merged(object(), repo)
    assert TOKEN_SHAPED not in str(caught.value)


def test_a_recipe_of_gigabytes_in_a_pushed_folder_is_refused_before_it_is_read(merged, tmp_path, no_hub, capsys,
                                                                               monkeypatch):
    """`push` reads the recipe whole (its local folders are renamed for the Hub): a folder's 2 GB (sparse) recipe
    was read into memory before anything was said."""
    from hf_mudsc.publish.recipe import MAX_RECIPE_BYTES

    folder = tmp_path / "folder"
    shutil.copytree(merged, folder)
    with (folder / RECIPE_FILENAME).open("ab") as handle:
        handle.truncate(MAX_RECIPE_BYTES + 1)
    monkeypatch.setattr("pathlib.Path.read_bytes", lambda *a, **k: pytest.fail("the recipe was read whole"))
    assert main(["push", str(folder), "user/x", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"{RECIPE_FILENAME} is {MAX_RECIPE_BYTES + 1:,} bytes" in err and len(err.strip().splitlines()) == 1, err
