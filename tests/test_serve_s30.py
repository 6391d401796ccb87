"""`hf-mudsc serve`: the defects of the session-30 service hunt — what a recipe file's own notes and keys say, local
inputs checked at POST, the licence conflict, a replaced output folder, a short token and an output root that cannot
be created — each checked in-process (the app without its scheduler thread) where it can be.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hf_mudsc import __version__
from hf_mudsc.cli.serve import check_output_root
from hf_mudsc.errors import RecipeError
from hf_mudsc.publish.folder import MARKER_FILENAME, weights_fingerprint
from hf_mudsc.publish.recipe import Recipe
from hf_mudsc.serve import worker
from hf_mudsc.serve.app import create_app
from hf_mudsc.serve.jobs import JobRequest, parse_job

YAML = {"Content-Type": "application/yaml"}


def client_of(app: Any) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1")


def post_yaml(client: TestClient, text: str, path: str = "/api/jobs") -> Any:
    return client.post(path, content=text.encode(), headers=YAML)


# ------------------------------------------------------------------------- 1. a recipe's `# processor:` note


def test_a_recipe_files_processor_note_is_a_warning_of_the_job_and_its_dry_run(tmp_path):
    """`merge --recipe` warns that the re-run preprocesses with parent A's processor; the service said nothing."""
    text = Recipe(models=["user/a", "user/b"], method="average").to_yaml(processor_given=True)
    client = client_of(create_app(tmp_path / "state"))
    answer = post_yaml(client, text + "output: served\n")
    assert answer.status_code == 201, answer.text
    said = [w for w in answer.json()["warnings"] if "processor" in w]
    assert len(said) == 1 and "parent A's" in said[0], answer.json()
    job = client.get(f"/api/jobs/{answer.json()['id']}").json()
    assert said[0] in job["warnings"], job
    stored = JobRequest.from_stored(client.app.state.store.get(job["id"])["request"])
    assert said[0] in stored.warnings  # what the worker's result and a dry run's plan carry (`job.warnings`)
    dry = post_yaml(client, text, "/api/jobs?dry_run=true")
    assert dry.status_code == 201 and any("processor" in w for w in dry.json()["warnings"]), dry.text


# ----------------------------------------------------------------------------- 2. `auto_chosen` of a re-run


AUTO_CHOSEN = {"method": {"value": "mudsc", "reason": "parents come from different initializations: mudsc",
                          "correspondence_check": None, "parent_relation": {"relation": "independent"}}}


def test_a_recipes_auto_chosen_reaches_the_worker(tmp_path):
    """The re-run of a recipe from a `method: auto` merge restates why auto chose (CLI); the service dropped it."""
    text = Recipe(models=["user/a", "user/b"], method="mudsc", calibration="user/data:train").to_yaml()
    text += "auto_chosen: " + json.dumps(AUTO_CHOSEN) + "\noutput: served\n"
    client = client_of(create_app(tmp_path / "state"))
    answer = post_yaml(client, text)
    assert answer.status_code == 201, answer.text
    stored = client.app.state.store.get(answer.json()["id"])["request"]
    assert JobRequest.from_stored(stored).recipe.auto_chosen == AUTO_CHOSEN


@pytest.mark.parametrize("chosen, said", [
    ({"method": {"value": "mudsc"}}, "auto_chosen"),  # not as hf-mudsc writes it
    ({"method": {"value": "mudsc", "reason": "hf_" + "a" * 34}}, "access token"),
    ({"method": {"value": "mudsc", "reason": "chosen\n2026-01-01 ERROR forged"}}, "control characters"),
])
def test_a_bad_auto_chosen_is_refused_naming_it(tmp_path, chosen, said):
    body = {"models": ["user/a", "user/b"], "method": "average", "output": "o", "auto_chosen": chosen}
    answer = client_of(create_app(tmp_path / "state")).post("/api/jobs", json=body)
    assert answer.status_code == 400 and said in answer.json()["error"], answer.text
    assert "hf_" + "a" * 34 not in answer.text


# ------------------------------------------------------------------------------- 3. `hf_mudsc_version`


def test_a_recipe_from_a_newer_release_warns_naming_both_versions(tmp_path):
    body = {"hf_mudsc_version": "99.0.0", "models": ["user/a", "user/b"], "method": "average", "output": "o"}
    job = parse_job(body, tmp_path / "out")
    said = [w for w in job.warnings if "99.0.0" in w]
    assert len(said) == 1 and __version__ in said[0] and "operator" in said[0], job.warnings
    assert "pip install" not in said[0]


def test_an_unknown_key_of_a_newer_recipe_is_refused_naming_the_versions(tmp_path):
    body = {"hf_mudsc_version": "99.0.0", "models": ["user/a", "user/b"], "method": "average", "output": "o",
            "future_option": 3}
    with pytest.raises(RecipeError) as refused:
        parse_job(body, tmp_path / "out")
    said = str(refused.value)
    assert "future_option" in said and "99.0.0" in said and __version__ in said and "operator" in said, said
    assert "pip install" not in said
    with pytest.raises(RecipeError, match="unknown key"):  # an older (or no) version: the usual refusal
        parse_job({**body, "hf_mudsc_version": "0.0.1"}, tmp_path / "out")


