"""Issue 10, items 8 and 9 (and the push rough edges): what `push` uploads, and what a failed push reports.

- A folder holding symlinks or files the writer did not write is refused, naming them, before the Hub is
  contacted (the writer's marker lists the folder's own files); the marker itself is never uploaded.
- A commit applied whose answer was lost is reported as applied (the repo head is checked), and the local
  output is kept, and named, on any push failure.
- An empty repo left by a killed push is pushed into on the rerun; stalled Hub calls time out and say what
  they waited for; `push` names its own ORG/NAME argument.
"""

from __future__ import annotations

import functools
import shutil

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


@pytest.fixture()
def push_cli(hub_cli):
    """`hf-mudsc ARGV` in this process against the emulator, with this module's token (conftest's hub_cli)."""
    return functools.partial(hub_cli, token=SECRET)


def test_the_marker_is_not_uploaded(push_cli, hub_emulator, merged):
    proc = push_cli("push", str(merged), "user/pushed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(hub_emulator.list_files("user/pushed")) == PUSHED | {".gitattributes"}


@pytest.mark.parametrize("drop", [False, True], ids=["answer-500", "connection-dropped"])
def test_a_commit_applied_whose_answer_was_lost_is_reported_as_applied(push_cli, hub_emulator, merged, drop):
    hub = hub_emulator
    hub.fail_next("commit", status=500, repo_id="user/merged", apply=True, drop=drop)
    proc = push_cli("push", str(merged), "user/merged")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    head = hub.head("user/merged")
    assert [c.title for c in hub.commits("user/merged")][1:] == ["initial commit"]  # it was applied
    assert f"the commit was applied although its answer was lost: the repo's head is now {head}" in proc.stderr
    assert "nothing was committed" not in proc.stderr and "deleted" not in proc.stderr
    assert set(hub.list_files("user/merged")) == PUSHED | {".gitattributes"}
    assert not hub.pending_faults() and SECRET not in proc.stdout + proc.stderr


def test_a_failed_push_keeps_the_local_output_and_says_where(push_cli, hub_emulator, inputs, tmp_path):
    hub = hub_emulator
    a, b, calibration = inputs
    out = tmp_path / "merged"
    hub.fail_next("commit", status=500, repo_id="user/m1", apply=True)
    proc = push_cli("merge", str(a), str(b), "--calibration", str(calibration), "--output", str(out),
                   "--push-to-hub", "user/m1", *FAST)
    assert proc.returncode == 1 and "the commit was applied" in proc.stderr
    assert f"the merged model is kept in {out}" in proc.stderr
    assert MERGED_FILES <= {p.name for p in out.iterdir()} and leftovers(tmp_path) == []
    # The commit names the output folder, not the hidden folder it was staged in (".merged.partial-f5o3m4e5").
    assert hub.commits("user/m1")[0].title == "Upload merged model (merged) with hf-mudsc"
    # Without --output: kept in a folder of its own, named in the message, ready for `hf-mudsc push`.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    hub.fail_next("commit", status=500, repo_id="user/m2")
    proc = push_cli("merge", str(a), str(b), "--calibration", str(calibration), "--push-to-hub", "user/m2",
                   *FAST, extra={"TMPDIR": str(scratch)})
    assert proc.returncode == 1
    assert "nothing was committed; the repo 'user/m2' created by this run was deleted" in proc.stderr
    kept = [p for p in scratch.iterdir() if p.name.startswith("hf-mudsc-unpushed-")]
    assert len(kept) == 1 and MERGED_FILES <= {p.name for p in kept[0].iterdir()}
    assert f"the merged model is kept in {kept[0]}" in proc.stderr
    assert f"hf-mudsc push {kept[0]} user/m2" in proc.stderr
    assert not hub.repo_exists("user/m2") and not hub.pending_faults()


def test_an_empty_repo_left_by_a_killed_push_is_pushed_into_and_wording_names_the_argument(push_cli, hub_emulator,
                                                                                          merged):
    hub = hub_emulator
    hub.create_repo("user/empty")  # only the initial commit, as a push killed after create_repo leaves it
    proc = push_cli("push", str(merged), "user/empty")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c.title for c in hub.commits("user/empty")][1:] == ["initial commit"]
    assert set(hub.list_files("user/empty")) == PUSHED | {".gitattributes"}
    proc = push_cli("push", str(merged), "user/empty")  # now it holds a model: refused
    assert proc.returncode == 1
    assert "already exists; pass --overwrite to replace its files (in one commit), or choose another ORG/NAME" \
        in proc.stderr
    assert "--push-to-hub" not in proc.stderr


