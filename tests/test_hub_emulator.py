"""The local Hub emulator (tests/hub_emulator.py) against the real huggingface_hub / transformers clients.

Client code runs in a subprocess (``hub_emulator.run_client``) because the client reads HF_ENDPOINT at
import; the server runs in this process, so the tests also check what the Hub received.
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

try:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from hub_emulator import HubEmulator, hub_emulator, hub_emulator_session  # noqa: F401
except ImportError:
    try:  # tests/ became a package, or the repo root is on sys.path
        from tests.hub_emulator import HubEmulator, hub_emulator, hub_emulator_session  # noqa: F401
    except ImportError:  # any other import mode: load it from this folder
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from hub_emulator import HubEmulator, hub_emulator, hub_emulator_session  # noqa: F401

BIG_SIZE = 11_000_000  # > 10 MB: must go through LFS even though its name matches no .gitattributes rule


def _big_payload() -> bytes:
    # Text-like (no NUL byte) and not matched by .gitattributes: only the size rule makes it LFS.
    return (b"0123456789abcdef" * (BIG_SIZE // 16 + 1))[:BIG_SIZE]


def _http(hub: HubEmulator, method: str, path: str, headers: dict | None = None, data: bytes | None = None):
    """Raw request to the emulator from this process (no proxies); returns (status, headers, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(hub.endpoint + path, method=method, headers=headers or {}, data=data)
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_whoami_create_repo_duplicate_private_and_auth(hub_emulator):
    hub = hub_emulator
    hub.accept_any_token = False  # only hub.token is valid: a wrong token must be rejected
    res = hub.run_client(
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
        api = HfApi()
        emit({"whoami": api.whoami()["name"]})
        url = api.create_repo("user/alpha")
        emit({"url": str(url), "repo_id": url.repo_id})
        try:
            api.create_repo("user/alpha")
            emit({"dup": "no error"})
        except HfHubHTTPError as e:
            emit({"dup": e.response.status_code})
        emit({"exist_ok": str(api.create_repo("user/alpha", exist_ok=True))})
        beta = api.create_repo("beta", private=True)   # no namespace => the token's user
        emit({"beta": beta.repo_id, "private": api.model_info("user/beta").private,
              "alpha_private": api.model_info("user/alpha").private})
        try:
            HfApi(token=False).model_info("user/beta")
            emit({"anon_private": "visible"})
        except RepositoryNotFoundError:
            emit({"anon_private": "RepositoryNotFoundError"})
        try:
            HfApi(token=False).create_repo("user/gamma")
            emit({"anon_create": "created"})
        except HfHubHTTPError as e:
            emit({"anon_create": e.response.status_code})
        try:
            HfApi(token="hf_not_the_right_token").whoami()
            emit({"bad_token": "accepted"})
        except HfHubHTTPError as e:
            emit({"bad_token": e.response.status_code})
        """
    )
    out = {k: v for r in res.results for k, v in r.items()}
    assert out["whoami"] == "user"
    assert out["url"] == f"{hub.endpoint}/user/alpha" and out["repo_id"] == "user/alpha"
    assert out["dup"] == 409
    assert out["exist_ok"] == f"{hub.endpoint}/user/alpha"
    assert out["beta"] == "user/beta" and out["private"] is True and out["alpha_private"] is False
    assert out["anon_private"] == "RepositoryNotFoundError"
    assert out["anon_create"] == 401
    assert out["bad_token"] == 401

    assert hub.list_repos() == ["user/alpha", "user/beta"]
    assert hub.is_private("user/beta") and not hub.is_private("user/alpha")
    # A new repo has the Hub's initial commit with .gitattributes, and a 40-hex sha.
    (initial,) = hub.commits("user/alpha")
    assert initial.title == "initial commit" and initial.files == (".gitattributes",)
    assert len(hub.head("user/alpha")) == 40 and int(hub.head("user/alpha"), 16) >= 0
    # The token travelled in the Authorization header only.
    creates = hub.requests_for("create_repo")
    assert creates[0].headers["authorization"] == f"Bearer {hub.token}"
    assert creates[0].json() == {"name": "alpha", "organization": "user"}
    beta_create = [r.json() for r in creates if r.json()["name"] == "beta"]
    assert beta_create == [{"name": "beta", "organization": None, "visibility": "private"}]
    assert not hub.find_in_requests(hub.token, where=("body", "url"))
    assert not hub.unhandled and not hub.server_errors


def test_upload_folder_regular_and_lfs_then_download_latest_and_old_sha(hub_emulator, tmp_path):
    hub = hub_emulator
    folder = tmp_path / "upload"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("version one\n")
    (folder / "data" / "big.dat").write_bytes(_big_payload())
    weights = bytes(range(256)) * 8  # small binary, *.bin is an LFS pattern of the default .gitattributes
    (folder / "weights.bin").write_bytes(weights)

    res = hub.run_client(
        f"""
        import hashlib, os
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.hf_api import RepoFile, RepoFolder
        api = HfApi()
        folder = Path({str(folder)!r})
        api.create_repo("user/files")
        c1 = api.upload_folder(folder_path=folder, repo_id="user/files", commit_message="first").oid
        (folder / "notes.txt").write_text("version two\\n")
        c2 = api.upload_folder(folder_path=folder, repo_id="user/files", commit_message="second").oid
        info = api.model_info("user/files", files_metadata=True)
        tree = list(api.list_repo_tree("user/files", recursive=True))
        emit({{
            "c1": c1, "c2": c2, "info_sha": info.sha,
            "siblings": {{s.rfilename: [s.size, s.lfs["sha256"] if s.lfs else None] for s in info.siblings}},
            "files": api.list_repo_files("user/files"),
            "files_c1": api.list_repo_files("user/files", revision=c1),
            "tree": sorted([t.path, "dir" if isinstance(t, RepoFolder) else bool(t.lfs)] for t in tree),
            "latest_notes": Path(hf_hub_download("user/files", "notes.txt")).read_text(),
            "old_notes": Path(hf_hub_download("user/files", "notes.txt", revision=c1)).read_text(),
            "big_sha": hashlib.sha256(Path(hf_hub_download("user/files", "data/big.dat")).read_bytes())
            .hexdigest(),
            "weights": Path(hf_hub_download("user/files", "weights.bin", revision=c1)).read_bytes().hex(),
        }})
        snap = Path(snapshot_download("user/files"))
        old_snap = Path(snapshot_download("user/files", revision=c1))
        emit({{
            "snap": sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()),
            "snap_name": snap.name,
            "snap_notes": (snap / "notes.txt").read_text(),
            "old_snap_name": old_snap.name,
            "old_snap_notes": (old_snap / "notes.txt").read_text(),
        }})
        """
    )
    out = {k: v for r in res.results for k, v in r.items()}
    c1, c2 = out["c1"], out["c2"]
    assert c1 != c2 and len(c1) == len(c2) == 40
    assert out["info_sha"] == c2 == hub.head("user/files")
    big_sha = hashlib.sha256(_big_payload()).hexdigest()
    assert out["siblings"] == {
        ".gitattributes": [len(hub.file_bytes("user/files", ".gitattributes")), None],
        "data/big.dat": [BIG_SIZE, big_sha],
        "notes.txt": [len("version two\n"), None],
        "weights.bin": [len(weights), hashlib.sha256(weights).hexdigest()],
    }
    expected_files = [".gitattributes", "data/big.dat", "notes.txt", "weights.bin"]
    assert out["files"] == out["files_c1"] == expected_files
    assert out["tree"] == sorted(
        [
            [".gitattributes", False],
            ["data", "dir"],
            ["data/big.dat", True],
            ["notes.txt", False],
            ["weights.bin", True],
        ]
    )
    assert out["latest_notes"] == "version two\n" and out["old_notes"] == "version one\n"
    assert out["big_sha"] == big_sha and out["weights"] == weights.hex()
    assert out["snap"] == expected_files and out["snap_name"] == c2 and out["snap_notes"] == "version two\n"
    assert out["old_snap_name"] == c1 and out["old_snap_notes"] == "version one\n"

    # Server side: the client's own regular/LFS decision (from preupload) reached the commit endpoint.
    first, second = [r.ndjson() for r in hub.requests_for("commit", "user/files")]
    kinds = {line["value"]["path"]: line["key"] for line in first if line["key"] != "header"}
    assert kinds == {"notes.txt": "file", "data/big.dat": "lfsFile", "weights.bin": "lfsFile"}
    assert first[0] == {"key": "header", "value": {"summary": "first", "description": ""}}
    # Unchanged files are skipped by the client (preupload returned their remote oid).
    assert [line["value"]["path"] for line in second if line["key"] != "header"] == ["notes.txt"]
    # LFS blobs went through batch + PUT, once each: the second batch is answered "already present".
    assert [len(r.json()["objects"]) for r in hub.requests_for("lfs_batch")] == [2, 2]
    assert sorted(len(r.body) for r in hub.requests_for("lfs_upload")) == [len(weights), BIG_SIZE]
    assert all(len(r.body) < 10_000 for r in hub.requests_for("commit"))
    assert hub.is_lfs("user/files", "data/big.dat") and not hub.is_lfs("user/files", "notes.txt")
    assert [c.title for c in hub.commits("user/files")] == ["second", "first", "initial commit"]
    assert hub.file_bytes("user/files", "notes.txt", revision=c1) == b"version one\n"
    assert hub.file_bytes("user/files", "data/big.dat") == _big_payload()
    assert not hub.find_in_requests(hub.token, where=("body", "url"))
    assert not hub.unhandled and not hub.server_errors


def test_missing_repo_file_and_revision_raise_the_clients_errors(hub_emulator):
    hub = hub_emulator
    sha = hub.commit_files("user/present", {"a.txt": b"content"}, "add a.txt")
    res = hub.run_client(
        f"""
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub import errors
        api = HfApi()
        def kind(fn):
            try:
                fn()
                return "ok"
            except Exception as e:
                return type(e).__name__
        emit({{
            "download_missing_repo": kind(lambda: hf_hub_download("user/absent", "a.txt")),
            "info_missing_repo": kind(lambda: api.model_info("user/absent")),
            "snapshot_missing_repo": kind(lambda: snapshot_download("user/absent")),
            "missing_file": kind(lambda: hf_hub_download("user/present", "nope.txt")),
            "missing_branch": kind(lambda: hf_hub_download("user/present", "a.txt", revision="nope")),
            "missing_sha": kind(lambda: hf_hub_download("user/present", "a.txt", revision="0" * 40)),
            "info_missing_revision": kind(lambda: api.model_info("user/present", revision="nope")),
            "tree_missing_revision": kind(lambda: api.list_repo_files("user/present", revision="nope")),
            "present": kind(lambda: hf_hub_download("user/present", "a.txt", revision={sha!r})),
            "repo_exists": [api.repo_exists("user/present"), api.repo_exists("user/absent")],
            "file_exists": [api.file_exists("user/present", f) for f in ("a.txt", "b.txt")],
            "revision_exists": [api.revision_exists("user/present", r) for r in ({sha!r}, "x")],
        }})
        try:
            hf_hub_download("user/present", "nope.txt")
        except errors.EntryNotFoundError as e:
            emit({{"entry_is_http_error": isinstance(e, errors.HfHubHTTPError),
                  "status": e.response.status_code}})
        """
    )
    out = {k: v for r in res.results for k, v in r.items()}
    assert out["download_missing_repo"] == "RepositoryNotFoundError"
    assert out["info_missing_repo"] == "RepositoryNotFoundError"
    assert out["snapshot_missing_repo"] == "RepositoryNotFoundError"
    assert out["missing_file"] == "RemoteEntryNotFoundError"
    assert out["missing_branch"] == "RevisionNotFoundError"
    assert out["missing_sha"] == "RevisionNotFoundError"
    assert out["info_missing_revision"] == "RevisionNotFoundError"
    assert out["tree_missing_revision"] == "RevisionNotFoundError"
    assert out["present"] == "ok"
    assert out["repo_exists"] == [True, False]
    assert out["file_exists"] == [True, False]
    assert out["revision_exists"] == [True, False]
    assert out["entry_is_http_error"] is True and out["status"] == 404
    assert not hub.unhandled and not hub.server_errors


def test_failed_commit_or_lfs_upload_leaves_no_commit(hub_emulator):
    hub = hub_emulator
    sha0 = hub.commit_files("user/target", {"README.md": "---\nlicense: mit\n---\n# target\n"}, "seed")
    hub.fail_next("commit", status=500)
    hub.fail_next("lfs_upload", status=403)  # 4xx: not retried by the client
    res = hub.run_client(
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        try:
            api.upload_file(path_or_fileobj=b"new text", path_in_repo="new.txt", repo_id="user/target")
            emit({"first": "committed"})
        except HfHubHTTPError as e:
            emit({"first": e.response.status_code, "sha_after_first": api.model_info("user/target").sha})
        try:
            api.upload_file(path_or_fileobj=b"\\0binary" * 100, path_in_repo="w.bin", repo_id="user/target")
            emit({"lfs": "committed"})
        except Exception as e:
            emit({"lfs": type(e).__name__, "sha_after_lfs": api.model_info("user/target").sha})
        ci = api.upload_file(path_or_fileobj=b"new text", path_in_repo="new.txt", repo_id="user/target")
        emit({"retry": ci.oid})
        """
    )
    out = {k: v for r in res.results for k, v in r.items()}
    assert out["first"] == 500 and out["sha_after_first"] == sha0
    assert out["lfs"] == "RuntimeError" and out["sha_after_lfs"] == sha0
    assert out["retry"] == hub.head("user/target") != sha0
    assert [c.title for c in hub.commits("user/target")] == [
        "Upload new.txt with huggingface_hub",
        "seed",
        "initial commit",
    ]
    assert hub.list_files("user/target") == [".gitattributes", "README.md", "new.txt"]
    # One failed commit POST (500), one commit never sent (the LFS PUT failed first), one successful commit.
    assert [r.status for r in hub.requests_for("commit")] == [500, 200]
    assert [r.status for r in hub.requests_for("lfs_upload")] == [403]
    assert not hub.pending_faults()
    assert not hub.unhandled and not hub.server_errors