# ----------------------------------------------------------------------------- 4. data given in memory


def test_a_recipe_whose_data_was_given_in_memory_says_so_in_the_services_words(tmp_path):
    text = Recipe(models=["user/a", "user/b"], method="zipit").to_yaml(calibration_in_memory=True) + "output: o\n"
    answer = post_yaml(client_of(create_app(tmp_path / "state")), text)
    said = answer.json()["error"]
    assert answer.status_code == 400 and "in memory" in said and "`calibration`" in said, said
    assert "--calibration" not in said and "\n" not in said


# ------------------------------------------------------------------ 5 and 6. local inputs the server lacks


def parent_folder(folder: Path, weights: str = "model.safetensors") -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / weights).write_bytes(b"")
    return folder


def test_missing_local_inputs_are_refused_at_post_all_at_once(tmp_path):
    """The CLI refuses every missing input before loading; the service queued the job, which failed in its worker
    naming the first."""
    roots = tmp_path / "roots"
    a = parent_folder(roots / "a")
    body = {"models": [str(a), str(roots / "no-such-b")], "calibration": str(roots / "no-such-data"),
            "method": "zipit", "output": "o"}
    app = create_app(tmp_path / "state", local_roots=[roots])
    answer = client_of(app).post("/api/jobs", json=body)
    said = answer.json()["error"]
    assert answer.status_code == 400, answer.text
    assert "`models[1]`" in said and repr(str(roots / "no-such-b")) in said, said
    assert "`calibration`" in said and repr(str(roots / "no-such-data")) in said, said
    assert str(Path.cwd()) not in said and "`models[0]`" not in said and "\n" not in said
    assert app.state.store.list() == []


def test_missing_input_refusal_names_the_clients_relative_path_not_the_servers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parent_folder(tmp_path / "a")
    with pytest.raises(RecipeError) as refused:
        parse_job({"models": ["./a", "./gone"], "method": "average", "output": "o"}, tmp_path / "out",
                  local_roots=[tmp_path])
    said = str(refused.value)
    assert "`models[1]`" in said and "'./gone'" in said and str(tmp_path) not in said, said


def test_a_pickle_only_parent_is_refused_at_post_in_the_services_words(tmp_path):
    roots = tmp_path / "roots"
    a, b = parent_folder(roots / "a"), parent_folder(roots / "b", "pytorch_model.bin")
    answer = client_of(create_app(tmp_path / "state", local_roots=[roots])).post(
        "/api/jobs", json={"models": [str(a), str(b)], "method": "average", "output": "o"})
    said = answer.json()["error"]
    assert answer.status_code == 400 and "`models[1]`" in said and "pickle" in said, said
    assert "safetensors only" in said and "allow_pickle=True" not in said and "--allow-pickle" not in said, said


def test_a_jobs_pickle_error_gives_advice_the_service_can_follow():
    """A job's error (a Hub parent's pickle weights, found by its worker) advised `allow_pickle=True`: refused."""
    from hf_mudsc.load.weight_files import weights_format
    from hf_mudsc.serve.jobs import service_advice

    with pytest.raises(Exception) as refused:
        weights_format("org/b", ["pytorch_model.bin"], False)
    said = service_advice(str(refused.value))
    assert "allow_pickle" not in said and "safetensors only" in said and "convert" in said.lower(), said


# --------------------------------------------------------------------------------- 7. the licence conflict


class Pipe:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, message: tuple) -> None:
        self.sent.append(message)


def run_merge_producing(monkeypatch: pytest.MonkeyPatch, produced: dict[str, Any], job: JobRequest
                        ) -> dict[str, Any]:
    import hf_mudsc.runner

    monkeypatch.setattr(hf_mudsc.runner, "execute", lambda recipe, **kwargs: produced)
    reporter = worker.Reporter(Pipe(), None, calibrates=False, asks_before_push=False)
    return worker.run_merge(job, None, reporter)


def test_a_licence_conflict_is_among_the_results_warnings_with_the_parents_licences(monkeypatch):
    mudsc = {"method": "linear", "warnings": [], "parent_licenses": ["mit", "apache-2.0"]}
    job = JobRequest(Recipe(models=["user/a", "user/b"], method="linear", push_to_hub="me/x"), False)
    result = run_merge_producing(monkeypatch, {"mudsc": mudsc}, job)
    said = [w for w in result["warnings"] if "licen" in w]
    assert len(said) == 1 and "mit" in said[0] and "apache-2.0" in said[0], result["warnings"]
    assert result["parent_licenses"] == ["mit", "apache-2.0"]
    same = run_merge_producing(monkeypatch, {"mudsc": {**mudsc, "parent_licenses": ["mit", "mit"]}}, job)
    assert not any("licen" in w for w in same["warnings"]) and same["parent_licenses"] == ["mit", "mit"]


