"""The worker process: runs ONE job (a merge or a dry run) and reports to the web process through a pipe.

Each job gets a fresh process (forked from the scheduler's forkserver, or spawned; `scheduler.worker_context`), so
a crash cannot take the server down and the memory of a finished merge goes back to the system when it exits.
This module imports nothing heavy at import time; the merge engine is imported by `run_merge`. Messages:

    web -> worker   {"token": str | None}   first, once (the token never touches the disk)
                    "cancel"                 stop at the next safe point
    worker -> web   ("phase", name, progress)   ("log", line)   ("done", status, error, result)
                    ("pushing",)   the push is about to begin; the worker waits for the answer:
    web -> worker   "push"          go on: the scheduler marked the job pushing (a cancel now answers 409), and the
                                    push is never stopped (no cancel point, no kill for a cancel)
                    "no-push"       a cancel came first (or the service stops): stop before any upload
                    ("traceback", level, text)   a failure's traceback, for the server's log only (never the job's)

Progress comes from the pipeline's own logging records (a handler on the `hf_mudsc` logger maps each stage's
records to a phase: load / calibrate / solve / apply / build / publish) and from a global forward pre-hook of
torch (`forward_progress`: every batch of calibration, a data method's own pass, the refit and evaluation passes
it, and moves the bar within the calibrate, apply and build phases). Both are the CANCEL POINTS: when a cancel has
been asked, they raise `JobCancelled` (a BaseException, so no `except Exception` of the library swallows it),
which unwinds through the one writer's staging folder — nothing half-written is left, nothing is pushed. Once the
push has begun (the merged folder is written and the Hub repo is being checked or created), a cancel no longer
applies: the push is one commit, and stopping it halfway would leave an empty repo behind.

If the web process dies (the pipe closes), the worker cancels itself the same way, and exits hard after
`ORPHAN_GRACE_S` if it has not stopped by then: an orphaned job must never push later. The writer's rename of the
finished folder into place is the last cancel point (`Reporter.before_rename`): an orphan discards its staging
folder there instead of leaving a model in an output its restarted service says was never written.

A cancel in the load phase or of a dry run (parents located and read; nothing written but the Hub cache's own atomic
downloads) ends the worker at once, after reporting it: locating thousands of parents has no cancel point of its own.

A job's failure is one line in its error and its log; its traceback goes to the server's log only (at debug level
for the errors hf-mudsc raises on purpose for a bad input, `EXPECTED`; at error level for any other): the page shows
what a client may see, and a traceback holds server paths.

Test-only delay: `HF_MUDSC_SERVE_TEST_DELAY=SECONDS` makes every batch (a parent's whole-model forward) sleep that long
(in 0.05 s slices that honour a cancel), and the load phase wait once as long, so tests can cancel or kill a job
while it runs. Never set it in production.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hf_mudsc.errors import EDQUOT, PushError, disk_error
from hf_mudsc.load.hub_calls import hub_error_line
from hf_mudsc.load.references import EscapedControls, hide_tokens
from hf_mudsc.option_values import CHECK_NEEDS_NO_SOLVE
from hf_mudsc.options import REFITTING
from hf_mudsc.publish.folder import checked_rename, weights_fingerprint
from hf_mudsc.runner import check_found_base, push_not_checked
from hf_mudsc.serve import mask_token
from hf_mudsc.serve.jobs import JobRequest

DELAY_ENV = "HF_MUDSC_SERVE_TEST_DELAY"
KEPT = "the merged model is kept in"  # how the writer's failed push says where it kept the model (publish/writer.py)
ORPHAN_GRACE_S = 20.0
# The errors a job ends in on purpose, for a bad input or destination: the ones `hf-mudsc merge` prints as one line.
EXPECTED = (ValueError, FileExistsError, FileNotFoundError, PermissionError, PushError)
# (logger name prefix, message prefix) -> the phase that record shows has begun, and the progress it marks.
PHASE_MARKS = (
    ("hf_mudsc.load.relation", "", "after_load", None),
    ("hf_mudsc.pipeline", "calibrated on ", "solve", 0.6),  # a data pass read it all (statistics, regmean's own)
    ("hf_mudsc.solve.loop", "solve: ", "apply", 0.75),
    ("hf_mudsc.pipeline", CHECK_NEEDS_NO_SOLVE, "apply", 0.75),  # auto's check settled without a solve
    ("hf_mudsc.apply.refit", "", "build", 0.8),
    ("hf_mudsc.pipeline", "merged ", "publish", 0.9),  # the model is built; the folder is written (and pushed)
    ("hf_mudsc.publish.hub", "pushed ", "published", 1.0),
)
# How a job's log line reads (the library's records, and the worker's own lines).
LINE_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
PROGRESS = {"load": 0.02, "calibrate": 0.2, "solve": 0.6, "apply": 0.75, "build": 0.85, "publish": 0.9}
# Phases whose whole-model forwards are data passes after calibration, and the progress their batches move toward
# (the next mark's): regmean's own pass once auto's check confirmed it (apply), the refit's and REPAIR's (build).
PASS_ENDS = {"apply": 0.8, "build": 0.9}


class JobCancelled(BaseException):
    """Raised at a cancel point; a BaseException so no `except Exception` in the library swallows it."""


class Reporter:
    """The worker's side of the pipe: phases (monotonic), log lines (token scrubbed) and the cancel flag."""

    def __init__(self, conn: Any, token: str | None, calibrates: bool, *, asks_before_push: bool) -> None:
        self.conn = conn
        self.token = token
        self.calibrates = calibrates
        self.cancel = threading.Event()
        self.pushing = False  # the push has begun (repo created, one commit): it completes, a cancel waits it out
        self.push_asked = False  # ("pushing",) was sent: the answer ("push" or "no-push") is awaited once
        # Whether something reads the web process's answers (`watch_pipe`, started by `main`): without a reader no
        # answer can arrive, and the push begins unasked. Required, so that no new caller pushes unasked by default.
        self.asks_before_push = asks_before_push
        self.push_answered = threading.Event()
        self.push_granted = False
        self.phase: str | None = None
        self.batches = 0
        self.pass_batches = 0  # batches in the current phase after calibration (PASS_ENDS)
        self.phase_start = 0.0  # the progress the current phase began at
        self._lock = threading.Lock()

    def batch(self, expected: int | None) -> None:
        """One forward batch of a model: in the calibrate phase, progress moves from 0.2 toward 0.6 (exactly when
        the number of batches is known, asymptotically otherwise); in a phase of later data passes (`PASS_ENDS`),
        asymptotically from where the phase began toward the next mark — the bar does not stand still for a pass."""
        if not self.calibrates:
            return
        if self.phase == "load":
            self.enter("calibrate")
        if self.phase == "calibrate":
            self.batches += 1
            share = min(1.0, self.batches / expected) if expected else 1 - 1 / (1 + self.batches / 20)
            self.send(("phase", "calibrate", round(0.2 + 0.4 * share * 0.98, 4)))
        elif self.phase in PASS_ENDS:
            self.pass_batches += 1
            start, end = self.phase_start, PASS_ENDS[self.phase]
            share = 1 - 1 / (1 + self.pass_batches / 20)
            self.send(("phase", self.phase, round(start + (end - start) * share * 0.98, 4)))

    def scrub(self, text: str) -> str:
        """The token masked, as is any URL's userinfo (an `HF_ENDPOINT` with credentials, `hide_tokens`), and lone
        surrogates (a non-UTF-8 path through os.fsdecode) escaped: the store is UTF-8. A token shaped like one is
        masked wherever it occurs; a short value (a placeholder such as `e` or `test`, which the Hub refuses only
        when it is used) only where it stands alone (`mask_token`), or every word holding its letters would be."""
        text = hide_tokens(text.encode("utf-8", "backslashreplace").decode("utf-8"))
        return mask_token(text, self.token) if self.token else text

    def send(self, message: tuple) -> None:
        with self._lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):
                self.cancel.set()  # the web process is gone
                self.push_answered.set()  # no answer will come: the push does not begin

    def log(self, line: str) -> None:
        self.send(("log", self.scrub(line)))

    def enter(self, phase: str, progress: float | None = None) -> None:
        """Advance to `phase` (never back)."""
        order = list(PROGRESS)
        if self.phase is not None and order.index(phase) <= order.index(self.phase):
            return
        self.phase = phase
        self.pass_batches = 0
        self.phase_start = PROGRESS[phase] if progress is None else progress
        self.send(("phase", phase, self.phase_start))

    def begin_push(self) -> None:
        """Checking or creating the repo after the merge: the push is about to begin. Asked of the scheduler, which
        under its lock either marks the job pushing (a later cancel answers 409 and the push completes) or answers
        that a cancel came first: then the cancel is set, and the next cancel point (right after this record)
        stops the job before anything reaches the Hub. Without the question, a cancel sent as the push began was
        answered 202 and the push landed anyway, the job "succeeded"."""
        self.push_asked = True
        self.send(("pushing",))
        if not self.asks_before_push:
            self.pushing = True
            return
        self.push_answered.wait()
        if self.push_granted:
            self.pushing = True
        else:
            self.cancel.set()

    @property
    def push_refused(self) -> bool:
        """The push was asked and not granted (the scheduler answered "no-push", or no answer could come): the job
        stopped before any upload."""
        return self.push_asked and self.asks_before_push and not self.push_granted

    def answer_push(self, granted: bool) -> None:
        """The scheduler's answer to ("pushing",) (`receive`)."""
        self.push_granted = granted
        self.push_answered.set()

    def checkpoint(self) -> None:
        """A cancel point: raise `JobCancelled` if a cancel was asked and the push has not begun."""
        if self.cancel.is_set() and not self.pushing:
            raise JobCancelled()

    def before_rename(self) -> None:
        """The writer's last cancel point, right before the finished folder is renamed into place
        (`publish.folder.checked_rename`). A line to the server first: if it died moments ago, the closed pipe sets
        the cancel here, before `watch_pipe` may have noticed; the staging folder is then discarded."""
        self.say(logging.INFO, "the merged model is written; moving it into place")
        self.checkpoint()

    def say(self, level: int, message: str) -> None:
        """A line of the worker's own in the job's log, formatted as the library's records are."""
        self.log(LINE_FORMAT.format(logging.LogRecord(__name__, level, __file__, 0, message, (), None)))

    def wait(self, seconds: float) -> None:
        """Sleep (the test-only delay) while honouring a cancel."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.checkpoint()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        self.checkpoint()

    def on_record(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.phase == "publish" and record.name == "hf_mudsc.publish.hub" and not self.push_asked:
            self.begin_push()
        for prefix, start, phase, progress in PHASE_MARKS:
            if record.name.startswith(prefix) and message.startswith(start):
                if phase == "published":
                    self.phase = "publish"
                    self.send(("phase", "publish", 0.99))
                elif phase == "after_load":
                    self.enter("calibrate" if self.calibrates else "solve")
                else:
                    self.enter(phase, progress)
                break


class ForwardHandler(logging.Handler):
    """Forwards the `hf_mudsc` log records to the web process (the job's log) and checks for a cancel."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__(level=logging.INFO)
        self.reporter = reporter
        self.setFormatter(LINE_FORMAT)
        self.addFilter(EscapedControls())  # a label or task name from a parent's config cannot split or forge a line

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.log(self.format(record))
        self.reporter.on_record(record)
        self.reporter.checkpoint()  # raising here is deliberate: the record's call site is a safe point


def watch_pipe(conn: Any, reporter: Reporter) -> None:
    """Reads "cancel" from the web process; a closed pipe (the server died) cancels too, then exits hard."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            reporter.cancel.set()
            reporter.push_answered.set()  # the push does not begin
            if reporter.phase in (None, "load"):  # nothing written yet: an orphan stops now
                os._exit(3)
            time.sleep(ORPHAN_GRACE_S)
            os._exit(3)
        receive(reporter, message)


def receive(reporter: Reporter, message: Any) -> None:
    """One message of the web process (`watch_pipe`): a cancel, or the answer to the push's question."""
    if message in ("push", "no-push"):
        reporter.answer_push(message == "push")
    elif message == "cancel":
        reporter.cancel.set()
        if reporter.phase in (None, "load"):  # nothing written yet (a dry run never writes): stop now
            reporter.send(("done", "cancelled", "cancelled on request; nothing was written or pushed", None))
            with reporter._lock:  # no other message after the final one
                os._exit(4)


def main(conn: Any, job_id: str, request: dict[str, Any]) -> None:
    """The worker process's entry point (multiprocessing target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server cancels us
    first = conn.recv()
    token = first.get("token")
    job = JobRequest.from_stored(request)
    needs_data = job.recipe.refit in REFITTING or (job.recipe.refit == "auto" and bool(job.recipe.calibration)) \
        or _needs_calibration(job)
    reporter = Reporter(conn, token, calibrates=needs_data, asks_before_push=True)  # `watch_pipe` reads the answers
    threading.Thread(target=watch_pipe, args=(conn, reporter), daemon=True, name="pipe-watch").start()
    logger = logging.getLogger("hf_mudsc")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(ForwardHandler(reporter))
    try:
        with checked_rename(reporter.before_rename):
            result = dry_run_plan(job, token) if job.dry_run else run_merge(job, token, reporter)
    except JobCancelled:
        reporter.send(("done", "cancelled", cancelled_said(job, reporter.push_refused), None))
    except Exception as error:  # noqa: BLE001 - any failure of the job is reported, the worker exits
        report_failure(reporter, error)
    else:
        reporter.send(("done", "succeeded", None, result))
    finally:
        conn.close()


def cancelled_said(job: JobRequest, push_refused: bool) -> str:
    """What a cancelled job says. Refused its push (a cancel came first), the job stopped inside the writer's staged
    output (`publish.writer.publish` pushes before the folder is moved into place): the staged folder was deleted,
    so the output is as it was before the job (absent, or an overwritten folder's old model) — never "written"."""
    if not push_refused:
        return "cancelled on request; nothing was written or pushed"
    said = "cancelled on request before its push began; nothing was written or pushed"
    return said + (f"; the output folder {str(job.output)!r} is as before" if job.output else "")


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then what it was raised from (`__cause__`), and so on: a library wraps a disk failure in its own
    error (a parent's download: `LoadError`) whose words are not the operator's fix."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__


def disk_failure_line(number: int, what: str) -> str:
    """A job's error for a disk failure (`errors.disk_error`): what the service's operator does about it, never the
    server's paths (the output root, the Hub cache)."""
    ask = "ask the service's operator to"
    if number == errno.EIO:
        return f"{what} on the service's disk: {ask} check that disk, then resubmit the job"
    fix = {errno.EROFS: "put the service's output root (--output-root) and Hub cache (HF_HOME) on a writable disk",
           EDQUOT: "free space or raise the quota"}.get(number, "free space")
    return (f"{what} on the service's disk while the job ran (its output, or the downloads it reads); nothing was "
            f"left half-written: {ask} {fix}, then resubmit the job")


def report_failure(reporter: Reporter, error: Exception) -> None:
    """The job failed: one line (`Type: message`) as its error and in its log; the traceback to the server's log
    (`("traceback", level, text)`), at debug level for an `EXPECTED` error, at error level for any other."""
    disk = next((found for cause in causes(error) if (found := disk_error(cause)) is not None), None)
    if disk is not None:  # the operator's to fix, in the service's words (never the server's paths)
        line = disk_failure_line(disk[0], disk[1])
    else:
        line = reporter.scrub(f"{type(error).__name__}: {hub_error_line(error)}")
    expected = disk is not None or isinstance(error, EXPECTED)
    said = line if expected else f"{line} (an unexpected error: its traceback is in the service's log)"
    reporter.say(logging.ERROR, f"the job failed: {said}")
    trace = reporter.scrub("".join(traceback.format_exception(error)).rstrip())
    reporter.send(("traceback", logging.DEBUG if expected else logging.ERROR, trace))
    reporter.send(("done", "failed", line, None))


def _needs_calibration(job: JobRequest) -> bool:
    """Whether the job reads calibration data (its progress then has a calibrate phase); `auto` (no registered
    method: it chooses one in the merge) reads what it is given."""
    from hf_mudsc.methods.auto import is_auto
    from hf_mudsc.methods.registry import get_method

    if is_auto(job.recipe.method):
        return bool(job.recipe.calibration)
    return bool(get_method(job.recipe.method).needs_calibration)


def _expected_batches(job: JobRequest) -> int | None:
    """Forward batches of calibration (both parents), when `num_samples` says how many samples are read."""
    samples = job.recipe.num_samples
    return 2 * -(-samples // job.recipe.batch_size) if samples else None


def dry_run_plan(job: JobRequest, token: str | None) -> dict[str, Any]:
    """The dry run's answer: `hf_mudsc.merge(..., dry_run=True)` — configs and safetensors headers only, nothing
    downloaded or written — as JSON (`plan`) and as the text the CLI prints (`plan_text`, shown on the job page)."""
    import hf_mudsc

    recipe = job.recipe
    plan = hf_mudsc.merge(list(recipe.models), recipe.calibration, **{**recipe.keywords(), "dry_run": True},
                          token=token, progress=False)
    if plan.base_source is not None and recipe.base is None:  # the base the cards name is an input too, as the
        check_found_base(recipe, plan.base, None)  # CLI's dry run and the job itself refuse it (no output written)
    if recipe.push_to_hub:  # the repo is looked up when the merge runs, not by its dry run
        plan.warnings.append(push_not_checked(recipe.push_to_hub))
    plan.warnings[:0] = [w for w in job.warnings if w not in plan.warnings]  # the request's own (`parse_job`)
    return {"plan": plan.to_dict(), "plan_text": str(plan), "repo_id": None, "commit": None, "output": None,
            "eval": None}


@contextlib.contextmanager
def forward_progress(reporter: Reporter, expected: int | None, delay: float = 0.0) -> Iterator[None]:
    """Inside the block, every whole-model forward (one batch of one parent or of the merged model: calibration, a
    data method's own pass, the refit, evaluation) is a progress step (`Reporter.batch`) and a cancel point; `delay`:
    the test-only sleep per batch. The global hooks are removed on leaving."""
    import torch
    from transformers import PreTrainedModel

    depth = [0]  # nesting of whole-model forwards: a ViTForImageClassification runs its ViTModel inside

    def before_forward(module: torch.nn.Module, args: Any) -> None:
        if isinstance(module, PreTrainedModel):
            depth[0] += 1
            if depth[0] == 1:
                reporter.batch(expected)
                if delay:
                    reporter.wait(delay)
        reporter.checkpoint()

    def after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, PreTrainedModel):
            depth[0] = max(0, depth[0] - 1)

    # `always_call`: a forward a pass stops early (its hook raises once the inputs it needs are read: the refit,
    # regmean_plusplus) still ends its nesting, or every later batch would count as nested and move nothing.
    handles = [torch.nn.modules.module.register_module_forward_pre_hook(before_forward),
               torch.nn.modules.module.register_module_forward_hook(after_forward, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def push_failed(job: JobRequest, error: PushError) -> PushError:
    """A failed push as a service client reads it. The writer keeps a push-only merge in the temp folder
    (`hf-mudsc-unpushed-*`) and names it with an `hf-mudsc push` command, for a CLI user: on the server that folder is
    removed (no client can reach it; every such job would leave a whole model behind), and the error names neither
    it nor the command. A merge written to an `output` stays there, named as the client named it (`public`)."""
    from hf_mudsc.publish.writer import UNPUSHED_PREFIX

    said = str(error)
    if KEPT not in said:  # not the writer's failed push (nothing was kept): as the library said it
        return error
    cause = hub_error_line(error.__cause__) if error.__cause__ is not None else said.split(f" — {KEPT}")[0]
    repo = job.recipe.push_to_hub
    if job.recipe.output is not None:
        return PushError(f"the push to {repo!r} failed: {cause}; the merged model is kept in the output folder "
                         f"{str(job.recipe.output)!r}")
    for kept in Path(tempfile.gettempdir()).glob(f"{UNPUSHED_PREFIX}*"):
        if str(kept) in said:  # this job's own: never a folder a CLI run on the same machine kept
            shutil.rmtree(kept, ignore_errors=True)
    return PushError(f"the push to {repo!r} failed: {cause}; the merged model was not kept (the job names no "
                     "`output`): resubmit the job, with an `output` to keep the model on the service if a push fails")


def run_merge(job: JobRequest, token: str | None, reporter: Reporter) -> dict[str, Any]:
    """Merge, write and push exactly as `hf-mudsc merge` does (`hf_mudsc.runner.execute`, the one writer)."""
    reporter.enter("load")
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay:
        reporter.wait(delay)
    from hf_mudsc.load.parents import BASE_FROM_CARDS
    from hf_mudsc.load.references import license_conflict
    from hf_mudsc.runner import execute

    try:
        with forward_progress(reporter, _expected_batches(job), delay):
            produced = execute(job.recipe, token=token, base_origin=BASE_FROM_CARDS if job.base_from_cards else None)
    except PushError as error:
        said = push_failed(job, error)
        if said is error:
            raise
        raise said from error.__cause__
    push = produced.get("push")
    output = produced.get("output")
    files = sorted(p.name for p in output.iterdir() if p.is_file() and not p.name.startswith(".")) if output else []
    ran = produced.get("mudsc") or {}
    # logged by the merge only (its card declares no licence): a client reads it among the job's warnings
    licences = ran.get("parent_licenses")
    conflict = license_conflict(licences, ran.get("base_license"), ran.get("base") is not None) if licences else None
    return {
        "repo_id": push.repo_id if push else None,
        "commit": push.commit_sha if push else None,
        "url": push.url if push else None,
        "output": str(output) if output else None,
        "files": files,
        "calibration_samples": produced.get("calibration_samples"),
        "eval": None,
        # what ran, as the card records it: the method and α `auto` chose (and why), the refit, the dtype
        **{key: ran[key] for key in ("method", "method_choice_reason", "alpha", "alpha_auto", "refit", "out_dtype",
                                     "matcher") if key in ran},
        # the request's own warnings, then the merge's (config.mudsc["warnings"], as its card lists them)
        "warnings": list(dict.fromkeys([*job.warnings, *(ran.get("warnings") or []),
                                        *([conflict] if conflict else [])])),
        **({"parent_licenses": licences, "base_license": ran.get("base_license")} if licences else {}),
        # which model the job wrote (`weights_fingerprint`): the page serves the folder's card and plots only while
        # it still holds that model, not a later job's that replaced the folder (`app.output_folder`)
        "output_fingerprint": weights_fingerprint(output) if output else None,
    }
