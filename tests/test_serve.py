"""`hf-mudsc serve` end to end: the service in a subprocess on a free port, parents and pushes on the Hub emulator.

Merges use tiny ViTs (tests/factories.py) and `weight_matching` where the method does not matter; tests that need
a job to stay running (cancel, kill) set the service's test-only delay (`HF_MUDSC_SERVE_TEST_DELAY`, documented
in hf_mudsc/serve/worker.py) so each forward pass of calibration takes a moment.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from serve_service import Service, alive, drain_job, files_containing
from test_cli import save_parents_and_data

from hf_mudsc.errors import RecipeError
from hf_mudsc.serve.jobs import parse_job, service_advice
from hf_mudsc.serve.store import (
    RESTARTED_RUNNING,
    RESTARTED_TOKEN,
    STOPPED_RUNNING,
    JobStore,
    StoreError,
    TargetClaimedError,
)
from hf_mudsc.serve.worker import ForwardHandler, JobCancelled, Reporter

SECRET = "hf_serveSecretTokenThatMustNeverLeak42"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("serve_inputs"))


@pytest.fixture()
def hub(hub_emulator, inputs):
    a, b, _ = inputs
    hub_emulator.upload_folder("user/a", a, "parent A")
    hub_emulator.upload_folder("user/b", b, "parent B")
    return hub_emulator


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial-" in p.name)


# ---------------------------------------------------------------------------------------------- unit: requests


def test_a_bad_request_names_the_offending_key(tmp_path):
    base = {"models": ["user/a", "user/b"], "method": "weight_matching", "output": "m"}
    cases = [
        ({**base, "alpah": 0.3}, "['alpah']"),
        ({**base, "alpha": 3}, "alpha"),
        ({**base, "models": ["user/a"]}, "two or more parent models"),
        ({**base, "method": "nope"}, "method"),
        ({**base, "output": "../escape"}, "`output` must name a folder inside"),
        ({**base, "output": "/etc"}, "`output` must name a folder inside"),
        ({**base, "output": "a\x00b"}, "`output` must not contain a NUL byte"),
        ({**base, "output": "x" * 300}, "`output` has a folder name longer than 255 bytes"),
        ({**base, "output": "a\ud800"}, "not valid Unicode"),
        ({**base, "models": ["user/a", "user/b\udcff"]}, "not valid Unicode"),
        ({**base, "allow_pickle": True}, "`allow_pickle` is refused"),
        ({**base, "dry_run": "yes"}, "`dry_run`"),
        ({"models": ["user/a", "user/b"], "method": "weight_matching"}, "say where the merged model goes"),
        ({**base, "method": "zipit"}, "needs calibration data"),
        (["user/a", "user/b"], "must be a mapping"),
    ]
    for body, fragment in cases:
        with pytest.raises(RecipeError) as caught:
            parse_job(body, tmp_path)
        assert fragment in str(caught.value), (body, str(caught.value))
    job = parse_job({**base, "output": "sub/m"}, tmp_path)
    assert job.output == str((tmp_path / "sub" / "m").resolve()) and not job.dry_run
    assert parse_job({"models": ["user/a", "user/b"], "method": "average"}, tmp_path, dry_run=True).dry_run


def test_what_the_library_refuses_before_loading_is_refused_at_post_not_by_a_failed_job(tmp_path):
    """An existing output, a size the method cannot spend, options the method refuses, a reference or repo id that
    is no Hub id: the CLI refuses them before loading, but the service queued them (201) and the job failed in its
    worker — with a message naming the CLI's --overwrite, or a Hub id's newline in it."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("someone's file")
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    base = {"models": ["user/a", "user/b"], "method": "weight_matching", "output": "m"}
    cases = [
        # overwrite would refuse it too (not written by hf-mudsc): the reason at once, not advice refused in turn
        ({**base, "output": "taken"}, "would not replace it: it is not a folder written by hf-mudsc"),
        ({**base, "output": "empty"}, "already exists; pass overwrite"),
        ({**base, "output": "taken", "overwrite": True}, "not a folder written by hf-mudsc"),
        ({**base, "output": "a-file/m"}, "which is not a folder"),
        ({**base, "method": "average", "size": 1.5}, "cannot spend size=1.5"),
        ({**base, "models": ["user/a", "user/b", "user/c"], "reference_compat": True}, "reference_compat"),
        ({**base, "models": ["user/a", "user/b\x00"]}, "`models[1]`"),
        ({**base, "models": ["user/a", "user/b\nINJECTED line"]}, "`models[1]`"),
        ({**base, "base": "bad//base", "method": "task_arithmetic"}, "`base`"),
        ({**base, "push_to_hub": "<x>/y"}, "`push_to_hub`"),
        ({**base, "push_to_hub": "../x"}, "`push_to_hub`"),
    ]
    for body, fragment in cases:
        with pytest.raises(RecipeError) as caught:
            parse_job(body, tmp_path)
        message = str(caught.value)  # as the client reads it (`service_advice`: a key, not a CLI flag)
        said = service_advice(message)
        assert fragment in message + said and "\n" not in message and "--overwrite" not in message, (body, message)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    assert parse_job({**base, "push_to_hub": "user/ok.name-1_x"}, tmp_path).repo_id == "user/ok.name-1_x"


def tiny_vit_config(folder: Path) -> None:
    """A parent's config.json alone (POST reads no weights): its largest tensor has 128 entries."""
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8,
              patch_size=4, num_channels=1, architectures=["ViTModel"]).save_pretrained(folder)


