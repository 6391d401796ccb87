"""Session 37, pushing as huggingface_hub users expect: commit message and description, a branch (`revision`) and
pull requests (`create_pr`), through `push_merged`, `hf-mudsc push` and `merge --push-to-hub`; the dry run refusing a
pickle that runs code as the merge does; the push's arguments checked before any upload."""

from __future__ import annotations

import os
import shlex

import pytest
import torch
from factories import make_model
from huggingface_hub import HfApi, ModelCard
from test_cli import FAST, save_parents_and_data

import hf_mudsc
from hf_mudsc.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread_module")

UPLOADS = ("preupload", "lfs_batch", "lfs_upload", "commit")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("push37_inputs"))


@pytest.fixture(scope="module")
def merged(inputs):
    """The module's merge of the two tiny ViTs, in memory (zipit, 24 samples)."""
    a, b, calibration = inputs
    return hf_mudsc.merge([str(a), str(b)], str(calibration), method="zipit", num_samples=24, batch_size=8,
                          progress=False)


@pytest.fixture(scope="module")
def folder(merged, tmp_path_factory):
    """The same merge saved as `hf-mudsc merge --output` writes it."""
    return hf_mudsc.save_merged(merged, tmp_path_factory.mktemp("push37_folder") / "merged")


def uploads(hub) -> int:
    return sum(len(hub.requests_for(op)) for op in UPLOADS)


def test_push_merged_commits_to_a_new_branch_with_the_message_and_description_given(local_hub, merged, monkeypatch):
    """push_merged(m, "user/m", revision="dev", commit_message=..., commit_description=...): the branch is created from
    main (as push_to_hub does), holds the model; main keeps only its initial commit; the card loads revision="dev"."""
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    result = hf_mudsc.push_merged(merged, "user/m", revision="dev", commit_message="First merge",
                                  commit_description="zipit of two ViTs")
    hub = local_hub
    assert result.revision == "dev" and result.pr_url is None and result.created
    assert result.commit_sha == hub.head("user/m", revision="dev")
    assert [c.title for c in hub.commits("user/m")] == ["initial commit"]
    head = hub.commits("user/m", revision="dev")[0]
    assert head.title == "First merge" and head.message.endswith("\n\nzipit of two ViTs")
    card = hub.file_bytes("user/m", "README.md", revision="dev").decode()
    assert 'from_pretrained("user/m", revision="dev")' in card
    assert "model.safetensors" in hub.list_files("user/m", revision="dev")
    assert not hub.unhandled and not hub.server_errors


def test_push_merged_opens_a_pull_request_without_overwrite_and_returns_its_url(local_hub, merged, monkeypatch):
    """push_merged(m, "user/m") then push_merged(m2, "user/m", create_pr=True): refs/pr/1 holds the new model, main
    is untouched, result.pr_url is the PR's URL; a PR against a branch that does not exist is refused in one line
    before any upload."""
    monkeypatch.setenv("HF_TOKEN", local_hub.token)
    hub = local_hub
    hf_mudsc.push_merged(merged, "user/m")
    main_head = hub.head("user/m")
    before = uploads(hub)
    with pytest.raises(ValueError) as caught:
        hf_mudsc.push_merged(merged, "user/m", create_pr=True, revision="nope")
    assert "has no branch 'nope' to open a pull request against" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1 and uploads(hub) == before
    merged.merge_report.diagnostics = None  # another model's files: no plots, which main holds
    try:
        result = hf_mudsc.push_merged(merged, "user/m", create_pr=True, commit_message="Proposed merge")
    finally:
        del merged.merge_report.diagnostics
    assert result.pr_url == f"{hub.endpoint}/user/m/discussions/1" and result.changed
    assert hub.head("user/m") == main_head
    assert hub.head("user/m", revision="refs/pr/1") == result.commit_sha
    assert hub.commits("user/m", revision="refs/pr/1")[0].title == "Proposed merge"
    # without overwrite a pull request only adds and replaces files (as upload_folder without delete_patterns)
    assert any(name.startswith("plots/") for name in hub.list_files("user/m", revision="refs/pr/1"))
    assert result.deleted == ()
    card = hub.file_bytes("user/m", "README.md", revision="refs/pr/1").decode()
    assert 'from_pretrained("user/m")' in card  # merged into main, it loads from main
    assert any(name.startswith("plots/") for name in hub.list_files("user/m"))