def test_transformers_push_to_hub_and_from_pretrained_round_trip(hub_emulator):
    hub = hub_emulator
    res = hub.run_client(
        """
        import hashlib, tempfile, torch
        from huggingface_hub import HfApi
        from transformers import (AutoModelForImageClassification, BertConfig, BertModel, ViTConfig,
                                  ViTForImageClassification)
        torch.manual_seed(0)
        def digest(model):
            h = hashlib.sha256()
            for name, t in sorted(model.state_dict().items()):
                h.update(name.encode()); h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
            return h.hexdigest()
        bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=37, vocab_size=99))
        commit = bert.push_to_hub("user/tiny-bert")
        fresh_cache = tempfile.mkdtemp()  # nothing cached: every byte comes from the emulator
        loaded = BertModel.from_pretrained("user/tiny-bert", cache_dir=fresh_cache, dtype=torch.float32)
        sd1, sd2 = bert.state_dict(), loaded.state_dict()
        same = sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
        info = HfApi().model_info("user/tiny-bert")
        emit({"bert_commit": commit.oid, "bert_same": same and digest(bert) == digest(loaded),
              "card_library": info.card_data.library_name, "info_sha": info.sha,
              "safetensors_total": info.safetensors.total,
              "numel": sum(p.numel() for p in bert.parameters())})
        vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=37, num_labels=10))
        vit.push_to_hub("merged")   # no namespace => user/merged
        vit2 = AutoModelForImageClassification.from_pretrained("user/merged", dtype=torch.float32)
        emit({"vit_same": digest(vit) == digest(vit2), "vit_class": type(vit2).__name__})
        """
    )
    out = {k: v for r in res.results for k, v in r.items()}
    assert out["bert_same"] is True and out["vit_same"] is True
    assert out["vit_class"] == "ViTForImageClassification"
    assert out["bert_commit"] == out["info_sha"] == hub.head("user/tiny-bert")
    assert out["card_library"] == "transformers"
    assert out["safetensors_total"] == out["numel"]
    assert hub.list_files("user/tiny-bert") == [
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert hub.is_lfs("user/tiny-bert", "model.safetensors")
    assert json.loads(hub.file_bytes("user/tiny-bert", "config.json"))["hidden_size"] == 32
    assert b"library_name: transformers" in hub.file_bytes("user/tiny-bert", "README.md")
    assert hub.list_repos() == ["user/merged", "user/tiny-bert"]
    assert hub.requests_for("validate_yaml")  # the model card went through /api/validate-yaml
    assert not hub.find_in_requests(hub.token, where=("body", "url"))
    assert not hub.unhandled and not hub.server_errors


def test_branches_tags_prs_deletes_and_commit_listing(hub_emulator):
    hub = hub_emulator
    sha0 = hub.commit_files("user/refs", {"a.txt": b"a", "dir/b.txt": b"b", "dir/c.txt": b"c"}, "seed")
    res = hub.run_client(
        f"""
        from pathlib import Path
        from huggingface_hub import HfApi, CommitOperationAdd, CommitOperationDelete, hf_hub_download
        from huggingface_hub.hf_api import RepoFolder
        api = HfApi()
        api.create_branch("user/refs", branch="dev")
        api.create_branch("user/refs", branch="dev", exist_ok=True)
        dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="a.txt", repo_id="user/refs",
                              revision="dev").oid
        api.create_tag("user/refs", tag="v1", revision={sha0!r})
        pr = api.create_commit("user/refs", operations=[CommitOperationAdd("pr.txt", b"pr")],
                               commit_message="proposal", create_pr=True)
        deleted = api.create_commit("user/refs", commit_message="cleanup", operations=[
            CommitOperationDelete("a.txt"), CommitOperationDelete("dir/", is_folder=True)]).oid
        refs = api.list_repo_refs("user/refs", include_pull_requests=True)
        paths = api.get_paths_info("user/refs", ["a.txt", "dir", "zzz"], revision="v1")
        emit({{
            "dev": dev,
            "dev_a": Path(hf_hub_download("user/refs", "a.txt", revision="dev")).read_text(),
            "tag_a": Path(hf_hub_download("user/refs", "a.txt", revision="v1")).read_text(),
            "pr_ref": pr.pr_revision, "pr_num": pr.pr_num,
            "pr_file": Path(hf_hub_download("user/refs", "pr.txt", revision=pr.pr_revision)).read_text(),
            "branches": sorted((b.name, b.target_commit) for b in refs.branches),
            "tags": [(t.name, t.target_commit) for t in refs.tags],
            "prs": [p.ref for p in refs.pull_requests],
            "main_files": api.list_repo_files("user/refs"),
            "deleted": deleted,
            "log": [c.title for c in api.list_repo_commits("user/refs")],
            "paths": [[p.path, isinstance(p, RepoFolder)] for p in paths],
            "expand": [t.last_commit.title
                       for t in api.list_repo_tree("user/refs", revision="v1", expand=True)],
        }})
        """
    )
    out = res.result
    assert out["dev_a"] == "dev" and out["tag_a"] == "a"
    assert out["pr_ref"] == "refs/pr/1" and out["pr_num"] == 1 and out["pr_file"] == "pr"
    assert out["branches"] == [["dev", out["dev"]], ["main", out["deleted"]]]
    assert out["tags"] == [["v1", sha0]]
    assert out["prs"] == ["refs/pr/1"]
    assert out["main_files"] == [".gitattributes"]
    assert out["log"] == ["cleanup", "seed", "initial commit"]
    assert out["paths"] == [["a.txt", False], ["dir", True]]
    assert out["expand"] == ["seed", "initial commit", "seed"]  # dir, .gitattributes, a.txt (dirs first)
    assert [c.title for c in hub.commits("user/refs", revision="refs/pr/1")] == [
        "proposal",
        "seed",
        "initial commit",
    ]
    assert not hub.unhandled and not hub.server_errors


def test_resolve_headers_ranges_faults_and_unhandled_routes(hub_emulator):
    """Raw HTTP from this process: the headers the client relies on, and the test-control API."""
    hub = hub_emulator
    big = _big_payload()
    sha = hub.commit_files("user/raw", {"small.txt": b"hello world", "big.dat": big}, "seed")
    assert hub.is_lfs("user/raw", "big.dat") and not hub.is_lfs("user/raw", "small.txt")

    status, headers, body = _http(hub, "HEAD", "/user/raw/resolve/main/small.txt")
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == sha
    git_blob_sha1 = hashlib.sha1(b"blob 11\0hello world").hexdigest()
    assert headers["ETag"] == f'"{git_blob_sha1}"'
    assert headers["Content-Length"] == "11" and "X-Linked-Size" not in headers

    status, headers, _ = _http(hub, "HEAD", f"/user/raw/resolve/{sha}/big.dat")
    assert status == 200 and headers["X-Repo-Commit"] == sha
    assert headers["X-Linked-Etag"] == headers["ETag"] == f'"{hashlib.sha256(big).hexdigest()}"'
    assert headers["X-Linked-Size"] == str(len(big))

    status, headers, body = _http(hub, "GET", "/user/raw/resolve/main/small.txt", {"Range": "bytes=6-"})
    assert status == 206 and body == b"world" and headers["Content-Range"] == "bytes 6-10/11"

    for path, code in [
        ("/user/nope/resolve/main/small.txt", "RepoNotFound"),
        ("/user/raw/resolve/nope/small.txt", "RevisionNotFound"),
        ("/user/raw/resolve/main/nope.txt", "EntryNotFound"),
    ]:
        status, headers, _ = _http(hub, "HEAD", path)
        assert (status, headers["X-Error-Code"]) == (404, code), path

    status, _, body = _http(hub, "GET", "/api/whoami-v2", {"Authorization": f"Bearer {hub.token}"})
    assert status == 200 and json.loads(body)["name"] == "user"
    status, _, _ = _http(hub, "GET", "/api/whoami-v2")
    assert status == 401

    hub.fail_next("resolve", status=503, times=2, method="HEAD", error_code="Overloaded", message="try later")
    assert _http(hub, "GET", "/user/raw/resolve/main/small.txt")[0] == 200  # GET is not targeted
    first, second, third = (_http(hub, "HEAD", "/user/raw/resolve/main/small.txt") for _ in range(3))
    assert (first[0], first[1]["X-Error-Code"], first[1]["X-Error-Message"]) == (
        503,
        "Overloaded",
        "try later",
    )
    assert second[0] == 503 and third[0] == 200 and not hub.pending_faults()

    status, _, _ = _http(hub, "GET", "/api/some/unknown/route")
    assert status == 404 and [r.path for r in hub.unhandled] == ["/api/some/unknown/route"]
    hub.unhandled.clear()
    assert not hub.server_errors


def test_invalid_model_card_yaml_is_rejected_before_upload(hub_emulator):
    hub = hub_emulator
    hub.create_repo("user/card")
    res = hub.run_client(
        """
        from huggingface_hub import HfApi
        try:
            HfApi().upload_file(path_or_fileobj=b"---\\ntags: [unclosed\\n---\\n# card\\n",
                                path_in_repo="README.md", repo_id="user/card")
            emit("uploaded")
        except ValueError as e:
            emit(str(e).splitlines()[0])
        """
    )
    assert res.result == "Invalid metadata in README.md."
    assert not hub.requests_for("commit") and len(hub.commits("user/card")) == 1
