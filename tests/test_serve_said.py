"""What the service says to its clients (QA of session 23): what ran and the warnings reach the answers and the page,
advice is in the service's spellings, POST refuses what the merge refuses before loading, a dry run of a claimed
target says so, and job lists carry a summary of each recipe. In-process app (`TestClient`, no lifespan: queued jobs
stay queued), tiny ViTs (tests/test_cli.save_parents_and_data)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_cli import save_parents_and_data

from hf_mudsc.errors import RecipeError
from hf_mudsc.serve import jobs as serve_jobs
from hf_mudsc.serve.app import create_app
from hf_mudsc.serve.jobs import parse_job, service_advice


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("said_inputs"))


def client_of(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


# ------------------------------------------------------------------------------------------- advice, spellings

LIBRARY_TEXTS = [  # (what the library says, what a service client reads instead)
    ("the output folder 'm' already exists; pass --overwrite to replace it, or choose another --output",
     'pass `"overwrite": true` to replace it, or choose another `output`'),
    ("the output folder 'm' already exists; pass overwrite=True to replace it, or choose another output",
     'pass `"overwrite": true` to replace it'),
    ("--device cuda: CUDA is not available on this machine; use --device cpu",
     '`"device": "cuda"`: CUDA is not available on this machine; use `"device": "cpu"`'),
    ("the Hub repo 'me/x' already exists; pass --overwrite, or choose another --push-to-hub name",
     'pass `"overwrite": true`, or choose another `push_to_hub`'),
    ("no model repository 'me/x' on the Hub (or it is private: pass token= or log in with `hf auth login`)",
     "(or it is private: send a token that can read it as `Authorization: Bearer hf_...`)"),
    ("the token was refused: pass a valid one (CLI --token, token=, or `hf auth login`)",
     "the token was refused: send a valid one as `Authorization: Bearer hf_...`"),
    ("`calibration` looks like an access token; pass a token with token= (CLI: --token, or the HF_TOKEN variable), "
     "never in its place (CLI: --calibration SPEC)", "`Authorization: Bearer hf_...` header"),
    ("push_to_hub (CLI: --push-to-hub ORG/NAME) looks like a token", "push_to_hub looks like a token"),
    ("say where it goes (CLI: --output DIR)", "say where it goes"),
    ("private= (CLI: --private) has no effect: nothing is pushed (no push_to_hub= (CLI: --push-to-hub))",
     "`private` has no effect: nothing is pushed (no `push_to_hub`)"),
    ("method 'ties' needs the parents' common base model and none was given; pass base= (CLI: --base), or choose "
     "a method that needs no base (CLI: --method linear)",
     'pass `base`, or choose a method that needs no base (`"method": "linear"`)'),
    ("refit 'x' needs calibration data: pass --calibration, or --refit none",
     'pass `calibration`, or `"refit": "none"`'),
]


@pytest.mark.parametrize("text, expected", LIBRARY_TEXTS)
def test_advice_names_what_a_service_client_sends_not_a_flag_or_keyword(text, expected):
    """QA: job errors and 400s said `pass --overwrite ... --output`, `use --device cpu`, `pass token= or log in
    with hf auth login`, `(CLI: --calibration SPEC)`: nothing a client of the service can do."""
    said = service_advice(text)
    assert expected in said, said
    for spelling in ("--", "CLI", "token=", "=True", "hf auth login", "device="):
        assert spelling not in said, (spelling, said)


def test_a_serve_flag_the_operator_passes_is_left_as_it_is():
    text = "outside the folders this server allows (its operator lists them with --local-root)"
    assert service_advice(text) == text


def test_a_jobs_error_and_warnings_are_answered_in_the_services_words(tmp_path):
    app = create_app(tmp_path / "state")
    store = app.state.store
    job_id = store.add({"models": ["user/a", "user/b"], "method": "linear"}, output=None, repo_id=None,
                       dry_run=False, has_token=False)
    store.update(job_id, status="failed", error="RecipeError: --device cuda: CUDA is not available on this "
                 "machine; use --device cpu")
    answer = client_of(app).get(f"/api/jobs/{job_id}").json()
    assert answer["error"] == 'RecipeError: `"device": "cuda"`: CUDA is not available on this machine; use ' \
                              '`"device": "cpu"`', answer


@pytest.mark.parametrize("kind", ["application/json", "application/yaml"])
def test_an_integer_of_thousands_of_digits_answers_a_plain_400(tmp_path, kind):
    """QA: `"alpha": 111...1` (5,000 digits) answered Python's `use sys.set_int_max_str_digits()`."""
    body = ('{"models": ["user/a", "user/b"], "alpha": %s}' if kind.endswith("json") else
            "models: [user/a, user/b]\nalpha: %s\n") % ("1" * 5000)
    answer = client_of(create_app(tmp_path / "state")).post("/api/jobs", content=body,
                                                               headers={"Content-Type": kind})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "integer too large" in error and "sys." not in error and "digits()" not in error, error