# -------------------------------------------------------------------------- 8. a recipe naming a model object


def test_a_recipe_naming_a_model_object_is_refused_in_the_services_words(tmp_path):
    text = Recipe(models=["<ViTForImageClassification object>", "user/b"], method="linear").to_yaml()
    answer = post_yaml(client_of(create_app(tmp_path / "state")), text + "output: o\n")
    said = answer.json()["error"]
    assert answer.status_code == 400 and "`models[0]`" in said and "Hub reference" in said, said
    assert "--recipe" not in said and "hf-mudsc merge" not in said and "--base" not in said, said


# ---------------------------------------------------------------------------- 9. an output folder replaced


def written_folder(folder: Path, card: str) -> str:
    """A folder as the writer leaves it: a card, weights, and the marker listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(card)
    (folder / "model.safetensors").write_text(card)  # other weights for another card
    files = {name: {"size": len(card), "sha256": hashlib.sha256(card.encode()).hexdigest()}
             for name in ("README.md", "model.safetensors")}
    (folder / MARKER_FILENAME).write_text(json.dumps({"written_by": "hf-mudsc", "complete": True, "files": files}))
    return weights_fingerprint(folder)


def test_the_worker_records_which_model_it_wrote(monkeypatch, tmp_path):
    folder = tmp_path / "out"
    fingerprint = written_folder(folder, "# zipit\n")
    job = JobRequest(Recipe(models=["user/a", "user/b"], method="linear", output=str(folder)), False)
    result = run_merge_producing(monkeypatch, {"mudsc": {"method": "linear"}, "output": folder}, job)
    assert result["output_fingerprint"] == fingerprint is not None
    assert written_folder(tmp_path / "other", "# linear\n") != fingerprint


def test_an_older_jobs_page_serves_nothing_from_a_folder_a_later_job_replaced(tmp_path):
    app = create_app(tmp_path / "state")
    store, client = app.state.store, client_of(app)
    folder = tmp_path / "state" / "outputs" / "same"
    ids = []
    for card in ("# zipit\n", "# linear\n"):
        digest = written_folder(folder, card)
        job_id = store.add({"models": ["user/a", "user/b"], "method": "average", "output": str(folder)},
                           output=str(folder), repo_id=None, dry_run=False, has_token=False)
        store.update(job_id, status="succeeded", result={"output": str(folder), "files": ["README.md"],
                                                         "output_fingerprint": digest, "warnings": []})
        ids.append(job_id)
    old, new = ids
    assert client.get(f"/jobs/{new}/files/README.md").text == "# linear\n"
    answer = client.get(f"/jobs/{old}/files/README.md")
    assert answer.status_code == 404 and "replaced by a later job" in answer.json()["error"], answer.text
    page = client.get(f"/jobs/{old}").text
    assert "replaced by a later job" in page and f"/jobs/{old}/files/README.md" not in page


def test_a_job_stored_before_the_marker_was_recorded_still_serves_its_files(tmp_path):
    app = create_app(tmp_path / "state")
    folder = tmp_path / "state" / "outputs" / "kept"
    written_folder(folder, "# card\n")
    job_id = app.state.store.add({"models": ["user/a", "user/b"], "method": "average", "output": str(folder)},
                                 output=str(folder), repo_id=None, dry_run=False, has_token=False)
    app.state.store.update(job_id, status="succeeded", result={"output": str(folder), "warnings": []})
    assert client_of(app).get(f"/jobs/{job_id}/files/README.md").text == "# card\n"


# ---------------------------------------------------------------------------------------- 10. a short token


def test_a_short_token_masks_only_itself_in_the_jobs_log_and_error():
    reporter = worker.Reporter(Pipe(), "e", calibrates=False, asks_before_push=False)
    line = "LoadError: no model folder at '/tmp/hunt_serve/no-such-b'; pass an existing folder"
    assert reporter.scrub(line) == line
    assert reporter.scrub("the token was e, here") == "the token was ***, here"
    secret = "hf_s30ClientTokenThatMustNeverShow"
    reporter = worker.Reporter(Pipe(), secret, calibrates=False, asks_before_push=False)
    for text in (f"Bearer {secret}", f"token={secret}&x", f"https://u:{secret}@host/x", f"'{secret}'"):
        assert secret not in reporter.scrub(text), text


# ------------------------------------------------------------------------------- 11. an uncreatable output root


def test_an_output_root_that_cannot_be_created_is_one_line_naming_the_option(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError) as refused:
        check_output_root(tmp_path / "a-file" / "outputs")
    said = str(refused.value)
    assert "--output-root" in said and "cannot be created" in said and "\n" not in said, said
    check_output_root(tmp_path / "new" / "outputs")
    assert (tmp_path / "new" / "outputs").is_dir()


def test_serve_with_an_uncreatable_output_root_prints_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "hf_mudsc", "serve", "--port", "0", "--state-dir",
                           str(tmp_path / "state"), "--output-root", str(tmp_path / "a-file" / "outputs")],
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert "--output-root" in lines[0] and "cannot be created" in lines[0], lines
