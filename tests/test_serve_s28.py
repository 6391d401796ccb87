"""`hf-mudsc serve`: the defects of the session-28 bug hunt, each checked in-process (the app without its scheduler
thread: the tests drive the scheduler's steps themselves, so every race is reproduced deterministically).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from hf_mudsc.serve.app import create_app

SECRET = "hf_s28ClientTokenThatMustReachItsWorker"
DRY = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}


def client_of(app: Any) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def recording_starts(app: Any) -> dict[str, Any]:
    """Replace the scheduler's `_start` (no process): each started job's token is recorded and the job finishes."""
    scheduler, store, handed = app.state.scheduler, app.state.store, {}

    def start(job_id: str, request: dict[str, Any], run: Any, token: str | None) -> None:
        handed[job_id] = token
        store.update(job_id, status="succeeded")
        with scheduler._lock:
            scheduler.running.pop(job_id, None)

    scheduler._start = start
    return handed


# ---------------------------------------------------------------------------------------------- 1. the token race


def test_a_job_taken_by_the_scheduler_right_after_its_insert_starts_with_its_token(tmp_path):
    """The POST stored the job as queued and only then handed its token to the scheduler: a scheduler poll in
    between started the job without it (on the server's own Hub login), and the token stayed in memory forever."""
    app = create_app(tmp_path / "state")
    handed = recording_starts(app)
    store, scheduler = app.state.store, app.state.scheduler
    real_add = store.add

    def add_then_poll(*args: Any, **kwargs: Any) -> str:
        job_id = real_add(*args, **kwargs)
        scheduler._start_queued()  # the scheduler thread's poll, between the insert and the rest of the POST
        return job_id

    store.add = add_then_poll
    answer = client_of(app).post("/api/jobs", json=DRY, headers={"Authorization": f"Bearer {SECRET}"})
    assert answer.status_code == 201, answer.text
    assert handed == {answer.json()["id"]: SECRET} and scheduler.tokens == {}


def test_a_cancel_right_after_the_insert_leaves_no_token_behind(tmp_path):
    app = create_app(tmp_path / "state")
    store, scheduler = app.state.store, app.state.scheduler
    real_add = store.add

    def add_then_cancel(*args: Any, **kwargs: Any) -> str:
        job_id = real_add(*args, **kwargs)
        assert scheduler.cancel(job_id)  # a DELETE between the insert and the rest of the POST
        return job_id

    store.add = add_then_cancel
    answer = client_of(app).post("/api/jobs", json=DRY, headers={"Authorization": f"Bearer {SECRET}"})
    assert answer.status_code == 201, answer.text
    assert store.get(answer.json()["id"])["status"] == "cancelled" and scheduler.tokens == {}


def test_a_refused_submission_leaves_no_token_behind(tmp_path):
    app = create_app(tmp_path / "state")
    client, scheduler = client_of(app), app.state.scheduler
    body = {"models": ["user/a", "user/b"], "method": "average", "output": "shared"}
    assert client.post("/api/jobs", json=body).status_code == 201
    answer = client.post("/api/jobs", json=body, headers={"Authorization": f"Bearer {SECRET}"})
    assert answer.status_code == 409 and SECRET not in scheduler.tokens.values()


def test_a_queued_job_that_came_with_a_token_never_starts_without_it(tmp_path):
    """A job stored with a token the scheduler does not hold is failed, never started on the server's login."""
    app = create_app(tmp_path / "state")
    handed = recording_starts(app)
    store = app.state.store
    job_id = store.add(dict(DRY), output=None, repo_id=None, dry_run=True, has_token=True)
    app.state.scheduler._start_queued()
    job = store.get(job_id)
    assert handed == {} and job["status"] == "failed", (handed, job)
    assert "Hub token" in job["error"] and "resubmit" in job["error"], job["error"]


# ------------------------------------------------------------------------------------- 2. a push is never killed


class Pipe:
    """A worker's end of the pipe: what it sends, and what it receives (then EOF: the worker has exited)."""

    def __init__(self, incoming: list | None = None) -> None:
        self.sent: list[tuple] = []
        self.incoming = list(incoming or [])

    def send(self, message: tuple) -> None:
        self.sent.append(message)

    def recv(self) -> Any:
        if self.incoming:
            return self.incoming.pop(0)
        raise EOFError


class Process:
    """A worker process that never exits on its own (stuck in its push); `kill` ends it."""

    def __init__(self) -> None:
        self.killed = False
        self.exitcode: int | None = None

    def is_alive(self) -> bool:
        return not self.killed

    def join(self, timeout: float | None = None) -> None:
        return None

    def kill(self) -> None:
        self.killed, self.exitcode = True, -9


def hub_record(message: str) -> Any:
    import logging

    return logging.LogRecord("hf_mudsc.publish.hub", logging.INFO, __file__, 1, message, (), None)


def pushing_job(tmp_path: Any) -> tuple[Any, Any, str]:
    from hf_mudsc.serve.scheduler import Scheduler
    from hf_mudsc.serve.store import JobStore

    store = JobStore(tmp_path / "state")
    job_id = store.add({"models": ["user/a", "user/b"], "push_to_hub": "me/merged"}, output=None,
                       repo_id="me/merged", dry_run=False, has_token=False)
    store.update(job_id, status="running", phase="publish", progress=0.9)
    return store, Scheduler(store), job_id


def test_the_worker_tells_the_scheduler_once_when_its_push_begins():
    from hf_mudsc.serve.worker import ForwardHandler, Reporter

    pipe = Pipe()
    reporter = Reporter(pipe, None, calibrates=False, asks_before_push=False)
    handler = ForwardHandler(reporter)
    handler.emit(hub_record("checking the repo 'me/merged'"))  # before the merge is written: no push yet
    assert ("pushing",) not in pipe.sent
    reporter.enter("publish")
    handler.emit(hub_record("waiting for the Hub: creating the repo 'me/merged'"))
    handler.emit(hub_record("uploading 3 files"))
    assert pipe.sent.count(("pushing",)) == 1


def test_a_cancel_never_kills_a_worker_whose_push_has_begun(tmp_path):
    """A DELETE during a long push: CANCEL_GRACE_S later the worker was killed mid-push (an empty repo left) and the
    job said "nothing was pushed". The push completes; a worker still writing its folder is killed as before."""
    from hf_mudsc.serve.scheduler import Running

    store, scheduler, job_id = pushing_job(tmp_path)
    run = Running(Process(), Pipe(incoming=[("pushing",)]))
    scheduler._copy_messages(job_id, run)  # the worker said its push began
    run.cancelled = run.requested = True  # cancelled after (session 37: a cancel before it answers "no-push")
    scheduler._kill(job_id, run)  # the cancel's grace is over
    assert not run.process.killed
    writing = Running(Process(), Pipe(), cancelled=True, requested=True)
    scheduler._kill(job_id, writing)
    assert writing.process.killed
    store.close()


@pytest.mark.parametrize("requested", [False, True])  # the service stopping; a client's DELETE
def test_a_pushing_worker_that_is_killed_anyway_never_says_nothing_was_pushed(tmp_path, requested):
    from hf_mudsc.serve.scheduler import Running

    store, scheduler, job_id = pushing_job(tmp_path)
    run = Running(Process(), Pipe(incoming=[("pushing",)]))
    scheduler._copy_messages(job_id, run)
    run.cancelled, run.requested = True, requested  # after the push began (before it, the push never begins)
    run.process.kill()
    scheduler._settle(job_id, run, None)
    job = store.get(job_id)
    assert job["status"] == "failed" and "nothing was" not in job["error"], job["error"]
    assert "'me/merged' may have completed: check the repo" in job["error"], job["error"]
    store.close()


def test_stopping_the_service_while_a_job_pushes_is_bounded_and_says_the_push_may_have_completed(tmp_path,
                                                                                              monkeypatch):
    """SIGTERM during a push: the worker was killed after STOP_GRACE_S and the job said "nothing was pushed after
    that point", though the commit had reached the Hub. The stop stays bounded; the record says to check the repo."""
    from hf_mudsc.serve import scheduler as scheduler_module
    from hf_mudsc.serve.scheduler import Running

    monkeypatch.setattr(scheduler_module, "STOP_GRACE_S", 0.0)
    store, scheduler, job_id = pushing_job(tmp_path)
    run = Running(Process(), Pipe(incoming=[("pushing",)]))
    scheduler._copy_messages(job_id, run)
    scheduler.running[job_id] = run
    scheduler.stop()
    job = store.get(job_id)
    assert run.process.killed and job["status"] == "failed", job
    assert "nothing was" not in job["error"] and "may have completed: check the repo" in job["error"], job["error"]
    store.close()


# ------------------------------------------------------------------------------------- 3. a failed push-only job


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    from test_cli import save_parents_and_data

    return save_parents_and_data(tmp_path_factory.mktemp("s28_parents"))


def test_a_push_only_job_whose_push_fails_leaves_no_model_on_the_server_and_names_no_server_path(
        parents, tmp_path, monkeypatch):
    """The writer keeps a push-only merge whose push failed in the temp folder (`hf-mudsc-unpushed-*`, for a CLI
    user to push by hand): on the server every such job left a whole model behind, and its error named that server
    path and an `hf-mudsc push` command the client cannot run."""
    import tempfile

    from hf_mudsc.errors import PushError
    from hf_mudsc.publish import hub
    from hf_mudsc.serve.jobs import parse_job
    from hf_mudsc.serve.worker import Reporter, run_merge

    server_tmp = tmp_path / "server-tmp"
    server_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(server_tmp))

    def failing_push(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("500 Server Error: the Hub is down")

    monkeypatch.setattr(hub, "check_target", lambda *args, **kwargs: False)  # the repo is absent
    monkeypatch.setattr(hub, "push_folder", failing_push)
    a, b, _ = parents
    job = parse_job({"models": [str(a), str(b)], "method": "weight_matching", "push_to_hub": "me/merged"},
                    tmp_path / "outputs", local_roots=[a.parent])
    with pytest.raises(PushError) as caught:
        run_merge(job, None, Reporter(Pipe(), None, calibrates=False, asks_before_push=False))
    message = str(caught.value)
    assert list(server_tmp.iterdir()) == [], list(server_tmp.iterdir())
    assert "the Hub is down" in message and "'me/merged'" in message, message
    assert str(server_tmp) not in message and "hf-mudsc push" not in message and "unpushed" not in message, message
    assert "resubmit" in message, message
    # with an `output`, the model stays there: the error says so, without the CLI's command
    job = parse_job({"models": [str(a), str(b)], "method": "weight_matching", "push_to_hub": "me/merged",
                     "output": "kept"}, tmp_path / "outputs", local_roots=[a.parent])
    with pytest.raises(PushError) as caught:
        run_merge(job, None, Reporter(Pipe(), None, calibrates=False, asks_before_push=False))
    message = str(caught.value)
    assert (tmp_path / "outputs" / "kept" / "config.json").is_file() and list(server_tmp.iterdir()) == []
    assert f"kept in the output folder {str(tmp_path / 'outputs' / 'kept')!r}" in message, message
    assert "hf-mudsc push" not in message and "the Hub is down" in message, message


def test_a_push_error_that_kept_no_model_passes_unchanged():
    """Only the writer's failed push keeps a model: any other refusal of the push is left as the library said it."""
    from hf_mudsc.errors import PushError
    from hf_mudsc.serve.jobs import parse_job
    from hf_mudsc.serve.worker import push_failed

    job = parse_job({"models": ["user/a", "user/b"], "method": "average", "push_to_hub": "me/merged"},
                    __import__("pathlib").Path("/nonexistent-root"))
    refusal = PushError("could not create the Hub repo 'me/merged': 403 Forbidden")
    assert push_failed(job, refusal) is refusal


# ------------------------------------------------------------------------------- 4. a restart with another output root


def test_a_job_queued_under_another_output_root_is_refused_when_it_starts_and_never_shows_that_root(tmp_path):
    """A job queued under `--output-root A` and started after a restart under `--output-root B` wrote into A, and
    its answers showed A's absolute path (only B is hidden). It is refused when it is about to start, as a job
    naming a local path outside the current `--local-root`s is, and A is not shown."""
    old_root, new_root = tmp_path / "old-private-root", tmp_path / "new-root"
    first = create_app(tmp_path / "state", output_root=old_root)
    body = {"models": ["user/a", "user/b"], "method": "average"}
    answer = client_of(first).post("/api/jobs", json={**body, "output": "runs/second"})
    assert answer.status_code == 201, answer.text
    moved = answer.json()["id"]
    first.state.store.close()
    app = create_app(tmp_path / "state", output_root=new_root)
    handed = recording_starts(app)
    client = client_of(app)
    staying = client.post("/api/jobs", json={**body, "output": "third"}).json()["id"]
    app.state.scheduler._start_queued()
    job = app.state.store.get(moved)
    assert moved not in handed and staying in handed, handed
    assert job["status"] == "failed" and "output root" in job["error"] and "resubmit" in job["error"], job
    for shown in (client.get(f"/api/jobs/{moved}").text, client.get("/api/jobs").text, client.get("/").text,
                  client.get(f"/jobs/{moved}").text):
        assert str(old_root) not in shown and "old-private-root" not in shown, shown
    assert not old_root.joinpath("runs").exists()


# ------------------------------------------------------------------------ 5. a long output root, shortened in a refusal


def test_a_refusal_of_a_long_or_deep_output_never_shows_part_of_a_long_output_root(tmp_path):
    """The writer's location checks shorten a long path to its first 60 and last 17 characters, which the service
    no longer recognised as its output root: with a root over 60 characters, a client learned most of it."""
    root = tmp_path / "secret-operator-layout" / "srv" / "hf-mudsc" / "production-outputs-of-this-server"
    assert len(str(root)) > 60
    client = client_of(create_app(tmp_path / "state", output_root=root))
    base = {"models": ["user/a", "user/b"], "method": "weight_matching"}
    deep, long = "a/" * 101 + "m", ("x" * 250 + "/") * 16 + "m"
    for output, said in ((deep, "nested folders"), (long, "path limit")):
        answer = client.post("/api/jobs", json={**base, "output": output})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert said in error and "secret-operator-layout" not in error and str(tmp_path) not in error, error
        assert "\n" not in error and "`output`" in error, error


def test_hide_output_root_hides_the_writers_shortened_form_of_a_long_root(tmp_path):
    from hf_mudsc.serve.jobs import hide_output_root

    root = tmp_path / ("r" * 70)
    path = str(root / "sub" / "model")
    shortened = f"{path[:60]}...{path[-17:]}"
    hidden = hide_output_root(f"output {shortened!r} cannot be created", root)
    assert str(tmp_path) not in hidden and "rrrr" not in hidden and "sub/model" in hidden, hidden


# ------------------------------------------------------------------------------------------- 6. a large YAML body


def test_a_yaml_body_over_the_yaml_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    """A 1 MiB YAML body took 8-15 s of the web process's CPU to parse. YAML bodies are capped far lower than JSON
    ones (a recipe is a few hundred bytes), refused with 413 and the way out; a JSON body that size is still read."""
    from hf_mudsc.serve import app as app_module

    parsed: list[str] = []
    real_parse = app_module._parse_body
    monkeypatch.setattr(app_module, "_parse_body", lambda raw, kind: parsed.append(kind) or real_parse(raw, kind))
    client = client_of(create_app(tmp_path / "state"))
    cap = app_module.MAX_YAML_BODY
    assert cap <= 64 << 10
    models = "".join(f"  - user/m{i}\n" for i in range(cap // 12))
    yaml_body = f"method: average\ndry_run: true\nmodels:\n{models}".encode()
    assert cap < len(yaml_body) < app_module.MAX_BODY
    for declared in (True, False):  # a Content-Length over the cap; a body that turns out larger (chunked)
        content = yaml_body if declared else iter([yaml_body[:cap // 2], yaml_body[cap // 2:]])
        answer = client.post("/api/jobs", content=content, headers={"Content-Type": "application/yaml"})
        assert answer.status_code == 413, answer.text
        error = answer.json()["error"]
        assert f"YAML body is larger than {cap} bytes" in error and "JSON" in error and "\n" not in error, error
    assert parsed == []
    json_body = {"models": [f"user/m{i}" for i in range(cap // 12)], "method": "task_arithmetic", "base": "user/b",
                 "dry_run": True}
    assert client.post("/api/jobs", json=json_body).status_code == 201
    small = "models: [user/a, user/b]\nmethod: average\ndry_run: true\n"
    assert client.post("/api/jobs", content=small, headers={"Content-Type": "application/yaml"}).status_code == 201