# ------------------------------------------------------------------------------------------- warnings, what ran


def test_a_recipe_warning_reaches_the_post_answer_the_job_and_its_dry_run(tmp_path, inputs):
    """QA: `private: true` without `push_to_hub` warned on the server's console only: not in the 201, the job or a
    dry run's `warnings`."""
    from hf_mudsc.serve.worker import dry_run_plan

    a, b, _ = inputs
    app = create_app(tmp_path / "state", local_roots=[a.parent])
    body = {"models": [str(a), str(b)], "method": "linear", "private": True, "output": "p"}
    client = client_of(app)
    said = "`private` has no effect: nothing is pushed (no `push_to_hub`)"
    answer = client.post("/api/jobs", json=body)
    assert answer.status_code == 201 and answer.json()["warnings"] == [said], answer.text
    assert client.get(f"/api/jobs/{answer.json()['id']}").json()["warnings"] == [said]
    dry = client.post("/api/jobs?dry_run=true", json={**body, "output": "q"})
    assert dry.status_code == 201 and dry.json()["warnings"] == [said], dry.text
    stored = app.state.store.get(dry.json()["id"])["request"]
    job = serve_jobs.resolve_local_paths(serve_jobs.JobRequest.from_stored(stored), app.state.local_roots)
    assert job.warnings == (said,)  # what the worker is handed (the scheduler's start check keeps it)
    plan = dry_run_plan(job, None)
    assert said in plan["plan"]["warnings"] and said in plan["plan_text"], plan["plan"]["warnings"]


def test_a_warning_of_another_thread_is_not_this_requests(tmp_path):
    import logging

    started, done = threading.Event(), threading.Event()

    def other() -> None:
        started.wait()
        logging.getLogger("hf_mudsc.other").warning("another request's warning")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with serve_jobs.recorded_warnings() as found:
        started.set()
        done.wait(5)
    thread.join()
    assert found == []


class Pipe:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)


def test_a_merge_result_says_what_ran_and_the_merges_warnings(tmp_path, inputs):
    """QA: with `method: auto` the API said only `recipe.method: auto`; the method and α chosen and the merge's
    warnings ("calibration too small", ...) were only in the raw log. The result now carries what the merged
    config records (`config.mudsc`), and the request's own warnings first."""
    from hf_mudsc.serve.worker import Reporter, run_merge

    a, b, data = inputs
    job = parse_job({"models": [str(a), str(b)], "calibration": str(data), "alpha": "auto", "num_samples": 8,
                     "batch_size": 8, "private": True, "output": "auto"}, tmp_path / "outputs",
                    local_roots=[a.parent])
    result = run_merge(job, None, Reporter(Pipe(), None, calibrates=True, asks_before_push=False))
    recorded = json.loads((Path(result["output"]) / "config.json").read_text())["mudsc"]
    assert result["method"] == recorded["method"] != "auto" and result["alpha"] == recorded["alpha"], result
    assert recorded["warnings"], "the tiny merge is expected to warn (calibration too small, ...)"
    assert result["warnings"] == [*job.warnings, *recorded["warnings"]] and job.warnings, result["warnings"]
    json.dumps(result)  # stored as JSON


