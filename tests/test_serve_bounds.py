"""What a client of `hf-mudsc serve` must not be able to do to the server, checked in-process (the app without its
scheduler, so jobs stay queued): fill the store with finished jobs forever, hold a connection with a body that never
ends, learn the server's output root from a refusal, run script from the service's origin through a served file,
or queue a job from a recipe pushed to the Hub whose local folders are named by folder name only.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from hf_mudsc.errors import RecipeError
from hf_mudsc.publish.recipe import published_text
from hf_mudsc.serve import app as app_module
from hf_mudsc.serve import store as store_module
from hf_mudsc.serve.app import create_app
from hf_mudsc.serve.jobs import parse_job

BODY = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}


def client_of(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


# ---------------------------------------------------------------------------------------------- stored jobs


def finish(app, count: int, *, output: Path | None = None) -> list[str]:
    """`count` finished jobs in the app's store, oldest first."""
    store, ids = app.state.store, []
    for index in range(count):
        job_id = store.add({"models": [f"user/m{index}", "user/x"]}, output=None, repo_id=None, dry_run=True,
                           has_token=False)
        store.append_log(job_id, [f"line of job {index}"])
        store.update(job_id, status="succeeded" if index % 2 else "failed",
                     result={"output": str(output)} if output else None)
        ids.append(job_id)
    return ids


