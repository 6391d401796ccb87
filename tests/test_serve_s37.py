"""Session 37's second pass over `hf-mudsc serve`: secrets in a job's fields, HTTP conventions (HEAD, 405's Allow,
the OpenAPI schema), checked in-process (the app without its scheduler: jobs stay queued). Each test's reproduction
is its docstring's first line."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from hf_mudsc.serve.app import create_app

API_KEY = "the-service-key-1234"
TOKEN = "abcdefgh12345678wxyz"  # a Hub token of no `hf_` shape (an older or organisation token): held as sent
BODY = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}


def client_of(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


# ---------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(("field", "value"), [
    ("output", API_KEY), ("models", ["user/a", f"user/{API_KEY}"]), ("calibration", f"user/{API_KEY}:train"),
    ("output", TOKEN), ("base", f"user/{TOKEN}"), ("push_to_hub", f"me/{TOKEN}"), ("image_column", TOKEN),
    ("text_column", API_KEY), ("labels", {TOKEN: 0}),
])
def test_a_job_holding_the_api_key_or_the_bearer_token_in_a_field_is_refused_and_never_listed(
        tmp_path, caplog, field, value):
    """POST {"output": "<the service's API key>"} (or the Authorization token, of no hf_ shape) was stored: listed."""
    app = create_app(tmp_path / "state", api_key=API_KEY)
    client = client_of(app)
    headers = {"X-API-Key": API_KEY, "Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.DEBUG):
        answer = client.post("/api/jobs", json={**BODY, field: value}, headers=headers)
    assert answer.status_code == 400, answer.text
    said = answer.json()["error"]
    assert f"`{field}`" in said and "not shown" in said and "\n" not in said
    for secret in (API_KEY, TOKEN):
        assert secret not in answer.text
        assert secret not in client.get("/api/jobs").text
        assert secret not in client.get("/").text
        assert secret not in caplog.text
    assert app.state.store.list() == []


def test_a_short_api_key_refuses_only_a_field_that_is_it_not_every_word_holding_its_letters(tmp_path):
    """--api-key ab: a job whose parents are `user/lab`, `user/b` is accepted; `ab` itself as a parent is not."""
    app = create_app(tmp_path / "state", api_key="ab")
    client = client_of(app)
    assert client.post("/api/jobs", json={**BODY, "models": ["user/lab", "user/b"]},
                       headers={"X-API-Key": "ab"}).status_code == 201
    assert client.post("/api/jobs", json={**BODY, "models": ["user/ab", "user/b"]},
                       headers={"X-API-Key": "ab"}).status_code == 201  # a word inside a value: not the key
    refused = client.post("/api/jobs", json={**BODY, "models": ["ab", "user/b"]}, headers={"X-API-Key": "ab"})
    assert refused.status_code == 400 and "`models`" in refused.json()["error"]


# ---------------------------------------------------------------------------------------------- HTTP conventions


@pytest.mark.parametrize("path", ["/", "/api/jobs", "/api/jobs/{id}", "/api/jobs/{id}/log", "/jobs/{id}",
                                  "/partials/jobs"])
def test_head_answers_as_get_without_a_body(tmp_path, path):
    """curl -I http://127.0.0.1:8000/api/jobs answered 405: HTTP requires HEAD wherever GET is answered."""
    app = create_app(tmp_path / "state")
    client = client_of(app)
    job_id = client.post("/api/jobs", json=BODY).json()["id"]
    path = path.replace("{id}", job_id)
    got, head = client.get(path), client.head(path)
    assert got.status_code == 200, got.text
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["x-content-type-options"] == "nosniff"
    missing = client.head("/api/jobs/000000000000")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/api/jobs", {"GET", "HEAD", "POST"}),
    ("OPTIONS", "/api/jobs", {"GET", "HEAD", "POST"}),
    ("POST", "/api/jobs/abc", {"GET", "HEAD", "DELETE"}),
    ("DELETE", "/api/jobs/abc/log", {"GET", "HEAD"}),
])
def test_a_405_allow_header_lists_every_method_of_the_path(tmp_path, method, path, allowed):
    """PUT /api/jobs answered 405 with `Allow: POST`, though GET /api/jobs is answered too (the first route's only)."""
    client = client_of(create_app(tmp_path / "state"))
    answer = client.request(method, path)
    assert answer.status_code == 405
    assert {m.strip() for m in answer.headers["allow"].split(",")} == allowed
    assert answer.headers["content-type"] == "application/json"


