"""Session 37's final review of `hf-mudsc serve`, fixed: what a cancel refused its push says, short secrets in a
job's fields, the worker's reporter asked whether it asks before pushing. Each test's reproduction is its
docstring's first line."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from test_cli import save_parents_and_data

import hf_mudsc
from hf_mudsc.serve.app import create_app
from hf_mudsc.serve.jobs import JobRequest
from hf_mudsc.serve.worker import JobCancelled, Reporter, cancelled_said

BODY = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}


def client_of(app) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """The two tiny ViTs merged in memory (zipit, 24 samples)."""
    a, b, calibration = save_parents_and_data(tmp_path_factory.mktemp("fix2_serve_inputs"))
    return hf_mudsc.merge([str(a), str(b)], str(calibration), method="zipit", num_samples=24, batch_size=8,
                          progress=False)


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _cancelled_at_the_push(*args, **kwargs):
    """The handler's cancel point as `Reporter.begin_push` leaves it after a "no-push" answer."""
    raise JobCancelled()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_cancel_refusing_the_push_says_the_output_is_as_before_as_it_is_on_disk(tmp_path, monkeypatch, merged,
                                                                                 overwrite):
    """DELETE as a job with output + push_to_hub began its push: said "the merged model was written"; none was."""
    from hf_mudsc.publish.writer import publish, recipe_of

    out = tmp_path / "out"
    before = None
    if overwrite:  # an earlier model in the output, which the job was to replace
        hf_mudsc.save_merged(merged, out)
        before = files_of(out)
    monkeypatch.setattr("hf_mudsc.publish.hub.push_folder", _cancelled_at_the_push)
    with pytest.raises(JobCancelled):
        publish(merged, output=out, push_to_hub="me/merged", overwrite=overwrite,
                recipe=recipe_of(merged).override(push_to_hub="me/merged"))
    job = JobRequest.from_stored({"models": ["user/a", "user/b"], "output": str(out), "push_to_hub": "me/merged",
                                  "overwrite": overwrite})
    said = cancelled_said(job, push_refused=True)
    assert "nothing was written or pushed" in said and f"{str(out)!r} is as before" in said, said
    assert "was written to" not in said
    if overwrite:
        assert files_of(out) == before
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if overwrite else [])  # no staging folder left
    push_only = JobRequest.from_stored({"models": ["user/a", "user/b"], "push_to_hub": "me/merged"})
    assert cancelled_said(push_only, push_refused=True) == ("cancelled on request before its push began; nothing was "
                                                            "written or pushed")


@pytest.mark.parametrize(("api_key", "field", "value"), [
    ("2024", "seed", 2024), ("8", "batch_size", 8), ("0.5", "alpha", 0.5),
])
def test_a_short_api_key_never_refuses_a_number_equal_to_it(tmp_path, api_key, field, value):
    """--api-key 2024 refused `seed: 2024`; --api-key 8 refused `batch_size: 8`: a number is no secret's text."""
    app = create_app(tmp_path / "state", api_key=api_key)
    answer = client_of(app).post("/api/jobs", json={**BODY, field: value}, headers={"X-API-Key": api_key})
    assert answer.status_code == 201, answer.text


@pytest.mark.parametrize(("api_key", "labels"), [
    ("2024", {"2024": 0}),  # a short key: a whole key of a mapping
    ("the-service-key-1234", {"x-the-service-key-1234": 0}),  # a long key: anywhere in a key
    ("the-service-key-1234", {"a": {"the-service-key-1234": 1}}),  # at any depth
])
def test_a_secret_in_a_mapping_key_of_a_field_is_refused(tmp_path, api_key, labels):
    """--api-key 2024 and `labels: {"2024": 0}`: stored and listed (the keys of a field's mapping were never read)."""
    app = create_app(tmp_path / "state", api_key=api_key)
    client = client_of(app)
    answer = client.post("/api/jobs", json={**BODY, "labels": labels}, headers={"X-API-Key": api_key})
    assert answer.status_code == 400, answer.text
    assert "API key" in answer.json()["error"] and api_key not in answer.text
    assert app.state.store.list() == []


@pytest.mark.parametrize(("api_key", "warned"), [("2024", True), ("the-service-key-1234", False), (None, False)])
def test_a_short_api_key_is_warned_about_once_at_startup(tmp_path, caplog, api_key, warned):
    """hf-mudsc serve --api-key 2024: no word that the key is weak and only matched as a whole value."""
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        create_app(tmp_path / "state", api_key=api_key)
    said = [r for r in caplog.records if "API key is under 16 characters" in r.getMessage()]
    assert len(said) == (1 if warned else 0), caplog.text
    assert all(r.levelno == logging.WARNING and (api_key or "") not in r.getMessage() for r in said)


def test_the_reporter_must_be_told_whether_it_asks_before_pushing():
    """Reporter(conn, token, calibrates=False): pushed without asking the scheduler (asks_before_push default False)."""
    with pytest.raises(TypeError):
        Reporter(None, None, calibrates=False)  # type: ignore[call-arg]
    assert Reporter(None, None, calibrates=False, asks_before_push=True).asks_before_push is True
    assert not hasattr(Reporter(None, None, calibrates=False, asks_before_push=False), "pushes")
