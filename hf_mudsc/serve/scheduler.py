"""The web process's side of the jobs: a queue, at most `workers` worker processes, cancel, restart recovery.

One thread starts queued jobs (oldest first) while fewer than `workers` run; each running job has a thread
reading its pipe (phases, log lines, the final status) into the store. Tokens are held here, in memory, from
submission until the worker has received them — never in the store, a log or an error (docs/design.md §11).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hf_mudsc.errors import RecipeError
from hf_mudsc.publish.folder import clean_leftovers, push_only_target
from hf_mudsc.serve.store import (
    RESTARTED_RUNNING,
    STOPPED_PUSHING,
    STOPPED_RUNNING,
    TOKEN_NOT_HELD,
    JobStore,
    StateLock,
    lock_state_dir,
)

logger = logging.getLogger(__name__)

EXIT_GRACE_S = 30.0  # a worker that has reported its end gets this long to exit before it is killed
CANCEL_GRACE_S = 30.0  # a running job that ignores a cancel this long (stuck outside a cancel point) is killed
STOP_GRACE_S = 10.0  # on the way down, the running jobs get this long to stop at a cancel point before a kill


# What the forkserver imports once, so a job's process starts in milliseconds instead of re-importing torch.
PRELOAD = ["hf_mudsc.serve.worker", "torch", "transformers", "datasets", "hf_mudsc.pipeline", "hf_mudsc.runner",
           "hf_mudsc.publish.hub"]


def worker_context() -> Any:
    """Fresh processes for jobs: forked from a forkserver that has the merge engine imported (POSIX), else spawned.

    Either way each job is its own process (its memory is returned when it exits), and the web process never
    imports torch and is never forked. The forkserver starts at once and imports in the background."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class PushUnderway(Exception):
    """A cancel of a job whose push has begun: the push is one commit and completes (HTTP 409)."""


@dataclass
class Running:
    process: Any
    conn: Any
    cancelled: bool = False
    requested: bool = False  # a client asked for the cancel (DELETE); otherwise the service is stopping
    finished: bool = False
    pushing: bool = False  # the worker said its push began: a cancel never kills it (`_kill`)
    timer: threading.Timer | None = field(default=None, repr=False)
    follower: threading.Thread | None = field(default=None, repr=False)  # copies its pipe into the store