def test_a_density_that_keeps_nothing_is_refused_at_post_when_parent_a_is_a_local_folder(tmp_path):
    """The method's shape check (`check_shapes`: a DARE/breadcrumbs density keeping no entry of any tensor) ran
    only in the worker: POST accepted the job, which then failed. It runs at POST — the same check as the CLI's —
    when parent A is a local folder; a Hub parent is left to the worker, even one in the server's Hub cache (its
    shapes in a refusal would describe a private model to a client without its token)."""
    from huggingface_hub import constants

    from hf_mudsc.serve.app import create_app

    root = tmp_path / "root"
    for name in ("a", "b", "base"):
        tiny_vit_config(root / name)
    snapshot = Path(constants.HF_HUB_CACHE) / "models--shapes--cached-vit" / "snapshots" / ("0" * 40)
    tiny_vit_config(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    local = {"models": [str(root / "a"), str(root / "b")], "base": str(root / "base"), "method": "dare_ties",
             "output": "m"}
    for method in ("dare_ties", "breadcrumbs", "dare_linear"):
        with pytest.raises(RecipeError) as caught:
            parse_job({**local, "method": method, "density": 0.001}, tmp_path / "out", local_roots=[root])
        message = str(caught.value)
        assert "density 0.001" in message and "128 entries" in message and "\n" not in message, message
        assert parse_job({**local, "method": method, "density": 0.5}, tmp_path / "out",
                         local_roots=[root]).recipe.density == 0.5
    for hub_parent in ("shapes/cached-vit", "user/not-cached"):  # the worker checks these
        hub = {"models": [hub_parent, "user/b"], "method": "breadcrumbs", "output": "m", "density": 0.001}
        assert parse_job(hub, tmp_path / "out").recipe.density == 0.001

    app = create_app(tmp_path / "state", local_roots=[root])
    from fastapi.testclient import TestClient

    answer = TestClient(app, base_url="http://127.0.0.1").post("/api/jobs", json={**local, "density": 0.001})
    assert answer.status_code == 400 and "density" in answer.json()["error"], answer.text
    assert app.state.store.list() == []


def test_a_destination_key_of_the_wrong_type_is_named_as_the_jobs_not_the_command_lines(tmp_path):
    """`output: 5` answered "command line: `output` must be str": a client of the service has no command line."""
    base = {"models": ["user/a", "user/b"], "method": "average", "output": "m"}
    for key, value in (("output", 5), ("push_to_hub", ["me/x"]), ("private", "yes"), ("overwrite", 1)):
        with pytest.raises(RecipeError) as caught:
            parse_job({**base, key: value}, tmp_path)
        message = str(caught.value)
        assert message.startswith(f"job: `{key}` must be") and "command line" not in message, message


def test_an_output_name_with_control_characters_is_refused(tmp_path):
    """`output: "m\\n2026-12-01 ERROR ..."` made a folder whose name split the job's log lines (a forged line) and the
    card's `# title`; any printable name, Unicode included, is still a folder name."""
    base = {"models": ["user/a", "user/b"], "method": "average"}
    for name in ("m\n2026-12-01 00:00:00 ERROR forged", "m\r", "a\tb", "m\x1b[31m", "m\x7f", "m\x85"):
        with pytest.raises(RecipeError) as caught:
            parse_job({**base, "output": name}, tmp_path)
        message = str(caught.value)
        assert "`output` must not contain control characters" in message and "\n" not in message, message
    assert parse_job({**base, "output": "fusion-é-融合 v2"}, tmp_path).output.endswith("fusion-é-融合 v2")


def test_a_name_with_bidirectional_overrides_is_refused(tmp_path):
    """U+202E (right-to-left override) and its kin make a name display as another (`merged\u202eetad.pkl`
    reads `mergedlkp.adate`) on the page, in logs and the card: refused like control characters."""
    base = {"models": ["user/a", "user/b"], "method": "average", "output": "m"}
    for key, value in (("output", "merged\u202eetad"), ("output", "a\u2066b\u2069"), ("text_column", "te\u202ext")):
        with pytest.raises(RecipeError) as caught:
            parse_job({**base, key: value}, tmp_path)
        assert f"`{key}` must not contain control characters" in str(caught.value), str(caught.value)
    assert parse_job({**base, "output": "מיזוג-merged"}, tmp_path).output.endswith("מיזוג-merged")  # RTL text is fine


def test_an_unknown_key_answer_lists_each_valid_key_once(tmp_path):
    """It listed `dry_run` twice: once as a recipe key, once as the service's own."""
    with pytest.raises(RecipeError) as caught:
        parse_job({"models": ["user/a", "user/b"], "method": "average", "output": "m", "alpah": 1}, tmp_path)
    listed = str(caught.value).split("valid keys are: ")[1].split(", ")
    assert "dry_run" in listed and "output" in listed and len(listed) == len(set(listed)), listed


def test_the_web_process_does_not_import_the_merge_engine(tmp_path):
    """The app and a validated job need no torch: only worker processes import it."""
    script = (
        "import sys\n"
        "from hf_mudsc.serve.app import create_app\n"
        "from hf_mudsc.serve.jobs import parse_job\n"
        f"create_app({str(tmp_path)!r})\n"
        f"parse_job({{'models': ['a/b', 'c/d'], 'method': 'mudsc', 'calibration': 'org/x:train', 'output': 'o'}}, "
        f"__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


class FakePipe:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, message: tuple) -> None:
        self.sent.append(message)


def record(name: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, (), None)


def test_the_worker_maps_pipeline_records_to_phases_scrubs_the_token_and_cancels_until_the_push_begins():
    pipe = FakePipe()
    reporter = Reporter(pipe, SECRET, calibrates=True, asks_before_push=False)
    handler = ForwardHandler(reporter)
    reporter.enter("load")
    handler.emit(record("hf_mudsc.load.parents", "loaded user/a"))
    handler.emit(record("hf_mudsc.load.relation", "parents: independent"))
    reporter.batch(expected=4)
    reporter.batch(expected=4)
    handler.emit(record("hf_mudsc.pipeline", "calibrated on 16 samples: mudsc's statistics"))
    handler.emit(record("hf_mudsc.solve.loop", "solve: 7 sweeps, best objective 0.2"))
    handler.emit(record("hf_mudsc.load.parents", f"a line that quotes {SECRET} by mistake"))
    reporter.log("a server path that is not UTF-8: /data/caf\udce9")  # os.fsdecode's surrogateescape
    phases = [m[1:] for m in pipe.sent if m[0] == "phase"]
    assert phases == [("load", 0.02), ("calibrate", 0.2), ("calibrate", 0.298), ("calibrate", 0.396),
                      ("solve", 0.6), ("apply", 0.75)]
    lines = [m[1] for m in pipe.sent if m[0] == "log"]
    assert len(lines) == 6 and lines[-2].endswith("a line that quotes *** by mistake")
    assert lines[-1] == "a server path that is not UTF-8: /data/caf\\udce9"  # storable: SQLite takes UTF-8 only
    assert not any(SECRET in str(m) for m in pipe.sent)

    reporter.cancel.set()  # a cancel: the next record (or batch) raises
    with pytest.raises(JobCancelled):
        handler.emit(record("hf_mudsc.pipeline", "merged user/a and user/b with zipit"))
    assert reporter.phase == "publish"
    with pytest.raises(JobCancelled):
        reporter.checkpoint()  # writing the folder: still cancellable (the staging folder is dropped)
    handler.emit(record("hf_mudsc.publish.hub", "waiting for the Hub: creating the repo 'user/m'"))
    reporter.checkpoint()  # the push has begun: it completes
    handler.emit(record("hf_mudsc.publish.hub", "pushed /x to user/m (commit abc)"))
    assert pipe.sent[-1] == ("phase", "publish", 0.99)


def _merge_phases(parents, batches, **options) -> list[tuple[str, float]]:
    """The ("phase", name, progress) events a job's worker sends while `hf_mudsc.merge` runs: its log records and its
    whole-model forwards reach a Reporter as they do in `run_merge`."""
    import hf_mudsc
    from hf_mudsc.serve.worker import forward_progress

    pipe = FakePipe()
    reporter = Reporter(pipe, None, calibrates=True, asks_before_push=False)
    handler = ForwardHandler(reporter)
    library = logging.getLogger("hf_mudsc")
    level = library.level
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        reporter.enter("load")
        with forward_progress(reporter, expected=None):
            hf_mudsc.merge(parents, batches, progress=False, **options)
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
    return [m[1:] for m in pipe.sent if m[0] == "phase"]


def test_the_progress_moves_during_the_same_base_methods_pass_after_the_check():
    """method auto on fine-tunes of one base: the check's statistics (calibrate), its solve (solve) — or, since
    session 37, its first start alone, whose log line marks the same point — then regmean's own pass over the data,
    which runs in the apply phase: the bar stood still there for the whole pass. Each of its batches now moves it, as
    calibration's do, and never past the next phase's start."""
    from factories import make_batches
    from test_refit import same_base_fine_tunes

    phases = _merge_phases(same_base_fine_tunes(), make_batches("vit_cls", num_batches=4), refit="none")
    names = [name for name, _ in phases]
    assert names[:2] == ["load", "calibrate"] and "solve" in names and names[-1] == "publish"
    progress = [value for _, value in phases]
    assert progress == sorted(progress)  # never back
    applied = [value for name, value in phases if name == "apply"]
    assert len(applied) >= 1 + 2 * 4  # entering apply, then regmean's pass: 4 batches of each of the 2 parents
    assert applied == sorted(set(applied)) and applied[0] == 0.75 and applied[-1] < 0.8


def test_the_progress_moves_during_every_refit_pass():
    """The refit's passes stop each forward early (once the layer's inputs are read): the batches after the first
    pass still move the bar (a forward left by an exception used to leave the hooks counting nested forwards)."""
    from factories import make_batches, make_model

    phases = _merge_phases([make_model("vit_cls", 0), make_model("vit_cls", 1)], make_batches("vit_cls", 2),
                           method="average", refit="ridge")
    built = [value for name, value in phases if name == "build"]
    assert len(built) > 10 and built == sorted(set(built)) and built[0] == 0.8 and built[1] < 0.81 and built[-1] < 0.9


@pytest.mark.parametrize("calibration", [None, "org/data:train"])
def test_a_job_with_the_default_method_auto_runs_in_its_worker(tmp_path, monkeypatch, calibration):
    """`method: auto` (the default) without calibration crashed the worker before it reported anything
    (get_method('auto')): the job failed as "the worker process died ... out of memory", whatever it asked."""
    import threading

    from hf_mudsc.serve import worker

    class Conn:
        def __init__(self):
            self.sent, self.first = [], True

        def recv(self):
            if self.first:
                self.first = False
                return {"token": None}
            threading.Event().wait()  # the web process never cancels

        def send(self, message):
            self.sent.append(message)

        def close(self):
            pass

    ran = []
    monkeypatch.setattr(worker, "run_merge", lambda job, token, reporter: ran.append(job) or {"output": None})
    request = parse_job({"models": ["user/a", "user/b"], "output": "m", "calibration": calibration}, tmp_path)
    assert request.recipe.method == "auto"
    conn = Conn()
    library = logging.getLogger("hf_mudsc")
    handlers, propagate, level = list(library.handlers), library.propagate, library.level
    # The worker ignores SIGINT (its own process; the server cancels it): left so in this test's process, every
    # later subprocess inherited SIG_IGN, and the Ctrl-C test's merge in the same xdist worker never stopped.
    interrupt = signal.getsignal(signal.SIGINT)
    try:
        worker.main(conn, "job1", request.to_dict())
    finally:
        library.handlers[:], library.propagate = handlers, propagate
        library.setLevel(level)
        signal.signal(signal.SIGINT, interrupt)
    assert len(ran) == 1 and conn.sent[-1] == ("done", "succeeded", None, {"output": None}), conn.sent


def test_store_claims_targets_and_recovers_after_a_restart(tmp_path):
    store = JobStore(tmp_path)
    running = store.add({"models": []}, output="/o/1", repo_id="me/one", dry_run=False, has_token=False)
    store.update(running, status="running", phase="solve", progress=0.6)
    with pytest.raises(TargetClaimedError, match="claimed by job " + running):
        store.add({}, output="/o/1", repo_id=None, dry_run=False, has_token=False)
    with pytest.raises(TargetClaimedError, match="Hub repo 'me/one'"):
        store.add({}, output="/o/2", repo_id="me/one", dry_run=False, has_token=False)
    with pytest.raises(TargetClaimedError, match="Hub repo 'Me/ONE'"):  # the Hub's names ignore case
        store.add({}, output="/o/2", repo_id="Me/ONE", dry_run=False, has_token=False)
    with_token = store.add({}, output="/o/2", repo_id="me/two", dry_run=False, has_token=True)
    without = store.add({}, output="/o/3", repo_id=None, dry_run=False, has_token=False)
    store.close()

    again = JobStore(tmp_path)
    assert sorted(again.recover()) == sorted([running, with_token])
    assert (again.get(running)["status"], again.get(running)["error"]) == ("failed", RESTARTED_RUNNING)
    assert (again.get(with_token)["status"], again.get(with_token)["error"]) == ("failed", RESTARTED_TOKEN)
    assert "resubmit with a token" in RESTARTED_TOKEN
    assert again.queued() == [without]
    # A finished job releases its target.
    assert again.add({}, output="/o/1", repo_id="me/one", dry_run=False, has_token=False)


def test_an_output_inside_or_around_one_an_active_job_writes_is_claimed_too(tmp_path):
    """`nest/inner` while `nest` is written (or the reverse) was accepted: the inner job's folder made `nest` exist,
    so the outer job failed after its whole merge ("already exists"), or the inner one wrote into its output."""
    store = JobStore(tmp_path)
    outer = store.add({}, output="/o/nest", repo_id=None, dry_run=False, has_token=False)
    for clash in ("/o/nest/inner", "/o/nest/a/b", "/o"):
        with pytest.raises(TargetClaimedError, match=f"claimed by job {outer}"):
            store.add({}, output=clash, repo_id=None, dry_run=False, has_token=False)
    assert store.add({}, output="/o/nest2", repo_id=None, dry_run=False, has_token=False)  # a sibling, not inside
    store.finish_if_active(outer, "succeeded")  # the claim ends with the job (the writer checks the folder itself)
    assert store.add({}, output="/o/nest/inner", repo_id=None, dry_run=False, has_token=False)


def test_a_job_may_not_write_over_what_an_active_job_reads_nor_read_what_one_writes(tmp_path, monkeypatch):
    """QA: with the output root inside a --local-root, job 2 read `<root>/fresh` (job 1's output) as a parent while
    job 3 (`output: fresh, overwrite: true`) was accepted and replaced it: only outputs were claimed, not inputs. Now
    an output over an active job's input, and an input inside an active job's output, answer 409 naming no server
    path."""
    from fastapi.testclient import TestClient

    from hf_mudsc.publish.folder import MARKER_FILENAME
    from hf_mudsc.serve.app import create_app

    root = tmp_path / "root"
    (root / "other").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    app = create_app(tmp_path / "state", output_root=root, local_roots=[root])
    client = TestClient(app, base_url="http://127.0.0.1")

    def post(**body):
        return client.post("/api/jobs", json={"method": "weight_matching", **body})

    first = post(models=["user/a", "user/b"], output="fresh")
    assert first.status_code == 201, first.text
    reads_it = post(models=[str(root / "fresh"), "user/b"], output="second")  # job 1 is still writing `fresh`
    assert reads_it.status_code == 409, reads_it.text
    message = reads_it.json()["error"]
    assert "`models[0]` reads the output folder 'fresh' of job " + first.json()["id"] in message, message
    assert str(root) not in message and "\n" not in message
    store = app.state.store
    store.finish_if_active(first.json()["id"], "succeeded")
    (root / "fresh").mkdir()  # what job 1 wrote (a missing local input is refused at POST)
    marker = {"written_by": "hf-mudsc", "complete": True, "files": {}}
    (root / "fresh" / MARKER_FILENAME).write_text(json.dumps(marker))
    second = post(models=[str(root / "fresh"), "user/b"], output="second")
    assert second.status_code == 201, second.text
    # (`fresh/inner` is refused at POST now: it lies inside a folder hf-mudsc wrote; `other` is a plain folder)
    third = post(models=[str(root / "other"), "user/b"], output="third")
    assert third.status_code == 201, third.text
    for output, reader in (("fresh", second), ("other/inner", third)):  # the input itself, a folder inside one
        answer = post(models=["user/a", "user/b"], output=output, overwrite=True)
        assert answer.status_code == 409, (output, answer.text)
        message = answer.json()["error"]
        assert f"job {reader.json()['id']} (queued)" in message and "inputs are never modified" in message, message
        assert str(root) not in message and str(tmp_path) not in message, message
    base = post(models=["user/a", "user/b"], base=str(root / "second"), method="task_arithmetic", output="t")
    assert base.status_code == 409 and "`base` reads the output folder 'second'" in base.json()["error"], base.text
    assert post(models=["user/a", "user/b"], output="elsewhere").status_code == 201
    assert post(models=["user/a", "user/b"], output="dry", dry_run=True).status_code == 201


def test_an_output_inside_a_finished_jobs_output_folder_is_refused_at_post(tmp_path):
    """QA: after job `race2` finished, `output: race2/inner` was accepted and written inside it; then `race2` with
    `overwrite` was refused for good. Now 400 at POST, one line naming the output as the client gave it."""
    from hf_mudsc.publish.folder import staged_output

    outputs = tmp_path / "out"
    with staged_output(outputs / "race2") as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
    body = {"models": ["user/a", "user/b"], "method": "weight_matching"}
    for inner in ("race2/inner", "race2/a/b"):
        with pytest.raises(RecipeError) as caught:
            parse_job({**body, "output": inner}, outputs)
        message = str(caught.value)
        assert message.startswith(f"refusing output {inner!r}: it lies inside 'race2', a model folder hf-mudsc "
                                  "wrote"), message
        assert str(tmp_path) not in message and "\n" not in message
    assert parse_job({**body, "output": "race2", "overwrite": True}, outputs).output == str(outputs / "race2")
    assert parse_job({**body, "output": "race3/inner"}, outputs)


def test_clients_see_the_output_as_they_named_it_never_the_servers_path(tmp_path):
    """QA: `result.output`, `recipe.output` (GET /api/jobs, the job page) and the log showed `/tmp/.../out/m1`,
    while refusals name `output` as the client gave it. Now every answer names it relative to the output root."""
    from fastapi.testclient import TestClient

    from hf_mudsc.publish.folder import staged_output
    from hf_mudsc.serve.app import create_app

    outputs = tmp_path / "out"
    app = create_app(tmp_path / "state", output_root=outputs)
    client = TestClient(app, base_url="http://127.0.0.1")
    answer = client.post("/api/jobs", json={"models": ["user/a", "user/b"], "method": "weight_matching",
                                            "output": "runs/m1"})
    assert answer.status_code == 201, answer.text
    job_id = answer.json()["id"]
    folder = outputs / "runs" / "m1"
    with staged_output(folder) as staging:
        (staging / "README.md").write_text("# card\n")
    store = app.state.store
    assert store.get(job_id)["request"]["output"] == str(folder.resolve())  # the server keeps its path
    store.append_log(job_id, [f"INFO hf_mudsc.publish.writer: wrote {folder.resolve()}"])
    store.update(job_id, status="succeeded", result={"output": str(folder.resolve()), "files": ["README.md"]})
    for path in ("/api/jobs", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/log", f"/jobs/{job_id}"):
        text = client.get(path).text
        assert str(outputs) not in text and str(outputs.resolve()) not in text and str(tmp_path) not in text, path
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["result"]["output"] == "runs/m1" and job["recipe"]["output"] == "runs/m1", job
    assert client.get(f"/api/jobs/{job_id}/log").json()["lines"] == ["INFO hf_mudsc.publish.writer: wrote runs/m1"]
    page = client.get(f"/jobs/{job_id}").text
    assert "runs/m1" in page and f"/jobs/{job_id}/files/README.md" in page
    assert client.get(f"/jobs/{job_id}/files/README.md").text == "# card\n"  # still found on the server's disk


@pytest.mark.parametrize("key", ["models[0]", "base", "calibration", "push_to_hub"])
def test_a_token_in_a_field_is_refused_with_the_services_advice_not_the_clis(tmp_path, key):
    """QA: a token-shaped `models[0]` (or `base`, `calibration`, `push_to_hub`) was refused with "pass a token with
    token= (CLI: --token, or the HF_TOKEN variable)": a service client sends it as `Authorization: Bearer`."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    body: dict = {"models": ["user/a", "user/b"], "method": "task_arithmetic", "output": "m"}
    if key == "models[0]":
        body["models"] = [SECRET, "user/b"]
    else:
        body[key] = SECRET
    if key == "calibration":
        body["method"] = "zipit"
    app = create_app(tmp_path / "state")
    answer = TestClient(app, base_url="http://127.0.0.1").post("/api/jobs", json=body)
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]
    assert SECRET not in message and "\n" not in message, message
    assert "Authorization: Bearer" in message and "--token" not in message and "token=" not in message, message
    assert app.state.store.list() == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupted_store_stops_the_service_in_one_line_and_is_left_as_it_was(tmp_path, damage):
    """A store file that is not SQLite (or lost its tail) made `hf-mudsc serve` die with a traceback."""
    store = JobStore(tmp_path / "state")
    for i in range(200):
        store.add({"models": ["a/b", "c/d"], "note": "x" * 2000}, output=f"/o/{i}", repo_id=None, dry_run=False,
                  has_token=False)
    store.close()
    path = tmp_path / "state" / "jobs.sqlite3"
    assert not (tmp_path / "state" / "jobs.sqlite3-wal").exists()  # closed: everything is in the main file
    if damage == "garbage":
        path.write_bytes(b"\x00not a database\xff" * 200)
    else:
        with open(path, "r+b") as file:
            file.truncate(path.stat().st_size // 2)
    damaged = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        JobStore(tmp_path / "state")
    message = str(caught.value)
    assert str(path) in message and "move it aside" in message and "\n" not in message, message
    done = subprocess.run([sys.executable, "-m", "hf_mudsc", "serve", "--state-dir", str(tmp_path / "state"),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and str(path) in done.stderr, done.stderr
    assert path.read_bytes() == damaged  # the operator decides what to do with it


# ---------------------------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def jobs_service(hub_emulator_session, inputs, tmp_path_factory):
    """One service for the tests whose jobs run and end while it keeps serving (the token in a URL, a push, a
    cancel, a crashed worker): each start costs a web process and a forkserver importing torch and transformers.
    Jobs run one at a time (one worker), each test's jobs end before it returns, and each test names its own
    outputs and repos; the tests that stop, kill or restart a service start their own. The calibration folder is a
    local root, and each batch's forward pass takes 0.4 s (the cancel and the crash catch their job mid-calibration;
    weight_matching, which the push test runs, has no forward pass to slow)."""
    _, _, calibration = inputs
    root = tmp_path_factory.mktemp("jobs_service")
    with Service(hub_emulator_session, root / "state", root / "server.log", delay=0.4,
                 extra=("--local-root", str(calibration.parent))) as service:
        yield service


def job_ids(service: Service) -> list[str]:
    """The ids the service's job list shows, newest first."""
    return [job["id"] for job in service.request("GET", "/api/jobs")[1]["jobs"]]


def server_log_once(service: Service, needle: str, timeout: float = 10) -> str:
    """The server's log once `needle` is in it (a line is written as the answer goes out, not after it)."""
    deadline = time.monotonic() + timeout
    while needle not in (log := service.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def test_a_token_put_in_a_url_never_reaches_the_server_log(jobs_service):
    """uvicorn's access log writes every request line whole: a token a client put in the query or the path (a
    mistake the API never asks for) was written to the server's log. Token-shaped text is redacted there."""
    service = jobs_service
    assert service.request("GET", f"/api/jobs?token={SECRET}")[0] == 200
    assert service.request("GET", f"/api/jobs/{SECRET}")[0] == 404
    assert service.request("GET", f"/api/jobs?limit=5&hf={SECRET}x")[0] == 200
    log = server_log_once(service, "GET /api/jobs?limit=5&hf=")
    assert "GET /api/jobs?token=" in log  # the request itself is still logged ...
    assert SECRET not in log and SECRET[3:] not in log, log  # ... without the token


def test_push_a_merge_poll_to_succeeded_and_load_it_by_repo_id(hub, local_hub, jobs_service, monkeypatch):
    service = jobs_service
    state = service.state_dir
    earlier = job_ids(service)  # the module's earlier tests' jobs
    status, answer = service.request("POST", "/api/jobs", {"models": ["user/a", "user/b"], "alpah": 1})
    assert status == 400 and "alpah" in answer["error"]
    status, answer = service.request("POST", "/api/jobs", {"models": ["user/a", "user/b"], "alpha": 2,
                                                           "push_to_hub": "user/x"})
    assert status == 400 and "alpha" in answer["error"]
    assert service.request("GET", "/api/jobs/nope")[0] == 404

    job_id = service.submit({"models": ["user/a", "user/b"], "method": "weight_matching",
                             "push_to_hub": "user/merged", "private": True, "output": "merged"}, token=SECRET)
    job = service.wait(job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["phase"] == "publish" and job["error"] is None
    result = job["result"]
    assert result["repo_id"] == "user/merged" and result["commit"] == hub.head("user/merged")
    assert result["output"] == "merged"  # as the client named it: the server's path is its own
    assert {"README.md", "model.safetensors", "mudsc_recipe.yaml"} <= set(result["files"])
    assert result["eval"] is None
    assert set(job) >= {"id", "status", "progress", "phase", "error", "result", "created", "updated"}
    assert hub.is_private("user/merged")
    assert hub.file_bytes("user/merged", "model.safetensors") == (
        state / "outputs" / result["output"] / "model.safetensors").read_bytes()

    assert job_ids(service) == [job_id, *earlier]  # the refused requests stored no job
    log = service.request("GET", f"/api/jobs/{job_id}/log")[1]
    assert any("pushed" in line and "user/merged" in line for line in log["lines"]), log
    tail = service.request("GET", f"/api/jobs/{job_id}/log?since={log['next'] - 1}")[1]
    assert tail["lines"] == log["lines"][-1:] and tail["next"] == log["next"]
    page = service.request("GET", "/")[1]
    assert job_id in page and "user/merged" in page and "succeeded" in page
    card = service.request("GET", f"/jobs/{job_id}/files/README.md")[1]
    assert card == (state / "outputs" / result["output"] / "README.md").read_text()
    assert service.request("GET", f"/jobs/{job_id}/files/..%2Fjobs.sqlite3")[0] == 404

    # Loaded by repo id with stock transformers, in this process against the emulator (conftest's `local_hub`), with
    # the emulator's token as a client's environment has it.
    from transformers import AutoModelForImageClassification

    monkeypatch.setenv("HF_TOKEN", hub.token)
    model = AutoModelForImageClassification.from_pretrained("user/merged")
    loaded = [type(model).__name__, model.config.mudsc["method"], model.config.mudsc["parents"]]
    assert loaded == ["ViTForImageClassification", "weight_matching", ["user/a", "user/b"]]
    assert not files_containing(state.parent, SECRET), "the token leaked into the state dir or the server log"


def test_cancel_a_running_job_leaves_nothing_and_a_second_job_on_its_target_gets_409(hub, inputs, jobs_service):
    _, _, calibration = inputs
    body = {"models": ["user/a", "user/b"], "method": "zipit", "calibration": str(calibration),
            "num_samples": 16, "batch_size": 4, "push_to_hub": "user/cancelled", "output": "cancelled"}
    service = jobs_service
    job_id = service.submit(body, token=SECRET)
    service.wait(job_id, until=lambda job: job["phase"] == "calibrate")
    for clash in ({**body, "output": "other"}, {**body, "push_to_hub": "user/other"}):
        status, answer = service.request("POST", "/api/jobs", clash, token=SECRET)
        assert status == 409 and job_id in answer["error"] and "claimed" in answer["error"], answer
    [worker] = service.workers()

    status, answer = service.request("DELETE", f"/api/jobs/{job_id}")
    assert status == 202 and answer["id"] == job_id
    job = service.wait(job_id)
    assert job["status"] == "cancelled" and "nothing was written or pushed" in job["error"], job
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the cancelled job's worker process is still running"
    outputs = service.state_dir / "outputs"
    assert not (outputs / "cancelled").exists() and partials(outputs) == []
    assert not hub.repo_exists("user/cancelled")
    assert service.request("DELETE", f"/api/jobs/{job_id}")[0] == 409  # already finished

    # A queued job is cancelled at once; the target is free again.
    first = service.submit({**body, "output": "one", "push_to_hub": None}, token=SECRET)
    queued = service.submit({**body, "output": "two", "push_to_hub": None})
    assert service.request("DELETE", f"/api/jobs/{queued}")[0] == 202
    assert service.job(queued)["status"] == "cancelled"
    service.request("DELETE", f"/api/jobs/{first}")
    assert service.wait(first)["status"] == "cancelled"
    assert not files_containing(service.state_dir.parent, SECRET)


def test_a_crashing_worker_fails_its_job_and_the_service_keeps_serving(hub, inputs, jobs_service):
    _, _, calibration = inputs
    service = jobs_service
    job_id = service.submit({"models": ["user/a", "user/b"], "method": "zipit", "calibration": str(calibration),
                             "num_samples": 16, "batch_size": 4, "output": "crash"})
    service.wait(job_id, until=lambda job: job["phase"] == "calibrate")
    [worker] = service.workers()
    subprocess.run(["kill", "-9", str(worker)], check=True)
    job = service.wait(job_id)
    assert job["status"] == "failed" and "worker process died (exit code -9)" in job["error"], job
    dry = service.submit({"models": ["user/a", "user/b"], "method": "average", "dry_run": True})
    plan = service.wait(dry)
    assert plan["status"] == "succeeded", plan
    assert [p["reference"] for p in plan["result"]["plan"]["parents"]] == ["user/a", "user/b"]
    assert plan["result"]["plan"]["method"] == "average"
    assert plan["result"]["plan_text"].startswith("Dry run: nothing was downloaded but configs and safetensors")
    assert partials(service.state_dir / "outputs") == []


def test_kill_the_server_mid_job_and_restart(hub, inputs, tmp_path):
    _, _, calibration = inputs
    slow = {"models": ["user/a", "user/b"], "method": "zipit", "calibration": str(calibration),
            "num_samples": 16, "batch_size": 4}
    state, log = tmp_path / "state", tmp_path / "server.log"
    service = Service(hub, state, log, delay=0.5, extra=("--local-root", str(calibration.parent)))
    try:
        running = service.submit({**slow, "push_to_hub": "user/killed", "output": "killed"}, token=SECRET)
        with_token = service.submit({"models": ["user/a", "user/b"], "method": "weight_matching",
                                     "push_to_hub": "user/queued"}, token=SECRET)
        without = service.submit({"models": ["user/a", "user/b"], "method": "weight_matching", "output": "later"})
        service.wait(running, until=lambda job: job["phase"] == "calibrate")
        [worker] = service.workers()
    finally:
        service.kill()
    deadline = time.monotonic() + 15
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the orphaned worker kept running after the server was killed"

    with Service(hub, state, log) as service:
        jobs = {job["id"]: job for job in service.request("GET", "/api/jobs")[1]["jobs"]}
        assert set(jobs) == {running, with_token, without}
        assert (jobs[running]["status"], jobs[running]["error"]) == ("failed", RESTARTED_RUNNING)
        assert jobs[with_token]["status"] == "failed" and "resubmit with a token" in jobs[with_token]["error"]
        later = service.wait(without)
        assert later["status"] == "succeeded", later
        assert Path(state, "outputs", later["result"]["output"], "model.safetensors").is_file()
    outputs = state / "outputs"
    assert not (outputs / "killed").exists() and partials(outputs) == []
    assert not hub.repo_exists("user/killed") and not hub.repo_exists("user/queued")
    assert not files_containing(tmp_path, SECRET), "the token leaked into the state dir or the server log"


def test_stopping_the_server_mid_job_fails_the_job_it_does_not_say_cancelled_on_request(hub, inputs, tmp_path):
    """QA: kill -TERM the server while a job runs, restart, GET the job: "cancelled on request; nothing was written or
    pushed", though nobody asked for a cancel. Now: failed, saying the service stopped and to resubmit."""
    import signal

    _, _, calibration = inputs
    state, log = tmp_path / "state", tmp_path / "server.log"
    service = Service(hub, state, log, delay=0.5, extra=("--local-root", str(calibration.parent)))
    try:
        running = service.submit({"models": ["user/a", "user/b"], "method": "zipit", "calibration": str(calibration),
                                  "num_samples": 16, "batch_size": 4, "output": "stopped"})
        service.wait(running, until=lambda job: job["phase"] == "calibrate")
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=60)
    finally:
        service.stop()
    with Service(hub, state, log) as service:
        job = service.job(running)
    assert job["status"] == "failed", job
    assert job["error"] == STOPPED_RUNNING, job
    assert "resubmit" in job["error"] and "nothing was written or pushed" in job["error"]
    assert not (state / "outputs" / "stopped").exists() and partials(state / "outputs") == []


def test_an_exposed_service_needs_an_api_key_for_post_and_delete(hub, tmp_path):
    refused = subprocess.run([sys.executable, "-m", "hf_mudsc", "serve", "--host", "0.0.0.0", "--state-dir",
                              str(tmp_path / "s0")], capture_output=True, text=True, timeout=60,
                             env=hub.client_env(token=None))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--api-key" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "s0").exists()

    key = "k3y-for-tests"
    with Service(hub, tmp_path / "state", tmp_path / "server.log", extra=("--api-key", key)) as service:
        body = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True, "alpha": 7}
        status, answer = service.request("POST", "/api/jobs", body)
        assert status == 401 and "X-API-Key" in answer["error"]
        status, answer = service.request("POST", "/api/jobs", body, headers={"X-API-Key": "wrong"})
        assert status == 401
        status, answer = service.request("POST", "/api/jobs", body, headers={"X-API-Key": key})
        assert status == 400 and "alpha" in answer["error"]  # past the key check, on to the recipe's
        assert service.request("DELETE", "/api/jobs/abc")[0] == 401
        assert service.request("DELETE", "/api/jobs/abc", headers={"X-API-Key": key})[0] == 404
        assert service.request("GET", "/api/jobs")[0] == 200  # reading needs no key
        # Exposed with a key, any Host is answered (the key, not the name, guards the writes).
        assert service.request("GET", "/api/jobs", headers={"Host": "merge.example.org"})[0] == 200
    assert not files_containing(tmp_path / "state", key), "the API key was written to the state dir"
    log = service.log.read_text()
    assert "--api-key on the command line is visible" in log and key not in log, log[-2000:]


def test_the_space_example_runs_hf_mudsc_serve_exposed_only_with_a_key(tmp_path):
    import importlib.util

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.serve import check_exposure

    space = Path(__file__).resolve().parents[1] / "docs" / "space"
    spec = importlib.util.spec_from_file_location("space_app", space / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # importing it starts nothing
    (tmp_path / "data").mkdir()
    argv = app.serve_args({}, data=tmp_path / "data")
    args = build_parser(available=["serve"]).parse_args(argv)
    assert (args.command, args.host, args.port, args.workers) == ("serve", "0.0.0.0", 7860, 1)
    assert args.state_dir == str(tmp_path / "data" / "hf-mudsc")
    assert app.serve_args({"PORT": "9000"}, data=tmp_path / "none")[4] == "9000"
    with pytest.raises(ValueError, match="--api-key"):
        check_exposure(args.host, None)
    check_exposure(args.host, "secret-from-the-space")

    dockerfile = (space / "Dockerfile").read_text()
    assert 'CMD ["python", "app.py"]' in dockerfile and "EXPOSE 7860" in dockerfile
    # hf-mudsc is not on PyPI: the Space installs the wheel built from a clone into its folder (README, "Service")
    assert "torch==2.13.0" in dockerfile and "COPY --chown=user hf_mudsc-*.whl ./" in dockerfile
    assert 'pip install --no-cache-dir --user "$(ls hf_mudsc-*.whl)[serve]"' in dockerfile
    readme = (space.parents[1] / "README.md").read_text()
    assert "pip wheel --no-deps -w docs/space ." in readme
    front = (space / "README.md").read_text().split("---")[1]
    assert "sdk: docker" in front and "app_port: 7860" in front


# ---------------------------------------------------------------------------------------------- hostile requests
# One service for these (no job of theirs runs): a finished job with hostile strings is written into the store
# before the service starts.

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


@pytest.fixture(scope="module")
def hostile(hub_emulator_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    store = JobStore(root / "state")
    seeded = store.add({"models": [f"user/{HOSTILE}", "user/b"], "method": HOSTILE, "output": f"/o/{HOSTILE}"},
                       output=None, repo_id=None, dry_run=False, has_token=False)
    store.update(seeded, status="failed", error=f"LoadError: {HOSTILE}")
    store.append_log(seeded, [f"a log line {HOSTILE}", "another"])
    folder = root / "state" / "outputs" / "written"  # a finished merge's folder, as the one writer leaves it
    folder.mkdir(parents=True)
    for name in ("README.md", "mudsc_recipe.yaml", "model.safetensors", "config.json", "heads.png"):
        (folder / name).write_text(f"the file {name}")
    (folder / "plots").mkdir()
    (folder / "plots" / "match_quality.png").write_text("the file plots/match_quality.png")  # the writer's plots
    written = store.add({"models": ["user/a", "user/b"], "output": str(folder)}, output=str(folder), repo_id=None,
                        dry_run=False, has_token=False)
    store.update(written, status="succeeded", result={"output": str(folder), "repo_id": None, "url": None})
    store.close()
    with Service(hub_emulator_session, root / "state", root / "server.log") as service:
        service.seeded, service.written = seeded, written
        yield service


def raw(service: Service, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, *, chunks: list[bytes] | None = None) -> tuple[int, str, str]:
    """A request exactly as given (no default Content-Type, a Content-Length that may lie, chunked bodies)."""
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=15)
    try:
        if chunks is not None:
            connection.request(method, path, body=iter(chunks), headers=headers or {}, encode_chunked=True)
        else:
            connection.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
            for key, value in (headers or {}).items():
                connection.putheader(key, value)
            connection.endheaders()
            if body:
                connection.send(body)
        answer = connection.getresponse()
        return answer.status, answer.getheader("content-type") or "", answer.read().decode()
    finally:
        connection.close()


def job_count(service: Service) -> int:
    return len(service.request("GET", "/api/jobs")[1]["jobs"])


def test_a_body_a_browser_may_send_cross_site_is_refused_with_415(hostile):
    """text/plain, form and multipart bodies (or none declared) are what a page on another site can POST without a
    CORS preflight: refused, so a drive-by page cannot queue a job on a local service (with its Hub login)."""
    body = json.dumps({"models": ["user/a", "user/b"], "alpah": 1, "dry_run": True}).encode()
    before = job_count(hostile)
    for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", None):
        headers = {"Content-Length": str(len(body)), **({"Content-Type": kind} if kind else {})}
        status, content_type, text = raw(hostile, "POST", "/api/jobs", body, headers)
        assert status == 415 and content_type == "application/json", (kind, status, text)
        error = json.loads(text)["error"]
        assert "application/json" in error and "application/yaml" in error and "\n" not in error, error
    for kind in ("application/json", "application/json; charset=utf-8", "application/yaml", "application/x-yaml",
                 "text/yaml"):
        status, _, text = raw(hostile, "POST", "/api/jobs", body,
                              {"Content-Type": kind, "Content-Length": str(len(body))})
        assert status == 400 and "['alpah']" in json.loads(text)["error"], (kind, status, text)
    assert job_count(hostile) == before


def test_a_token_sent_in_another_form_than_bearer_is_refused_not_ignored(hostile):
    """`Authorization: token hf_...` (or the bare token) was ignored: the job ran with the server's own Hub login,
    where the client meant its token. Refused in one line that does not repeat the header."""
    body = json.dumps({"models": ["user/a", "user/b"], "alpah": 1, "dry_run": True}).encode()
    before = job_count(hostile)
    for header in (f"token {SECRET}", SECRET, f"Basic {SECRET}", "Bearer", "Bearer   "):
        status, _, text = raw(hostile, "POST", "/api/jobs", body, {"Content-Type": "application/json",
                                                                   "Content-Length": str(len(body)),
                                                                   "Authorization": header})
        assert status == 400 and SECRET not in text, (header, status, text)
        error = json.loads(text)["error"]
        assert "Authorization: Bearer" in error and "\n" not in error, error
    for header in (f"Bearer {SECRET}", f"bearer  {SECRET} "):  # the scheme is case-insensitive
        status, _, text = raw(hostile, "POST", "/api/jobs", body, {"Content-Type": "application/json",
                                                                   "Content-Length": str(len(body)),
                                                                   "Authorization": header})
        assert status == 400 and "['alpah']" in json.loads(text)["error"], (header, status, text)
    assert job_count(hostile) == before


def test_pages_escape_what_a_client_wrote_and_a_missing_job_page_does_not_reflect_html(hostile):
    for path in ("/", f"/jobs/{hostile.seeded}", "/partials/jobs"):
        status, page = hostile.request("GET", path)
        assert status == 200 and "&lt;script&gt;alert(2)&lt;/script&gt;" in page, path
        assert "<script>alert" not in page and "<img src=x" not in page, path
    status, content_type, page = raw(hostile, "GET", "/jobs/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert status == 404 and "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page, page


def test_a_yaml_alias_bomb_and_deep_nesting_answer_400_not_a_huge_answer_or_a_500(hostile):
    level = '&a ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]'
    levels = [level] + [f"&{b} [" + ", ".join([f"*{a}"] * 8) + "]" for a, b in zip("abcdef", "bcdefg")]
    bomb = ("models: [user/a, user/b]\nmethod: average\ndry_run: true\nweights: [" + ", ".join(levels) + "]\n")
    status, _, text = raw(hostile, "POST", "/api/jobs", bomb.encode(),
                          {"Content-Type": "application/yaml", "Content-Length": str(len(bomb))})
    assert status == 400 and len(text) < 500, (status, len(text), text[:300])
    assert "anchors and aliases" in json.loads(text)["error"]
    deep = {"application/json": b"[" * 100_000 + b"]" * 100_000,
            "application/yaml": b"models: " + b"[" * 30_000 + b"]" * 30_000}  # within MAX_YAML_BODY
    for kind, body in deep.items():
        status, content_type, text = raw(hostile, "POST", "/api/jobs", body,
                                         {"Content-Type": kind, "Content-Length": str(len(body))})
        assert status == 400 and content_type == "application/json", (kind, status, text[:300])
        assert "nested too deeply" in json.loads(text)["error"], text
    for depth in range(950, 1001):  # deep enough to strain the recursion limit after the parse, not in it
        body = b'{"models": ' + b"[" * depth + b"]" * depth + b', "method": "average", "dry_run": true}'
        status, _, text = raw(hostile, "POST", "/api/jobs", body,
                              {"Content-Type": "application/json", "Content-Length": str(len(body))})
        assert status == 400, (depth, status, text[:300])


def test_a_body_that_is_not_valid_yaml_or_json_answers_one_line_naming_where(hostile):
    """PyYAML's messages span several lines (the context, a copy of the source line, a caret): the answer was not
    the one line every error is."""
    bodies = {"application/yaml": ["models: [user/a, user/b\n", "? [a, b]\n: 1\n", "--- a\n--- b\n",
                                   "!!python/object/apply:os.system [id]\n", "a: b\n  c: d\n", "a:\n\t- x\n",
                                   "a: 'x\n"],
              "application/json": ['{"models": ["user/a",\n "user/b"', '{"a": 1}\n{"b": 2}', "[1, 2,]"]}
    for kind, texts in bodies.items():
        for text in texts:
            body = text.encode()
            status, _, answer = raw(hostile, "POST", "/api/jobs", body,
                                    {"Content-Type": kind, "Content-Length": str(len(body))})
            assert status == 400, (text, status, answer)
            error = json.loads(answer)["error"]
            assert error.startswith("the body is not valid") and "line" in error and "\n" not in error, (text, error)


def test_a_key_given_twice_is_refused_as_a_recipe_file_refuses_it(hostile):
    """YAML and JSON keep the last of a repeated key silently: `output: a` ... `output: b` wrote `b`, `method` the
    second one. A recipe file refuses a key given twice (publish/recipe.py); a job now does too."""
    before = job_count(hostile)
    bodies = {"application/yaml": "models: [user/a, user/b]\nmethod: average\noutput: a\ndry_run: true\noutput: b\n",
              "application/json": '{"models": ["user/a", "user/b"], "method": "average", "output": "a", '
                                  '"dry_run": true, "output": "b"}'}
    for kind, text in bodies.items():
        body = text.encode()
        status, _, answer = raw(hostile, "POST", "/api/jobs", body, {"Content-Type": kind,
                                                                     "Content-Length": str(len(body))})
        assert status == 400, (kind, status, answer)
        error = json.loads(answer)["error"]
        assert "'output' is given twice" in error and "\n" not in error, (kind, error)
    assert job_count(hostile) == before


def test_odd_calibration_and_path_values_answer_400_not_500(hostile):
    """A calibration spec with a newline crashed its parser (AttributeError), a name longer than the file system
    takes raised ENAMETOOLONG from a path check: both answered 500 Internal Server Error."""
    long = "a" * 300
    before = job_count(hostile)
    for key, value in (("calibration", "org/da\nta:train"), ("calibration", "org/data@rev\n:train"),
                       ("calibration", f"{long}/b:train"), ("calibration", f"org/{long}:train"),
                       ("calibration", "<x>/y:train"), ("base", f"{long}/b"), ("models", [f"{long}/b", "user/b"]),
                       ("models", [f"./{long}", "user/b"])):
        method = {"calibration": "zipit", "base": "task_arithmetic"}.get(key, "average")
        body = json.dumps({"models": ["user/a", "user/b"], "method": method, "output": "odd", key: value}).encode()
        status, content_type, text = raw(hostile, "POST", "/api/jobs", body,
                                         {"Content-Type": "application/json", "Content-Length": str(len(body))})
        assert status == 400 and content_type == "application/json", (key, value[:40], status, text[:300])
        error = json.loads(text)["error"]
        assert f"`{key}" in error and "\n" not in error, (key, error)
    assert job_count(hostile) == before


def test_a_home_folder_of_no_user_answers_400_not_500(hostile):
    """`~nosuchuser/x` made pathlib's expanduser raise RuntimeError ("Could not determine home directory"): a 500
    for a parent, base, calibration or output naming it."""
    before = job_count(hostile)
    for key, value in (("models", ["~nosuchuser0/x", "user/b"]), ("models", ["user/a", "~nosuchuser0"]),
                       ("base", "~nosuchuser0/base"), ("calibration", "~nosuchuser0/data:train"),
                       ("output", "~nosuchuser0/out")):
        method = {"calibration": "zipit", "base": "task_arithmetic"}.get(key, "average")
        body = json.dumps({"models": ["user/a", "user/b"], "method": method, "output": "home", key: value}).encode()
        status, content_type, text = raw(hostile, "POST", "/api/jobs", body,
                                         {"Content-Type": "application/json", "Content-Length": str(len(body))})
        assert status == 400 and content_type == "application/json", (key, value, status, text[:300])
        assert f"`{key}" in json.loads(text)["error"], (key, text)
    assert job_count(hostile) == before


def test_a_body_that_is_not_utf8_is_refused_not_repaired(hostile):
    """Bytes that are not UTF-8 (a Latin-1 `é`) were replaced with U+FFFD: the job ran on a name the client never
    sent (`output: caf\ufffd`). A recipe file that is not UTF-8 is refused; so is such a body now."""
    before = job_count(hostile)
    body = '{"models": ["user/a", "user/b"], "method": "average", "dry_run": true, "output": "café"}'.encode("latin-1")
    for kind in ("application/json", "application/yaml"):
        status, _, text = raw(hostile, "POST", "/api/jobs", body, {"Content-Type": kind,
                                                                   "Content-Length": str(len(body))})
        assert status == 400, (kind, status, text)
        error = json.loads(text)["error"]
        assert "not UTF-8" in error and f"byte {body.index('é'.encode('latin-1'))}" in error, error
    assert job_count(hostile) == before


def test_a_huge_body_is_refused_before_it_is_read(hostile):
    """A declared 100 MB body is answered 413 at once (the server does not wait for it); a chunked one that grows
    past the limit too."""
    status, _, text = raw(hostile, "POST", "/api/jobs", b"{",
                          {"Content-Type": "application/json", "Content-Length": str(100 << 20)})
    assert status == 413 and "larger than" in json.loads(text)["error"]
    status, _, text = raw(hostile, "POST", "/api/jobs", chunks=[b" " * (256 << 10)] * 8,
                          headers={"Content-Type": "application/json"})
    assert status == 413 and "larger than" in json.loads(text)["error"]


def test_a_client_that_hangs_up_mid_body_leaves_no_traceback_in_the_server_log(hostile):
    """A POST whose client disconnects before its declared body is sent raised ClientDisconnect out of the route:
    "Exception in ASGI application" and a traceback in the server's log for an everyday event."""
    import socket

    before = hostile.log.stat().st_size
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as sock:
        sock.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"models": [')
        time.sleep(0.5)
    assert hostile.request("GET", "/api/jobs")[0] == 200  # the service answers on
    time.sleep(0.5)
    with open(hostile.log, "rb") as log:
        log.seek(before)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written and "Exception in ASGI application" not in written, written[-3000:]


def test_bad_query_values_and_unknown_routes_answer_one_line_json_errors(hostile):
    job = hostile.seeded
    status, answer = hostile.request("GET", f"/api/jobs/{job}/log?since={10 ** 30}")
    assert status == 200 and answer["lines"] == [] and answer["next"] == 10 ** 30
    status, answer = hostile.request("GET", f"/api/jobs/{job}/log?since=-5")
    assert status == 200 and answer["lines"][0].startswith("a log line") and answer["next"] == 2
    for limit in (10 ** 30, -(10 ** 22)):
        status, answer = hostile.request("GET", f"/api/jobs?limit={limit}")
        assert status == 200 and job in [j["id"] for j in answer["jobs"]], (limit, status, answer)
    for method, path, code, fragment in (("GET", f"/api/jobs/{job}/log?since=abc", 400, "`since`"),
                                         ("GET", "/api/jobs?limit=1.5", 400, "`limit`"),
                                         ("POST", "/api/jobs?dry_run=maybe", 400, "`dry_run`"),
                                         ("GET", "/api/nothing-here", 404, "/api/nothing-here"),
                                         ("PUT", f"/api/jobs/{job}", 405, "PUT")):
        status, content_type, text = raw(hostile, method, path)
        assert status == code and content_type == "application/json", (path, status, text)
        error = json.loads(text)["error"]
        assert fragment in error and "\n" not in error, (path, error)


def test_a_lone_surrogate_is_refused_so_the_job_list_keeps_answering(hostile):
    """JSON may escape a lone UTF-16 surrogate (`\\ud800`); stored, it made every answer that lists the job a 500."""
    body = b'{"models": ["user/a", "user/b\\ud800"], "method": "average", "output": "surrogate"}'
    status, _, text = raw(hostile, "POST", "/api/jobs", body,
                          {"Content-Type": "application/json", "Content-Length": str(len(body))})
    assert status == 400 and "not valid Unicode" in json.loads(text)["error"], (status, text)
    for path in ("/api/jobs", "/", "/partials/jobs"):
        assert hostile.request("GET", path)[0] == 200, path


def test_without_an_api_key_only_requests_addressed_to_this_machine_are_answered(hostile):
    """DNS rebinding: a page on evil.example whose name turns into 127.0.0.1 is same-origin with the service; its
    requests still say `Host: evil.example`. Without a key the service (bound to loopback) refuses them."""
    body = json.dumps({"models": ["user/a", "user/b"], "alpah": 1, "dry_run": True}).encode()
    for host in ("evil.example", f"evil.example:{hostile.port}", "127.0.0.1.evil.example", "10.0.0.1", ""):
        for method, path, payload in (("GET", "/api/jobs", None), ("GET", "/", None), ("POST", "/api/jobs", body)):
            headers = {"Host": host, "Content-Type": "application/json", "Content-Length": str(len(payload or b""))}
            status, _, text = raw(hostile, method, path, payload, headers)
            assert status == 400 and "Host" in json.loads(text)["error"], (host, path, status, text)
    for host in (f"localhost:{hostile.port}", f"127.0.0.1:{hostile.port}", f"[::1]:{hostile.port}", "127.0.0.2"):
        status, _, text = raw(hostile, "GET", "/api/jobs", headers={"Host": host})
        assert status == 200, (host, status, text)


def test_the_files_route_serves_the_card_recipe_and_plots_not_the_weights(hostile):
    """GETs need no key (an exposed service shows its jobs): the merged weights of a private push must not be.
    The plots are where the writer puts them (`plots/`, as the card links them), and the job page links them."""
    for name in ("README.md", "mudsc_recipe.yaml", "heads.png", "plots/match_quality.png"):
        status, content_type, text = raw(hostile, "GET", f"/jobs/{hostile.written}/files/{name}")
        assert status == 200 and text == f"the file {name}", (name, status, text)
    for name in ("model.safetensors", "config.json", "plots/../model.safetensors", "plots/%2e%2e/config.json",
                 "plots", "plots/", "../written/README.md"):
        status, _, text = raw(hostile, "GET", f"/jobs/{hostile.written}/files/{name}")
        assert status == 404, (name, status, text)
    page = hostile.request("GET", f"/jobs/{hostile.written}")[1]
    assert f'<img src="/jobs/{hostile.written}/files/plots/match_quality.png"' in page


def test_a_dry_run_claims_no_destination(hostile):
    """A dry run writes and pushes nothing, so a merge into the same folder and repo is not refused with 409."""
    body = {"models": ["user/absent-a", "user/absent-b"], "method": "average", "output": "dry-claim",
            "push_to_hub": "user/dry-claim"}
    dry = hostile.submit({**body, "dry_run": True})
    status, answer = hostile.request("POST", "/api/jobs", body)
    assert status == 201, answer
    for job_id in (dry, answer["id"]):
        assert hostile.wait(job_id)["status"] == "failed"  # the parents are not on the Hub: both end at load


def test_a_store_write_that_fails_while_following_a_worker_fails_the_job_and_frees_its_slot(tmp_path):
    """The follow thread copies a worker's messages into the store; if a write fails (disk full, a locked or
    corrupt database), the job must not stay "running" holding a worker slot forever: the worker is stopped, the
    job is failed with the reason (when the store still takes it), and the slot is free."""
    import sqlite3

    from hf_mudsc.serve.scheduler import Running, Scheduler

    class Pipe:
        def __init__(self, messages):
            self.messages = list(messages)

        def recv(self):
            if not self.messages:
                raise EOFError
            return self.messages.pop(0)

    class Process:
        exitcode = None
        killed = False

        def join(self, timeout=None):
            return None

        def is_alive(self):
            return not self.killed

        def kill(self):
            self.killed = True
            self.exitcode = -9

    store = JobStore(tmp_path / "state")
    job_id = store.add({"models": ["a", "b"]}, output=None, repo_id=None, dry_run=False, has_token=False)
    store.update(job_id, status="running")
    failures = iter([sqlite3.OperationalError("disk I/O error")])

    def failing_update(job, **fields):
        if "phase" in fields:  # the first phase report fails to write; later writes (the failure) work
            raise next(failures)
        return JobStore.update(store, job, **fields)

    store.update = failing_update
    scheduler = Scheduler(store, workers=1)
    run = Running(process=Process(), conn=Pipe([("phase", "calibrate", 0.1), ("log", "never read")]))
    scheduler.running[job_id] = run
    scheduler._follow(job_id, run)
    job = store.get(job_id)
    assert job["status"] == "failed"
    assert "could not record the job's progress (disk I/O error)" in job["error"]
    assert run.process.killed and job_id not in scheduler.running
    # a job the worker already reported finished keeps that status when a later log write fails
    done = store.add({"models": ["a", "b"]}, output=None, repo_id=None, dry_run=False, has_token=False)
    store.update(done, status="running")
    store.append_log = lambda job, lines: (_ for _ in ()).throw(sqlite3.OperationalError("disk full"))
    finished = Running(process=Process(), conn=Pipe([("done", "succeeded", None, {"output": "x"}), ("log", "late")]))
    scheduler.running[done] = finished
    scheduler._follow(done, finished)
    assert store.get(done)["status"] == "succeeded" and done not in scheduler.running


def _writing_into(target, env=None):
    """A process inside `staged_output(target)`, its staging folder half-written, waiting to be killed there."""
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys\n"
        "from hf_mudsc.publish.folder import staged_output\n"
        f"with staged_output({str(target) if target is None else repr(str(target))}) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(b'half')\n"
        "    print('writing', flush=True); sys.stdin.readline()\n"  # killed here, inside the block
    )], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout.readline() == "writing\n"
    return writer


def _followed_after_a_kill(tmp_path, writer: subprocess.Popen, request: dict) -> tuple[JobStore, str]:
    """A running job of `request` whose worker `writer` was killed before it reported, followed by the scheduler to
    its end: the store and the job's id."""
    from hf_mudsc.serve.scheduler import Running, Scheduler

    class Process:
        def join(self, timeout=None):
            writer.wait(timeout)

        def is_alive(self):
            return writer.poll() is None

        @property
        def exitcode(self):
            return writer.returncode

    class Pipe:  # closed without a final report
        def recv(self):
            raise EOFError

    store = JobStore(tmp_path / "state")
    job_id = store.add(request, output=request.get("output"), repo_id=request.get("push_to_hub"), dry_run=False,
                       has_token=False)
    store.update(job_id, status="running")
    scheduler = Scheduler(store, workers=1)
    run = Running(process=Process(), conn=Pipe())
    scheduler.running[job_id] = run
    scheduler._follow(job_id, run)
    return store, job_id


def test_a_worker_killed_while_writing_leaves_no_staging_folder(tmp_path):
    """A worker that dies mid-write (out of memory, kill -9, or killed 30 s after an ignored cancel) left its
    half-written staging folder in the output root until another job wrote the same output — possibly never."""

    outputs = tmp_path / "state" / "outputs"
    target = outputs / "killed"
    writer = _writing_into(target)
    assert partials(outputs) != []
    writer.kill()

    store, job_id = _followed_after_a_kill(tmp_path, writer, {"models": ["a/b", "c/d"], "output": str(target)})
    assert store.get(job_id)["status"] == "failed" and "died" in store.get(job_id)["error"]
    assert partials(outputs) == [] and not target.exists()


def test_a_push_only_worker_killed_while_writing_leaves_no_staging_folder(tmp_path, monkeypatch):
    """A push-only job (no `output`) stages its model in the temp folder: a worker killed there left a whole model
    behind for good (the cleanup looked only at a job's output)."""

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    writer = _writing_into(None, env={**os.environ, "TMPDIR": str(scratch)})
    assert partials(scratch) != []
    writer.kill()
    writer.wait()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    store, job_id = _followed_after_a_kill(tmp_path, writer, {"models": ["a/b", "c/d"], "push_to_hub": "user/m"})
    assert store.get(job_id)["status"] == "failed"
    assert list(scratch.iterdir()) == []


def test_a_restart_removes_the_staging_folder_a_job_killed_with_the_service_left(tmp_path):
    """The service and its worker killed together (a container restart, the OOM killer on the group): the job is
    marked failed at the next start, but its half-written staging folder stayed in the output root."""
    from hf_mudsc.serve.scheduler import Scheduler

    outputs = tmp_path / "state" / "outputs"
    target = outputs / "interrupted"
    writer = _writing_into(target)
    writer.kill()
    writer.wait()
    store = JobStore(tmp_path / "state")
    job_id = store.add({"models": ["a/b", "c/d"], "output": str(target)}, output=str(target), repo_id=None,
                       dry_run=False, has_token=False)
    store.update(job_id, status="running")
    assert partials(outputs) != []
    scheduler = Scheduler(store, workers=1)
    scheduler.start()
    try:
        assert store.get(job_id)["status"] == "failed"
        assert partials(outputs) == [] and not target.exists()
    finally:
        scheduler.stop()
        store.close()


def test_the_job_list_pages_newest_first_with_a_before_cursor(tmp_path):
    """GET /api/jobs answers at most `limit` jobs (default 100, at most 1000), newest first, and `next`: the id to
    pass as `before` for the following page (null on the last); an unknown cursor is a one-line 404."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    app = create_app(tmp_path)
    ids = [app.state.store.add({"models": [f"m{i}", "x"]}, output=None, repo_id=None, dry_run=True, has_token=False)
           for i in range(5)]
    newest = ids[::-1]
    client = TestClient(app, base_url="http://127.0.0.1")
    pages, cursor = [], None
    while True:
        answer = client.get("/api/jobs", params={"limit": 2, **({"before": cursor} if cursor else {})}).json()
        pages.append([job["id"] for job in answer["jobs"]])
        cursor = answer["next"]
        if cursor is None:
            break
    assert pages == [newest[0:2], newest[2:4], newest[4:5]]
    whole = client.get("/api/jobs").json()
    assert [job["id"] for job in whole["jobs"]] == newest and whole["next"] is None
    missing = client.get("/api/jobs", params={"before": "nosuchjob"})
    assert missing.status_code == 404 and missing.json() == {
        "error": "no job 'nosuchjob' to page from (`before`); pass the `next` id of the previous page"}


# ---------------------------------------------------------------------------------------------- limits


def test_a_post_while_max_queued_jobs_wait_answers_429_and_stores_nothing(tmp_path):
    """Anyone who may POST could queue unboundedly many jobs (each a store row, later a whole merge): at
    `--max-queued` jobs waiting for a worker, a POST answers 429 with Retry-After and nothing is stored; a
    cancelled (no longer queued) job frees a place."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    app = create_app(tmp_path, max_queued=2)  # the scheduler never starts (no lifespan): jobs stay queued
    client = TestClient(app, base_url="http://127.0.0.1")
    body = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}
    first, second = (client.post("/api/jobs", json=body) for _ in range(2))
    assert (first.status_code, second.status_code) == (201, 201), (first.text, second.text)
    refused = client.post("/api/jobs", json=body)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert set(refused.json()) == {"error"} and "\n" not in error
    assert "2 jobs are queued" in error and "--max-queued" in error, error
    assert int(refused.headers["retry-after"]) > 0
    assert len(app.state.store.list()) == 2
    assert client.delete(f"/api/jobs/{first.json()['id']}").status_code == 202
    assert client.post("/api/jobs", json=body).status_code == 201


@pytest.mark.parametrize(("flag", "attribute", "default"), [("--max-queued", "max_queued", 100),
                                                         ("--max-jobs", "max_jobs", 1000)])
def test_the_serve_bounds_are_flags_with_documented_defaults_checked_in_one_line(tmp_path, monkeypatch, flag,
                                                                                  attribute, default):
    import uvicorn

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.serve import run
    from hf_mudsc.serve.store import MAX_JOBS, MAX_QUEUED

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    parser = build_parser(available=["serve"])
    assert run(parser.parse_args(["serve", "--port", "0", "--state-dir", str(tmp_path / "s"), flag, "7"])) == 0
    assert getattr(served[0].state, attribute) == 7
    assert run(parser.parse_args(["serve", "--port", "0", "--state-dir", str(tmp_path / "s")])) == 0
    assert getattr(served[1].state, attribute) == {"max_queued": MAX_QUEUED, "max_jobs": MAX_JOBS}[attribute] == default
    with pytest.raises(ValueError, match=rf"^{flag} must be at least 1, got 0$"):
        run(parser.parse_args(["serve", "--state-dir", str(tmp_path / "s"), flag, "0"]))
    assert re.search(rf"`{flag} N`[\w ]* \(default {default}\)", (Path(__file__).parents[1] / "README.md").read_text())


# ---------------------------------------------------------------------------------------------- local paths


@pytest.fixture()
def server_disk(tmp_path, monkeypatch):
    """A root the operator allows (`root`: a parent folder, a data file), a folder beside it (`outside`), a symlink in
    the root that leads out of it; the working folder is `tmp_path`, where relative paths resolve."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "parent", outside / "secret-model"):
        folder.mkdir(parents=True)
    (root / "data.json").write_text('{"text": "x"}\n')
    (root / "link").symlink_to(outside / "secret-model", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return root, outside


def test_a_job_names_local_paths_only_inside_the_local_roots(server_disk, tmp_path):
    """Anyone who may POST could make the server merge — and push to the Hub — any folder it can read. Without
    --local-root a job names Hub references only; with it, paths inside those folders (symlinks followed)."""
    root, outside = server_disk
    hub_only = {"models": ["user/a", "user/b@v1"], "method": "mudsc", "calibration": "org/data@main:train",
                "base": "user/base", "output": "m"}
    assert parse_job(hub_only, tmp_path / "out").recipe.models == ["user/a", "user/b@v1"]
    base = {"models": ["user/a", "user/b"], "method": "weight_matching", "output": "m"}
    cases = [  # (body, the field, the path as given)
        ({**base, "models": [str(root / "parent"), "user/b"]}, "models[0]", str(root / "parent")),
        ({**base, "models": ["user/a", "root/parent"]}, "models[1]", "root/parent"),  # an existing relative path
        ({**base, "models": ["user/a", "./root/missing"]}, "models[1]", "./root/missing"),  # a path, even if missing
        ({**base, "base": str(root / "parent"), "method": "task_arithmetic"}, "base", str(root / "parent")),
        ({**base, "calibration": f"{root / 'data.json'}:train", "method": "zipit"}, "calibration",
         str(root / "data.json")),
        ({**base, "calibration": "./root", "method": "zipit"}, "calibration", "./root"),  # a path looks like one
    ]
    for body, key, path in cases:
        with pytest.raises(RecipeError) as caught:
            parse_job(body, tmp_path / "out")
        message = str(caught.value)
        assert f"`{key}` names the local path {path!r}" in message and "--local-root" in message, message
        assert "\n" not in message
        if path == "./root/missing":  # inside the roots but not there: refused as missing at POST (s30)
            with pytest.raises(RecipeError, match=r"`models\[1\]` './root/missing' is no folder on this server"):
                parse_job(body, tmp_path / "out", local_roots=[root, outside])
            continue
        # (`outside` a root too: the calibration folder `root` holds `link`, which leads there)
        assert parse_job(body, tmp_path / "out", local_roots=[root, outside]).recipe.to_dict()[key.split("[")[0]]
    # a bare name is a datasets builder (json, csv, imagefolder, ...) that reads the working folder
    with pytest.raises(RecipeError, match=r"`calibration` 'imagefolder:train' is no `org/name` Hub dataset.*"
                                          r"--local-root"):
        parse_job({**base, "calibration": "imagefolder:train", "method": "zipit"}, tmp_path / "out")
    assert parse_job({**base, "calibration": "imagefolder:train", "method": "zipit"}, tmp_path / "out",
                     local_roots=[tmp_path])


@pytest.mark.parametrize("escape", ["{root}/../outside/secret-model", "{root}/link", "{root}/link/config.json",
                                    "root/../outside/secret-model", "root/link"])
def test_a_path_that_leaves_the_local_root_is_refused(server_disk, tmp_path, escape):
    root, outside = server_disk
    path = escape.format(root=root)
    for body, key in (({"models": [path, "user/b"], "method": "weight_matching", "output": "m"}, "models[0]"),
                      ({"models": ["user/a", "user/b"], "method": "zipit", "calibration": f"{path}:train",
                        "output": "m"}, "calibration")):
        with pytest.raises(RecipeError) as caught:
            parse_job(body, tmp_path / "out", local_roots=[root])
        message = str(caught.value)
        assert message.startswith(f"`{key}` names the local path {path!r}, which is outside the folders this server "
                                  "allows (its operator lists them with --local-root)"), message
        rest = message.replace(path, "")  # the client learns no server path but the one it sent
        assert str(outside) not in rest and str(root) not in rest, message


def test_the_service_refuses_a_local_path_at_post_time_and_queues_nothing(server_disk, tmp_path):
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    root, _ = server_disk
    body = {"models": [str(root / "parent"), "user/b"], "method": "weight_matching", "output": "m"}
    closed = create_app(tmp_path / "closed")
    client = TestClient(closed, base_url="http://127.0.0.1")
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 400 and "`models[0]`" in answer.json()["error"] and "--local-root" in answer.text
    assert closed.state.store.list() == []
    opened = create_app(tmp_path / "open", local_roots=[root])
    assert TestClient(opened, base_url="http://127.0.0.1").post("/api/jobs", json=body).status_code == 201


def test_local_root_is_a_repeatable_serve_flag_naming_existing_folders(server_disk, tmp_path, monkeypatch):
    import uvicorn

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.serve import run

    root, outside = server_disk
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    parser = build_parser(available=["serve"])
    state = ["serve", "--port", "0", "--state-dir", str(tmp_path / "s")]
    assert run(parser.parse_args([*state, "--local-root", str(root), "--local-root", "outside"])) == 0
    assert served[0].state.local_roots == (root.resolve(), outside.resolve())
    assert run(parser.parse_args(state)) == 0 and served[1].state.local_roots == ()
    with pytest.raises(ValueError, match=r"^--local-root 'missing' is not a folder"):
        run(parser.parse_args([*state, "--local-root", "missing"]))


def test_an_api_key_on_the_command_line_is_warned_about_and_never_logged(tmp_path, monkeypatch, caplog):
    """`--api-key KEY` is in the process's command line, which every user of the machine can read (`ps`): the
    service says so once, recommending the environment variable, without writing the key."""
    import uvicorn
    from fastapi.testclient import TestClient

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.serve import API_KEY_ENV, run

    key = "k3y-that-ps-shows"
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append(app))
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    parser = build_parser(available=["serve"])
    state = ["serve", "--port", "0", "--state-dir", str(tmp_path / "s")]
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        assert run(parser.parse_args([*state, "--api-key", key])) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "--api-key on the command line is visible" in warnings[0] and API_KEY_ENV in warnings[0]
    assert key not in caplog.text
    caplog.clear()
    monkeypatch.setenv(API_KEY_ENV, key)
    with caplog.at_level(logging.INFO, logger="hf_mudsc"):
        assert run(parser.parse_args(state)) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING] and key not in caplog.text
    client = TestClient(served[1], base_url="http://127.0.0.1")
    body = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}
    assert client.post("/api/jobs", json=body).status_code == 401  # the key from the environment guards POST
    assert client.post("/api/jobs", json=body, headers={"X-API-Key": key}).status_code == 201


def test_a_queued_job_is_checked_again_when_it_starts_so_a_restart_with_fewer_roots_refuses_it(server_disk, tmp_path):
    """Jobs queued before a restart run after it: one accepted under `--local-root DIR` must not read DIR once the
    service runs without it. The check runs again when the job's worker would start; nothing starts."""

    from hf_mudsc.serve.app import create_app

    root, _ = server_disk
    body = {"models": [str(root / "parent"), "user/b"], "method": "weight_matching", "output": "m"}
    accepted = parse_job(body, tmp_path / "out", local_roots=[root])
    store = JobStore(tmp_path / "state")
    job_id = store.add(accepted.to_dict(), output=accepted.output, repo_id=None, dry_run=False, has_token=False)
    store.close()
    app = create_app(tmp_path / "state", output_root=tmp_path / "out")  # restarted without --local-root
    job = drain_job(app, job_id)
    assert job["status"] == "failed", job
    assert f"`models[0]` names the local path {str(root / 'parent')!r}" in job["error"], job["error"]
    assert "\n" not in job["error"] and not app.state.scheduler.running