def test_the_store_keeps_at_most_max_jobs_finished_jobs_pruning_the_oldest_records(tmp_path):
    """Without a cap every POST adds a record (and its log) for good: a client could fill the disk. Beyond
    `--max-jobs` finished jobs, submitting a job removes the records and logs of those finished longest ago —
    never a queued or running job, and never a job's output folder (the merged model stays on disk)."""
    app = create_app(tmp_path / "state", max_jobs=3)
    store = app.state.store
    kept_folder = tmp_path / "state" / "outputs" / "merged"
    kept_folder.mkdir(parents=True)
    (kept_folder / "model.safetensors").write_bytes(b"weights")
    queued = store.add({"models": ["user/q", "user/x"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    running = store.add({"models": ["user/r", "user/x"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    store.update(running, status="running")
    old = finish(app, 4, output=kept_folder)
    client = client_of(app)
    answer = client.post("/api/jobs", json=BODY)
    assert answer.status_code == 201, answer.text
    left = {job["id"] for job in store.list()}
    assert left == {queued, running, *old[1:], answer.json()["id"]}  # 3 finished kept, the oldest one gone
    assert client.get(f"/api/jobs/{old[0]}").status_code == 404
    assert store.log(old[0]) == [] and store.log(old[1]) == ["line of job 1"]
    assert (kept_folder / "model.safetensors").read_bytes() == b"weights"
    # Pruning goes by when a job finished, not when it was submitted: the queued job, finishing now, is the newest.
    store.update(queued, status="cancelled")
    assert client.post("/api/jobs", json=BODY).status_code == 201
    assert queued in {job["id"] for job in store.list()} and old[1] not in {job["id"] for job in store.list()}


def post_with_a_body_that_stalls(app, first: bytes) -> list[dict]:
    """POST /api/jobs straight to the ASGI app: `first` arrives, then the body never continues (a client trickling
    nothing more). Returns the messages the app sent."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/jobs", "raw_path": b"/api/jobs", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
    sent: list[dict] = []
    delivered = []

    async def receive() -> dict:
        if not delivered:
            delivered.append(first)
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.sleep(3600)  # the rest of the body never comes
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await asyncio.wait_for(app(scope, receive, send), timeout=30)

    asyncio.run(run())
    return sent


def test_a_body_that_stops_arriving_is_answered_408_after_the_read_timeout(tmp_path, monkeypatch):
    """uvicorn has no timeout for a request's body: a client that sends its headers and then trickles (or stalls)
    held the connection and the route open forever. The body must arrive within `BODY_TIMEOUT_S`."""
    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.5)
    app = create_app(tmp_path)
    sent = post_with_a_body_that_stalls(app, b'{"models": [')
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 408, (start, body)
    assert (b"connection", b"close") in start["headers"]  # uvicorn then closes it: the rest is never read
    error = json.loads(body)["error"]
    assert "0.5 s" in error and "\n" not in error, error
    assert app.state.store.list() == []


def test_serve_bounds_what_uvicorn_reads_before_the_app(tmp_path, monkeypatch):
    """The server's own limits are set, not left to uvicorn's defaults of the day: an idle keep-alive connection
    is closed, and a request's headers are capped in size."""
    import uvicorn

    from hf_mudsc.cli.main import build_parser
    from hf_mudsc.cli.serve import KEEP_ALIVE_S, run
    from hf_mudsc.serve import HEADER_MAX_BYTES

    settings = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: settings.append(kwargs))
    parser = build_parser(available=["serve"])
    assert run(parser.parse_args(["serve", "--port", "0", "--state-dir", str(tmp_path / "s")])) == 0
    assert settings[0]["timeout_keep_alive"] == KEEP_ALIVE_S <= 10
    assert settings[0]["h11_max_incomplete_event_size"] == HEADER_MAX_BYTES <= 64 << 10
    # The cap is h11's (with httptools installed, uvicorn would pick that): the protocol is uvicorn's h11 one.
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert issubclass(settings[0]["http"], H11Protocol)


# ---------------------------------------------------------------------------------------------- server paths


def test_refusals_name_the_clients_output_never_the_servers_output_root(tmp_path):
    """A refused `output` was answered with the service's absolute output root (`/srv/.../outputs`), a detail of
    the server's disk: the answer names the client's own value."""
    root = tmp_path / "outputs-of-the-server"
    root.mkdir()
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("someone's file")
    (root / "a-file").write_text("not a folder")
    base = {"models": ["user/a", "user/b"], "method": "weight_matching", "output": "m"}
    cases = [
        ({**base, "output": "../escape"}, "'../escape'"),
        ({**base, "output": "/etc"}, "'/etc'"),
        ({**base, "output": "taken"}, "'taken'"),
        ({**base, "output": "taken", "overwrite": True}, "'taken'"),
        ({**base, "output": "a-file/m"}, "'a-file/m'"),
    ]
    for body, named in cases:
        with pytest.raises(RecipeError) as caught:
            parse_job(body, root)
        message = str(caught.value)
        assert named in message and str(root) not in message and "outputs-of-the-server" not in message, message


def test_a_409_names_the_claimed_output_as_the_client_named_it(tmp_path):
    app = create_app(tmp_path / "state", output_root=tmp_path / "outputs-of-the-server")
    client = client_of(app)
    body = {"models": ["user/a", "user/b"], "method": "average", "output": "shared"}
    assert client.post("/api/jobs", json=body).status_code == 201
    for output in ("shared", "shared/inner"):
        answer = client.post("/api/jobs", json={**body, "output": output})
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert f"the output folder {output!r} is claimed" in error and "outputs-of-the-server" not in error, error


def test_a_failed_jobs_error_names_its_output_as_the_client_did(tmp_path):
    """A job refused in its worker (the folder appeared after POST) reported the writer's message whole, with the
    server's absolute output root, to anyone who may GET the job."""
    root = tmp_path / "outputs-of-the-server"
    app = create_app(tmp_path / "state", output_root=root)
    store = app.state.store
    folder = str((root / "runs" / "m").resolve())
    job_id = store.add({"models": ["user/a", "user/b"], "output": folder}, output=folder, repo_id=None,
                       dry_run=False, has_token=False)
    store.update(job_id, status="failed", error=f"FileExistsError: the output folder {folder!r} already exists; pass "
                 "overwrite=True to replace it, or choose another output")
    client = client_of(app)
    for answer in (client.get(f"/api/jobs/{job_id}").json(), client.get("/api/jobs").json()["jobs"][0]):
        assert "the output folder 'runs/m' already exists" in answer["error"], answer["error"]
    page = client.get(f"/jobs/{job_id}").text
    assert "the output folder &#39;runs/m&#39; already exists" in page and str(root) not in page.split("<pre")[0]


# ---------------------------------------------------------------------------------------------- served files


@pytest.fixture()
def written(tmp_path):
    """An app whose one job finished writing a folder with a card, a recipe and plots (one an SVG with a script)."""
    app = create_app(tmp_path / "state")
    folder = tmp_path / "state" / "outputs" / "written"
    (folder / "plots").mkdir(parents=True)
    (folder / "README.md").write_text("# card <script>alert(1)</script>")
    (folder / "mudsc_recipe.yaml").write_text("models: [user/a, user/b]\n")
    (folder / "plots" / "match.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>')
    (folder / "plots" / "match.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    store = app.state.store
    job_id = store.add({"models": ["user/a", "user/b"], "output": str(folder)}, output=str(folder), repo_id=None,
                       dry_run=False, has_token=False)
    store.update(job_id, status="succeeded", result={"output": str(folder)})
    return client_of(app), job_id


def test_a_served_file_cannot_run_script_from_the_services_origin(written):
    """An SVG opened from the job page's link is a document of the service's origin: its scripts could call the
    API (cancel jobs, read the page). Every served file comes sandboxed (no script, nothing loaded from elsewhere)
    and with `nosniff`, so no file is read as another type; the page still shows the plots through <img>."""
    client, job_id = written
    for name in ("plots/match.svg", "plots/match.png", "README.md", "mudsc_recipe.yaml"):
        answer = client.get(f"/jobs/{job_id}/files/{name}")
        assert answer.status_code == 200, (name, answer.text)
        assert answer.headers["x-content-type-options"] == "nosniff", name
        policy = [part.strip() for part in answer.headers["content-security-policy"].split(";")]
        assert "sandbox" in policy and "default-src 'none'" in policy, (name, policy)
        assert "script-src" not in answer.headers["content-security-policy"], policy
    assert client.get(f"/jobs/{job_id}/files/plots/match.svg").headers["content-type"].startswith("image/svg+xml")
    assert f'<img src="/jobs/{job_id}/files/plots/match.svg"' in client.get(f"/jobs/{job_id}").text


def test_every_answer_says_nosniff(written):
    client, job_id = written
    for path in ("/api/jobs", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/log", "/", f"/jobs/{job_id}",
                 "/partials/jobs", "/api/nothing", f"/jobs/{job_id}/files/model.safetensors"):
        answer = client.get(path)
        assert answer.headers.get("x-content-type-options") == "nosniff", (path, answer.status_code)
    refused = TestClient(client.app, base_url="http://evil.example").get("/api/jobs")  # the Host guard's answer
    assert refused.status_code == 400 and refused.headers.get("x-content-type-options") == "nosniff"


# ---------------------------------------------------------------------------------------------- nosniff everywhere


def with_a_failing_route(tmp_path):
    """The app with a route that raises (as a bug would): the exception escapes every handler the app declares."""
    app = create_app(tmp_path / "state")

    @app.get("/api/fails")
    def fails() -> None:
        raise RuntimeError("a bug, holding /srv/secret/path")

    return app


def test_an_exception_escaping_a_route_answers_one_line_of_json_saying_nosniff(tmp_path):
    """Starlette answers an exception escaping a route from outside the app's middleware: a plain-text 500 without
    `nosniff`. It is one line of JSON like every other error, says `nosniff`, and does not repeat the exception."""
    client = TestClient(with_a_failing_route(tmp_path), base_url="http://127.0.0.1", raise_server_exceptions=False)
    answer = client.get("/api/fails")
    assert answer.status_code == 500
    assert answer.headers.get("x-content-type-options") == "nosniff", answer.headers
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert "\n" not in error and "secret" not in error and "GET /api/fails" in error, error


def test_an_app_that_fails_before_answering_still_answers_500_saying_nosniff():
    """What uvicorn would answer itself (a plain-text 500): an inner app that raises, or returns, before it starts
    an answer gets the service's one-line JSON 500 with `nosniff` from the outermost layer."""
    async def raises(scope, receive, send):
        raise RuntimeError("broken")

    async def returns(scope, receive, send):
        return None

    for inner, escapes in ((raises, True), (returns, False)):
        sent: list[dict] = []

        async def send(message, sent=sent):
            sent.append(message)

        async def call(inner=inner):
            await app_module.NoSniffing(inner)({"type": "http", "method": "GET", "path": "/x", "headers": []},
                                               None, send)

        if escapes:  # re-raised once answered, so the server still logs the traceback
            with pytest.raises(RuntimeError):
                asyncio.run(call())
        else:
            asyncio.run(call())
        start, body = sent[0], sent[1]
        assert start["status"] == 500 and (b"x-content-type-options", b"nosniff") in start["headers"], sent
        assert "error" in json.loads(body["body"]), sent


def test_headers_over_the_cap_are_refused_even_when_they_arrive_whole(tmp_path):
    """h11 caps only a request head it has not seen the end of: 40 KiB of headers sent in one piece reached the app
    and were answered 200, although the docs say headers are capped at 16 KiB. The app refuses them itself (431,
    one line of JSON, `nosniff`, the connection closed); headers under the cap are answered as before."""
    from hf_mudsc.serve import HEADER_MAX_BYTES

    client = TestClient(create_app(tmp_path / "state"), base_url="http://127.0.0.1")
    answer = client.get("/api/jobs", headers={"X-Big": "a" * (HEADER_MAX_BYTES + 10)})
    assert answer.status_code == 431, (answer.status_code, answer.text)
    assert answer.headers.get("x-content-type-options") == "nosniff" and answer.headers["connection"] == "close"
    assert "\n" not in answer.json()["error"] and str(HEADER_MAX_BYTES) in answer.json()["error"], answer.text
    assert client.get("/api/jobs", headers={"X-Big": "a" * (HEADER_MAX_BYTES // 2)}).status_code == 200


def test_every_answer_of_the_running_server_says_nosniff_its_own_400_and_a_failing_route_included(tmp_path):
    """The server as `hf-mudsc serve` runs it (uvicorn with the CLI's settings): a route that raises, and a request
    uvicorn refuses before the app sees it (not HTTP, headers over the cap), answer with `nosniff` too."""
    import socket
    import threading
    import time

    import uvicorn

    from hf_mudsc.cli.serve import server_settings
    from hf_mudsc.serve import HEADER_MAX_BYTES

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(with_a_failing_route(tmp_path), host="127.0.0.1", port=port,
                                           log_level="critical", **server_settings()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        requests = {
            "a failing route": b"GET /api/fails HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            "a route": b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            "not HTTP": b"NOT HTTP AT ALL\r\n\r\n",
            # still arriving (h11 caps a head it has not seen the end of)
            "headers over the cap": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (HEADER_MAX_BYTES + 10),
        }
        for what, request in requests.items():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            status = head.split(b"\r\n")[0]
            assert b"x-content-type-options: nosniff" in head.lower(), (what, head)
            if what != "a route":
                assert status.split()[1] in (b"400", b"500"), (what, status)
                assert "error" in json.loads(body), (what, body)
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------------------------------------- job logs


def test_a_jobs_log_is_capped_keeping_its_first_and_last_lines_and_saying_how_many_were_dropped(tmp_path,
                                                                                                  monkeypatch):
    """A job producing megabytes of log lines filled the store (--max-jobs caps the number of jobs, not their
    size): each job keeps at most `LOG_CAP` lines and bytes — its first and its last lines, one line between saying
    how many were dropped — and a client following the log with `?since=next` still gets every later line once."""
    cap = store_module.LogCap(lines=10, bytes=1000, line_bytes=100)
    monkeypatch.setattr(store_module, "LOG_CAP", cap)
    app = create_app(tmp_path / "state")
    store, client = app.state.store, client_of(app)
    job_id = store.add({"models": ["user/a", "user/b"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    followed, since = [], 0
    for batch in range(10):
        store.append_log(job_id, [f"line {batch * 20 + i}" for i in range(20)])
        page = client.get(f"/api/jobs/{job_id}/log", params={"since": since}).json()
        followed += page["lines"]
        since = page["next"]
    assert since == 200  # `next` counts every line written, dropped ones included
    kept = client.get(f"/api/jobs/{job_id}/log").json()["lines"]
    marks = [line for line in kept if "dropped" in line]
    assert len(marks) == 1 and "190 lines" in marks[0], kept
    lines = [line for line in kept if line not in marks]
    assert lines == [f"line {i}" for i in range(5)] + [f"line {i}" for i in range(195, 200)], kept
    assert kept.index(marks[0]) == 5  # between the first part and the last
    written = [line for line in followed if "dropped" not in line]
    assert written[-5:] == lines[-5:] and len(written) == len(set(written))  # no line twice while following
    assert "190 lines dropped here" in client.get(f"/jobs/{job_id}").text  # the page shows the mark too

    big = store.add({"models": ["user/a", "user/c"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    store.append_log(big, ["x" * 10_000] + [f"{i:02d}" + "y" * 78 for i in range(40)])  # bytes, not lines
    kept = store.log(big)
    assert sum(len(line.encode()) for line in kept if "dropped" not in line) <= cap.bytes, kept
    assert kept[0].startswith("x" * 50) and len(kept[0].encode()) <= cap.line_bytes + 40  # a huge line is cut
    assert kept[-1].startswith("39") and any("dropped" in line for line in kept)


# ---------------------------------------------------------------------------------------------- pushed recipes


def pushed_recipe(tmp_path: Path, *, calibration: bool) -> str:
    """The `mudsc_recipe.yaml` a merge of local folders pushes to the Hub: folders named by name, listed on top."""
    machine = tmp_path / "alice" / "runs"
    for name in ("vit-cars", "vit-pets", "calibration-images"):
        (machine / name).mkdir(parents=True)
    lines = ["models:", f"- {machine / 'vit-cars'}", f"- {machine / 'vit-pets'}",
             f"method: {'zipit' if calibration else 'weight_matching'}"]
    if calibration:
        lines.append(f"calibration: {machine / 'calibration-images'}")
    text = "\n".join(lines) + "\n"
    published = published_text(text)
    assert published.startswith("#") and str(machine) not in published
    return published


@pytest.mark.parametrize("calibration", [False, True])
def test_a_pushed_recipe_naming_local_folders_by_name_is_refused_at_post_in_one_line(tmp_path, calibration):
    """`hf-mudsc merge --recipe` refuses such a file in one line naming each entry; the service queued it (the
    folder names pass as Hub ids) and the job failed in its worker, or answered that `calibration-images` was a
    datasets builder."""
    published = pushed_recipe(tmp_path, calibration=calibration)
    app = create_app(tmp_path / "state")
    client = client_of(app)
    text = published + "output: merged\n"
    answer = client.post("/api/jobs", content=text.encode(), headers={"Content-Type": "application/yaml"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "\n" not in error and "local folder" in error and "published recipe" in error, error
    assert "`models[0]` 'vit-cars'" in error and "`models[1]` 'vit-pets'" in error, error
    assert ("`calibration` 'calibration-images'" in error) == calibration, error
    assert "--recipe" not in error and "--base" not in error, error  # a client has no command line
    assert app.state.store.list() == []
    # The same recipe with those entries written in (the comment left on top) is a job.
    data = yaml.safe_load(published)
    edited = published.replace("- vit-cars", "- user/a").replace("- vit-pets", "- user/b")
    if calibration:
        edited = edited.replace(f"\ncalibration: {data['calibration']}\n", "\ncalibration: user/images:train\n")
    assert edited.splitlines()[:4] == published.splitlines()[:4]  # the comment is left as it was
    answer = client.post("/api/jobs", content=(edited + "output: merged\n").encode(),
                         headers={"Content-Type": "application/yaml"})
    assert answer.status_code == 201, answer.text


def test_the_readme_states_the_log_cap():
    cap = store_module.LOG_CAP
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert (f"log keeps at most {cap.lines:,} lines and {cap.bytes >> 10} KiB (each line cut at "
            f"{cap.line_bytes >> 10} KiB)") in " ".join(readme.split())