def test_the_page_and_the_api_show_the_method_that_ran_and_the_warnings(tmp_path):
    app = create_app(tmp_path / "state")
    store = app.state.store
    job_id = store.add({"models": ["user/a", "user/b"], "method": "auto", "warnings": ["`private` has no effect"]},
                       output=None, repo_id=None, dry_run=False, has_token=False)
    store.update(job_id, status="succeeded", result={
        "output": None, "method": "mudsc", "alpha": 0.9, "method_choice_reason": "the parents are independent",
        "warnings": ["`private` has no effect", "calibration too small: give more samples (num_samples= (CLI: "
                     "--num-samples) or a larger split)"]})
    client = client_of(app)
    job = client.get(f"/api/jobs/{job_id}").json()
    assert (job["result"]["method"], job["result"]["alpha"]) == ("mudsc", 0.9)
    assert job["result"]["warnings"][1] == "calibration too small: give more samples (`num_samples` or a larger split)"
    for page in (client.get(f"/jobs/{job_id}").text, client.get("/").text):
        assert "auto → mudsc" in page and "0.9" in page, page
    page = client.get(f"/jobs/{job_id}").text
    assert "<li>`private` has no effect</li>" in page and "<li>calibration too small" in page
    assert "the parents are independent" in page


# ------------------------------------------------------------------------------------------- refused at POST


def test_a_cuda_device_is_refused_at_post_on_a_server_without_cuda(tmp_path, monkeypatch):
    """QA: `device: "cuda"` was queued (201) and failed in the worker with `use --device cpu`."""
    monkeypatch.setattr(serve_jobs, "cuda_devices", lambda: 0)
    base = {"models": ["user/a", "user/b"], "method": "linear", "output": "m"}
    with pytest.raises(RecipeError, match='`device` \'cuda\': CUDA is not available on this server; send '
                                          '`"device": "cpu"`'):
        parse_job({**base, "device": "cuda"}, tmp_path)
    monkeypatch.setattr(serve_jobs, "cuda_devices", lambda: 2)
    with pytest.raises(RecipeError, match="no CUDA device 2 \\(2 available: 0-1\\)"):
        parse_job({**base, "device": "cuda:2"}, tmp_path)
    assert parse_job({**base, "device": "cuda:1"}, tmp_path).recipe.device == "cuda:1"
    assert parse_job({**base, "device": "cpu"}, tmp_path).recipe.device == "cpu"


def test_a_method_needing_a_base_none_of_the_local_parents_cards_names_is_refused_at_post(tmp_path, inputs):
    """QA: `method: ties` with local parents whose folders name no base_model was queued and failed in the worker
    (`MergeInputError: method 'ties' needs the parents' common base model`)."""
    a, b, _ = inputs
    body = {"models": [str(a), str(b)], "method": "ties", "output": "t"}
    with pytest.raises(RecipeError) as caught:
        parse_job(body, tmp_path, local_roots=[a.parent])
    message = str(caught.value)
    assert "needs the parents' common base model" in message and "pass `base`" in message, message
    assert "--" not in message and "CLI" not in message, message
    assert parse_job({**body, "base": str(a)}, tmp_path, local_roots=[a.parent]).recipe.base == str(a)
    assert parse_job({**body, "models": ["user/a", "user/b"]}, tmp_path).recipe.method == "ties"  # Hub: the worker's


# ------------------------------------------------------------------------------------------- dry runs, listings


