"""`hf-mudsc serve` robust to a second server, a restart, a stop and a damaged store (QA session 23).

In-process: the store, the scheduler's methods and the CLI's `run` with uvicorn replaced; the only subprocess is the
"other server" that holds a state directory's lock.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from hf_mudsc.publish.folder import checked_rename, staged_output
from hf_mudsc.serve import worker
from hf_mudsc.serve.scheduler import Running, Scheduler
from hf_mudsc.serve.store import (
    STOPPED_RUNNING,
    JobStore,
    StateDirBusyError,
    StoreError,
    lock_state_dir,
)
from hf_mudsc.serve.worker import JobCancelled, Reporter, report_failure


def serve_args(*argv: str):
    from hf_mudsc.cli.main import build_parser

    return build_parser(available=["serve"]).parse_args(["serve", *argv])


@pytest.fixture()
def served(monkeypatch):
    """The apps `hf-mudsc serve` would run (uvicorn replaced: nothing listens)."""
    import uvicorn

    apps: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    return apps


def add_job(store: JobStore, status: str = "queued", output: str | None = None) -> str:
    job_id = store.add({"models": ["a/b", "c/d"], **({"output": output} if output else {})}, output=output,
                       repo_id=None, dry_run=False, has_token=False)
    if status != "queued":
        store.update(job_id, status=status)
    return job_id


# ---------------------------------------------------------------------------------------------- a second server


def test_a_second_server_on_a_live_servers_state_dir_refuses_in_one_line_and_leaves_its_jobs(tmp_path, served):
    """A second `hf-mudsc serve` on the same --state-dir ran the store's restart recovery against the live server:
    its running job was marked failed (its output freed for another job while still written), its queue run twice."""
    from hf_mudsc.cli.serve import run

    state = tmp_path / "state"
    store = JobStore(state)
    running, queued = add_job(store, "running", output=str(state / "outputs" / "x")), add_job(store)
    store.close()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        "from hf_mudsc.serve.store import lock_state_dir\n"
        f"lock = lock_state_dir({str(state)!r})\n"
        "print(os.getpid(), flush=True); sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid = holder.stdout.readline().strip()
        with pytest.raises(StateDirBusyError) as refused:
            run(serve_args("--port", "0", "--state-dir", str(state)))
        message = str(refused.value)
        assert "\n" not in message and str(state) in message and f"pid {pid}" in message, message
        assert served == []
        # nor does a scheduler recover a store whose directory another server holds
        store = JobStore(state)
        with pytest.raises(StateDirBusyError):
            Scheduler(store).start()
        assert (store.get(running)["status"], store.get(queued)["status"]) == ("running", "queued")
        store.close()
    finally:
        holder.communicate("\n", timeout=30)
    assert run(serve_args("--port", "0", "--state-dir", str(state))) == 0  # its server gone: the lock is free
    with lock_state_dir(state):  # and released when `run` returned
        pass


def test_the_lock_is_counted_within_one_process_and_freed_by_the_last_holder(tmp_path):
    first = lock_state_dir(tmp_path)
    second = lock_state_dir(tmp_path)  # the CLI, then the scheduler
    first.release()
    check = [sys.executable, "-c",
             f"from hf_mudsc.serve.store import lock_state_dir; lock_state_dir({str(tmp_path)!r})"]
    assert subprocess.run(check, capture_output=True, text=True).returncode != 0
    second.release()
    second.release()  # a second release does nothing
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0


def test_an_out_of_range_port_is_refused_by_argument_parsing_in_one_line(capsys):
    for bad in ("70000", "-1", "http"):
        with pytest.raises(SystemExit) as exited:
            serve_args("--port", bad)
        assert exited.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--port" in error and "is not a port number" in error and "Traceback" not in error, error


def test_a_port_in_use_is_one_line_before_the_store_is_opened(tmp_path, served):
    from hf_mudsc.cli.serve import run

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^cannot listen on 127.0.0.1:{port} \(.*\): .*pass another --port"):
            run(serve_args("--port", str(port), "--state-dir", str(tmp_path / "state")))
    assert not (tmp_path / "state" / "jobs.sqlite3").exists() and served == []


# ---------------------------------------------------------------------------------------------- bad paths


def test_a_store_path_that_cannot_be_opened_is_one_line(tmp_path):
    dangling, folder = tmp_path / "a", tmp_path / "b"
    dangling.mkdir()
    (dangling / "jobs.sqlite3").symlink_to("/nonexistent/jobs.sqlite3")
    (folder / "jobs.sqlite3").mkdir(parents=True)
    with pytest.raises(StoreError, match=r"cannot be opened \(it is a symbolic link to '/nonexistent/jobs.sqlite3', "
                                         r"which does not exist\)"):
        JobStore(dangling)
    with pytest.raises(StoreError, match=r"cannot be opened \(it is not a file\)"):
        JobStore(folder)


def test_a_state_dir_or_output_root_that_is_not_a_folder_is_one_line(tmp_path, served):
    from hf_mudsc.cli.serve import run

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match=r"^--state-dir '.*file' is not a folder: pass a folder"):
        run(serve_args("--port", "0", "--state-dir", str(a_file)))
    with pytest.raises(ValueError, match=r"^the output root '.*file' is not a folder"):
        run(serve_args("--port", "0", "--state-dir", str(tmp_path / "s1"), "--output-root", str(a_file)))
    state = tmp_path / "s2"
    state.mkdir()
    (state / "outputs").symlink_to("/nonexistent/dir")
    with pytest.raises(ValueError, match=r"outputs' is a symbolic link to nothing: pass --output-root DIR"):
        run(serve_args("--port", "0", "--state-dir", str(state)))
    assert served == []


# ---------------------------------------------------------------------------------------------- a damaged row


def damage(store: JobStore, job_id: str) -> None:
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET request = ? WHERE id = ?", ('{"mod', job_id))


def test_an_unreadable_row_is_shown_failed_and_the_api_and_page_keep_answering(tmp_path):
    """One row with bad JSON made GET /, /api/jobs and /api/jobs/<id> answer 500 for good."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    app = create_app(tmp_path / "state")  # no lifespan: the scheduler does not run
    store = app.state.store
    good, bad = add_job(store), add_job(store)
    damage(store, bad)
    client = TestClient(app, base_url="http://127.0.0.1")
    listed = client.get("/api/jobs")
    assert listed.status_code == 200, listed.text
    jobs = {job["id"]: job for job in listed.json()["jobs"]}
    assert jobs[good]["status"] == "queued"
    assert jobs[bad]["status"] == "failed" and "could not read this job's stored record" in jobs[bad]["error"]
    assert client.get(f"/api/jobs/{bad}").status_code == 200
    assert client.get("/").status_code == 200 and client.get(f"/jobs/{bad}").status_code == 200
    # marked failed once, in the store: it leaves the queue
    assert store.queued() == [good]
    assert store.get(bad)["status"] == "failed"