def test_a_stalled_hub_times_out_and_says_what_it_waited_for(push_cli, hub_emulator, merged):
    hub = hub_emulator
    hub.delay_next("create_repo", 8)
    proc = push_cli("push", str(merged), "user/slow", extra={"HF_MUDSC_HUB_TIMEOUT": "1"})
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
    assert main(["push", str(folder), "user/x"]) == 1  # weights changed since the merge: refused for that first
    assert "changed since hf-mudsc wrote them (model.safetensors)" in capsys.readouterr().err
    assert main(["push", str(folder), "user/x", "--allow-changed"]) == 1  # published as they are: never NaN/inf
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-mudsc push: error: refusing to push"), err
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
    assert main(["push", str(folder), "user/x", "--overwrite", "--allow-changed"]) == 1  # changed: opted in
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-mudsc push: error:") and f"{RECIPE_FILENAME} is {MAX_RECIPE_BYTES + 1:,} bytes" in err


# ------------------------------------------------------------------ QA pass of session 21: publishing defects


def _change_weights(folder):
    """Rewrite the folder's weights with one tensor doubled: still a valid model, no longer the merge's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    name = sorted(n for n, t in tensors.items() if t.dim() == 2)[0]
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(path), metadata=metadata)


def test_push_refuses_files_changed_since_the_merge_before_the_hub(merged, tmp_path, no_hub, capsys, caplog):
    """QA: another merge's weights copied over a merged folder's were published under this folder's card and recipe
    (`push` checked which files the marker lists, not that they are still the ones written)."""
    from hf_mudsc.publish.hub import check_unchanged, push_folder

    folder = tmp_path / "folder"
    shutil.copytree(merged, folder)
    _change_weights(folder)
    assert main(["push", str(folder), "user/x"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "refusing to push" in err and "changed since hf-mudsc wrote them (model.safetensors)" in err, err
    assert "hf-mudsc merge" in err and "--allow-changed" in err, err
    (folder / PLOTS_FOLDER / "match_quality.png").unlink()  # a listed file gone counts too: the card links it
    with pytest.raises(ValueError, match=r"model\.safetensors, plots/match_quality\.png \(deleted\)") as caught:
        push_folder(folder, "user/x", flag="repo_id")
    assert "allow_changed=True" in str(caught.value) and "--allow-changed" not in str(caught.value)
    with caplog.at_level("WARNING", logger="hf_mudsc"):
        check_unchanged(folder, allow_changed=True)  # the user's explicit choice: said, not refused
    assert "model.safetensors" in caplog.text and "as they are" in caplog.text


def test_a_folder_evaluate_rewrote_still_pushes_and_evaluate_refuses_a_folder_with_changed_weights(merged, tmp_path):
    """`evaluate` rewrites README.md and eval_results.json through `write_file_atomically`, which records them in the
    marker: such a folder is still the writer's. Weights changed since the merge: `evaluate` would put their scores
    into the merge's card, so it refuses before any work, as `push` does."""
    from hf_mudsc.cli.evaluate import check_replaceable
    from hf_mudsc.publish.folder import write_file_atomically
    from hf_mudsc.publish.hub import check_unchanged

    folder = tmp_path / "folder"
    shutil.copytree(merged, folder)
    card = folder / "README.md"
    check_replaceable([folder / "eval_results.json"], card)
    write_file_atomically(card, lambda temporary: temporary.write_text(card.read_text() + "\n## Evaluation\n"))
    write_file_atomically(folder / "eval_results.json",
                          lambda temporary: temporary.write_text('{"hf_mudsc_version": "0", "scores": {}}'))
    check_unchanged(folder)  # not refused: evaluate recorded what it wrote
    check_replaceable([folder / "eval_results.json"], card)  # evaluated again: still fine
    _change_weights(folder)
    with pytest.raises(FileExistsError, match=r"changed since hf-mudsc wrote them \(model\.safetensors\)") as caught:
        check_replaceable([folder / "eval_results.json"], card)
    assert "--no-card" in str(caught.value) and "\n" not in str(caught.value)
    check_replaceable([tmp_path / "elsewhere.json"], None)  # --no-card --output-json elsewhere: nothing of the merge's


