"""`hf-mudsc serve`: the defects of the session-28 bug hunt, each checked in-process (the app without its scheduler
thread: the tests drive the scheduler's steps themselves, so every race is reproduced deterministically).
"""

from __future__ import annotations

from typing import Any

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
