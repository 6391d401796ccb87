"""The job store: one SQLite file (`jobs.sqlite3`) under `--state-dir`, through the standard library.

Only the web process writes it (workers report through a pipe), and one server at a time runs on a state directory
(`lock_state_dir`: a second refuses before it opens the store), so there is one writer and SQLite's own locking is
never contended across processes. A row that cannot be read is shown failed with the reason, never a 500.

What it holds: each job's request (recipe keys, destination, `dry_run`), status, progress, phase, error, result and
log lines, and whether a Hub token came with the job — never the token itself (tokens live in the scheduler's memory
only; docs/design.md §11).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

STORE_FILENAME = "jobs.sqlite3"
# The lock one server holds on its state directory for its whole life (`lock_state_dir`): the file holds its pid.
LOCK_FILENAME = "serve.lock"
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
PHASES = ("load", "calibrate", "solve", "apply", "build", "publish")

# Jobs that may wait for a worker at once (`hf-mudsc serve --max-queued`): each is a store row and later a whole
# merge (minutes of CPU), so anyone who may POST could otherwise queue unbounded work; 100 is hours of merges.
MAX_QUEUED = 100
# Finished jobs whose records the store keeps (`hf-mudsc serve --max-jobs`): every POST adds a record and a log, so
# without a cap anyone who may POST fills the disk. A submission beyond it removes the records of the jobs that
# finished longest ago (never a queued or running one, never an output folder); 1000 is months of everyday use.
MAX_JOBS = 1000


class LogCap(NamedTuple):
    lines: int
    bytes: int
    line_bytes: int


# What the store keeps of one job's log (the API's and the page's): at most `lines` lines and `bytes` bytes (UTF-8),
# each line cut at `line_bytes`. A job writing more keeps its first half (how it started) and, rolling, its last
# half (how it ended), with one line between saying how many were dropped: without a cap, a job logging megabytes
# fills the store (--max-jobs bounds the number of jobs, not their size). A merge logs a few hundred short lines.
LOG_CAP = LogCap(lines=2000, bytes=256 << 10, line_bytes=4 << 10)

RESTARTED_RUNNING = ("the service stopped while this job was running (crash, kill or restart); nothing was "
                     "pushed after that point — resubmit the job")
# A job in its publish phase with a Hub target: its worker, orphaned, finishes a push it had begun (one commit, never
# stopped halfway), so the restarted service cannot say nothing was pushed.
RESTARTED_PUBLISHING = ("the service stopped while this job was writing or pushing its model (crash, kill or "
                        "restart); the push to {repo_id!r} may have completed: check the repo before resubmitting "
                        "the job")
# A worker stopped (a shutdown's bounded wait, a crash) after it said its push began (`("pushing",)`).
STOPPED_PUSHING = ("this job's worker was stopped while it pushed the model ({how}); the push to {repo_id!r} may "
                   "have completed: check the repo before resubmitting the job")
STOPPED_RUNNING = ("the service stopped (it was shut down) while this job was running; the job was stopped before its "
                   "push, so nothing was written or pushed — resubmit the job")
RESTARTED_TOKEN = ("the service restarted before this job ran, and Hub tokens are held in memory only: "
                   "resubmit with a token")
# A queued job that came with a token the scheduler does not hold: never started on the server's own Hub login.
TOKEN_NOT_HELD = ("this job came with a Hub token that the service no longer holds (tokens are kept in memory only), "
                  "so it was not started on the service's own Hub login: resubmit the job with its token")

UNREADABLE_ROW = ("the service could not read this job's stored record ({problem}); it was marked failed and will not "
                  "run — resubmit the job")

FREE_IT = "wait for it to finish or cancel it (DELETE /api/jobs/{id}), or choose another destination"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    phase TEXT,
    error TEXT,
    request TEXT NOT NULL,
    dry_run INTEGER NOT NULL DEFAULT 0,
    has_token INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    repo_id TEXT,
    inputs TEXT,
    result TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS logs (
    job_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    line TEXT NOT NULL,
    PRIMARY KEY (job_id, n)
);
"""


class TargetClaimedError(Exception):
    """The job's output folder or Hub repo is claimed by a queued or running job (HTTP 409)."""


class StoreError(ValueError):
    """The store file cannot be read (corrupted or truncated): the service does not start (one line naming it)."""


class StoreWriteError(Exception):
    """The store cannot take a new job (its disk is full, the file is locked or read-only): HTTP 503, not queued."""