class Scheduler:
    """Runs the store's queued jobs in worker processes (one fresh process per job; `worker_context`).

    The lock guards `tokens` and `running` only, and is never held while a process starts (with a forkserver
    still importing torch that can take a while): submitting, cancelling and the API never wait for a worker."""

    def __init__(self, store: JobStore, workers: int = 1,
                 admit: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        """`admit(request)`: run when a job is about to start; returns the request its worker receives (local paths
        resolved, so the worker reads what was checked), or raises `RecipeError` to fail it (the service's local
        roots: a job queued before a restart with fewer `--local-root` folders must not run)."""
        if workers < 1:
            raise ValueError(f"--workers must be at least 1, got {workers}")
        self.store = store
        self.workers = workers
        self.admit = admit
        self.tokens: dict[str, str | None] = {}
        self.running: dict[str, Running] = {}
        self._context = worker_context()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._later: threading.Timer | None = None  # the second clean-up after a restart (`start`)
        self._state_lock: StateLock | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True, name="hf-mudsc-scheduler")

    def start(self) -> None:
        """Recover the store after a restart and start running its queue, once this process holds the state
        directory's lock (`store.lock_state_dir`: `StateDirBusyError` while another server runs on it)."""
        self._state_lock = lock_state_dir(self.store.state_dir)
        marked = self.store.recover()
        if marked:
            logger.warning("marked %d job(s) failed after a restart: %s", len(marked), ", ".join(marked))
            # Their workers died with the old service, or are orphans that stop (and clean up) at their next cancel
            # point or exit hard after ORPHAN_GRACE_S: what a dead one left is removed now, and once more after that.
            for job_id in marked:
                self._clean_after(job_id)
            from hf_mudsc.serve.worker import ORPHAN_GRACE_S

            self._later = threading.Timer(ORPHAN_GRACE_S + 5, lambda: [self._clean_after(job_id) for job_id in marked])
            self._later.daemon = True
            self._later.start()
        if self._context.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()
        self._thread.start()

    def stop(self) -> None:
        """Cancel running jobs (they stop at their next cancel point), wait a little for them (`STOP_GRACE_S`, then
        kill), and record each as failed (`STOPPED_RUNNING`) before the store closes — a job still starting too:
        none is left "running" in the store of a service that is gone. The wait is bounded even for a job whose
        push has begun (a shutdown must end); that job's record says the push may have completed
        (`STOPPED_PUSHING`), never that nothing was pushed."""
        if self._later is not None:
            self._later.cancel()  # the store closes after this
        with self._lock:
            self._stopping = True
            running = list(self.running.items())
        self._wake.set()
        for job_id, run in running:
            self._send_cancel(job_id, run)
        deadline = time.monotonic() + STOP_GRACE_S
        if self._thread.is_alive():  # a job it is starting gets its process (and the cancel) first
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            running = list(self.running.items())
        for _, run in running:
            if run.process is not None:
                run.process.join(timeout=max(0.0, deadline - time.monotonic()))
                if run.process.is_alive():
                    run.process.kill()
        for job_id, run in running:
            if run.follower is not None:
                run.follower.join(timeout=EXIT_GRACE_S)
            try:
                error = self._push_stopped(job_id, "the service was shut down") if run.pushing else STOPPED_RUNNING
                if self.store.finish_if_active(job_id, "failed", error):
                    logger.warning("job %s: failed, the service stopped while it ran", job_id)
            except Exception:  # noqa: BLE001 - the store refuses: logged, the restart's recovery fails it
                logger.exception("job %s: could not record that the service stopped it", job_id)
        if self._state_lock is not None:
            self._state_lock.release()

    # ------------------------------------------------------------------ requests
    def submit(self, job_id: str, token: str | None) -> None:
        """Hold `token` for a job already stored (tests, tools); a POST uses `holding`, which holds it first."""
        with self._lock:
            if token is not None:
                self.tokens[job_id] = token
        self._wake.set()

    @contextmanager
    def holding(self, job_id: str, token: str | None) -> Iterator[None]:
        """Hold the job's token while its row is inserted (inside the block), then wake the queue. Held BEFORE the
        row exists: a queued row is startable at once, and a job started before its token arrived ran on the
        server's own Hub login. A refused insert (the block raises) drops the token again."""
        if token is not None:
            with self._lock:
                self.tokens[job_id] = token
        try:
            yield
        except BaseException:
            with self._lock:
                self.tokens.pop(job_id, None)
            raise
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, a running one at its next cancel point. False if it had finished;
        `PushUnderway` if its push has begun (it completes: a cancel accepted then would be ignored, and the client
        told 202 would take the pushed model for never pushed)."""
        with self._lock:
            run = self.running.get(job_id)
            if run is None:
                self.tokens.pop(job_id, None)
                return self.store.finish_if_active(job_id, "cancelled", "cancelled before it started")
            if run.pushing:
                raise PushUnderway(job_id)
            run.requested = True
        self._send_cancel(job_id, run)
        return True

    def _send_cancel(self, job_id: str, run: Running) -> None:
        with self._lock:
            run.cancelled = True
            conn = run.conn
        if conn is None:
            return  # still starting: `_start` sends the cancel once the pipe exists
        try:
            conn.send("cancel")
        except (BrokenPipeError, OSError):
            pass
        if run.timer is None:
            run.timer = threading.Timer(CANCEL_GRACE_S, self._kill, args=(job_id, run))
            run.timer.daemon = True
            run.timer.start()

    def _kill(self, job_id: str, run: Running) -> None:
        """The cancel's grace is over: kill a worker stuck outside a cancel point — never one whose push has begun
        (one commit: killed halfway it leaves an empty repo, and the push may land anyway)."""
        if run.pushing:
            logger.info("job %s: its push had begun when it was cancelled; the push completes", job_id)
            return
        if not run.finished and run.process is not None and run.process.is_alive():
            logger.warning("job %s did not stop within %.0f s of its cancel; killing its worker", job_id,
                           CANCEL_GRACE_S)
            run.process.kill()

    # ------------------------------------------------------------------ running
    def _loop(self) -> None:
        """The scheduler thread: start queued jobs while workers are free. Nothing one job's record or start does
        ends it (a dead thread would leave every later job queued forever): an error is logged, and the job it came
        from failed, and the queue is looked at again a second later."""
        while True:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._start_queued()
            except Exception:  # noqa: BLE001 - the store failed outside any one job: logged, tried again
                logger.exception("the scheduler could not read the queue; it tries again in a second")
            if self._stopping:
                return

    def _next_queued(self) -> dict[str, Any] | None:
        """The oldest queued job whose record can be read; one that cannot be is failed (`store.get` shows it
        failed, `JobStore.mark_unreadable`) and skipped."""
        for job_id in self.store.queued():
            try:
                job = self.store.get(job_id)
            except Exception as error:  # noqa: BLE001 - any store error on one row: that job fails, not the queue
                logger.exception("job %s: its record cannot be read", job_id)
                self.store.mark_unreadable(job_id, f"{type(error).__name__}: {error}")
                self.tokens.pop(job_id, None)  # (under the lock) it will never run: its token is not kept
                continue
            if job is not None and job["status"] == "queued":
                return job
        return None

    def _start_queued(self) -> None:
        while True:
            with self._lock:
                if self._stopping or len(self.running) >= self.workers:
                    return
                job = self._next_queued()
                if job is None:
                    return
                job_id = job["id"]
                if job.get("has_token") and job_id not in self.tokens:  # never on the server's own login
                    self.store.finish_if_active(job_id, "failed", TOKEN_NOT_HELD)
                    logger.warning("job %s: failed, its Hub token is not held", job_id)
                    continue
                token = self.tokens.pop(job_id, None)
                run = Running(None, None)
                self.running[job_id] = run
            try:
                self.store.update(job_id, status="running", phase=None if job["dry_run"] else "load", progress=0.0)
                request = job["request"] if self.admit is None else self.admit(job["request"])
                self._start(job_id, request, run, token)
            except RecipeError as refused:
                self._fail_start(job_id, f"refused when it was about to start: {refused}")
            except Exception as error:  # noqa: BLE001 - a job that cannot start fails; the service stays up
                logger.exception("job %s could not start", job_id)
                self._fail_start(job_id, f"the worker could not start: {error}")
            del token

    def _fail_start(self, job_id: str, error: str) -> None:
        """A job that never got a worker: failed, its slot freed (even if the store refuses the write)."""
        try:
            self.store.update(job_id, status="failed", error=error)
        finally:
            with self._lock:
                self.running.pop(job_id, None)

    def _start(self, job_id: str, request: dict[str, Any], run: Running, token: str | None) -> None:
        """Start the job's worker process, hand it the token through its pipe, follow it."""
        from hf_mudsc.serve import worker

        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=worker.main, args=(child_end, job_id, request),
                                        name=f"hf-mudsc-job-{job_id}")
        process.start()
        child_end.close()
        parent_end.send({"token": token})
        with self._lock:
            run.process, run.conn = process, parent_end
            cancelled = run.cancelled
        run.follower = threading.Thread(target=self._follow, args=(job_id, run), daemon=True, name=f"follow-{job_id}")
        run.follower.start()
        if cancelled:
            self._send_cancel(job_id, run)

    def _settle(self, job_id: str, run: Running, final: tuple | None) -> None:
        """The job's final status: what the worker reported, else cancelled (if asked) or failed (it died). A job
        the service stopped because it was shutting down (no client asked) failed: it is to be resubmitted."""
        if final is not None:
            _, status, error, result = final
            if status == "cancelled" and not run.requested:
                status, error = "failed", STOPPED_RUNNING
            fields: dict[str, Any] = {"status": status, "error": error, "result": result}
            if status == "succeeded":
                fields["progress"] = 1.0
            self.store.update(job_id, **fields)
        elif run.pushing:  # killed (the service stopping) or died after its push began: it may have landed
            how = ("the service was shut down" if run.cancelled and not run.requested
                   else f"its process ended, exit code {run.process.exitcode}")
            self.store.update(job_id, status="failed", error=self._push_stopped(job_id, how))
        elif run.cancelled and not run.requested:  # killed while the service stopped
            self.store.update(job_id, status="failed", error=RESTARTED_RUNNING)
        elif run.cancelled:
            self.store.update(job_id, status="cancelled",
                              error="cancelled; the worker was stopped (nothing was pushed)")
        else:
            self.store.update(job_id, status="failed",
                              error=f"the worker process died (exit code {run.process.exitcode}) — out of memory "
                              "or a crash in native code; the service is unaffected")

    def _push_stopped(self, job_id: str, how: str) -> str:
        """The error of a job whose worker stopped after its push began (`STOPPED_PUSHING`), naming its repo."""
        repo_id = ((self.store.get(job_id) or {}).get("request") or {}).get("push_to_hub") or "its Hub repo"
        return STOPPED_PUSHING.format(how=how, repo_id=repo_id)

    def _follow(self, job_id: str, run: Running) -> None:
        """Copy one worker's messages into the store until its pipe closes; then settle the job's status. Whatever
        happens here, the worker ends and its slot is freed: a store write that fails (disk full, a locked or
        corrupt database) stops the worker and fails the job with the reason, instead of leaving it "running"."""
        final: tuple | None = None
        broken: Exception | None = None
        try:
            final = self._copy_messages(job_id, run)
        except Exception as error:  # noqa: BLE001 - the service stays up; the job is failed below
            logger.exception("job %s: following its worker failed", job_id)
            broken = error
            run.process.kill()
        run.process.join(timeout=EXIT_GRACE_S)
        if run.process.is_alive():  # reported its end but does not exit (a stuck library thread): reclaim it
            run.process.kill()
            run.process.join()
        run.finished = True
        if run.timer is not None:
            run.timer.cancel()
        self._clean_after(job_id)
        try:
            if broken is not None:  # failed unless the worker's own report already settled it
                self.store.finish_if_active(job_id, "failed", f"the service could not record the job's progress "
                                            f"({broken}); the worker was stopped — check the state directory's "
                                            "disk and resubmit")
            elif final is None:
                self._settle(job_id, run, None)
        except Exception:  # noqa: BLE001 - the store refuses even that: logged, the slot is still freed
            logger.exception("job %s: its final status could not be recorded", job_id)
        finally:
            with self._lock:
                self.running.pop(job_id, None)
            self._wake.set()

    def _clean_after(self, job_id: str) -> None:
        """Remove what a worker that died mid-write (out of memory, a kill, a cancel it ignored) left of its output:
        its staging folder. `clean_leftovers` removes only the writer's own staging folders whose process is gone
        (after a clean end there are none; a later job on the same output is alive, so its folder stays)."""
        try:
            output = ((self.store.get(job_id) or {}).get("request") or {}).get("output")
            for leftover in clean_leftovers(output or push_only_target()):  # a push-only job: the temp folder's
                logger.warning("job %s: removed %s, the staging folder its worker left", job_id, leftover)
        except Exception:  # noqa: BLE001 - the service stays up; the next run into that output cleans it
            logger.exception("job %s: could not remove what its worker left", job_id)

    def _copy_messages(self, job_id: str, run: Running) -> tuple | None:
        """The worker's log lines, phases and final report into the store, until its pipe closes; the final
        report (settled as it arrives) or None."""
        final: tuple | None = None
        pending: list[str] = []
        while True:
            try:
                message = run.conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "log":
                pending.append(message[1])
                if len(pending) >= 20:
                    self.store.append_log(job_id, pending)
                    pending = []
                continue
            if pending:
                self.store.append_log(job_id, pending)
                pending = []
            if kind == "traceback":  # the server's log only: a job's log is shown to clients
                logger.log(int(message[1]), "job %s failed:\n%s", job_id, message[2], extra={"keep_lines": True})
            elif kind == "phase":
                self.store.update(job_id, phase=message[1], progress=float(message[2]))
            elif kind == "pushing":  # the worker waits for the answer (`worker.Reporter.begin_push`)
                with self._lock:  # the lock `cancel` holds: a cancel comes wholly before this or is refused after
                    run.pushing = not (run.requested or run.cancelled or self._stopping)
                    granted = run.pushing
                try:
                    run.conn.send("push" if granted else "no-push")
                except (BrokenPipeError, OSError):
                    pass  # the worker is gone: its pipe closes next
            elif kind == "done":
                final = message
                self._settle(job_id, run, final)
        if pending:
            self.store.append_log(job_id, pending)
        return final
