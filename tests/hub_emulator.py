"""A small local Hugging Face Hub emulator for tests (a test fixture, not product code).

There is no network here, and no installable server accepts uploads, so every push/download test talks
to this emulator: a stdlib ``ThreadingHTTPServer`` on ``127.0.0.1`` (random free port) running in a
background thread, holding repos in memory with git-like history (40-hex commit shas, every commit kept,
so any file can be downloaded at any older sha). It speaks the subset of the Hub HTTP API that
``huggingface_hub`` 2.4 and ``transformers`` 5.x actually use (see "Endpoints" below); the installed
client's source is the ground truth it was written against.

How to use it (READ THIS FIRST)
-------------------------------
The Hub client reads ``HF_ENDPOINT`` (and ``HF_HUB_OFFLINE``, ``HF_HOME``...) **once, at import**, and the
pytest process has usually imported ``huggingface_hub``/``transformers`` already (with the offline test
settings). So client code runs in a **subprocess** whose environment points at the emulator — or, in this
suite, in the pytest process through conftest's ``local_hub`` fixture (it points the settings the client reads
at call time at the emulator, with a fresh cache per test) and ``hub_cli`` (the CLI in-process): no interpreter
start-up per run; a subprocess is kept where the process itself is under test. The server itself lives in the
pytest process, so a test can inspect what the Hub received (repos, commits, requests) and inject faults.

In a conftest (re-export the fixtures; tests/ has no __init__.py, so pytest puts tests/ on sys.path)::

    try:
        from hub_emulator import hub_emulator, hub_emulator_session  # noqa: F401
    except ImportError:  # if tests/ ever becomes a package
        from tests.hub_emulator import hub_emulator, hub_emulator_session  # noqa: F401

In a test::

    def test_push_then_load(hub_emulator, tmp_path):
        # 1) Python code run against the emulator, in a fresh interpreter. `emit(obj)` reports JSON back.
        res = hub_emulator.run_client('''
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo("user/demo")
            api.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id="user/demo")
            emit(api.model_info("user/demo").sha)
        ''')
        assert res.result == hub_emulator.head("user/demo")

        # 2) Any other program (your CLI, ``accelerate launch`` ...): pass the prepared environment.
        env = hub_emulator.client_env()  # HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_HOME, HF_TOKEN...
        subprocess.run([sys.executable, "-m", "hf_mudsc", "merge", ..., "--push-to-hub", "user/merged"],
                       env=env, check=True)

        # 3) Inspect the server side directly (no client needed).
        assert [c.title for c in hub_emulator.commits("user/merged")][0].startswith("Upload")
        assert hub_emulator.file_bytes("user/merged", "config.json")
        assert not hub_emulator.find_in_requests(env["HF_TOKEN"], where=("body", "url"))

        # 4) Fault injection: the next commit fails with HTTP 500 and is not applied. (A failed
        #    `push_to_hub` still leaves the repo it created first, with only its "initial commit".)
        hub_emulator.fail_next("commit", status=500)

Fixtures: ``hub_emulator_session`` (session scope: one server for the whole run) and ``hub_emulator``
(function scope: the same server, **reset to an empty hub** before each test, with a fresh ``HF_HOME``
under ``tmp_path`` as the default for ``run_client``/``client_env``). Use ``hub_emulator_session``
directly (with unique repo names) if you need state shared across tests, e.g. parents pushed once per
module. Outside pytest: ``with HubEmulator() as hub: ...`` or ``python tests/hub_emulator.py`` to run
a server by hand.

Client environment (``client_env``): ``HF_ENDPOINT=<emulator>``, ``HF_HUB_DISABLE_XET=1`` (Xet
uploads cannot be emulated), ``HF_HUB_OFFLINE=0`` and ``TRANSFORMERS_OFFLINE=0`` (CI runs offline),
a temporary ``HF_HOME`` (cache-path overrides such as ``HF_HUB_CACHE`` removed), ``HF_TOKEN=<token>``
(default ``hub.token``; ``token=None`` removes it), ``NO_PROXY`` for 127.0.0.1, progress bars and
telemetry off.

Auth: every bearer token is accepted as user ``hub.username`` (default ``"user"``) unless
``hub.accept_any_token = False``, in which case only ``hub.token`` is valid (others get 401 "Invalid
credentials in Authorization header"). Writes (create/delete repo, preupload, LFS batch/verify, commit,
branch, tag, settings) require a token. Private repos are visible to any valid token, hidden (401
``RepoNotFound``) otherwise. ``create_repo("name")`` without a namespace creates ``user/name``.

Storage rules: a new repo gets an "initial commit" with the Hub's default ``.gitattributes``.
``preupload`` answers ``lfs`` for a file that matches a ``filter=lfs`` pattern of the repo's
``.gitattributes``, or is larger than ``hub.lfs_threshold`` (10 MB), or whose 512-byte sample contains a
NUL byte (binary); ``regular`` otherwise. The commit endpoint enforces it (a too-large regular file is
rejected with 400) and refuses ``lfsFile`` lines whose blob was never uploaded.

Endpoints (``{type}`` = models | datasets | spaces | kernels; ``{prefix}`` = "" | datasets/ | spaces/ ...)::

    GET    /api/whoami-v2
    POST   /api/repos/create                      (409 + {"url"} if it exists; exist_ok is client side)
    DELETE /api/repos/delete
    POST   /api/validate-yaml                     (400 + errors on invalid README front matter)
    GET    /api/{type}/{repo}                     model_info/repo_info (sha, siblings, private, cardData,
    GET    /api/{type}/{repo}/revision/{rev}        tags, library_name, pipeline_tag, model-index, config,
                                                    safetensors {parameters, total}, ...; ?blobs=1)
    GET    /api/{type}/{repo}/tree/{rev}[/{path}] list_repo_tree / list_repo_files (?recursive, ?expand)
    POST   /api/{type}/{repo}/paths-info/{rev}    get_paths_info
    POST   /api/{type}/{repo}/preupload/{rev}     upload modes (regular | lfs), shouldIgnore, remote oid
    POST   /api/{type}/{repo}/commit/{rev}        ndjson header/file/lfsFile/deletedFile/deletedFolder,
                                                  parentCommit (412 if stale), ?create_pr=1 (refs/pr/N)
    GET    /api/{type}/{repo}/commits/{rev}       list_repo_commits (newest first)
    GET    /api/{type}/{repo}/refs                list_repo_refs (?include_prs=1)
    POST   /api/{type}/{repo}/branch/{branch}     create_branch (409 if exists) / DELETE delete_branch
    POST   /api/{type}/{repo}/tag/{rev}           create_tag (409 if exists)   / DELETE .../tag/{tag}
    PUT    /api/{type}/{repo}/settings            update_repo_settings (visibility/private, gated)
    GET    /api/{type}/{repo}/discussions         always empty
    POST   /{prefix}{repo}.git/info/lfs/objects/batch    LFS batch API (upload; basic transfer)
    POST   /{prefix}{repo}.git/info/lfs/objects/verify   LFS verify
    PUT    /_emulator/lfs-upload/{sha256}                the upload URL handed out by the batch API
    HEAD   /{prefix}{repo}/resolve/{rev}/{path}   X-Repo-Commit, ETag (git sha1 or sha256 for LFS),
    GET    /{prefix}{repo}/resolve/{rev}/{path}     X-Linked-Etag/X-Linked-Size (LFS), Content-Length,
                                                    Range requests (206); errors via X-Error-Code:
                                                    RepoNotFound (404, 401 for hidden private repos),
                                                    RevisionNotFound (404), EntryNotFound (404)

Anything else answers 404 without an error code and is recorded in ``hub.unhandled`` (assert it is
empty to catch a client call the emulator does not know). Exceptions inside the emulator answer 500
and are recorded in ``hub.server_errors``.

Fault injection: ``hub.fail_next(op, status=500, times=1, message=None, error_code=None,
repo_id=None, method=None)``. ``op`` names: whoami, create_repo, delete_repo, validate_yaml,
repo_info (alias model_info), tree, paths_info, preupload, commit, commits, refs, branch, tag,
settings, discussions, lfs_batch, lfs_verify, lfs_upload, resolve (HEAD and GET; narrow with
``method="GET"``), or "*" for any request. The matching request is answered with that status and is
NOT executed (a failed commit leaves no commit) — unless ``apply=True``: then it is executed and the answer
is replaced by the error (or, with ``drop=True``, by a closed connection): a commit applied whose answer was
lost. ``hub.delay_next(op, seconds)`` delays the next answer (a slow server, for client timeouts).
Note: the client retries preupload, LFS batch/upload
and tree listing on 408/429/5xx (up to 5 times with back-off), but NOT the commit POST; use
``times=`` or a 4xx status to make those fail for good.

Network faults (the request is received, then the connection misbehaves): ``hub.stall_next(op, seconds,
times=1, repo_id=None, method=None, path=None)`` holds the request for ``seconds`` and closes the connection without an
answer (a stalled server; ``op`` is ``repo_info`` or ``resolve``); ``hub.drop_next(after_bytes=None, times=1,
repo_id=None, path=None)`` answers a download (``resolve`` GET) with its full headers, sends the file's bytes
only up to offset ``after_bytes`` (default: half of the file) and closes the connection mid-body. The client
resumes dropped downloads with Range requests; a resumed request that starts at or past the cut receives no
bytes, so ``times=`` large enough makes the download fail for good.

Inspection: ``hub.requests`` (``RecordedRequest``: method, url, path, op, repo_id, headers, body,
status), ``hub.find_in_requests(needle, where=("body", "url", "headers"))``, ``hub.requests_for(op)``,
``hub.commits(repo_id)`` (newest first, like ``git log``), ``hub.head(repo_id, revision="main")``,
``hub.list_files(repo_id, revision)``, ``hub.file_bytes(repo_id, path, revision)``,
``hub.repo_exists(repo_id)``, ``hub.is_private(repo_id)``. Seeding without the client (fast):
``hub.create_repo(repo_id)``, ``hub.commit_files(repo_id, {path: bytes | Path}, message)``,
``hub.upload_folder(repo_id, folder)``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import fnmatch
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

try:  # pytest is only needed for the fixtures; the emulator itself is stdlib-only (+ optional PyYAML).
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

try:
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

__all__ = [
    "HubEmulator",
    "ClientResult",
    "RecordedRequest",
    "CommitRecord",
    "hub_emulator",
    "hub_emulator_session",
]

DEFAULT_USERNAME = "user"
DEFAULT_TOKEN = "hf_emulatorTokenDoNotLeak0123456789"
LFS_THRESHOLD = 10 * 1000 * 1000  # bytes; above this a file must be stored with LFS
RESULT_MARKER = "@@HUB_EMULATOR_RESULT@@"

_TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}
_REPO_SUBROUTES = {
    "revision",
    "tree",
    "paths-info",
    "preupload",
    "commit",
    "commits",
    "refs",
    "branch",
    "tag",
    "settings",
    "discussions",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA40_RE = re.compile(r"^[0-9a-f]{40}$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")

# The .gitattributes the Hub writes in the initial commit of a new repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in [
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    ]
)


# ----------------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------------


def _now_iso() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclasses.dataclass(frozen=True)
class _File:
    path: str
    size: int
    sha256: str  # content address in the blob store
    blob_oid: str  # git sha1 of the content (regular) or of the LFS pointer (lfs)
    lfs: bool
    pointer_size: int | None = None

    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_oid


@dataclasses.dataclass
class _Commit:
    oid: str
    parents: list[str]
    title: str
    message: str
    date: str
    author: str
    files: dict[str, _File]


@dataclasses.dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    prs: dict[int, str] = dataclasses.field(default_factory=dict)
    gated: Any = False

    @property
    def url_path(self) -> str:
        return _URL_PREFIX.get(self.repo_type, "") + self.repo_id


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """A commit as seen from the test (``hub.commits(repo_id)``)."""

    oid: str
    title: str
    message: str
    parents: tuple[str, ...]
    date: str
    author: str
    files: tuple[str, ...]  # every file present at this commit (the tree, not the diff)


@dataclasses.dataclass
class RecordedRequest:
    """One request the emulator received (``hub.requests``)."""

    method: str
    url: str  # raw path + query string, as sent
    path: str  # decoded path
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    op: str | None = None
    repo_id: str | None = None
    status: int | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


@dataclasses.dataclass
class _Fault:
    op: str
    status: int
    times: int
    message: str | None
    error_code: str | None
    repo_id: str | None
    method: str | None
    apply: bool = False  # execute the request first, then fail (the client never learns it succeeded)
    drop: bool = False  # close the connection without any answer (instead of answering `status`)
    delay: float = 0.0  # seconds to wait before answering (a stalled server)
    passthrough: bool = False  # after the delay, answer normally (a slow, not a failing, server)
    path: str | None = None  # only requests whose path ends with it (one file of a repo: `/README.md`)

    def matches(self, op: str | None, method: str, repo_id: str | None, path: str = "") -> bool:
        if self.times <= 0:
            return False
        if self.path is not None and not path.endswith(self.path):
            return False
        if self.op != "*" and self.op != op:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.repo_id is not None and self.repo_id != repo_id:
            return False
        return True


@dataclasses.dataclass
class _NetworkFault:
    kind: str  # "stall" | "drop"
    op: str
    times: int
    seconds: float = 0.0
    after_bytes: int | None = None
    repo_id: str | None = None
    method: str | None = None
    path: str | None = None

    def matches(self, kind: str, op: str, method: str, repo_id: str | None, path: str | None) -> bool:
        return (
            self.times > 0
            and self.kind == kind
            and self.op == op
            and (self.method is None or self.method.upper() == method)
            and (self.repo_id is None or self.repo_id == repo_id)
            and (self.path is None or self.path == path)
        )


@dataclasses.dataclass
class ClientResult:
    """Outcome of ``hub.run_client(code)``; ``results`` are the objects passed to ``emit(...)``."""

    returncode: int
    stdout: str
    stderr: str
    results: list[Any]

    @property
    def result(self) -> Any:
        return self.results[-1] if self.results else None


class _HubError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra_body: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra_body = extra_body or {}


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in {"1", "true", "yes", "on"}


def _parse_front_matter(text: str) -> tuple[dict | None, str | None]:
    """(metadata dict or None, error message or None) of a README's YAML front matter."""
    match = _YAML_BLOCK_RE.search(text)
    if match is None:
        return None, None
    if yaml is None:  # pragma: no cover
        return None, None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        return None, f"Invalid YAML in README.md front matter: {exc}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, "README.md front matter must be a YAML mapping (key: value)"
    return data, None