def test_the_openapi_schema_says_what_the_handlers_take_and_answer(tmp_path):
    """GET /openapi.json said POST /api/jobs takes no body and answers 200, and every route 422 (the service: 400)."""
    schema = client_of(create_app(tmp_path / "state")).get("/openapi.json").json()
    post = schema["paths"]["/api/jobs"]["post"]
    assert set(post["requestBody"]["content"]) >= {"application/json", "application/yaml"}
    assert post["requestBody"]["required"] is True
    assert {"201", "400", "409", "413", "415", "429"} <= set(post["responses"])
    assert "200" not in post["responses"]
    delete = schema["paths"]["/api/jobs/{job_id}"]["delete"]
    assert {"202", "404", "409"} <= set(delete["responses"]) and "200" not in delete["responses"]
    for path, operations in schema["paths"].items():
        for name, operation in operations.items():
            assert "422" not in operation["responses"], (name, path)
    assert "HTTPValidationError" not in str(schema)
    served = schema["paths"]["/jobs/{job_id}/files/{name}"]["get"]["responses"]
    assert "application/json" not in served["200"]["content"] and "404" in served


# ---------------------------------------------------------------------------------------------- the store on disk


@pytest.mark.parametrize(("column", "value"), [
    ("result", "[1, 2]"), ("result", '"done"'), ("result", '{"output": 5}'), ("result", '{"warnings": 3}'),
    ("request", '{"models": 5}'), ("request", '{"models": {"a": 1}}'), ("request", '{"models": ["a"], "warnings": 3}'),
    ("request", '{"models": ["a"], "output": ["x"]}'),
])
def test_a_record_edited_by_hand_or_of_another_format_is_shown_unreadable_and_the_others_still_listed(
        tmp_path, column, value):
    """UPDATE jobs SET result = '[1, 2]' (or request '{"models": 5}') in jobs.sqlite3: GET /api/jobs, / answered 500."""
    app = create_app(tmp_path / "state")
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    good = client.post("/api/jobs", json=BODY).json()["id"]
    store = app.state.store
    damaged = store.add({"models": ["user/x", "user/y"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    store.update(damaged, status="succeeded")
    with store._lock:  # as a hand edit (or a newer hf-mudsc) leaves it
        store._db.execute(f"UPDATE jobs SET {column} = ? WHERE id = ?", (value, damaged))  # noqa: S608
    listed = client.get("/api/jobs")
    assert listed.status_code == 200, listed.text
    jobs = {job["id"]: job for job in listed.json()["jobs"]}
    assert jobs[good]["status"] == "queued"
    assert jobs[damaged]["status"] == "succeeded"  # a final status is kept (`store._unreadable_job`)
    assert "could not read this job's stored record" in jobs[damaged]["error"]
    assert "\n" not in jobs[damaged]["error"]
    for path in ("/", "/partials/jobs", f"/jobs/{damaged}", f"/api/jobs/{damaged}", f"/jobs/{good}"):
        assert client.get(path).status_code == 200, path


# ---------------------------------------------------------------------------------------------- cancel


def test_a_cancel_during_the_push_is_refused_saying_the_push_completes(tmp_path):
    """DELETE /api/jobs/{id} while its worker pushes answered 202 "running", then the job succeeded and was pushed."""
    from hf_mudsc.serve.scheduler import Running

    app = create_app(tmp_path / "state")
    client = client_of(app)
    store, scheduler = app.state.store, app.state.scheduler
    job_id = store.add({"models": ["user/a", "user/b"], "push_to_hub": "me/merged"}, output=None,
                       repo_id="me/merged", dry_run=False, has_token=False)
    store.update(job_id, status="running", phase="publish", progress=0.9)
    run = Running(None, None, pushing=True)
    scheduler.running[job_id] = run
    answer = client.delete(f"/api/jobs/{job_id}")
    assert answer.status_code == 409, answer.text
    said = answer.json()["error"]
    assert "'me/merged'" in said and "cannot be cancelled" in said and "\n" not in said
    assert not run.cancelled and not run.requested
    run.pushing = False  # still writing its folder: the cancel applies
    assert client.delete(f"/api/jobs/{job_id}").status_code == 202
    assert run.cancelled and run.requested


# ---------------------------------------------------------------------------------------------- a full disk


def _safetensors_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _recipe_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


class SentMessages:
    """The web process's end of a worker's pipe, as far as the worker's reports go: what it was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, message: tuple) -> None:
        self.sent.append(message)


@pytest.mark.parametrize("where", ["transformers.modeling_utils.safe_save_file", "Recipe.save"])
def test_a_job_writing_onto_a_full_disk_fails_in_the_services_words_leaving_nothing(tmp_path, monkeypatch, where):
    """A merge job whose output write hits ENOSPC failed "SafetensorError: ... (an unexpected error: ...)": no fix."""
    import transformers.modeling_utils
    from factories import make_model

    from hf_mudsc.publish.folder import checked_rename
    from hf_mudsc.publish.recipe import Recipe
    from hf_mudsc.serve.jobs import JobRequest, parse_job, resolve_local_paths
    from hf_mudsc.serve.worker import Reporter, report_failure, run_merge

    parents = tmp_path / "parents"
    for index in (0, 1):
        make_model("vit_cls", index).save_pretrained(parents / f"p{index}")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    job = parse_job({"models": [str(parents / "p0"), str(parents / "p1")], "method": "average",
                     "output": "merged"}, outputs, local_roots=[parents])
    job = JobRequest.from_stored(resolve_local_paths(job, [parents]).to_dict())
    if where == "Recipe.save":
        monkeypatch.setattr(Recipe, "save", _recipe_full)
    else:
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _safetensors_full)
    pipe = SentMessages()
    reporter = Reporter(pipe, None, calibrates=False, asks_before_push=False)
    with pytest.raises(Exception) as raised:  # noqa: PT011, B017 - which one is the library's; the report is checked
        with checked_rename(reporter.before_rename):
            run_merge(job, None, reporter)
    report_failure(reporter, raised.value)
    (_, status, error, _), = [m for m in pipe.sent if m[0] == "done"]
    assert status == "failed"
    assert "no space left on device" in error.lower() and "nothing was left half-written" in error, error
    assert "unexpected error" not in error and "\n" not in error
    tracebacks = [m for m in pipe.sent if m[0] == "traceback"]
    assert tracebacks and all(m[1] == logging.DEBUG for m in tracebacks)  # expected: not an ERROR in the log
    assert list(outputs.iterdir()) == []  # nothing half-written


def test_a_post_while_the_stores_disk_is_full_answers_503_saying_so(tmp_path, monkeypatch):
    """POST /api/jobs while jobs.sqlite3 cannot grow ("database or disk is full") answered 500 "an internal error"."""
    import sqlite3

    app = create_app(tmp_path / "state")
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    store = app.state.store
    real_execute = store._db.execute

    class FullDisk:
        """The store's connection on a full disk: its inserts fail as SQLite's do."""

        def execute(self, sql, *args):
            if sql.lstrip().upper().startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return real_execute(sql, *args)

        def __getattr__(self, name):
            return getattr(real_execute.__self__, name)

    monkeypatch.setattr(store, "_db", FullDisk())
    answer = client.post("/api/jobs", json=BODY, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 503, answer.text
    said = answer.json()["error"]
    assert "disk is full" in said and "not queued" in said and "\n" not in said
    assert answer.headers["retry-after"]
    assert app.state.scheduler.tokens == {}  # the token of a job that was never stored is not held
    monkeypatch.undo()
    assert client.get("/api/jobs").json()["jobs"] == []


def test_the_api_key_sent_as_the_hub_token_is_refused_never_sent_to_the_hub(tmp_path):
    """POST with `X-API-Key: K` and `Authorization: Bearer K`: queued, to send the service key to the Hub."""
    app = create_app(tmp_path / "state", api_key=API_KEY)
    answer = client_of(app).post("/api/jobs", json=BODY, headers={"X-API-Key": API_KEY,
                                                                  "Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 400, answer.text
    said = answer.json()["error"]
    assert "API key" in said and "Authorization" in said and API_KEY not in said
    assert app.state.store.list() == [] and app.state.scheduler.tokens == {}


def test_a_store_whose_table_lacks_a_column_refuses_to_start_in_one_line(tmp_path):
    """jobs.sqlite3 of another format (`jobs` without its `result` column): the service started, every GET a 500."""
    import sqlite3

    from hf_mudsc.serve.store import JobStore, StoreError

    store = JobStore(tmp_path / "state")
    store.add({"models": ["user/a", "user/b"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    store.close()
    with sqlite3.connect(tmp_path / "state" / "jobs.sqlite3") as db:
        db.execute("ALTER TABLE jobs RENAME COLUMN result TO outcome")
    with pytest.raises(StoreError) as refused:
        JobStore(tmp_path / "state")
    said = str(refused.value)
    assert "'result'" in said and "move it aside" in said and "\n" not in said


def test_a_queued_job_holding_a_key_this_version_does_not_know_is_refused_when_it_starts(tmp_path):
    """A job queued by a newer hf-mudsc (a key this one lacks), then the service downgraded: it ran without that key."""
    from hf_mudsc.errors import RecipeError

    app = create_app(tmp_path / "state")
    request = {"models": ["user/a", "user/b"], "method": "linear", "future_option": 3, "dry_run": True}
    with pytest.raises(RecipeError) as refused:
        app.state.scheduler.admit(request)
    said = str(refused.value)
    assert "'future_option'" in said and "resubmit" in said and "\n" not in said
    known = {"models": ["user/a", "user/b"], "method": "linear", "dry_run": True, "warnings": ["w"]}
    assert app.state.scheduler.admit(known)["models"] == ["user/a", "user/b"]


# ---------------------------------------------------------------------------------------------- review fixes (s37)


def _download_fails(number: int):
    def download(*args, **kwargs):
        raise OSError(number, {28: "No space left on device", 30: "Read-only file system"}.get(number, "Disk quota"),
                      "/srv/hf-cache/models--user--a/blobs/abc.incomplete")
    return download


def test_a_full_disk_while_downloading_a_parent_is_a_disk_failure_not_an_unreachable_hub(tmp_path, monkeypatch):
    """hf_hub_download raising OSError(ENOSPC): the job said "cannot reach the Hub ... check the connection"."""
    import errno

    import huggingface_hub

    from hf_mudsc.load.parents import download_files
    from hf_mudsc.serve.worker import Reporter, report_failure

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _download_fails(errno.ENOSPC))
    with pytest.raises(OSError) as raised:  # the disk failure itself, for the CLI's "no space left on device"
        download_files("user/a", "user/a", "0" * 40, ["config.json"], token=None, cache_dir=tmp_path)
    assert raised.value.errno == errno.ENOSPC
    pipe = SentMessages()
    report_failure(Reporter(pipe, None, calibrates=False, asks_before_push=False), raised.value)
    (_, _, error, _), = [m for m in pipe.sent if m[0] == "done"]
    assert "no space left on device" in error and "reach the Hub" not in error and "connection" not in error
    assert "/srv/hf-cache" not in error and "free space" in error


@pytest.mark.parametrize(("number", "advice"), [(30, "writable"), (122, "raise the quota")])  # EROFS, EDQUOT
def test_a_read_only_or_over_quota_disk_gets_advice_that_fits_it(number, advice):
    """A job failing on EROFS (or EDQUOT) was told "ask the operator to free space": no space was missing."""
    import errno

    from hf_mudsc.errors import LoadError
    from hf_mudsc.serve.worker import Reporter, report_failure

    number = errno.EROFS if number == 30 else getattr(errno, "EDQUOT", 122)
    wrapped = LoadError("'user/a': something else")  # a wrapper the library adds: its cause is looked at
    wrapped.__cause__ = OSError(number, "disk", "/srv/out/merged/model.safetensors")
    pipe = SentMessages()
    report_failure(Reporter(pipe, None, calibrates=False, asks_before_push=False), wrapped)
    (_, _, error, _), = [m for m in pipe.sent if m[0] == "done"]
    assert advice in error and "/srv/out" not in error and "\n" not in error, error
    if number == errno.EROFS:
        assert "free space" not in error


def test_the_cli_tells_a_user_over_quota_to_raise_the_quota_too():
    """`hf-mudsc merge` failing on EDQUOT said only "free space": a quota is raised, not only freed."""
    import errno

    from hf_mudsc.cli.main import disk_failure

    quota = getattr(errno, "EDQUOT", 122)
    line = disk_failure(OSError(quota, "Disk quota exceeded", "/data/out/model.safetensors"), "merge")
    assert line is not None and "quota" in line.split(";")[-1], line


class StuckProcess:
    """A worker process as the scheduler sees it (its work runs in a thread of the test)."""

    exitcode = None

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        return None

    def kill(self) -> None:
        return None


def _worker_side(child, reporter) -> None:
    """The worker's pipe reader (`watch_pipe` without its hard exit) feeding the reporter."""
    from hf_mudsc.serve.worker import receive

    while True:
        try:
            message = child.recv()
        except (EOFError, OSError):
            return
        receive(reporter, message)


def _pushing_worker(child, reporter) -> None:
    """The worker from the publish phase on: its first Hub record begins the push; then it is done."""
    from types import SimpleNamespace

    from hf_mudsc.serve.worker import ForwardHandler, JobCancelled, cancelled_said

    handler = ForwardHandler(reporter)
    reporter.enter("publish")
    try:
        handler.emit(logging.LogRecord("hf_mudsc.publish.hub", logging.INFO, __file__, 1,
                                       "waiting for the Hub: creating the repo 'me/merged'", (), None))
    except JobCancelled:  # what the worker's main says (`cancelled_said`), for a job writing no output
        reporter.send(("done", "cancelled", cancelled_said(SimpleNamespace(output=None), reporter.push_refused),
                       None))
    else:
        reporter.send(("done", "succeeded", None, {"repo_id": "me/merged"}))
    import os
    import socket

    # The worker process exits: its end of the pipe closes (a shutdown wakes the reader thread blocked on it too).
    end = socket.socket(fileno=os.dup(child.fileno()))
    end.shutdown(socket.SHUT_RDWR)
    end.close()


@pytest.mark.parametrize("cancel_first", [True, False])
def test_a_cancel_sent_as_the_push_begins_either_stops_it_before_any_upload_or_is_refused(tmp_path, cancel_first):
    """DELETE after the worker sent ("pushing",), before the scheduler read it: 202, then the push landed: succeeded."""
    import multiprocessing
    import threading

    from hf_mudsc.serve.scheduler import PushUnderway, Running
    from hf_mudsc.serve.worker import Reporter

    app = create_app(tmp_path / "state")
    store, scheduler = app.state.store, app.state.scheduler
    job_id = store.add({"models": ["user/a", "user/b"], "push_to_hub": "me/merged"}, output=None,
                       repo_id="me/merged", dry_run=False, has_token=False)
    store.update(job_id, status="running", phase="build", progress=0.85)
    parent, child = multiprocessing.Pipe()
    reporter = Reporter(child, None, calibrates=False, asks_before_push=True)  # `_worker_side` answers
    run = Running(StuckProcess(), parent)
    scheduler.running[job_id] = run
    threading.Thread(target=_worker_side, args=(child, reporter), daemon=True).start()
    worker = threading.Thread(target=_pushing_worker, args=(child, reporter), daemon=True)
    worker.start()
    assert parent.poll(10)  # the worker said its push begins; the scheduler has not read it yet
    if cancel_first:
        assert scheduler.cancel(job_id) is True  # 202
    scheduler._copy_messages(job_id, run)
    worker.join(10)
    if run.timer is not None:
        run.timer.cancel()
    job = store.get(job_id)
    if cancel_first:  # accepted: the push never started
        assert job["status"] == "cancelled" and "before its push began; nothing was written or pushed" in job[
            "error"], job
    else:  # the push began: the cancel is refused (409), the job succeeds
        with pytest.raises(PushUnderway):
            scheduler.cancel(job_id)
        assert job["status"] == "succeeded", job


@pytest.mark.parametrize(("api_key", "token", "body"), [
    ("main", None, {**BODY, "models": ["org/main", "user/b"]}),  # a short key: a word of a parent's name
    ("models", None, BODY),  # the body's own key name
    (None, "openai", {**BODY, "models": ["openai/clip", "user/b"]}),  # a short Bearer token of no hf_ shape
])
def test_a_short_or_common_secret_does_not_refuse_ordinary_jobs(tmp_path, api_key, token, body):
    """--api-key main refused parent `org/main`; `--api-key models` every job; Bearer `openai` refused `openai/clip`."""
    app = create_app(tmp_path / "state", api_key=api_key)
    headers = {"X-API-Key": api_key} if api_key else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    answer = client_of(app).post("/api/jobs", json=body, headers=headers)
    assert answer.status_code == 201, answer.text


@pytest.mark.parametrize("which", ["key", "token"])
def test_a_refused_secret_is_named_and_only_the_token_gets_the_hub_token_advice(tmp_path, which):
    """A field equal to a short API key was refused as "the API key or the Hub token", with the Hub token's advice."""
    app = create_app(tmp_path / "state", api_key="main")
    headers = {"X-API-Key": "main", "Authorization": "Bearer openai"}
    value = "main" if which == "key" else "openai"
    answer = client_of(app).post("/api/jobs", json={**BODY, "output": value}, headers=headers)
    assert answer.status_code == 400, answer.text
    said = answer.json()["error"]
    assert "`output`" in said and "not shown" in said and "'main'" not in said and "'openai'" not in said
    if which == "key":
        assert "API key" in said and "Authorization" not in said and "Hub token" not in said, said
    else:
        assert "Hub token" in said and "Authorization" in said and "X-API-Key" not in said, said


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/json", '{"models": ["user/a", "user/b"], "labels": {"SECRET": 0, "SECRET": 1}}'),
    ("application/json", '{"models": ["user/a"], "SECRET": 1, "SECRET": 2}'),
    ("application/yaml", "models: [user/a, user/b]\nSECRET: 1\nSECRET: 2\n"),
    ("application/yaml", "models: [user/a, user/b]\noutput: !SECRET x\n"),
])
def test_a_parse_error_never_repeats_a_secret(tmp_path, content_type, body):
    """A JSON or YAML body with the API key as a duplicated key (or a YAML tag): the 400 repeated the key."""
    app = create_app(tmp_path / "state", api_key=API_KEY)
    answer = client_of(app).post("/api/jobs", content=body.replace("SECRET", API_KEY),
                                 headers={"X-API-Key": API_KEY, "Content-Type": content_type})
    assert answer.status_code == 400, answer.text
    assert API_KEY not in answer.text and "***" in answer.text, answer.text


def test_a_numeric_secret_sent_as_a_number_is_refused(tmp_path):
    """--api-key 123456789012345678 and `"seed": 123456789012345678`: stored and shown (only strings were looked at)."""
    key = "123456789012345678"
    app = create_app(tmp_path / "state", api_key=key)
    client = client_of(app)
    answer = client.post("/api/jobs", content=f'{{"models": ["user/a", "user/b"], "seed": {key}, "dry_run": true}}',
                         headers={"X-API-Key": key, "Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert key not in answer.text and "`seed`" in answer.json()["error"]
    assert app.state.store.list() == []
    short = create_app(tmp_path / "short", api_key="1234")  # a short one: as a whole string value only
    refused = client_of(short).post("/api/jobs", json={**BODY, "text_column": "1234"}, headers={"X-API-Key": "1234"})
    assert refused.status_code == 400 and "1234" not in refused.text


def test_head_of_a_served_file_never_reads_it(tmp_path, monkeypatch):
    """HEAD /jobs/{id}/files/model-card.md was run as its GET: the whole file read, then the body dropped."""
    import anyio

    from hf_mudsc.publish.folder import staged_output

    outputs = tmp_path / "out"
    app = create_app(tmp_path / "state", output_root=outputs)
    client = client_of(app)
    job_id = client.post("/api/jobs", json={**BODY, "dry_run": False, "output": "m1"}).json()["id"]
    folder = outputs / "m1"
    with staged_output(folder) as staging:
        (staging / "README.md").write_text("# card\n")
    app.state.store.update(job_id, status="succeeded", result={"output": str(folder.resolve()),
                                                               "files": ["README.md"]})
    got = client.get(f"/jobs/{job_id}/files/README.md")
    assert got.text == "# card\n"

    async def no_reading(*args, **kwargs):
        raise AssertionError("the file was opened for a HEAD")

    monkeypatch.setattr(anyio, "open_file", no_reading)
    head = client.head(f"/jobs/{job_id}/files/README.md")
    assert head.status_code == 200 and head.content == b"", head.text
    assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["x-content-type-options"] == "nosniff"
    missing = client.head(f"/jobs/{job_id}/files/nothing.md")
    assert missing.status_code == 404 and missing.content == b""


def test_the_openapi_schema_lists_the_keys_a_pushed_recipe_holds(tmp_path):
    """POST accepts `hf_mudsc_version` and `auto_chosen` (a pushed recipe's), but the schema said no other key."""
    schema = client_of(create_app(tmp_path / "state")).get("/openapi.json").json()
    body = schema["paths"]["/api/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"hf_mudsc_version", "auto_chosen"} <= set(body["properties"])
    assert all("head" not in operations for operations in schema["paths"].values())


def test_a_queued_job_with_an_unknown_key_does_not_blame_a_newer_version_only(tmp_path):
    """A job with a key this version does not know was said "queued by a newer version": an older one may have too."""
    from hf_mudsc.errors import RecipeError

    app = create_app(tmp_path / "state")
    with pytest.raises(RecipeError) as refused:
        app.state.scheduler.admit({"models": ["user/a", "user/b"], "old_option": 1, "dry_run": True})
    assert "a newer or an older version" in str(refused.value)