def test_a_dry_run_of_a_target_an_active_job_claims_says_so(tmp_path):
    """QA: a dry run of an output a queued merge claims answered 201 and succeeded without a word (a real POST
    gets 409). It is said, in the 201 and the plan's warnings: the plan is still worth having."""
    client = client_of(create_app(tmp_path / "state"))
    body = {"models": ["user/a", "user/b"], "method": "linear", "output": "sub/m", "push_to_hub": "me/m"}
    first = client.post("/api/jobs", json=body)
    assert first.status_code == 201, first.text
    assert client.post("/api/jobs", json=body).status_code == 409
    dry = client.post("/api/jobs?dry_run=true", json=body)
    assert dry.status_code == 201, dry.text
    warning = dry.json()["warnings"][-1]
    assert warning.startswith(f"the output folder 'sub/m' is claimed by job {first.json()['id']} (queued): this "
                              "merge, submitted now, would be refused (409)"), warning
    assert str(tmp_path) not in warning
    repo = client.post("/api/jobs?dry_run=true", json={**body, "output": "other", "push_to_hub": "Me/M"})
    assert "the Hub repo 'Me/M' is claimed by job" in repo.json()["warnings"][-1]
    free = client.post("/api/jobs?dry_run=true", json={**body, "output": "free", "push_to_hub": "me/free"})
    assert free.json()["warnings"] == []


def test_the_job_list_and_the_page_carry_a_summary_of_a_long_parent_list(tmp_path):
    """QA: 20,000 parents made `GET /api/jobs` take 2.1 s and the page 739 KB: every listing carried every job's
    whole recipe. The list and the page now name the first parents and count the rest; the job has them all."""
    app = create_app(tmp_path / "state")
    models = [f"org/parent-{i:05d}" for i in range(2000)]
    job_id = app.state.store.add({"models": models, "method": "average", "output": "x"}, output=None, repo_id=None,
                                 dry_run=True, has_token=False)
    client = client_of(app)
    listed = client.get("/api/jobs").json()["jobs"][0]
    assert "recipe" not in listed and listed["summary"] == {
        "method": "average", "parents": 2000, "models": models[:3], "output": "x", "push_to_hub": None}
    assert client.get(f"/api/jobs/{job_id}").json()["recipe"]["models"] == models
    for page in (client.get("/").text, client.get("/partials/jobs").text):
        assert "org/parent-00002" in page and "org/parent-00003" not in page and "and 1997 more" in page
        assert len(page) < 20_000


def test_the_page_names_the_output_folder_as_the_client_did(tmp_path):
    """QA: the Target column showed `x` for `sub/x`."""
    client = client_of(create_app(tmp_path / "state"))
    answer = client.post("/api/jobs", json={"models": ["user/a", "user/b"], "method": "linear", "output": "sub/x"})
    assert answer.status_code == 201, answer.text
    assert '<td class="mono">sub/x</td>' in client.get("/partials/jobs").text


def test_a_post_refusal_names_the_jobs_keys_not_the_apis_arguments(tmp_path):
    """QA: POST answered `pass overwrite=True to replace it` (the Python API's spelling)."""
    app = create_app(tmp_path / "state", output_root=tmp_path / "out")
    (tmp_path / "out" / "taken").mkdir(parents=True)
    answer = client_of(app).post("/api/jobs", json={"models": ["user/a", "user/b"], "method": "linear",
                                                    "output": "taken"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == ("the output folder 'taken' already exists; pass `\"overwrite\": true` to "
                                      "replace it, or choose another output"), answer.json()


TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


@pytest.mark.parametrize("body", [
    {"models": ["{root}/a", "{root}/" + TOKEN]},
    {"models": ["{root}/a", "{root}/b"], "base": "{root}/" + TOKEN},
    {"models": ["{root}/a", "{root}/b"], TOKEN: 1},
])
def test_a_token_anywhere_in_a_job_is_refused_unshown_and_never_stored(tmp_path, body):
    """QA s23: a token-shaped name inside a local parent path was stored and shown on the page and by the API (only
    the calibration field was checked), and a token-shaped unknown key was echoed in the 400."""
    root = tmp_path / "roots"
    root.mkdir()
    app = create_app(tmp_path / "state", local_roots=[root])
    client = client_of(app)
    filled = json.loads(json.dumps({**body, "method": "linear", "output": "o"}).replace("{root}", str(root)))
    answer = client.post("/api/jobs", json=filled)
    assert answer.status_code == 400, answer.text
    assert TOKEN not in answer.text and "access token" in answer.json()["error"], answer.text
    assert client.get("/api/jobs").json()["jobs"] == []
    assert TOKEN not in client.get("/").text
    assert not [p for p in (tmp_path / "state").rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