def _gitattributes_lfs_patterns(text: str) -> list[str]:
    patterns = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _path_matches(pattern: str, path: str) -> bool:
    pattern = pattern.lstrip("/")
    if "/" not in pattern.rstrip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.replace("**/", "*"))


# ----------------------------------------------------------------------------------------------------
# The emulator
# ----------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "HubEmulator/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def _dispatch(self) -> None:
        self.server.emulator._handle(self)  # type: ignore[attr-defined]

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class HubEmulator:
    """In-memory Hugging Face Hub served over HTTP on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        username: str = DEFAULT_USERNAME,
        token: str = DEFAULT_TOKEN,
        accept_any_token: bool = True,
        lfs_threshold: int = LFS_THRESHOLD,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.username = username
        self.token = token
        self.accept_any_token = accept_any_token
        self.lfs_threshold = lfs_threshold
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.default_hf_home: Path | None = None
        self._init_state()

    # ------------------------------------------------------------------ lifecycle
    def _init_state(self) -> None:
        with self._lock:
            self._repos: dict[tuple[str, str], _Repo] = {}
            self._blobs: dict[str, bytes] = {}  # sha256 -> content
            self._lfs_objects: set[str] = set()  # sha256 of blobs uploaded through LFS
            self._faults: list[_Fault] = []
            self._network_faults: list[_NetworkFault] = []
            self.requests: list[RecordedRequest] = []
            self.unhandled: list[RecordedRequest] = []
            self.server_errors: list[str] = []
            self._counter = 0

    def start(self) -> HubEmulator:
        if self._server is not None:
            return self
        self._server = _Server((self._host, self._port), _Handler)
        self._server.emulator = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="hub-emulator",
            daemon=True,
        )
        self._thread.start()
        self._tmp = tempfile.TemporaryDirectory(prefix="hub-emulator-")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every repo, blob, request, fault and error (the server keeps running)."""
        self._init_state()
        self.accept_any_token = True

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("HubEmulator is not started")
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://{self._host}:{self.port}"

    # ------------------------------------------------------------------ client side helpers
    def client_env(
        self,
        hf_home: str | os.PathLike | None = None,
        *,
        token: str | None = "default",
        extra: Mapping[str, str] | None = None,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for a process that must talk to this emulator (set before anything imports the client).

        ``token="default"`` uses ``self.token``; ``token=None`` removes every token variable.
        """
        env = dict(os.environ if base is None else base)
        for key in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "TRANSFORMERS_CACHE",
            "HF_ASSETS_CACHE",
            "HF_XET_CACHE",
            "HF_TOKEN_PATH",
            "HF_STORED_TOKENS_PATH",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_ENABLE_HF_TRANSFER",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN",
            "HF_HUB_USER_AGENT_ORIGIN",
            "HF_MODULES_CACHE",
        ):
            env.pop(key, None)
        if hf_home is None:
            hf_home = self._default_home()
        no_proxy = ",".join(
            x for x in ("127.0.0.1", "localhost", env.get("NO_PROXY") or env.get("no_proxy")) if x
        )
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_SYMLINKS_WARNING="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        if token == "default":
            token = self.token
        if token:
            env["HF_TOKEN"] = token
        if extra:
            env.update(extra)
        return env

    def _default_home(self) -> Path:
        if self.default_hf_home is not None:
            home = Path(self.default_hf_home)
        else:
            if self._tmp is None:
                raise RuntimeError("HubEmulator is not started")
            home = Path(self._tmp.name) / "hf_home"
        home.mkdir(parents=True, exist_ok=True)
        return home

    def run_client(
        self,
        code: str,
        *,
        hf_home: str | os.PathLike | None = None,
        token: str | None = "default",
        env: Mapping[str, str] | None = None,
        timeout: float = 300,
        check: bool = True,
        cwd: str | os.PathLike | None = None,
    ) -> ClientResult:
        """Run ``code`` (dedented) in a fresh ``sys.executable`` whose environment points at this emulator.

        Inside ``code``, ``emit(obj)`` sends a JSON-serialisable object back (``ClientResult.results``;
        ``.result`` is the last one). With ``check=True`` a non-zero exit raises ``AssertionError`` carrying
        the client's stdout/stderr and the emulator's last requests.
        """
        prelude = (
            "import json as _hub_emulator_json\n"
            "def emit(obj):\n"
            f"    print({RESULT_MARKER!r} + _hub_emulator_json.dumps(obj, default=str), flush=True)\n"
        )
        script = prelude + textwrap.dedent(code)
        full_env = self.client_env(hf_home, token=token, extra=env)
        script_dir = Path(self._tmp.name if self._tmp else tempfile.gettempdir())
        fd, script_path = tempfile.mkstemp(prefix="client_", suffix=".py", dir=script_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(script)
        try:
            proc = subprocess.run(
                [sys.executable, script_path],
                env=full_env,
                cwd=str(cwd) if cwd is not None else None,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(script_path)
        results, stdout_lines = [], []
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_MARKER):
                results.append(json.loads(line[len(RESULT_MARKER) :]))
            else:
                stdout_lines.append(line)
        result = ClientResult(proc.returncode, "\n".join(stdout_lines), proc.stderr, results)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"Hub client exited with {proc.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n"
                f"--- stderr ---\n{result.stderr[-8000:]}\n"
                f"--- last requests ---\n{self.describe_requests(25)}"
                + (f"\n--- emulator errors ---\n{self.server_errors[-3:]}" if self.server_errors else "")
            )
        return result

    # ------------------------------------------------------------------ inspection
    def describe_requests(self, last: int = 50) -> str:
        with self._lock:
            reqs = self.requests[-last:]
        return "\n".join(f"{r.status} {r.method} {r.url} [{r.op}]" for r in reqs)

    def requests_for(self, op: str, repo_id: str | None = None) -> list[RecordedRequest]:
        op = "repo_info" if op == "model_info" else op
        with self._lock:
            return [r for r in self.requests if r.op == op and (repo_id is None or r.repo_id == repo_id)]

    def find_in_requests(
        self, needle: str | bytes, where: Iterable[str] = ("body", "url", "headers")
    ) -> list[RecordedRequest]:
        """Requests whose body / url / headers contain ``needle`` (e.g. a token that must never leak)."""
        raw = needle.encode() if isinstance(needle, str) else needle
        text = raw.decode(errors="replace")
        where = set(where)
        found = []
        with self._lock:
            for r in self.requests:
                if ("body" in where and raw in r.body) or (
                    "url" in where and (text in r.url or text in r.path)
                ):
                    found.append(r)
                elif "headers" in where and any(text in v for v in r.headers.values()):
                    found.append(r)
        return found

    def _get_repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the emulator (repos: {self.list_repos()})")
        return repo

    def list_repos(self, repo_type: str | None = None) -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if repo_type is None or rtype == repo_type)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._get_repo(repo_id, repo_type).private

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            oid = self._resolve(repo, revision)
            if oid is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            return oid

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[CommitRecord]:
        """History reachable from ``revision``, newest first (like ``git log`` / ``list_repo_commits``)."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return [
                self._commit_record(c) for c in self._history(repo, self.head(repo_id, revision, repo_type))
            ]

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return sorted(repo.commits[self.head(repo_id, revision, repo_type)].files)

    def file_bytes(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            entry = repo.commits[self.head(repo_id, revision, repo_type)].files[path]
            return self._blobs[entry.sha256]

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return repo.commits[self.head(repo_id, revision, repo_type)].files[path].lfs

    # ------------------------------------------------------------------ fault injection
    def fail_next(
        self,
        op: str,
        status: int = 500,
        *,
        times: int = 1,
        message: str | None = None,
        error_code: str | None = None,
        repo_id: str | None = None,
        method: str | None = None,
        apply: bool = False,
        drop: bool = False,
        delay: float = 0.0,
        path: str | None = None,
    ) -> _Fault:
        """Answer the next ``times`` requests of ``op`` with ``status`` (without executing them).

        ``apply=True``: execute the request, then answer ``status`` anyway (a commit that was applied but whose
        answer was lost). ``drop=True``: close the connection without answering (after executing it when
        ``apply``). ``delay``: wait that many seconds first (a stalled server). ``path``: only requests whose path
        ends with it (`/README.md`: one file's downloads).
        """
        op = "repo_info" if op == "model_info" else op
        fault = _Fault(op, status, times, message, error_code, repo_id, method, apply, drop, delay, path=path)
        with self._lock:
            self._faults.append(fault)
        return fault

    def delay_next(self, op: str, seconds: float, *, times: int = 1, repo_id: str | None = None) -> _Fault:
        """Wait ``seconds`` before answering the next ``times`` requests of ``op`` normally (a slow server)."""
        op = "repo_info" if op == "model_info" else op
        fault = _Fault(op, 200, times, None, None, repo_id, None, delay=seconds, passthrough=True)
        with self._lock:
            self._faults.append(fault)
        return fault

    def stall_next(
        self,
        op: str,
        seconds: float,
        *,
        times: int = 1,
        repo_id: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> _NetworkFault:
        """Hold the next ``times`` ``op`` requests (repo_info, resolve) for ``seconds``, then hang up unanswered."""
        op = "repo_info" if op == "model_info" else op
        if op not in ("repo_info", "resolve"):
            raise ValueError(f"stall_next supports repo_info and resolve, not {op!r}")
        fault = _NetworkFault("stall", op, times, seconds=seconds, repo_id=repo_id, method=method, path=path)
        with self._lock:
            self._network_faults.append(fault)
        return fault

    def drop_next(
        self,
        *,
        after_bytes: int | None = None,
        times: int = 1,
        repo_id: str | None = None,
        path: str | None = None,
    ) -> _NetworkFault:
        """Cut the next ``times`` downloads (resolve GET) at file offset ``after_bytes`` (default: half)."""
        fault = _NetworkFault("drop", "resolve", times, after_bytes=after_bytes, repo_id=repo_id, method="GET",
                              path=path)
        with self._lock:
            self._network_faults.append(fault)
        return fault

    def _take_network_fault(
        self, kind: str, op: str, rec: RecordedRequest, path: str | None = None
    ) -> _NetworkFault | None:
        with self._lock:
            fault = next((f for f in self._network_faults
                          if f.matches(kind, op, rec.method, rec.repo_id, path)), None)
            if fault is not None:
                fault.times -= 1
        return fault

    def _stall_if_asked(self, handler, rec: RecordedRequest, op: str, path: str | None = None) -> None:
        """A stalled server: say nothing for a while, then close the connection (no answer at all)."""
        fault = self._take_network_fault("stall", op, rec, path)
        if fault is not None:
            time.sleep(fault.seconds)
            handler.close_connection = True
            raise ConnectionResetError("emulated stall")

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._network_faults.clear()

    def pending_faults(self) -> list[_Fault]:
        with self._lock:
            return [f for f in self._faults if f.times > 0]

    # ------------------------------------------------------------------ seeding (no client needed)
    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = True
    ) -> str:
        """Create a repo directly; returns its head sha."""
        if "/" not in repo_id:
            repo_id = f"{self.username}/{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                if not exist_ok:
                    raise ValueError(f"repo {repo_id} exists")
            else:
                self._create_repo(repo_type, repo_id, private)
            return self.head(repo_id, repo_type=repo_type)

    def commit_files(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike],
        message: str = "Upload files",
        *,
        delete: Iterable[str] = (),
        revision: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit ``{path_in_repo: bytes | str | Path}`` directly (creating the repo if needed).

        Returns the new commit sha.
        """
        self.create_repo(repo_id, repo_type=repo_type)
        if "/" not in repo_id:
            repo_id = f"{self.username}/{repo_id}"
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            head = self._resolve(repo, revision)
            if head is None:
                raise KeyError(f"revision {revision!r} not found in {repo_id}")
            tree = dict(repo.commits[head].files)
            patterns = self._lfs_patterns(tree)
            for path in delete:
                tree.pop(path, None)
            for path, content in files.items():
                if isinstance(content, os.PathLike):
                    data = Path(content).read_bytes()
                elif isinstance(content, str):
                    data = content.encode()
                else:
                    data = bytes(content)
                lfs = self._should_be_lfs(path, len(data), data[:512], patterns)
                tree[path] = self._store(path, data, lfs)
            return self._add_commit(repo, revision, head, tree, message, "", self.username)

    def upload_folder(
        self,
        repo_id: str,
        folder: str | os.PathLike,
        message: str = "Upload folder",
        *,
        repo_type: str = "model",
    ) -> str:
        """Commit every file under ``folder`` directly; returns the sha."""
        folder = Path(folder)
        files = {
            p.relative_to(folder).as_posix(): p
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(folder).parts
        }
        return self.commit_files(repo_id, files, message, repo_type=repo_type)

    # ------------------------------------------------------------------ storage internals
    def _next_counter(self) -> int:
        self._counter += 1
        return self._counter

    def _store(self, path: str, data: bytes, lfs: bool) -> _File:
        sha = hashlib.sha256(data).hexdigest()
        self._blobs[sha] = data
        if lfs:
            pointer = _lfs_pointer(sha, len(data))
            self._lfs_objects.add(sha)
            return _File(path, len(data), sha, _git_blob_sha1(pointer), True, len(pointer))
        return _File(path, len(data), sha, _git_blob_sha1(data), False)

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
        self._repos[(repo_type, repo_id)] = repo
        tree = {".gitattributes": self._store(".gitattributes", DEFAULT_GITATTRIBUTES.encode(), False)}
        self._add_commit(repo, "main", None, tree, "initial commit", "", self.username)
        return repo

    def _add_commit(
        self,
        repo: _Repo,
        ref: str,
        parent: str | None,
        tree: dict[str, _File],
        title: str,
        description: str,
        author: str,
    ) -> str:
        date = _now_iso()
        tree_id = hashlib.sha1(
            "".join(f"{p}\0{f.blob_oid}\n" for p, f in sorted(tree.items())).encode()
        ).hexdigest()
        raw = (
            f"tree {tree_id}\nparent {parent or ''}\nauthor {author} {date}\n"
            f"#{self._next_counter()}\n\n{title}\n\n{description}"
        )
        oid = hashlib.sha1(f"commit {len(raw)}\0{raw}".encode()).hexdigest()
        message = title if not description else f"{title}\n\n{description}"
        repo.commits[oid] = _Commit(oid, [parent] if parent else [], title, message, date, author, dict(tree))
        if ref.startswith("refs/pr/"):
            repo.prs[int(ref.rsplit("/", 1)[1])] = oid
        else:
            repo.branches[ref.removeprefix("refs/heads/")] = oid
        return oid

    def _resolve(self, repo: _Repo, rev: str) -> str | None:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
            return repo.branches[rev[11:]]
        if rev.startswith("refs/tags/") and rev[10:] in repo.tags:
            return repo.tags[rev[10:]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m:
            return repo.prs.get(int(m.group(1)))
        if _SHA40_RE.match(rev):
            return rev if rev in repo.commits else None
        if _HEX_RE.match(rev):
            candidates = [oid for oid in repo.commits if oid.startswith(rev)]
            return candidates[0] if len(candidates) == 1 else None
        return None

    def _history(self, repo: _Repo, oid: str) -> list[_Commit]:
        out = []
        cur: str | None = oid
        while cur is not None:
            commit = repo.commits[cur]
            out.append(commit)
            cur = commit.parents[0] if commit.parents else None
        return out

    @staticmethod
    def _commit_record(c: _Commit) -> CommitRecord:
        return CommitRecord(
            c.oid, c.title, c.message, tuple(c.parents), c.date, c.author, tuple(sorted(c.files))
        )

    def _lfs_patterns(self, tree: Mapping[str, _File]) -> list[str]:
        entry = tree.get(".gitattributes")
        if entry is None:
            return []
        return _gitattributes_lfs_patterns(self._blobs[entry.sha256].decode("utf-8", errors="replace"))

    def _should_be_lfs(self, path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        if size == 0:
            return False
        if size > self.lfs_threshold:
            return True
        if b"\0" in sample:
            return True
        return any(_path_matches(p, path) for p in patterns)

    # ------------------------------------------------------------------ HTTP plumbing
    @staticmethod
    def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = handler.rfile.readline()
                if not line:
                    break
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
            return b"".join(chunks)
        length = int(handler.headers.get("Content-Length") or 0)
        return handler.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        handler: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        if getattr(handler, "_emulator_silent", False):
            return
        handler.send_response(status)
        hdrs = {"X-Request-Id": uuid.uuid4().hex, "Content-Length": str(len(body))}
        if content_type:
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        for key, value in hdrs.items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command != "HEAD" and body:
            handler.wfile.write(body)

    def _send_json(self, handler, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(handler, status, json.dumps(obj).encode(), headers, "application/json; charset=utf-8")

    def _send_error(self, handler, err: _HubError) -> None:
        headers = {
            "X-Error-Message": re.sub(r"[\r\n]+", " ", err.message)
            .encode("latin-1", "replace")
            .decode("latin-1")
        }
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(err.headers)
        self._send_json(handler, err.status, {"error": err.message, **err.extra_body}, headers)

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        raw_url = handler.path
        split = urlsplit(raw_url)
        body = self._read_body(handler)
        rec = RecordedRequest(
            method=method,
            url=raw_url,
            path=unquote(split.path),
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(rec)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            route = self._route(method, segments)
            if route is None:
                with self._lock:
                    self.unhandled.append(rec)
                rec.status = 404
                self._send_json(handler, 404, {"error": f"Emulator: no route for {method} {split.path}"})
                return
            op, repo_key, fn, args = route
            rec.op = op
            rec.repo_id = repo_key[1] if repo_key else None
            with self._lock:
                fault = next((f for f in self._faults if f.matches(op, method, rec.repo_id, split.path)), None)
                if fault is not None:
                    fault.times -= 1
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and not fault.passthrough:
                if fault.apply:
                    handler._emulator_silent = True  # type: ignore[attr-defined] - execute, answer nothing
                    try:
                        fn(handler, rec, *args)
                    finally:
                        handler._emulator_silent = False  # type: ignore[attr-defined]
                if fault.drop:
                    rec.status = 0
                    handler.close_connection = True
                    return
                raise _HubError(fault.status, fault.message or f"Injected failure for {op}", fault.error_code)
            status = fn(handler, rec, *args)
            rec.status = status
        except _HubError as err:
            rec.status = err.status
            self._send_error(handler, err)
        except (BrokenPipeError, ConnectionResetError):
            rec.status = -1
        except Exception as exc:  # noqa: BLE001 - report emulator bugs to the client and the test
            tb = traceback.format_exc()
            with self._lock:
                self.server_errors.append(f"{method} {raw_url}\n{tb}")
            rec.status = 500
            with contextlib.suppress(Exception):
                self._send_error(handler, _HubError(500, f"Emulator internal error: {exc!r}"))

    def _route(self, method: str, seg: list[str]):
        """-> (op, (repo_type, repo_id) | None, handler_fn, args) or None."""
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method in ("GET", "HEAD"):
                return "whoami", None, self._api_whoami, ()
            if rest == ["repos", "create"] and method == "POST":
                return "create_repo", None, self._api_create_repo, ()
            if rest == ["repos", "delete"] and method in ("DELETE", "POST"):
                return "delete_repo", None, self._api_delete_repo, ()
            if rest == ["validate-yaml"] and method == "POST":
                return "validate_yaml", None, self._api_validate_yaml, ()
            if len(rest) >= 2 and rest[0] in _TYPE_FROM_PLURAL:
                repo_type = _TYPE_FROM_PLURAL[rest[0]]
                repo_id, sub = self._split_repo(repo_type, rest[1:])
                if repo_id is None:
                    return None
                key = (repo_type, repo_id)
                if not sub and method in ("GET", "HEAD"):
                    return "repo_info", key, self._api_repo_info, (key, None)
                head, tail = sub[0] if sub else "", sub[1:]
                if head == "revision" and tail and method in ("GET", "HEAD"):
                    return "repo_info", key, self._api_repo_info, (key, "/".join(tail))
                if head == "tree" and tail and method == "GET":
                    return "tree", key, self._api_tree, (key, tail[0], "/".join(tail[1:]))
                if head == "paths-info" and tail and method == "POST":
                    return "paths_info", key, self._api_paths_info, (key, "/".join(tail))
                if head == "preupload" and tail and method == "POST":
                    return "preupload", key, self._api_preupload, (key, "/".join(tail))
                if head == "commit" and tail and method == "POST":
                    return "commit", key, self._api_commit, (key, "/".join(tail))
                if head == "commits" and tail and method == "GET":
                    return "commits", key, self._api_commits, (key, "/".join(tail))
                if head == "refs" and not tail and method == "GET":
                    return "refs", key, self._api_refs, (key,)
                if head == "branch" and tail and method in ("POST", "DELETE"):
                    return "branch", key, self._api_branch, (key, "/".join(tail))
                if head == "tag" and tail and method in ("POST", "DELETE"):
                    return "tag", key, self._api_tag, (key, "/".join(tail))
                if head == "settings" and not tail and method == "PUT":
                    return "settings", key, self._api_settings, (key,)
                if head == "discussions" and method == "GET":
                    return "discussions", key, self._api_discussions, (key,)
            return None
        if seg[:2] == ["_emulator", "lfs-upload"] and len(seg) == 3 and method == "PUT":
            return "lfs_upload", None, self._lfs_upload, (seg[2],)
        # /{prefix}{ns}/{name}.git/info/lfs/objects/{batch|verify}
        # /{prefix}{ns}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        rest = seg
        if rest and rest[0] in ("datasets", "spaces", "kernels"):
            repo_type, rest = _TYPE_FROM_PLURAL[rest[0]], rest[1:]
        for n in (2, 1):
            if (
                len(rest) >= n + 4
                and rest[n - 1].endswith(".git")
                and rest[n : n + 3] == ["info", "lfs", "objects"]
            ):
                repo_id = "/".join(rest[: n - 1] + [rest[n - 1][: -len(".git")]])
                action = rest[n + 3]
                key = (repo_type, repo_id)
                if action == "batch" and method == "POST":
                    return "lfs_batch", key, self._lfs_batch, (key,)
                if action == "verify" and method == "POST":
                    return "lfs_verify", key, self._lfs_verify, (key,)
        repo_id, sub = self._split_repo(repo_type, rest)
        if repo_id is not None and len(sub) >= 3 and sub[0] == "resolve" and method in ("GET", "HEAD"):
            key = (repo_type, repo_id)
            return "resolve", key, self._resolve_file, (key, sub[1], "/".join(sub[2:]))
        return None

    def _split_repo(self, repo_type: str, rest: list[str]) -> tuple[str | None, list[str]]:
        if not rest or not rest[0]:
            return None, []
        if len(rest) >= 2 and rest[1]:
            two = f"{rest[0]}/{rest[1]}"
            with self._lock:
                exists = (repo_type, two) in self._repos
            if exists or rest[1] not in _REPO_SUBROUTES | {"resolve"}:
                return two, rest[2:]
        return rest[0], rest[1:]

    # ------------------------------------------------------------------ auth
    def _auth_user(self, rec: RecordedRequest) -> str | None:
        """User of the bearer token, None if no token; raises 401 for a rejected token."""
        auth = rec.headers.get("authorization", "")
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if token and (self.accept_any_token or token == self.token):
            return self.username
        raise _HubError(401, "Invalid credentials in Authorization header")

    def _require_user(self, rec: RecordedRequest) -> str:
        user = self._auth_user(rec)
        if user is None:
            raise _HubError(401, "Invalid username or password.")
        return user

    def _readable_repo(self, rec: RecordedRequest, key: tuple[str, str]) -> _Repo:
        user = self._auth_user(rec)
        repo = self._repos.get(key)
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and user is None:
            raise _HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, rec: RecordedRequest, key: tuple[str, str]) -> _Repo:
        self._require_user(rec)
        return self._readable_repo(rec, key)

    def _resolve_or_404(self, repo: _Repo, rev: str) -> str:
        oid = self._resolve(repo, rev)
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return oid

    @staticmethod
    def _json_body(rec: RecordedRequest) -> dict:
        if not rec.body:
            return {}
        try:
            data = json.loads(rec.body)
        except ValueError:
            raise _HubError(400, "Request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise _HubError(400, "Request body must be a JSON object")
        return data

    # ------------------------------------------------------------------ API handlers
    def _api_whoami(self, handler, rec) -> int:
        user = self._auth_user(rec)
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        self._send_json(
            handler,
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": "Hub Emulator User",
                "email": f"{user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "emulator", "role": "write"}},
            },
        )
        return 200

    def _api_create_repo(self, handler, rec) -> int:
        user = self._require_user(rec)
        data = self._json_body(rec)
        name = data.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".git"):
            raise _HubError(400, f"Invalid repo name: {name!r}")
        namespace = data.get("organization") or user
        repo_type = data.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type!r}")
        private = data.get("visibility") == "private" or data.get("private") is True
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # The client (exist_ok=True) still reads `url` from the body of the 409.
                raise _HubError(409, f"You already created this {repo_type} repo", extra_body={"url": url})
            self._create_repo(repo_type, repo_id, private)
        self._send_json(handler, 200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]})
        return 200

    def _api_delete_repo(self, handler, rec) -> int:
        user = self._require_user(rec)
        data = self._json_body(rec)
        repo_id = f"{data.get('organization') or user}/{data.get('name')}"
        key = (data.get("type") or "model", repo_id)
        rec.repo_id = repo_id
        with self._lock:
            if key not in self._repos:
                raise _HubError(404, "Repository not found", "RepoNotFound")
            del self._repos[key]
        self._send_json(handler, 200, {})
        return 200

    def _api_validate_yaml(self, handler, rec) -> int:
        data = self._json_body(rec)
        content = data.get("content")
        if not isinstance(content, str):
            raise _HubError(400, "Missing 'content'")
        meta, error = _parse_front_matter(content)
        if error:
            self._send_json(handler, 400, {"errors": [{"message": error}], "warnings": []})
            return 400
        self._send_json(handler, 200, {"errors": [], "warnings": []})
        return 200

    def _card_data(self, commit: _Commit) -> dict | None:
        entry = commit.files.get("README.md")
        if entry is None:
            return None
        meta, _ = _parse_front_matter(self._blobs[entry.sha256].decode("utf-8", errors="replace"))
        return meta

    def _safetensors_info(self, commit: _Commit) -> dict | None:
        """{"parameters": {dtype: count}, "total": n} from the headers of the root *.safetensors files."""
        params: dict[str, int] = {}
        found = False
        for path, f in commit.files.items():
            if "/" in path or not path.endswith(".safetensors"):
                continue
            data = self._blobs[f.sha256]
            try:
                n = int.from_bytes(data[:8], "little")
                header = json.loads(data[8 : 8 + n])
                for name, tensor in header.items():
                    if name != "__metadata__":
                        params[tensor["dtype"]] = params.get(tensor["dtype"], 0) + math.prod(tensor["shape"])
                found = True
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return {"parameters": params, "total": sum(params.values())} if found else None

    def _api_repo_info(self, handler, rec, key, rev) -> int:
        self._stall_if_asked(handler, rec, "repo_info")
        with self._lock:
            repo = self._readable_repo(rec, key)
            oid = self._resolve_or_404(repo, rev or "main")
            commit = repo.commits[oid]
            blobs = _truthy((rec.query.get("blobs") or [None])[0])
            siblings = []
            for path, f in sorted(commit.files.items()):
                sib: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sib.update(size=f.size, blobId=f.blob_oid)
                    if f.lfs:
                        sib["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
                siblings.append(sib)
            card = self._card_data(commit)
            info: dict[str, Any] = {
                "_id": hashlib.sha1(f"{key}".encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": repo.gated,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(f.size for f in commit.files.values()),
            }
            if card is not None:
                info["cardData"] = card
                tags = card.get("tags") or []
                info["tags"] = [t for t in (tags if isinstance(tags, list) else [tags]) if isinstance(t, str)]
            if repo.repo_type == "model":
                info["modelId"] = repo.repo_id
                info["spaces"] = []
                if card is not None:
                    if card.get("library_name"):
                        info["library_name"] = card["library_name"]
                        if card["library_name"] not in info["tags"]:
                            info["tags"].append(card["library_name"])
                    if card.get("pipeline_tag"):
                        info["pipeline_tag"] = card["pipeline_tag"]
                    if card.get("model-index"):
                        info["model-index"] = card["model-index"]
                safetensors = self._safetensors_info(commit)
                if safetensors is not None:
                    info["safetensors"] = safetensors
                cfg_entry = commit.files.get("config.json")
                if cfg_entry is not None:
                    with contextlib.suppress(ValueError, UnicodeDecodeError):
                        cfg = json.loads(self._blobs[cfg_entry.sha256])
                        if isinstance(cfg, dict):
                            info["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
        self._send_json(handler, 200, info)
        return 200

    def _tree_entry(self, repo: _Repo, oid: str, path: str, f: _File | None, expand: bool) -> dict:
        commit = repo.commits[oid]
        if f is not None:
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_oid, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        else:
            sub = {p: x.blob_oid for p, x in commit.files.items() if p.startswith(path + "/")}
            tree_oid = hashlib.sha1(json.dumps(sorted(sub.items())).encode()).hexdigest()
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        if expand:
            last = self._last_commit_touching(repo, oid, path, is_dir=f is None)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
            if f is not None:
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": {"virusFound": False, "virusNames": None},
                    "pickleImportScan": None,
                }
        return entry

    def _last_commit_touching(self, repo: _Repo, oid: str, path: str, is_dir: bool) -> _Commit:
        def state(c: _Commit):
            if is_dir:
                return sorted((p, x.blob_oid) for p, x in c.files.items() if p.startswith(path + "/"))
            x = c.files.get(path)
            return x.blob_oid if x else None

        history = self._history(repo, oid)
        for i, c in enumerate(history):
            parent = history[i + 1] if i + 1 < len(history) else None
            if parent is None or state(parent) != state(c):
                return c
        return history[-1]

    @staticmethod
    def _dirs_of(paths: Iterable[str]) -> set[str]:
        dirs = set()
        for p in paths:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        return dirs

    def _api_tree(self, handler, rec, key, rev, path) -> int:
        recursive = _truthy((rec.query.get("recursive") or [None])[0])
        expand = _truthy((rec.query.get("expand") or [None])[0])
        path = path.strip("/")
        with self._lock:
            repo = self._readable_repo(rec, key)
            oid = self._resolve_or_404(repo, rev)
            files = repo.commits[oid].files
            dirs = self._dirs_of(files)
            if path and path not in dirs:
                raise _HubError(
                    404,
                    f"Path {path} not found (or is not a folder)",
                    "EntryNotFound",
                    {"X-Repo-Commit": oid},
                )
            prefix = path + "/" if path else ""
            out = []
            for d in sorted(dirs):
                if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                    out.append(self._tree_entry(repo, oid, d, None, expand))
            for p, f in sorted(files.items()):
                if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :]):
                    out.append(self._tree_entry(repo, oid, p, f, expand))
        self._send_json(handler, 200, out)
        return 200

    def _api_paths_info(self, handler, rec, key, rev) -> int:
        ctype = rec.headers.get("content-type", "")
        if "json" in ctype:
            data = self._json_body(rec)
            paths, expand = data.get("paths") or [], bool(data.get("expand"))
        else:
            form = parse_qs(rec.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or [None])[0])
        with self._lock:
            repo = self._readable_repo(rec, key)
            oid = self._resolve_or_404(repo, rev)
            files = repo.commits[oid].files
            dirs = self._dirs_of(files)
            out = []
            for p in paths:
                p = p.strip("/")
                if p in files:
                    out.append(self._tree_entry(repo, oid, p, files[p], expand))
                elif p in dirs:
                    out.append(self._tree_entry(repo, oid, p, None, expand))
        self._send_json(handler, 200, out)
        return 200

    def _api_preupload(self, handler, rec, key, rev) -> int:
        data = self._json_body(rec)
        with self._lock:
            repo = self._writable_repo(rec, key)
            create_pr = _truthy((rec.query.get("create_pr") or [None])[0])
            oid = self._resolve(repo, rev)
            if oid is None and not create_pr:
                raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            tree = repo.commits[oid or repo.branches["main"]].files
            patterns = self._lfs_patterns(tree)
            gitignore = data.get("gitIgnore")
            if gitignore is None and ".gitignore" in tree:
                gitignore = self._blobs[tree[".gitignore"].sha256].decode("utf-8", errors="replace")
            ignore_patterns = [
                ln.strip() for ln in (gitignore or "").splitlines() if ln.strip() and not ln.startswith("#")
            ]
            out = []
            for item in data.get("files") or []:
                path = item.get("path")
                size = int(item.get("size") or 0)
                sample = base64.b64decode(item.get("sample") or "")
                lfs = self._should_be_lfs(path, size, sample, patterns)
                existing = tree.get(path)
                remote_oid = None
                if existing is not None:
                    remote_oid = existing.sha256 if existing.lfs else existing.blob_oid
                out.append(
                    {
                        "path": path,
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": any(_path_matches(p, path) for p in ignore_patterns),
                        "oid": remote_oid,
                    }
                )
        self._send_json(handler, 200, {"files": out, "commitOid": oid})
        return 200

    def _api_commit(self, handler, rec, key, rev) -> int:
        user = self._require_user(rec)
        create_pr = _truthy((rec.query.get("create_pr") or [None])[0])
        try:
            lines = [json.loads(line) for line in rec.body.splitlines() if line.strip()]
        except ValueError:
            raise _HubError(400, "Commit payload must be ndjson") from None
        header = next((ln.get("value") or {} for ln in lines if ln.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise _HubError(400, "Commit header with a non-empty 'summary' is required")
        with self._lock:
            repo = self._writable_repo(rec, key)
            base = self._resolve(repo, rev)
            if base is None:
                raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            is_branch = rev in repo.branches or rev.startswith("refs/heads/") or rev.startswith("refs/pr/")
            if not is_branch and not create_pr:
                raise _HubError(400, f"Can only commit to a branch, not to {rev}")
            parent_commit = header.get("parentCommit")
            if parent_commit and not base.startswith(parent_commit):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[base].files)
            for ln in lines:
                k, v = ln.get("key"), ln.get("value") or {}
                if k == "header":
                    continue
                path = v.get("path")
                if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                    raise _HubError(400, f"Invalid path in commit: {path!r}")
                if k == "file":
                    if v.get("encoding", "base64") != "base64":
                        raise _HubError(400, "Only base64 encoding is supported")
                    data = base64.b64decode(v.get("content") or "")
                    if len(data) > self.lfs_threshold:
                        raise _HubError(
                            400,
                            f"Your push was rejected because it contains files larger than 10 MB ({path}). "
                            "Please use LFS to track them.",
                        )
                    tree[path] = self._store(path, data, lfs=False)
                elif k == "lfsFile":
                    sha = v.get("oid")
                    if v.get("algo", "sha256") != "sha256" or sha not in self._lfs_objects:
                        raise _HubError(
                            400,
                            "Your push was rejected because an LFS pointer pointed to a file that does not "
                            "exist "
                            f"({path}: {sha})",
                        )
                    size = len(self._blobs[sha])
                    if v.get("size") is not None and int(v["size"]) != size:
                        raise _HubError(400, f"LFS object size mismatch for {path}")
                    pointer = _lfs_pointer(sha, size)
                    tree[path] = _File(path, size, sha, _git_blob_sha1(pointer), True, len(pointer))
                elif k == "deletedFile":
                    if path not in tree:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif k == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise _HubError(
                            404, f"A folder with this name doesn't exist: {path}", "EntryNotFound"
                        )
                    for p in doomed:
                        del tree[p]
                else:
                    raise _HubError(400, f"Unknown commit operation: {k!r}")
            pr_url = None
            if create_pr:
                number = max([0, *repo.prs]) + 1
                ref = f"refs/pr/{number}"
                pr_url = f"{self.endpoint}/{repo.url_path}/discussions/{number}"
            else:
                ref = rev
            new_oid = self._add_commit(
                repo, ref, base, tree, header["summary"], header.get("description") or "", user
            )
        self._send_json(
            handler,
            200,
            {
                "success": True,
                "commitOid": new_oid,
                "commitUrl": f"{self.endpoint}/{repo.url_path}/commit/{new_oid}",
                "commitMessage": header["summary"],
                "pullRequestUrl": pr_url,
            },
        )
        return 200

    def _api_commits(self, handler, rec, key, rev) -> int:
        with self._lock:
            repo = self._readable_repo(rec, key)
            oid = self._resolve_or_404(repo, rev)
            out = [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": None}],
                    "date": c.date,
                }
                for c in self._history(repo, oid)
            ]
        self._send_json(handler, 200, out)
        return 200

    def _api_refs(self, handler, rec, key) -> int:
        with self._lock:
            repo = self._readable_repo(rec, key)
            data: dict[str, Any] = {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()
                ],
                "converts": [],
                "tags": [
                    {"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()
                ],
            }
            if _truthy((rec.query.get("include_prs") or [None])[0]):
                data["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": o}
                    for n, o in repo.prs.items()
                ]
        self._send_json(handler, 200, data)
        return 200

    def _api_branch(self, handler, rec, key, branch) -> int:
        with self._lock:
            repo = self._writable_repo(rec, key)
            if rec.method == "DELETE":
                if branch not in repo.branches:
                    raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise _HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
            else:
                if branch in repo.branches or branch in repo.tags:
                    raise _HubError(409, "Reference already exists")
                start = self._json_body(rec).get("startingPoint") or "main"
                repo.branches[branch] = self._resolve_or_404(repo, start)
        self._send_json(handler, 200, {})
        return 200

    def _api_tag(self, handler, rec, key, rev_or_tag) -> int:
        with self._lock:
            repo = self._writable_repo(rec, key)
            if rec.method == "DELETE":
                if rev_or_tag not in repo.tags:
                    raise _HubError(404, f"Invalid rev id: {rev_or_tag}", "RevisionNotFound")
                del repo.tags[rev_or_tag]
            else:
                tag = self._json_body(rec).get("tag")
                if not tag:
                    raise _HubError(400, "Missing 'tag'")
                if tag in repo.tags or tag in repo.branches:
                    raise _HubError(409, "Tag already exists")
                repo.tags[tag] = self._resolve_or_404(repo, rev_or_tag)
        self._send_json(handler, 200, {})
        return 200

    def _api_settings(self, handler, rec, key) -> int:
        data = self._json_body(rec)
        with self._lock:
            repo = self._writable_repo(rec, key)
            if "visibility" in data:
                repo.private = data["visibility"] == "private"
            if "private" in data:
                repo.private = bool(data["private"])
            if "gated" in data:
                repo.gated = data["gated"]
        self._send_json(handler, 200, {})
        return 200

    def _api_discussions(self, handler, rec, key) -> int:
        with self._lock:
            self._readable_repo(rec, key)
        self._send_json(handler, 200, {"discussions": [], "count": 0, "start": 0, "numClosedDiscussions": 0})
        return 200

    # ------------------------------------------------------------------ LFS
    def _lfs_batch(self, handler, rec, key) -> int:
        data = self._json_body(rec)
        with self._lock:
            repo = self._writable_repo(rec, key)
            if data.get("operation") != "upload":
                raise _HubError(400, "The emulator only implements the LFS 'upload' operation")
            if "basic" not in (data.get("transfers") or ["basic"]):
                raise _HubError(400, "The emulator only implements the 'basic' LFS transfer")
            objects = []
            for obj in data.get("objects") or []:
                oid, size = obj.get("oid"), obj.get("size")
                if (
                    not isinstance(oid, str)
                    or not re.fullmatch(r"[0-9a-f]{64}", oid)
                    or not isinstance(size, int)
                ):
                    objects.append(
                        {
                            "oid": str(oid),
                            "size": int(size or 0),
                            "error": {"code": 422, "message": "Invalid oid or size"},
                        }
                    )
                    continue
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if not (oid in self._lfs_objects and len(self._blobs.get(oid, b"")) == size):
                    entry["actions"] = {
                        "upload": {"href": f"{self.endpoint}/_emulator/lfs-upload/{oid}?size={size}"},
                        "verify": {"href": f"{self.endpoint}/{repo.url_path}.git/info/lfs/objects/verify"},
                    }
                objects.append(entry)
        self._send(
            handler,
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )
        return 200

    def _lfs_upload(self, handler, rec, oid) -> int:
        actual = hashlib.sha256(rec.body).hexdigest()
        if actual != oid:
            raise _HubError(400, f"Uploaded content does not match oid {oid} (got sha256 {actual})")
        expected = (rec.query.get("size") or [None])[0]
        if expected is not None and int(expected) != len(rec.body):
            raise _HubError(400, f"Uploaded size {len(rec.body)} != announced size {expected}")
        with self._lock:
            self._blobs[oid] = rec.body
            self._lfs_objects.add(oid)
        self._send(handler, 200, b"", {"ETag": f'"{hashlib.md5(rec.body).hexdigest()}"'})
        return 200

    def _lfs_verify(self, handler, rec, key) -> int:
        data = self._json_body(rec)
        with self._lock:
            self._writable_repo(rec, key)
            oid, size = data.get("oid"), data.get("size")
            if oid not in self._lfs_objects or (size is not None and len(self._blobs[oid]) != size):
                raise _HubError(404, f"LFS object {oid} not found")
        self._send_json(handler, 200, {"success": True})
        return 200

    # ------------------------------------------------------------------ downloads
    def _resolve_file(self, handler, rec, key, rev, path) -> int:
        self._stall_if_asked(handler, rec, "resolve", path)
        with self._lock:
            repo = self._readable_repo(rec, key)
            oid = self._resolve_or_404(repo, rev)
            f = repo.commits[oid].files.get(path)
            if f is None:
                raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
            data = self._blobs[f.sha256]
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{f.etag()}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        status, body = 200, data
        rng = rec.headers.get("range")
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng or "")
        if m and (m.group(1) or m.group(2)):
            if m.group(1):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
            else:
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            end = min(end, len(data) - 1)
            if start >= len(data) or start > end:
                raise _HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
                )
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        drop = self._take_network_fault("drop", "resolve", rec, path) if handler.command == "GET" else None
        if drop is not None:  # full headers, then the bytes up to the cut, then hang up mid-body
            cut = len(data) // 2 if drop.after_bytes is None else drop.after_bytes
            start = int(headers["Content-Range"].split()[1].split("-")[0]) if status == 206 else 0
            handler.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body)),
                                "Content-Type": "application/octet-stream"}.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(body[: max(0, cut - start)])
            handler.wfile.flush()
            handler.close_connection = True
            return -1
        self._send(handler, status, body, headers, "application/octet-stream")
        return status


# ----------------------------------------------------------------------------------------------------
# pytest fixtures. Re-export them from a conftest:
#     from hub_emulator import hub_emulator, hub_emulator_session  # noqa: F401
# ----------------------------------------------------------------------------------------------------

if pytest is not None:

    @pytest.fixture(scope="session")
    def hub_emulator_session():
        """One running ``HubEmulator`` for the whole test session (state is shared: use unique repo names)."""
        with HubEmulator() as hub:
            yield hub

    @pytest.fixture
    def hub_emulator(hub_emulator_session, tmp_path):
        """The session's emulator, reset to an empty hub, with a fresh default ``HF_HOME`` (``tmp_path``)."""
        hub = hub_emulator_session
        hub.reset()
        hub.default_hf_home = tmp_path / "hf_home"
        try:
            yield hub
        finally:
            hub.default_hf_home = None
            hub.reset()


if __name__ == "__main__":  # pragma: no cover - manual use: python tests/hub_emulator.py [port]
    import time

    emulator = HubEmulator(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(f"Hub emulator on {emulator.endpoint}")
    print(
        f"export HF_ENDPOINT={emulator.endpoint} HF_HUB_DISABLE_XET=1 HF_HUB_OFFLINE=0 "
        f"HF_TOKEN={emulator.token}"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        emulator.stop()