def test_the_scheduler_skips_an_unreadable_queued_job_and_its_thread_survives_any_error(tmp_path):
    """JSONDecodeError in `_loop` -> `store.get` killed the scheduler thread: every later job stayed queued."""
    store = JobStore(tmp_path / "state")
    bad, good = add_job(store), add_job(store)
    damage(store, bad)
    scheduler = Scheduler(store)
    started: list[str] = []
    scheduler._start = lambda job_id, request, run, token: started.append(job_id)
    real_queued, calls = store.queued, []

    def flaky_queued():
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_queued()

    store.queued = flaky_queued
    scheduler._thread.start()
    try:
        deadline = time.monotonic() + 10
        while not started and time.monotonic() < deadline:
            scheduler._wake.set()
            time.sleep(0.05)
        assert started == [good] and scheduler._thread.is_alive()
        assert store.get(bad)["status"] == "failed" and store.get(good)["status"] == "running"
    finally:
        scheduler._stopping = True
        scheduler._wake.set()
        scheduler._thread.join(5)
        store.close()


# ---------------------------------------------------------------------------------------------- stopping


def test_stopping_fails_a_job_still_starting_instead_of_leaving_it_running(tmp_path):
    """SIGTERM just after a POST: the job whose worker was still starting stayed "running" in the store."""
    store = JobStore(tmp_path / "state")
    job_id = add_job(store, "running")
    scheduler = Scheduler(store)
    scheduler.running[job_id] = Running(None, None)  # taken off the queue, its process not started yet
    scheduler.stop()
    assert (store.get(job_id)["status"], store.get(job_id)["error"]) == ("failed", STOPPED_RUNNING)
    store.close()


# ---------------------------------------------------------------------------------------------- the worker


class Pipe:
    def __init__(self, *, closed: bool = False, incoming: list | None = None) -> None:
        self.sent: list[tuple] = []
        self.closed = closed
        self.incoming = list(incoming or [])

    def send(self, message: tuple) -> None:
        if self.closed:
            raise BrokenPipeError("the server is gone")
        self.sent.append(message)

    def recv(self):
        if self.incoming:
            return self.incoming.pop(0)
        raise EOFError


def test_the_writers_rename_is_a_cancel_point_an_orphan_discards_its_folder(tmp_path):
    """SIGKILL of the server while its job wrote the folder: the orphaned worker renamed the complete model into place,
    the restarted service said the job failed with nothing written, and a resubmit got 'already exists'."""
    reporter = Reporter(Pipe(closed=True), None, calibrates=False, asks_before_push=False)  # its server died
    target = tmp_path / "outputs" / "model"
    with pytest.raises(JobCancelled), checked_rename(reporter.before_rename), staged_output(target) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
    # nothing left: the folder the writer created on the way to the output is removed with its staging folder
    assert not target.exists() and not (tmp_path / "outputs").exists()
    # a live server, no cancel: the folder is moved into place, and the job's log says so
    pipe = Pipe()
    live = Reporter(pipe, None, calibrates=False, asks_before_push=False)
    with checked_rename(live.before_rename), staged_output(target) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert any("moving it into place" in m[1] for m in pipe.sent if m[0] == "log")