def test_credentials_in_hf_endpoint_reach_no_error_line_output_log_or_card(local_hub, merged, monkeypatch, capsys,
                                                                           caplog):
    """QA: `HF_ENDPOINT=http://user:secret@host` showed the secret in the Hub error's URL and wrote it into every link
    of the model card."""
    import huggingface_hub.constants as constants
    from transformers import AutoModelForImageClassification

    from hf_mudsc.publish.card import ParentInfo, render_card
    from hf_mudsc.publish.recipe import Recipe

    secret = "Mirror-Pass-Leak-2026"
    monkeypatch.setattr(constants, "ENDPOINT", local_hub.endpoint.replace("http://", f"http://mirror:{secret}@"))
    assert main(["push", str(merged), "user/creds", "--token", "tok"]) == 1  # the emulator refuses Basic auth: 401
    err = capsys.readouterr().err
    assert "401" in err and f"'{local_hub.endpoint.replace('http://', 'http://***@')}/api/models/user/creds" in err, err
    assert secret not in err and "mirror:" not in err
    monkeypatch.setattr(local_hub, "_auth_user", lambda rec: local_hub.username)  # a mirror that takes them
    with caplog.at_level("INFO"):  # -v: the HTTP client logs each request's URL
        assert main(["-v", "push", str(merged), "user/creds", "--token", "tok"]) == 0
    said = capsys.readouterr()
    assert f"to {local_hub.endpoint}/user/creds (commit " in said.out, said.out
    assert "HTTP Request: " in caplog.text and "http://***@127.0.0.1" in caplog.text
    assert secret not in said.out + said.err + caplog.text and "mirror:" not in said.out + said.err + caplog.text
    recipe = Recipe(models=[f"org/vit-a@{'a' * 40}", f"org/vit-b@{'b' * 40}"], calibration="org/calib:train")
    card = str(render_card(AutoModelForImageClassification.from_pretrained(merged), recipe,
                           parents=[ParentInfo("org/vit-a", "org/vit-a", None, "a" * 40),
                                    ParentInfo("org/vit-b", "org/vit-b", None, "b" * 40)]))
    assert f"]({local_hub.endpoint}/org/vit-a)" in card and f"({local_hub.endpoint}/datasets/org/calib)" in card
    assert secret not in card and "mirror" not in card


def test_hide_tokens_masks_the_userinfo_of_any_url():
    from hf_mudsc.load.references import hide_tokens, without_userinfo

    line = ("Client error '401 Unauthorized' for url 'http://mirror:hf_mirrorPasswordLeak123456789@127.0.0.1:38521"
            "/api/models/org/x' and https://u@example.org/a, https://:p@h/ and mailto:me@example.org kept")
    assert hide_tokens(line) == ("Client error '401 Unauthorized' for url 'http://***@127.0.0.1:38521/api/models/"
                                 "org/x' and https://***@example.org/a, https://***@h/ and mailto:me@example.org kept")
    assert without_userinfo("http://user:pa:ss@host:8080/x") == "http://host:8080/x"
    from hf_mudsc.serve.worker import Reporter  # a service job's log lines and error, as stored and shown

    assert Reporter(None, "tok", calibrates=False, asks_before_push=False).scrub(line) == hide_tokens(line)
    assert without_userinfo("https://huggingface.co") == "https://huggingface.co"