class QueueFullError(Exception):
    """`max_queued` jobs are already waiting for a worker (HTTP 429)."""


class StateDirBusyError(ValueError):
    """Another live server holds the state directory's lock: a second one would rewrite its jobs (one line)."""


class StateLock:
    """An exclusive lock on a state directory, held by ONE server for its whole life (`lock_state_dir`).

    Two servers on one `--state-dir` would both run its queue, and the second's restart recovery would fail the first's
    running jobs (freeing their outputs for other jobs while they are still written). An OS lock (`flock`) is released
    by the kernel when its process dies however it dies, so a crashed server never leaves a stale lock. Within one
    process the lock is counted (the CLI takes it before the store is opened, the scheduler again before recovery)."""

    _held: dict[Path, list[Any]] = {}  # resolved directory -> [file object, count], this process's locks
    _guard = threading.Lock()

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.key = state_dir.resolve()
        self.released = False

    def release(self) -> None:
        """Give the lock back (the last holder in this process unlocks it); a second call does nothing."""
        if self.released:
            return
        self.released = True
        with StateLock._guard:
            entry = StateLock._held.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del StateLock._held[self.key]
                entry[0].close()  # closing the file drops its flock

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def prepare_state_dir(state_dir: str | os.PathLike) -> Path:
    """The state directory, created if missing; one line (`StoreError`) when it cannot be: a file, a dangling
    symlink, a folder without write access."""
    folder = Path(state_dir).expanduser().absolute()
    shown = str(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        kind = "a symbolic link to nothing" if folder.is_symlink() and not folder.exists() else "not a folder"
        raise StoreError(f"--state-dir {shown!r} is {kind}: pass a folder (it is created if missing) where the job "
                         "store and the outputs may live")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(f"--state-dir {shown!r} cannot be created ({error.strerror or error}): pass a folder you "
                         "can write to") from None
    return folder


def lock_state_dir(state_dir: str | os.PathLike) -> StateLock:
    """Take the state directory's lock (`StateLock`) or refuse in one line naming the directory and the server (its
    pid) that holds it, before the store is opened: a second server must not touch a live server's jobs."""
    folder = prepare_state_dir(state_dir)
    lock = StateLock(folder)
    with StateLock._guard:
        entry = StateLock._held.get(lock.key)
        if entry is not None:  # this process holds it already (the CLI, then the scheduler)
            entry[1] += 1
            return lock
        path = folder / LOCK_FILENAME
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the server's life
        except OSError as error:
            raise StoreError(f"--state-dir {str(folder)!r}: cannot open its lock file {LOCK_FILENAME} "
                             f"({error.strerror or error}); pass a folder you can write to") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no OS lock; run one server per --state-dir
            logger.warning("cannot lock %s on this system: run one server per --state-dir", folder)
        else:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip()
                handle.close()
                raise StateDirBusyError(
                    f"--state-dir {str(folder)!r} is in use by another running hf-mudsc serve"
                    + (f" (pid {holder})" if holder.isdigit() else "")
                    + "; stop that server first, or pass another --state-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        StateLock._held[lock.key] = [handle, 1]
    return lock


def new_job_id() -> str:
    """A job's id: 12 random hex digits."""
    return uuid.uuid4().hex[:12]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    """Jobs and their logs in SQLite; thread-safe within the web process (one connection, one lock)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = prepare_state_dir(state_dir)
        self.path = self.state_dir / STORE_FILENAME
        self._lock = threading.Lock()
        self._db = _connect(self.path)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            try:  # a damaged file fails here (or in the check), not in every request later
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
                if "inputs" not in columns:  # a store written before jobs' inputs were claimed
                    self._db.execute("ALTER TABLE jobs ADD COLUMN inputs TEXT")
                problems = [r[0] for r in self._db.execute("PRAGMA quick_check")]
                if problems == ["ok"]:
                    problems = _missing_columns(self._db)
            except sqlite3.DatabaseError as error:
                problems = [str(error)]
            if problems != ["ok"]:
                self._db.close()
                raise StoreError(
                    f"the job store {str(self.path)!r} cannot be read ({'; '.join(problems[:3])}): it is corrupted "
                    "or truncated (or of another hf-mudsc version), and the service did not start; move it aside "
                    "(with any -wal and -shm file next to it) to start with an empty store, or pass another "
                    "--state-dir")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def mark_unreadable(self, job_id: str, problem: str) -> bool:
        """Fail a queued or running job whose record cannot be read (`UNREADABLE_ROW`): once, logged."""
        marked = self.finish_if_active(job_id, "failed", UNREADABLE_ROW.format(problem=problem))
        if marked:
            logger.error("job %s: its stored record cannot be read (%s); marked failed", job_id, problem)
        return marked

    # ------------------------------------------------------------------ writes
    def add(self, request: dict[str, Any], *, output: str | None, repo_id: str | None, dry_run: bool,
            has_token: bool, max_queued: int | None = None, max_jobs: int | None = None,
            inputs: Sequence[tuple[str, str]] = (), job_id: str | None = None) -> str:
        """A new queued job (`job_id`: the id chosen beforehand, `new_job_id`, so the scheduler can hold the job's
        token before its row exists); refused (`QueueFullError`) while `max_queued` jobs are queued, and
        (`TargetClaimedError`) if a queued or running job claims its destination, if its output is, holds or lies
        inside a local input of a queued or running job, or if one of its `inputs` ((key, absolute resolved path):
        parents, base, calibration data) is, holds or lies inside the output of one: inputs are never modified, and
        a job must not read a model being written or replaced. With `max_jobs`, the records (and logs) of finished
        jobs beyond the `max_jobs` that finished last are removed (`MAX_JOBS`).

        The checks and the insert are one transaction, so two concurrent submissions cannot both claim a target
        or both take the last place in the queue."""
        job_id = job_id or new_job_id()
        stamp = now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if max_queued is not None:
                    waiting = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                    if waiting >= max_queued:
                        raise QueueFullError(
                            f"{waiting} jobs are queued, the most this service takes (its --max-queued); "
                            "retry when some have started, or cancel one (DELETE /api/jobs/{id})")
                # A Hub repo id is one repo whatever its case (`Me/X` is `me/x`). An output folder is claimed with
                # what is inside it and the folders around it: a job writing `a/b` makes `a` exist under a job
                # writing `a` (which then fails after its merge), or writes into its output.
                row = None
                if output is not None:
                    row = next((r for r in self._db.execute(
                        "SELECT id, status, output FROM jobs WHERE output IS NOT NULL AND status IN (?, ?)", ACTIVE)
                        if _overlap(r["output"], output)), None)
                if row is not None:
                    raise TargetClaimedError(
                        f"the output folder {output!r} is claimed by job {row['id']} ({row['status']})"
                        + ("" if row["output"] == output else f", which writes {row['output']!r}")
                        + f"; {FREE_IT}")
                self._refuse_input_clashes(output, inputs)
                if repo_id is not None:
                    row = self._db.execute("SELECT id, status FROM jobs WHERE repo_id = ? COLLATE NOCASE AND "
                                           "status IN (?, ?)", (repo_id, *ACTIVE)).fetchone()
                if row is not None:
                    raise TargetClaimedError(f"the Hub repo {repo_id!r} is claimed by job {row['id']} "
                                             f"({row['status']}); {FREE_IT}")
                self._db.execute(
                    "INSERT INTO jobs (id, status, progress, request, dry_run, has_token, output, repo_id, inputs, "
                    "created, updated) VALUES (?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, json.dumps(request), int(dry_run), int(has_token), output, repo_id,
                     json.dumps([path for _, path in inputs]) if inputs else None, stamp, stamp))
                pruned = self._prune(max_jobs) if max_jobs is not None else 0
                self._db.execute("COMMIT")
            except BaseException as problem:
                with contextlib.suppress(sqlite3.Error):  # a transaction SQLite already ended (a full disk)
                    self._db.execute("ROLLBACK")
                if isinstance(problem, sqlite3.OperationalError):
                    raise StoreWriteError(str(problem)) from problem
                raise
        if pruned:
            logger.info("removed the records of %d finished job(s) beyond --max-jobs %d", pruned, max_jobs)
        return job_id

    def _refuse_input_clashes(self, output: str | None, inputs: Sequence[tuple[str, str]]) -> None:
        """Inside `add`'s transaction: `TargetClaimedError` when the new output overlaps an active job's input, or
        one of the new inputs overlaps an active job's output. The message names the new job's key and the outputs,
        never another job's input path (it may lie outside the output root, which the app hides)."""
        if output is not None:
            for row in self._db.execute("SELECT id, status, inputs FROM jobs WHERE inputs IS NOT NULL AND "
                                        "status IN (?, ?)", ACTIVE):
                if any(_overlap(path, output) for path in _paths(row["inputs"], row["id"])):
                    raise TargetClaimedError(
                        f"the output folder {output!r} is, holds or lies inside a local input (a parent, the base "
                        f"or the calibration data) of job {row['id']} ({row['status']}), and inputs are never "
                        f"modified while a job reads them; {FREE_IT}")
        for key, path in inputs:
            for row in self._db.execute("SELECT id, status, output FROM jobs WHERE output IS NOT NULL AND "
                                        "status IN (?, ?)", ACTIVE):
                if _overlap(path, row["output"]):
                    raise TargetClaimedError(
                        f"`{key}` reads the output folder {row['output']!r} of job {row['id']} ({row['status']}), "
                        f"which would be half-written or replaced while this job reads it; wait for it to "
                        "finish or cancel it (DELETE /api/jobs/{id}), then submit this job again")

    def _prune(self, max_jobs: int) -> int:
        """Delete the finished jobs beyond the `max_jobs` that finished last, with their log lines (inside the
        caller's transaction, under the lock). By `updated`, not submission: a long job that just finished stays."""
        stale = [(r["id"],) for r in self._db.execute(
            "SELECT id FROM jobs WHERE status NOT IN (?, ?) ORDER BY updated DESC, seq DESC LIMIT -1 OFFSET ?",
            (*ACTIVE, max_jobs))]
        self._db.executemany("DELETE FROM logs WHERE job_id = ?", stale)
        self._db.executemany("DELETE FROM jobs WHERE id = ?", stale)
        return len(stale)

    def update(self, job_id: str, **fields: Any) -> None:
        """Set some of status, progress, phase, error, result (a dict, stored as JSON)."""
        allowed = {"status", "progress", "phase", "error", "result"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown job field(s) {sorted(unknown)}")
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        fields["updated"] = now()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?",  # noqa: S608
                             (*fields.values(), job_id))

    def finish_if_active(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Move a queued/running job to a final `status`; False if it had already finished."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, updated = ? WHERE id = ? AND status IN (?, ?)",
                (status, error, now(), job_id, *ACTIVE))
        return cursor.rowcount == 1

    def append_log(self, job_id: str, lines: Iterable[str]) -> None:
        """Add lines to the job's log (each numbered, from 0), then drop its middle beyond `LOG_CAP`."""
        cap = LOG_CAP
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(n), -1) FROM logs WHERE job_id = ?", (job_id,)).fetchone()
            start = row[0] + 1
            self._db.executemany("INSERT INTO logs (job_id, n, line) VALUES (?, ?, ?)",
                                 [(job_id, start + i, _cut(line, cap.line_bytes)) for i, line in enumerate(lines)])
            self._drop_middle(job_id, cap)

    def _drop_middle(self, job_id: str, cap: LogCap) -> None:
        """Past the cap, keep the log's first lines (half the cap, never dropped) and its last (the other half)."""
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(line AS BLOB))), 0) FROM logs "
                                       "WHERE job_id = ?", (job_id,)).fetchone()
        if count <= cap.lines and size <= cap.bytes:  # (nearly always: the rows are fetched only past the cap)
            return
        rows = self._db.execute("SELECT n, LENGTH(CAST(line AS BLOB)) FROM logs WHERE job_id = ? ORDER BY n",
                                (job_id,)).fetchall()
        head, used = 0, 0  # the first lines, numbered from 0 with no gap, within half the cap: the same every time
        while (head < len(rows) and rows[head][0] == head and head < cap.lines // 2
               and used + rows[head][1] <= cap.bytes // 2):
            used += rows[head][1]
            head += 1
        tail, used = len(rows), 0  # the last lines within the other half
        while (tail > head and len(rows) - tail < cap.lines - cap.lines // 2
               and used + rows[tail - 1][1] <= cap.bytes - cap.bytes // 2):
            used += rows[tail - 1][1]
            tail -= 1
        if tail > head:
            self._db.execute("DELETE FROM logs WHERE job_id = ? AND n >= ? AND n < ?",
                             (job_id, rows[head][0], rows[tail][0] if tail < len(rows) else rows[-1][0] + 1))

    def recover(self) -> list[str]:
        """After a start: running jobs failed (the process that ran them is gone); queued jobs that came with a
        token failed too (the token died with the old process). Returns the ids marked."""
        stamp = now()
        with self._lock:
            marked = [r["id"] for r in self._db.execute(
                "SELECT id FROM jobs WHERE status = 'running' OR (status = 'queued' AND has_token = 1)")]
            publishing = self._db.execute("SELECT id, repo_id FROM jobs WHERE status = 'running' AND phase = "
                                          "'publish' AND repo_id IS NOT NULL").fetchall()
            for row in publishing:
                self._db.execute("UPDATE jobs SET status = 'failed', error = ?, updated = ? WHERE id = ?",
                                 (RESTARTED_PUBLISHING.format(repo_id=row["repo_id"]), stamp, row["id"]))
            self._db.execute("UPDATE jobs SET status = 'failed', error = ?, updated = ? WHERE status = 'running'",
                             (RESTARTED_RUNNING, stamp))
            self._db.execute("UPDATE jobs SET status = 'failed', error = ?, updated = ? "
                             "WHERE status = 'queued' AND has_token = 1", (RESTARTED_TOKEN, stamp))
        return marked

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job, or None; a record that cannot be read is shown failed with the reason (and failed in the store
        if it was queued or running), so one damaged row never breaks the API, the page or the scheduler."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._readable(row) if row is not None else None

    def _readable(self, row: sqlite3.Row) -> dict[str, Any]:
        """`_job(row)`, or for a row that cannot be read, what can be said of it: failed, with the reason."""
        try:
            return _job(row)
        except (ValueError, TypeError) as error:
            problem = f"{type(error).__name__}: {error}"
            if str(row["status"]) in ACTIVE:
                self.mark_unreadable(str(row["id"]), problem)
            return _unreadable_job(row, problem)

    def list(self, limit: int | None = None, before: str | None = None) -> list[dict[str, Any]]:
        """Newest first; `before`: only jobs submitted before that job (a page cursor; KeyError if unknown)."""
        where, values = "", []
        with self._lock:
            if before is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (before,)).fetchone()
                if row is None:
                    raise KeyError(before)
                where, values = " WHERE seq < ?", [row["seq"]]
            query = f"SELECT * FROM jobs{where} ORDER BY seq DESC" + (" LIMIT ?" if limit else "")  # noqa: S608
            rows = self._db.execute(query, (*values, *([limit] if limit else []))).fetchall()
        return [self._readable(r) for r in rows]

    def queued(self) -> list[str]:
        """Queued job ids, oldest first (the order they run in)."""
        with self._lock:
            return [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq")]

    def active_outputs(self) -> list[str]:
        """The output folders (absolute, resolved) queued or running jobs write: an input inside one may not be there
        yet, and its job is refused for the claim (409), not as missing (`jobs.refuse_missing_inputs`)."""
        with self._lock:
            return [r["output"] for r in self._db.execute("SELECT output FROM jobs WHERE output IS NOT NULL AND "
                                                          "status IN (?, ?)", ACTIVE)]

    def log(self, job_id: str, since: int = 0) -> list[str]:
        return self.log_page(job_id, since)[0]

    def log_page(self, job_id: str, since: int = 0) -> tuple[list[str], int]:
        """The job's log lines numbered `since` on, and the number to ask from next (one past the last line written,
        or `since` when none is). Where lines were dropped (`LOG_CAP`), one line says how many."""
        with self._lock:
            rows = self._db.execute("SELECT n, line FROM logs WHERE job_id = ? AND n >= ? ORDER BY n",
                                    (job_id, since)).fetchall()
            written, stored = self._db.execute("SELECT COALESCE(MAX(n), -1) + 1, COUNT(*) FROM logs WHERE job_id = ?",
                                               (job_id,)).fetchone()
        lines, expected = [], since
        for n, line in rows:
            if n > expected:  # the lines before it were dropped
                lines.append(f"[... {written - stored:,} lines dropped here: a job's log keeps its first and last "
                             f"{LOG_CAP.lines // 2:,} lines, {LOG_CAP.bytes // 2:,} bytes each ...]")
            lines.append(line)
            expected = n + 1
        return lines, (rows[-1][0] + 1 if rows else since)


def _cut(line: str, limit: int) -> str:
    """`line` within `limit` bytes of UTF-8: longer, its start and how many bytes were cut."""
    data = line.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return line
    note = f" [... {len(data):,} bytes, cut]"
    return data[:max(0, limit - len(note.encode()))].decode("utf-8", errors="ignore") + note


def _overlap(one: str, other: str) -> bool:
    """Whether two paths (absolute, resolved: outputs, a job's inputs) are the same or one is inside the other."""
    a, b = PurePath(one), PurePath(other)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _missing_columns(db: sqlite3.Connection) -> list[str]:
    """["ok"] when the store's tables hold every column `_SCHEMA` gives them, else what lacks which: a store of
    another format (or edited by hand) would fail every request that reads a job."""
    lacking = []
    for table, wanted in (("jobs", JOB_COLUMNS), ("logs", LOG_COLUMNS)):
        held = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if missing := [name for name in wanted if name not in held]:
            lacking.append(f"its table {table!r} has no column {', '.join(map(repr, missing))}")
    return lacking or ["ok"]


JOB_COLUMNS = ("seq", "id", "status", "progress", "phase", "error", "request", "dry_run", "has_token", "output",
               "repo_id", "inputs", "result", "created", "updated")
LOG_COLUMNS = ("job_id", "n", "line")


def _connect(path: Path) -> sqlite3.Connection:
    """The store's connection; a path SQLite cannot open (a folder, a dangling symlink, no access) is one line."""
    problem = None
    if path.is_symlink() and not path.exists():
        problem = f"it is a symbolic link to {os.readlink(path)!r}, which does not exist"
    elif path.exists() and not path.is_file():
        problem = "it is not a file"
    if problem is None:
        try:
            return sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as error:
            problem = str(error)
    raise StoreError(f"the job store {str(path)!r} cannot be opened ({problem}); the service did not start: move it "
                     "aside to start with an empty store, or pass another --state-dir")


def _paths(text: str, job_id: str) -> list[str]:
    """A job's stored input paths; a damaged list claims nothing (logged): the job itself fails when it is read."""
    try:
        value = json.loads(text)
        if isinstance(value, list) and all(isinstance(path, str) for path in value):
            return value
    except ValueError:
        pass
    logger.error("job %s: its stored inputs cannot be read; they are not claimed", job_id)
    return []


def _unreadable_job(row: sqlite3.Row, problem: str) -> dict[str, Any]:
    """A row `_job` cannot read, as the API shows it: failed (whatever it says), the reason as its error."""
    return {
        "id": str(row["id"]),
        "status": "failed" if str(row["status"]) in ACTIVE or str(row["status"]) not in STATUSES else row["status"],
        "progress": 0.0,
        "phase": None,
        "error": UNREADABLE_ROW.format(problem=problem),
        "result": None,
        "created": str(row["created"]),
        "updated": str(row["updated"]),
        "dry_run": False,
        "has_token": False,
        "request": {},
    }


def _job(row: sqlite3.Row) -> dict[str, Any]:
    """A stored row as the API shows it (plus `request` and `dry_run`, which the page uses)."""
    result = _shaped(json.loads(row["result"]), RESULT_SHAPE, "the result") if row["result"] else None
    return {
        "id": row["id"],
        "status": row["status"],
        "progress": round(float(row["progress"]), 4),
        "phase": row["phase"],
        "error": row["error"],
        "result": result,
        "created": row["created"],
        "updated": row["updated"],
        "dry_run": bool(row["dry_run"]),
        "has_token": bool(row["has_token"]),
        "request": _mapping(row["request"]),
    }


def _mapping(text: str) -> dict[str, Any]:
    """A stored request: a JSON object (anything else is a damaged row: ValueError)."""
    return _shaped(json.loads(text), REQUEST_SHAPE, "the request")


# The fields of a stored request and result that the API, the page and the scheduler read, and the types they read
# them as: a record edited by hand (or written by another version) holding another type is unreadable (`_readable`),
# not a 500 of the listing that shows every job.
STRINGS = "a list of strings"  # a shape of its own: a list whose every item is a str
REQUEST_SHAPE: dict[str, Any] = {"models": STRINGS, "warnings": STRINGS, "output": str, "push_to_hub": str}
RESULT_SHAPE: dict[str, Any] = {"output": str, "url": str, "repo_id": str, "commit": str, "plan_text": str,
                                "output_fingerprint": str, "method": str, "warnings": STRINGS, "files": STRINGS,
                                "plan": dict}


def _shaped(value: Any, shape: dict[str, Any], what: str) -> dict[str, Any]:
    """`value` (a stored request or result) when it is an object whose `shape` fields, where set (not null), have
    their types (`STRINGS`: a list of strings); ValueError naming the first that does not."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} is {type(value).__name__}, not an object")
    for key, kind in shape.items():
        item = value.get(key)
        if item is None:
            continue
        fits = (isinstance(item, list) and all(isinstance(entry, str) for entry in item)) if kind == STRINGS \
            else isinstance(item, kind)
        if not fits:
            expected = STRINGS if kind == STRINGS else kind.__name__
            raise ValueError(f"{what}'s {key!r} is {type(item).__name__}, not {expected}")
    return value