@pytest.mark.parametrize("phase", ["load", None])  # None: a dry run, which never writes
def test_a_cancel_in_the_load_phase_ends_the_worker_at_once(monkeypatch, phase):
    """Locating 20,000 parents has no cancel point: a DELETE waited 30 s for the kill."""
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    pipe = Pipe(incoming=["cancel"])
    reporter = Reporter(pipe, None, calibrates=False, asks_before_push=False)
    if phase:
        reporter.enter(phase)
    with pytest.raises(SystemExit):
        worker.watch_pipe(pipe, reporter)
    assert exits == [4] and pipe.sent[-1] == ("done", "cancelled", "cancelled on request; nothing was written or "
                                              "pushed", None)
    # later, a cancel waits for the next cancel point (the writer's staging folder must be discarded)
    pipe = Pipe(incoming=["cancel"])
    reporter = Reporter(pipe, None, calibrates=False, asks_before_push=False)
    reporter.enter("solve")
    monkeypatch.setattr(worker.time, "sleep", lambda seconds: None)
    with pytest.raises(SystemExit):  # then the pipe closes: the orphan's grace, then its exit
        worker.watch_pipe(pipe, reporter)
    assert exits == [4, 3] and reporter.cancel.is_set() and not any(m[0] == "done" for m in pipe.sent)


@pytest.mark.parametrize(("error", "level"), [(ValueError("device 'cuda' was asked for, but CUDA is not "
                                                          "available"), logging.DEBUG),
                                              (RuntimeError("an internal failure"), logging.ERROR)])
def test_a_failed_job_shows_one_line_and_its_traceback_goes_to_the_server_log_only(tmp_path, caplog, error, level):
    """A job that failed with an ordinary user error wrote a full traceback with server paths into its log."""
    try:
        raise error
    except Exception as raised:  # noqa: BLE001 - a traceback to report
        error = raised
    pipe = Pipe()
    reporter = Reporter(pipe, None, calibrates=False, asks_before_push=False)
    report_failure(reporter, error)
    lines = [m[1] for m in pipe.sent if m[0] == "log"]
    assert len(lines) == 1 and "Traceback" not in lines[0] and str(error) in lines[0], lines
    assert ("unexpected" in lines[0]) == (level == logging.ERROR)
    assert pipe.sent[-1] == ("done", "failed", f"{type(error).__name__}: {error}", None)
    # the scheduler writes the traceback to the server's log, never to the job's
    store = JobStore(tmp_path / "state")
    job_id = add_job(store, "running")
    scheduler = Scheduler(store)
    run = Running(process=None, conn=Pipe(incoming=list(pipe.sent)))
    with caplog.at_level(logging.DEBUG, logger="hf_mudsc.serve.scheduler"):
        scheduler._copy_messages(job_id, run)
    traced = [r for r in caplog.records if "Traceback (most recent call last)" in r.getMessage()]
    assert len(traced) == 1 and traced[0].levelno == level and job_id in traced[0].getMessage()
    assert not any("Traceback" in line for line in store.log(job_id))
    assert store.get(job_id)["status"] == "failed"
    store.close()



def test_a_job_stopped_while_publishing_to_the_hub_does_not_say_nothing_was_pushed(tmp_path):
    """A server killed while a job wrote or pushed its model: the orphaned worker may finish its one-commit push
    (a push is never stopped halfway), yet the restarted server said "nothing was pushed after that point". A job
    in its publish phase with a Hub target now says the push may have completed and to check the repo."""
    store = JobStore(tmp_path)
    pushing = store.add({"models": []}, output="/o/1", repo_id="me/one", dry_run=False, has_token=False)
    store.update(pushing, status="running", phase="publish", progress=0.9)
    writing = store.add({"models": []}, output="/o/2", repo_id=None, dry_run=False, has_token=False)
    store.update(writing, status="running", phase="publish", progress=0.9)
    solving = store.add({"models": []}, output="/o/3", repo_id="me/three", dry_run=False, has_token=False)
    store.update(solving, status="running", phase="solve", progress=0.6)
    store.close()
    again = JobStore(tmp_path)
    assert sorted(again.recover()) == sorted([pushing, writing, solving])
    error = again.get(pushing)["error"]
    assert error.startswith("the service stopped while this job was writing or pushing its model"), error
    assert "the push to 'me/one' may have completed: check the repo before resubmitting" in error
    assert "nothing was pushed" not in error
    for job in (writing, solving):  # no push begun (none asked, or not yet at that phase)
        assert "nothing was pushed after that point" in again.get(job)["error"]
    again.close()