def test_overwrite_names_the_files_it_deletes_and_an_identical_push_says_nothing_changed(local_hub, merged, caplog,
                                                                                         capsys):
    """QA: `push --overwrite` deleted the repo's own files without naming them; pushing the same folder again logged
    huggingface_hub's "No files have been modified" twice and claimed to create the existing repo."""
    hub = local_hub
    hub.commit_files("user/foreign", {"notes.md": b"mine", "data/a.csv": b"1", "data/b.csv": b"2"})
    argv = ["push", str(merged), "user/foreign", "--overwrite", "--token", "tok"]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    deleting = [m for m in caplog.messages if m.startswith("deleting")]
    assert deleting == ["deleting 3 files of 'user/foreign' that the folder does not hold (--overwrite): "
                        "data/a.csv, data/b.csv, notes.md"], caplog.messages
    assert not any("creating the repo" in m for m in caplog.messages)
    head, commits = hub.head("user/foreign"), len(hub.commits("user/foreign"))
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"Nothing to push: user/foreign already holds exactly these files (commit {head})", out
    assert "No files have been modified" not in caplog.text + err and "creating the repo" not in caplog.text
    assert not any(m.startswith("deleting") for m in caplog.messages)
    assert hub.head("user/foreign") == head and len(hub.commits("user/foreign")) == commits


def test_overwrite_never_commits_over_a_commit_that_landed_during_the_push(push_cli, hub_emulator, merged):
    """`push --overwrite` committed without `parent_commit`: a colleague's commit landing while the push uploaded
    was kept beside the replaced model (or overwritten unseen), and the push reported success. Now the commit
    applies only on top of the head the push read: refused, and the error says someone else pushed meanwhile."""
    import threading
    import time

    hub = hub_emulator
    hub.commit_files("user/race", {"old.txt": b"the old model"}, "old model")
    hub.delay_next("preupload", 2.0, repo_id="user/race")  # a big upload: the commit comes seconds later

    def colleague() -> None:
        deadline = time.monotonic() + 60
        while not hub.requests_for("preupload", "user/race") and time.monotonic() < deadline:
            time.sleep(0.02)
        hub.commit_files("user/race", {"colleague.txt": b"pushed meanwhile"}, "colleague's commit")

    other = threading.Thread(target=colleague)
    other.start()
    proc = push_cli("push", str(merged), "user/race", "--overwrite")
    other.join()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "someone else pushed meanwhile" in proc.stderr, proc.stderr[-2000:]
    assert [c.title for c in hub.commits("user/race")][0] == "colleague's commit"  # nothing of the push on top
    assert set(hub.list_files("user/race")) == {"old.txt", "colleague.txt", ".gitattributes"}


def test_a_failed_check_after_a_failed_commit_is_one_line_of_the_hub_s_words(push_cli, hub_emulator, merged):
    """The push fails, then asking the Hub what the repo holds fails too: the message says both in one line, the
    second as the Hub's error line (not the client's multi-line exception text)."""
    hub = hub_emulator
    hub.fail_next("commit", status=500, repo_id="user/checked", message="storage is down")
    hub.fail_next("commits", status=403, repo_id="user/checked", message="history is down")  # 4xx: no retries
    proc = push_cli("push", str(merged), "user/checked")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "could not check what the repo holds" in line]
    assert len(lines) == 1 and "history is down" in lines[0] and "look at its commit history" in lines[0], proc.stderr
    assert "storage is down" in lines[0] and "it was created by this run" in lines[0]
    assert "For more information" not in lines[0], lines[0]  # the client's exception text, not the Hub's line
    assert SECRET not in proc.stdout + proc.stderr