def test_push_to_a_branch_needs_overwrite_once_it_holds_files(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --revision dev twice: the second is refused naming --overwrite and --create-pr; with
    --overwrite the branch's files are replaced and main is untouched; the output names the branch."""
    hub = local_hub
    hub.create_repo("user/m")
    hub.commit_files("user/m", {"weights.bin": b"main's model"}, "main's model")
    main_head = hub.head("user/m")
    first = hub_cli("push", str(folder), "user/m", "--revision", "dev", "--commit-message", "Merge on dev")
    assert first.returncode == 0, first.stderr
    assert "(branch dev)" in first.stdout
    # created from main, main's files replaced on it (main keeps them)
    assert "weights.bin" not in hub.list_files("user/m", revision="dev")
    assert hub.commits("user/m", revision="dev")[0].title == "Merge on dev"
    before = uploads(hub)
    again = hub_cli("push", str(folder), "user/m", "--revision", "dev")
    assert again.returncode == 1
    error = again.stderr.strip().splitlines()[0]
    assert "the branch 'dev' of the Hub repo 'user/m' already holds files; pass --overwrite" in error
    assert "--create-pr" in error and uploads(hub) == before
    replaced = hub_cli("push", str(folder), "user/m", "--revision", "dev", "--overwrite", "--commit-message", "Again")
    assert replaced.returncode == 0, replaced.stderr
    assert "Nothing to push: user/m (dev) already holds exactly these files" in replaced.stdout
    assert hub.head("user/m") == main_head and "weights.bin" in hub.list_files("user/m")


def test_push_cli_opens_a_pull_request_and_prints_its_url(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --create-pr on a repo holding another model: no --overwrite needed, the PR's URL is
    printed, main is untouched, main's other files stay in the PR; with --overwrite the PR deletes them and says how
    many (it deleted them without --overwrite)."""
    hub = local_hub
    hub.create_repo("user/m")
    hub.commit_files("user/m", {"weights.bin": b"main's model"}, "main's model")
    main_head = hub.head("user/m")
    run = hub_cli("push", str(folder), "user/m", "--create-pr", "--commit-description", "please review")
    assert run.returncode == 0, run.stderr
    assert f"as a pull request: {hub.endpoint}/user/m/discussions/1" in run.stdout and "deletes" not in run.stdout
    assert hub.head("user/m") == main_head
    pr = hub.commits("user/m", revision="refs/pr/1")[0]
    # without --overwrite the pull request only adds and replaces files: main's own file stays in it
    assert pr.message.endswith("please review") and "weights.bin" in hub.list_files("user/m", revision="refs/pr/1")
    replacing = hub_cli("push", str(folder), "user/m", "--create-pr", "--overwrite")
    assert replacing.returncode == 0, replacing.stderr
    assert "as a pull request" in replacing.stdout and "it deletes 1 file of 'main' the folder lacks" in \
        replacing.stdout, replacing.stdout
    assert "weights.bin" not in hub.list_files("user/m", revision="refs/pr/2") and hub.head("user/m") == main_head
    assert hub_cli("push", str(folder), "user/m", "--overwrite").returncode == 0
    same = hub_cli("push", str(folder), "user/m", "--create-pr")
    assert same.returncode == 0 and "Nothing to push: user/m already holds exactly these files" in same.stdout
    assert {ref.ref for ref in HfApi(token=hub.token).list_repo_refs("user/m", include_pull_requests=True)
            .pull_requests} == {"refs/pr/1", "refs/pr/2"}


@pytest.mark.parametrize(("argv", "said"), [
    (["user/m@dev"], "names a revision, which a push target does not take: give the repo as 'user/m' and the branch "
                     "with --revision 'dev'"),
    (["user/m", "--revision", "refs/pr/1"], "is a git ref, not a branch name"),
    (["user/m", "--revision", "a" * 40], "is not a branch name the Hub accepts"),
    (["user/m", "--revision", "my branch"], "is not a branch name the Hub accepts"),
    (["user/m", "--commit-message", " "], "--commit-message is empty"),
    (["user/m", "--commit-message", "hf_" + "x" * 34], "--commit-message looks like it holds a Hugging Face access "
                                                         "token (not shown)"),
])
def test_push_arguments_the_hub_would_refuse_are_refused_in_one_line_before_the_hub(hub_cli, local_hub, folder,
                                                                                     argv, said):
    """hf-mudsc push DIR user/m@dev (or a ref, a sha, a blank message, a token as message): exit 2, one line, no Hub
    request at all."""
    run = hub_cli("push", str(folder), *argv)
    assert run.returncode == 2 and said in run.stderr, run.stderr
    assert "hf_" + "x" * 34 not in run.stderr
    assert not local_hub.requests


def test_push_to_a_tag_is_refused_before_any_upload(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --revision v1, v1 a tag: refused in one line (the Hub commits to branches only)."""
    hub = local_hub
    hub.create_repo("user/m")
    HfApi(token=hub.token).create_tag("user/m", tag="v1")
    before = uploads(hub)
    run = hub_cli("push", str(folder), "user/m", "--revision", "v1", "--overwrite")
    assert run.returncode == 1 and "'v1' is a tag of the Hub repo 'user/m', not a branch" in run.stderr
    assert run.stderr.count("hf-mudsc push: error:") == 1 and uploads(hub) == before


def test_explicit_token_wins_over_hf_token(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --token GOOD with HF_TOKEN=BAD pushes (the given token wins, as in huggingface_hub);
    --token BAD with HF_TOKEN=GOOD is refused without showing either."""
    hub = local_hub
    hub.accept_any_token = False
    bad = "hf_" + "b" * 34
    ok = hub_cli("push", str(folder), "user/m", "--token", hub.token, token=bad)
    assert ok.returncode == 0, ok.stderr
    refused = hub_cli("push", str(folder), "user/other", "--token", bad)
    assert refused.returncode == 1 and bad not in refused.stderr and hub.token not in refused.stderr


def test_merge_push_to_a_branch_names_it_in_the_card_and_the_flags_need_push_to_hub(hub_cli, local_hub, inputs,
                                                                                    tmp_path):
    """hf-mudsc merge A B ... --push-to-hub user/m --revision dev: the card on dev loads revision="dev"; --revision
    without --push-to-hub is refused (exit 2) before anything is loaded."""
    a, b, calibration = inputs
    alone = hub_cli("merge", str(a), str(b), "--calibration", str(calibration), "--output", str(tmp_path / "o"),
                    "--revision", "dev", *FAST)
    assert alone.returncode == 2 and "--revision says how --push-to-hub commits" in alone.stderr
    assert not (tmp_path / "o").exists()
    run = hub_cli("merge", str(a), str(b), "--calibration", str(calibration), "--push-to-hub", "user/m",
                  "--revision", "dev", "--commit-message", "Merged on dev", *FAST)
    assert run.returncode == 0, run.stderr
    assert "(branch dev)" in run.stdout
    hub = local_hub
    assert hub.commits("user/m", revision="dev")[0].title == "Merged on dev"
    card = ModelCard(hub.file_bytes("user/m", "README.md", revision="dev").decode())
    assert 'from_pretrained("user/m", revision="dev")' in card.content
    assert [c.title for c in hub.commits("user/m")] == ["initial commit"]


def test_dry_run_refuses_a_pickle_that_runs_code_as_the_merge_does(tmp_path, capsys):
    """hf-mudsc merge A B --allow-pickle --dry-run, B's pytorch_model.bin calling os.system: the merge refuses it at
    its header pass; the dry run printed a plan (it read headers only)."""
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    parents = []
    for name, seed in (("a", 1), ("b", 2)):
        model = make_model("vit_cls", seed)
        model.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
        state = dict(model.state_dict(), **({"extra": RunsCode()} if name == "b" else {}))
        torch.save(state, tmp_path / name / "pytorch_model.bin")
        parents.append(str(tmp_path / name))
    code = main(["merge", *parents, "--method", "average", "--allow-pickle", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1 and "pytorch_model.bin holds more than tensors — unpickling it would call posix.system" in err
    assert not marker.exists()


def test_the_readmes_branch_and_pull_request_examples_run_as_printed(hub_cli, local_hub, folder, merged,
                                                                       monkeypatch):
    """README "Push to a branch, or open a pull request": its `hf-mudsc push merged ...` lines (DIR = a merged folder)
    against a repo holding a model, then its Python example: the branch, the pull requests and the card it names."""
    from readme_examples import README, readme_example, shell_lines

    hub = local_hub
    hub.create_repo("org/my-merged-vit")
    hub.commit_files("org/my-merged-vit", {"weights.bin": b"main's model"}, "main's model")
    lines = [shlex.split(line, comments=True) for line in shell_lines(README.read_text(encoding="utf-8"))
             if line.startswith("hf-mudsc push merged ") and ("--revision" in line or "--create-pr" in line)]
    assert len(lines) == 2, lines
    for words in lines:
        run = hub_cli(*[str(folder) if word == "merged" else word for word in words[1:]])
        assert run.returncode == 0, run.stderr
    assert hub.commits("org/my-merged-vit", revision="zipit-24")[0].title == "zipit, 24 samples"
    assert hub.commits("org/my-merged-vit", revision="refs/pr/1")[0].message.endswith("Proposed: the zipit merge")
    monkeypatch.setenv("HF_TOKEN", hub.token)
    namespace = {"hf_mudsc": hf_mudsc, "merged": merged}
    merged.merge_report.diagnostics = None  # the folder's files differ from these: the pull request is not empty
    try:
        exec(compile(readme_example("push-branch"), "README.md", "exec"), namespace)
    finally:
        del merged.merge_report.diagnostics
    assert namespace["result"].pr_url == f"{hub.endpoint}/org/my-merged-vit/discussions/2"
    card = hub.file_bytes("org/my-merged-vit", "README.md", revision="experiment").decode()
    assert 'from_pretrained("org/my-merged-vit", revision="experiment")' in card
    assert hub.list_files("org/my-merged-vit") == [".gitattributes", "weights.bin"]  # main never touched


def test_a_failed_push_to_a_new_branch_deletes_the_branch_it_created(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --revision dev, the commit failing (500): one line saying nothing was committed and
    the branch this run created was deleted; main untouched."""
    hub = local_hub
    hub.create_repo("user/m")
    main_head = hub.head("user/m")
    hub.fail_next("commit", status=500)
    run = hub_cli("push", str(folder), "user/m", "--revision", "dev")
    assert run.returncode == 1
    assert "nothing was committed; the branch 'dev' created by this run was deleted" in run.stderr, run.stderr
    assert run.stderr.count("hf-mudsc push: error:") == 1
    branches = {ref.name for ref in HfApi(token=hub.token).list_repo_refs("user/m").branches}
    assert branches == {"main"} and hub.head("user/m") == main_head


def test_a_pull_request_opened_although_its_answer_was_lost_is_reported(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --create-pr, the commit applied but answered 500: the error names refs/pr/1 rather
    than saying nothing was committed."""
    hub = local_hub
    hub.create_repo("user/m")
    hub.commit_files("user/m", {"weights.bin": b"main's model"}, "main's model")
    hub.fail_next("commit", status=500, apply=True)
    run = hub_cli("push", str(folder), "user/m", "--create-pr")
    assert run.returncode == 1
    assert "the pull request was opened although its answer was lost: refs/pr/1" in run.stderr, run.stderr
    assert "nothing was committed" not in run.stderr


def test_dry_run_says_it_did_not_check_a_hub_parents_pickle(hub_cli, local_hub, tmp_path):
    """hf-mudsc merge user/a user/b --allow-pickle --dry-run, both pickle-only on the Hub: the plan says their pickle
    weights were not checked (a dry run downloads none), rather than implying the merge will start."""
    for name, seed in (("a", 1), ("b", 2)):
        model = make_model("vit_cls", seed)
        model.save_pretrained(tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / name / "pytorch_model.bin")
        local_hub.upload_folder(f"user/{name}", tmp_path / name, "pickle parent")
    run = hub_cli("merge", "user/a", "user/b", "--method", "average", "--allow-pickle", "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "'user/b': its pickle weights were not checked (a dry run downloads no weights)" in run.stdout


def test_a_pull_request_never_changes_the_repos_visibility(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --create-pr --private, user/m public: refused in one line before any upload (proposing
    a change must not make someone's public repo private, as --private does to a repo pushed to)."""
    hub = local_hub
    hub.create_repo("user/m")
    hub.commit_files("user/m", {"weights.bin": b"main's model"}, "main's model")
    run = hub_cli("push", str(folder), "user/m", "--create-pr", "--private")
    assert run.returncode == 1 and "--private would make the public repo 'user/m' private" in run.stderr, run.stderr
    assert not hub.is_private("user/m") and uploads(hub) == 0 and not hub.requests_for("settings")


def test_merge_push_to_hub_with_a_revision_suffix_points_at_revision(hub_cli, local_hub, inputs):
    """hf-mudsc merge A B ... --push-to-hub user/m@dev: exit 2 before anything is loaded, pointing at --revision
    (it said only that the repo id has invalid characters)."""
    a, b, calibration = inputs
    run = hub_cli("merge", str(a), str(b), "--calibration", str(calibration), "--push-to-hub", "user/m@dev", *FAST)
    assert run.returncode == 2
    assert "'user/m@dev' names a revision, which a push target does not take: give the repo as 'user/m' and the " \
           "branch with --revision 'dev'" in run.stderr, run.stderr
    assert not local_hub.requests


# ------------------------------------------------------------------ review findings (fix-push)
def test_a_branch_someone_creates_meanwhile_is_neither_replaced_nor_deleted(hub_cli, local_hub, folder, monkeypatch):
    """hf-mudsc push DIR user/m --revision dev while someone creates dev with their file first: refused in one line,
    their file and branch kept (create_branch(exist_ok=True) took their branch as new and replaced their files)."""
    hub = local_hub
    hub.create_repo("user/m")
    real = HfApi.create_branch

    def someone_first(self, repo_id, *, branch, **kwargs):
        real(self, repo_id, branch=branch)
        hub.commit_files(repo_id, {"theirs.txt": b"their work"}, "their work", revision=branch)
        return real(self, repo_id, branch=branch, **kwargs)

    monkeypatch.setattr(HfApi, "create_branch", someone_first)
    run = hub_cli("push", str(folder), "user/m", "--revision", "dev")
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and ("branch 'dev' appeared meanwhile; run again — with --overwrite to replace its files"
                                 in errors[0]), run.stderr
    assert hub.list_files("user/m", revision="dev") == [".gitattributes", "theirs.txt"]
    assert hub.commits("user/m", revision="dev")[0].title == "their work" and uploads(hub) == 0


def test_a_failed_commit_never_deletes_a_branch_this_run_did_not_create(local_hub, folder, monkeypatch):
    """push_folder(DIR, "user/m", revision="dev"), dev created by someone between the check and the push, the commit
    failing: their branch is kept (it was deleted as "created by this run")."""
    from hf_mudsc.errors import PushError
    from hf_mudsc.publish.hub import push_folder

    hub = local_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    hub.create_repo("user/m")
    real = HfApi.create_branch

    def someone_first(self, repo_id, *, branch, **kwargs):
        real(self, repo_id, branch=branch)
        return real(self, repo_id, branch=branch, **kwargs)

    monkeypatch.setattr(HfApi, "create_branch", someone_first)
    hub.fail_next("commit", status=500)
    with pytest.raises(PushError) as caught:
        push_folder(folder, "user/m", revision="dev", flag="repo_id")
    assert "appeared meanwhile" in str(caught.value) and "overwrite=True" in str(caught.value)
    assert "dev" in {ref.name for ref in HfApi(token=hub.token).list_repo_refs("user/m").branches}


def test_the_pushed_cards_snippet_names_the_push_target_not_the_one_written(hub_cli, local_hub, merged, tmp_path,
                                                                              monkeypatch):
    """merge --output DIR --push-to-hub user/m --revision dev, then hf-mudsc push DIR user/m: main's README loaded
    revision="dev"; a folder written for no repo pushed with --revision dev said "path/to/this/model"; a pull
    request's card says its snippet's branch holds the files once merged. The folder itself is never changed."""
    from hf_mudsc.publish.hub import CommitOptions
    from hf_mudsc.publish.writer import publish, recipe_of

    hub = local_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    out = tmp_path / "out"
    publish(merged, output=out, push_to_hub="user/m", recipe=recipe_of(merged).override(push_to_hub="user/m"),
            commit=CommitOptions(revision="dev"))
    written = (out / "README.md").read_bytes()
    assert b'from_pretrained("user/m", revision="dev")' in written
    run = hub_cli("push", str(out), "user/m")
    assert run.returncode == 0, run.stderr
    card = hub.file_bytes("user/m", "README.md").decode()
    assert 'from_pretrained("user/m")' in card and 'revision="dev"' not in card
    other = hub_cli("push", str(out), "user/other", "--revision", "exp")
    assert other.returncode == 0, other.stderr
    card = hub.file_bytes("user/other", "README.md", revision="exp").decode()
    assert 'from_pretrained("user/other", revision="exp")' in card and '"user/m"' not in card
    assert (out / "README.md").read_bytes() == written  # the folder is only read: it still passes check_unchanged
    hub.commit_files("user/m", {"weights.bin": b"another model"}, "another model")
    pr = hub_cli("push", str(out), "user/m", "--create-pr", "--overwrite")  # a change: it deletes weights.bin
    assert pr.returncode == 0, pr.stderr
    card = hub.file_bytes("user/m", "README.md", revision="refs/pr/1").decode()
    assert 'from_pretrained("user/m")' in card
    assert "pull request" not in card  # the card is the branch's: a PR of identical files changes nothing


def test_private_with_a_branch_never_makes_the_public_repo_private(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/m --revision dev --private, user/m public: refused in one line before any write (it
    made the whole repo private, with no --overwrite asked)."""
    hub = local_hub
    hub.create_repo("user/m")
    hub.commit_files("user/m", {"weights.bin": b"main's model"}, "main's model")
    run = hub_cli("push", str(folder), "user/m", "--revision", "dev", "--private")
    assert run.returncode == 1 and "--private would make the public repo 'user/m' private" in run.stderr, run.stderr
    assert run.stderr.count("error:") == 1
    assert not hub.is_private("user/m") and uploads(hub) == 0 and not hub.requests_for("settings")
    assert {ref.name for ref in HfApi(token=hub.token).list_repo_refs("user/m").branches} == {"main"}


def test_a_failed_branch_creation_deletes_the_repo_this_run_created(hub_cli, local_hub, folder):
    """hf-mudsc push DIR user/new --revision dev, creating the branch failing (500): the repo this run created is
    deleted (the check listed the commits of the missing branch, failed, and left the repo)."""
    hub = local_hub
    hub.fail_next("branch", status=500)
    run = hub_cli("push", str(folder), "user/new", "--revision", "dev")
    assert run.returncode == 1
    assert "the repo 'user/new' created by this run was deleted" in run.stderr, run.stderr
    assert not hub.repo_exists("user/new")


def test_ctrl_c_after_a_pull_request_names_the_pull_request(hub_cli, local_hub, folder, monkeypatch):
    """Ctrl-C during hf-mudsc push DIR user/m --create-pr, once the commit is being made: the line said "user/m holds
    the merged model" (main holds the other one); it names the pull request."""
    import signal

    hub = local_hub
    hub.create_repo("user/m")
    hub.commit_files("user/m", {"weights.bin": b"main's model"}, "main's model")
    real = HfApi.create_commit

    def interrupted(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", interrupted)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = hub_cli("push", str(folder), "user/m", "--create-pr")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert run.returncode == 130, run.stderr
    assert (f"the pull request {hub.endpoint}/user/m/discussions/1 against 'main' of user/m holds the merged model"
            in run.stderr), run.stderr
    assert "the push was done first: user/m holds" not in run.stderr


def test_the_retry_command_after_a_failed_push_keeps_the_commit_message(hub_cli, local_hub, merged, tmp_path,
                                                                         monkeypatch):
    """push_merged(m, "user/m", revision="dev", commit_message="First merge", commit_description=...), the commit
    failing: the suggested `hf-mudsc push KEPT user/m ...` dropped the message and description; it keeps them and
    runs as printed."""
    import re
    import shutil
    import tempfile

    from hf_mudsc.errors import PushError

    hub = local_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    hub.fail_next("commit", status=500)
    with pytest.raises(PushError) as caught:
        hf_mudsc.push_merged(merged, "user/m", revision="dev", commit_message="First merge",
                             commit_description="zipit of two ViT's")
    command = re.search(r"`(hf-mudsc push [^`]+)`", str(caught.value)).group(1)
    words = shlex.split(command)
    assert words[words.index("--commit-message") + 1] == "First merge"
    assert words[words.index("--commit-description") + 1] == "zipit of two ViT's"
    run = hub_cli(*words[1:])
    assert run.returncode == 0, run.stderr
    head = hub.commits("user/m", revision="dev")[0]
    assert head.title == "First merge" and head.message.endswith("zipit of two ViT's")
    shutil.rmtree(words[2])
