"""`hf-mudsc serve --local-root DIR`: what a job reads from the server's disk stays inside the roots — including a
base a local parent's model card names — the worker loads the paths that were checked (resolved, so a link swapped
after the check does not redirect a load), and a refusal tells the client nothing about the server's disk but the
path it sent (the roots go to the server's log)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import make_model
from serve_service import Service, drain_job
from test_cli import save_parents_and_data

from hf_mudsc.errors import RecipeError
from hf_mudsc.serve.jobs import JobRequest, parse_job

NEEDS_BASE = "task_arithmetic"  # a method that takes the parents' cards' base_model when no `base` is given


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    return save_parents_and_data(tmp_path_factory.mktemp("local_roots_inputs"))


def card(folder: Path, base_model: str) -> None:
    (folder / "README.md").write_text(f"---\nbase_model: {base_model}\nlibrary_name: transformers\n---\n\n# x\n")


@pytest.fixture()
def disk(tmp_path, monkeypatch):
    """`root` (the allowed folder) with two parent folders and a base folder; `outside` beside it with a model
    folder; `root/link` leads out. The working folder is `tmp_path`, where relative paths resolve."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "p0", root / "p1", root / "base", outside / "secret-model"):
        folder.mkdir(parents=True)
    (root / "link").symlink_to(outside / "secret-model", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return root, outside


def body_for(root: Path, **extra: Any) -> dict[str, Any]:
    return {"models": [str(root / "p0"), str(root / "p1")], "method": NEEDS_BASE, "output": "m", **extra}


@pytest.mark.parametrize("named", ["{outside}/secret-model", "../outside", "root/../outside/secret-model",
                                   "root/link", "outside/secret-model"])
def test_a_local_parents_card_naming_a_base_outside_the_roots_is_refused(disk, tmp_path, caplog, named):
    root, outside = disk
    value = named.format(outside=outside)
    for parent in ("p0", "p1"):
        card(root / parent, value)
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"), pytest.raises(RecipeError) as caught:
        parse_job(body_for(root), tmp_path / "out", local_roots=[root])
    message = str(caught.value)
    assert message.startswith(f"`models[0]` {str(root / 'p0')!r}: its model card (README.md) names a local "
                              "base_model, which is outside the folders this server allows (its operator lists them "
                              "with --local-root)"), message
    assert "\n" not in message and value not in message and str(outside) not in message, message
    # The server's log keeps what the client is not told: the card's value and the roots.
    assert value in caplog.text and str(root.resolve()) in caplog.text


def test_a_card_base_inside_the_roots_a_hub_id_or_no_base_needed_is_accepted(disk, tmp_path):
    root, _ = disk
    for value in (str(root / "base"), "root/base", "org/base", "org/base@v1"):
        for parent in ("p0", "p1"):
            card(root / parent, value)
        assert parse_job(body_for(root), tmp_path / "out", local_roots=[root]).recipe.base is None
    for parent in ("p0", "p1"):
        card(root / parent, "root/link")
    # a `base` given wins over the cards, and a method that needs no base never reads them
    assert parse_job(body_for(root, base="user/base"), tmp_path / "out", local_roots=[root])
    assert parse_job(body_for(root, method="weight_matching"), tmp_path / "out", local_roots=[root])


def test_the_refusal_names_no_root_and_the_server_log_keeps_them(disk, tmp_path, caplog):
    """A 400 tells the client the path it sent is outside the allowed folders, not where those are."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    root, outside = disk
    other = tmp_path / "other-root"
    other.mkdir()
    app = create_app(tmp_path / "state", local_roots=[root, other])
    client = TestClient(app, base_url="http://127.0.0.1")
    sent = str(outside / "secret-model")
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        answer = client.post("/api/jobs", json={"models": [sent, "user/b"], "method": "weight_matching",
                                                "output": "m"})
    assert answer.status_code == 400
    message = answer.json()["error"]
    assert message == (f"`models[0]` names the local path {sent!r}, which is outside the folders this server allows "
                       "(its operator lists them with --local-root): name a path inside them or a Hub reference "
                       "`org/name[@revision]`")
    assert str(root) not in answer.text and str(other) not in answer.text
    assert str(root.resolve()) in caplog.text and str(other.resolve()) in caplog.text and sent in caplog.text
    assert app.state.store.list() == []


def run_queued(app: Any, job_id: str, handed: list[dict[str, Any]], after_check: Any = None) -> dict[str, Any]:
    """Let the app's scheduler take `job_id`, recording the request each worker would be handed (no process starts:
    `_start` is replaced); `after_check()` runs once the job has passed the start check."""
    scheduler = app.state.scheduler

    def start(job: str, request: dict[str, Any], run: Any, token: Any) -> None:
        handed.append(json.loads(json.dumps(request)))
        if after_check is not None:
            after_check()
        app.state.store.update(job, status="succeeded")
        with scheduler._lock:
            scheduler.running.pop(job, None)

    scheduler._start = start
    return drain_job(app, job_id)


def queue(app: Any, body: dict[str, Any], roots: list[Path], tmp_path: Path) -> str:
    accepted = parse_job(body, app.state.outputs, local_roots=roots)  # the start check holds it to the output root
    return app.state.store.add(accepted.to_dict(), output=accepted.output, repo_id=None, dry_run=False,
                               has_token=False)


def test_the_worker_is_handed_the_resolved_paths_so_a_link_swapped_after_the_check_reads_nothing_else(
        vits, disk, tmp_path):
    """Checked, then opened by name, a link inside a root could be re-pointed out of it in between. The start check
    returns the resolved real paths and the worker loads those: re-pointing the link after the check changes
    nothing the job reads."""
    from hf_mudsc.runner import execute
    from hf_mudsc.serve.app import create_app

    root, outside = disk
    a, b, calibration = vits
    for name, source in (("real-a", a), ("real-b", b), ("real-data", calibration)):
        shutil.copytree(source, root / name)
    (root / "link-a").symlink_to(root / "real-a", target_is_directory=True)
    (root / "link-data").symlink_to(root / "real-data", target_is_directory=True)
    body = {"models": ["root/link-a", str(root / "real-b")], "method": "zipit", "calibration": "root/link-data",
            "num_samples": 8, "batch_size": 4, "output": "m"}
    app = create_app(tmp_path / "state", local_roots=[root])
    job_id = queue(app, body, [root], tmp_path)

    def swap() -> None:  # both links now lead out of the root
        for link in (root / "link-a", root / "link-data"):
            link.unlink()
            link.symlink_to(outside / "secret-model", target_is_directory=True)

    handed: list[dict[str, Any]] = []
    job = run_queued(app, job_id, handed, after_check=swap)
    assert job["status"] == "succeeded", job
    assert handed[0]["models"] == [str((root / "real-a").resolve()), str((root / "real-b").resolve())]
    assert handed[0]["calibration"] == str((root / "real-data").resolve())
    assert job["request"]["models"][0] == "root/link-a"  # the client's recipe, as it sent it, is what it sees
    # The merge the worker runs from that spec reads the checked folders, not where the links lead now.
    recipe = JobRequest.from_stored(handed[0]).recipe.override(output=str(tmp_path / "merged"))
    produced = execute(recipe, progress=False)
    pinned = yaml.safe_load((produced["output"] / "mudsc_recipe.yaml").read_text())
    assert pinned["models"][0] == str((root / "real-a").resolve())


def test_a_card_base_is_resolved_for_the_worker_and_checked_again_when_the_job_starts(vits, disk, tmp_path):
    """The base the parents' cards name is resolved at the start check and handed to the worker as the job's base
    (marked as found through the cards); a card re-pointed out of the roots while the job waited refuses it."""
    from hf_mudsc.serve.app import create_app

    root, outside = disk
    (root / "base-link").symlink_to(root / "base", target_is_directory=True)
    for parent in ("p0", "p1"):
        card(root / parent, "root/base-link")
    app = create_app(tmp_path / "state", local_roots=[root])
    handed: list[dict[str, Any]] = []
    job = run_queued(app, queue(app, body_for(root), [root], tmp_path), handed)
    assert job["status"] == "succeeded", job
    assert handed[0]["base"] == str((root / "base").resolve()) and handed[0]["base_from_cards"] is True
    assert job["request"].get("base") is None and "base_from_cards" not in job["request"]

    app = create_app(tmp_path / "state2", local_roots=[root])
    waiting = queue(app, body_for(root), [root], tmp_path)
    card(root / "p1", str(outside / "secret-model"))  # changed while the job waited
    handed = []
    job = run_queued(app, waiting, handed)
    assert handed == [] and job["status"] == "failed", job
    assert job["error"].startswith(f"refused when it was about to start: `models[1]` {str(root / 'p1')!r}: its "
                                   "model card (README.md) names a local base_model, which is outside"), job["error"]


def test_the_service_refuses_a_parent_whose_card_names_a_base_outside_its_roots(hub_emulator, vits, tmp_path):
    """End to end: the service started with a root, parents inside it whose cards name a base outside it -> 400
    before anything is queued or read; cards naming a base inside it -> the merge runs with that base, and its card
    says the base came from the parents' cards."""
    from hf_mudsc.load.parents import BASE_FROM_CARDS

    a, b, _ = vits
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(a, root / "p0")
    shutil.copytree(b, root / "p1")
    make_model("vit_cls", 3).save_pretrained(root / "base")  # not parent A's weights: a parent as base is refused
    shutil.copytree(a, outside / "base")
    for parent in ("p0", "p1"):
        card(root / parent, str(outside / "base"))
    body = {"models": [str(root / "p0"), str(root / "p1")], "method": NEEDS_BASE, "output": "merged"}
    log = tmp_path / "server.log"
    with Service(hub_emulator, tmp_path / "state", log, extra=("--local-root", str(root))) as service:
        status, answer = service.request("POST", "/api/jobs", body)
        assert status == 400, answer
        assert answer["error"].startswith(f"`models[0]` {str(root / 'p0')!r}: its model card (README.md) names a "
                                          "local base_model, which is outside the folders this server allows")
        assert str(outside) not in answer["error"]
        assert service.request("GET", "/api/jobs")[1]["jobs"] == []

        for parent in ("p0", "p1"):
            card(root / parent, str(root / "base"))
        job = service.wait(service.submit(body))
        assert job["status"] == "succeeded", job
        config = json.loads((tmp_path / "state" / "outputs" / job["result"]["output"] / "config.json").read_text())
        assert config["mudsc"]["base_source"] == BASE_FROM_CARDS
    refusals = [line for line in log.read_text().splitlines() if "outside the local roots" in line]
    assert refusals and str(root.resolve()) in refusals[0]  # the refusal, with the roots, is in the server's log


def test_the_readme_quotes_the_refusal_the_client_gets():
    from hf_mudsc.serve.jobs import OUTSIDE

    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    service = readme[readme.index("## Service"):]
    assert f'"{OUTSIDE}"' in service and "base_model" in service


@pytest.mark.parametrize("method, refused", [(NEEDS_BASE, True), ("weight_matching", False)])
def test_a_dry_run_and_a_real_run_agree_on_a_card_named_base_outside_the_roots(disk, tmp_path, method, refused):
    """The base the parents' cards name is checked where the merge would load it — a method that takes its base from
    the cards — and nowhere else; a dry run (which loads no base) is accepted or refused exactly as the real run,
    when it is posted and again when it is about to start."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    root, outside = disk
    for parent in ("p0", "p1"):
        card(root / parent, str(outside / "secret-model"))
    app = create_app(tmp_path / "state", local_roots=[root])
    client = TestClient(app, base_url="http://127.0.0.1")
    body = body_for(root, method=method)
    answers = {kind: client.post(url, json=sent) for kind, url, sent in (
        ("real", "/api/jobs", body), ("dry (body)", "/api/jobs", {**body, "dry_run": True}),
        ("dry (query)", "/api/jobs?dry_run=true", {k: v for k, v in body.items() if k != "output"}))}
    statuses = {kind: answer.status_code for kind, answer in answers.items()}
    assert set(statuses.values()) == {400 if refused else 201}, statuses
    for answer in answers.values():  # no server path but the one the client sent
        rest = answer.text.replace(str(root / "p0"), "")
        assert str(outside) not in rest and str(root) not in rest, answer.text
    if refused:
        assert len({answer.json()["error"] for answer in answers.values()}) == 1, answers
        return
    for job in app.state.store.list():  # the start check agrees too, and hands no base to either
        handed = app.state.scheduler.admit(job["request"])
        assert handed.get("base") is None and "base_from_cards" not in handed, handed


# ------------------------------------------------------------------------- links inside a local dataset folder


@pytest.fixture()
def image_folder(disk):
    """An imagefolder-style dataset inside the root (`root/data/train/<class>/<file>`), a folder of shared files
    inside the root, and files and a folder outside it that a link could lead to. No file is an image: the check
    reads no contents."""
    root, outside = disk
    for name in ("data/train/cat/a.png", "data/train/dog/b.png", "shared/c.png", "shared/more/d.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (outside / "secret.png").write_bytes(b"secret")
    (outside / "birds").mkdir()
    (outside / "birds" / "e.png").write_bytes(b"x")
    return root, outside


LINKS_OUT = {  # (the link inside root/data, where it leads outside, the entry the answer names)
    "a file": ("train/cat/b.png", "secret.png", "train/cat/b.png"),
    "a folder": ("train/birds", "birds", "train/birds"),
    "a file in nested folders": ("train/cat/deep/deeper/c.png", "secret.png", "train/cat/deep/deeper/c.png"),
    "a folder in nested folders": ("train/cat/deep/birds", "birds", "train/cat/deep/birds"),
}


@pytest.mark.parametrize("case", sorted(LINKS_OUT))
def test_a_local_dataset_folder_with_a_link_leading_out_of_the_roots_is_refused(image_folder, tmp_path, caplog,
                                                                                case):
    """The roots check resolved the dataset folder's own path, yet datasets reads every file under it through their
    links: a job naming a folder inside a root whose files or sub-folders link outside every root is refused in one
    line when posted, naming the entry but no server root (the log has the roots and the target)."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    root, outside = image_folder
    link, target, entry = LINKS_OUT[case]
    (root / "data" / link).parent.mkdir(parents=True, exist_ok=True)
    (root / "data" / link).symlink_to(outside / target)
    for given in (str(root / "data"), "root/data"):
        body = {"models": ["user/a", "user/b"], "method": "zipit", "calibration": f"{given}:train", "output": "m"}
        with caplog.at_level(logging.WARNING, logger="hf_mudsc"), pytest.raises(RecipeError) as caught:
            parse_job(body, tmp_path / "out", local_roots=[root])
        message = str(caught.value)
        assert message.startswith(f"`calibration` names the local path {given!r}, whose {entry!r} is a symbolic "
                                  "link to a path which is outside the folders this server allows (its operator "
                                  "lists them with --local-root)"), message
        rest = message.replace(given, "")
        assert "\n" not in message and str(outside) not in rest and str(root) not in rest, message
        assert str(outside / target) in caplog.text and str(root.resolve()) in caplog.text
    app = create_app(tmp_path / "state", local_roots=[root])
    answer = TestClient(app, base_url="http://127.0.0.1").post("/api/jobs", json=body)
    assert answer.status_code == 400 and answer.json()["error"] == message
    assert app.state.store.list() == []


def test_links_that_stay_inside_the_roots_are_allowed_in_a_local_dataset_folder(image_folder, tmp_path):
    """A file or folder linked from elsewhere in a root (or from another root), and a link back up the dataset folder
    (a loop the walk visits once), are what the roots allow."""
    root, outside = image_folder
    other = tmp_path / "other-root"
    (other / "owls").mkdir(parents=True)
    (root / "data" / "train" / "cat" / "c.png").symlink_to(root / "shared" / "c.png")
    (root / "data" / "train" / "shared").symlink_to(root / "shared", target_is_directory=True)
    (root / "data" / "train" / "owls").symlink_to(other / "owls", target_is_directory=True)
    (root / "data" / "train" / "cat" / "up").symlink_to(root / "data", target_is_directory=True)
    body = {"models": ["user/a", "user/b"], "method": "zipit", "calibration": "root/data:train", "output": "m"}
    accepted = parse_job(body, tmp_path / "out", local_roots=[root, other])
    assert accepted.recipe.calibration == "root/data:train"
    # A folder linked in from inside the roots is read too: a link out of it is refused.
    (root / "shared" / "more" / "e.png").symlink_to(outside / "secret.png")
    with pytest.raises(RecipeError, match=r"whose 'train/shared/more/e.png' is a symbolic link"):
        parse_job(body, tmp_path / "out", local_roots=[root, other])


def test_a_builder_over_the_working_folder_is_held_to_the_links_check(image_folder, tmp_path, monkeypatch):
    """A bare `imagefolder` reads the service's working folder, so a link out of that folder refuses it too."""
    root, outside = image_folder
    monkeypatch.chdir(root / "data")
    body = {"models": ["user/a", "user/b"], "method": "zipit", "calibration": "imagefolder:train", "output": "m"}
    assert parse_job(body, tmp_path / "out", local_roots=[root])
    (root / "data" / "train" / "dog" / "c.png").symlink_to(outside / "secret.png")
    with pytest.raises(RecipeError) as caught:
        parse_job(body, tmp_path / "out", local_roots=[root])
    message = str(caught.value)
    assert message.startswith("`calibration` 'imagefolder:train' is no `org/name` Hub dataset: a bare name is a "
                              "datasets builder (json, csv, imagefolder, ...) that reads the service's working "
                              "folder, whose 'train/dog/c.png' is a symbolic link to a path which is outside the "
                              "folders this server allows"), message
    assert str(root) not in message and str(outside) not in message


def test_a_link_out_added_while_the_job_waited_refuses_it_when_it_starts(image_folder, tmp_path):
    from hf_mudsc.serve.app import create_app

    root, outside = image_folder
    body = {"models": ["user/a", "user/b"], "method": "zipit", "calibration": "root/data:train", "output": "m"}
    app = create_app(tmp_path / "state", local_roots=[root])
    waiting = queue(app, body, [root], tmp_path)
    (root / "data" / "train" / "cat" / "c.png").symlink_to(outside / "secret.png")
    handed: list[dict[str, Any]] = []
    job = run_queued(app, waiting, handed)
    assert handed == [] and job["status"] == "failed", job
    assert job["error"].startswith("refused when it was about to start: `calibration` names the local path "
                                   "'root/data', whose 'train/cat/c.png' is a symbolic link"), job["error"]


def test_a_parent_card_of_gigabytes_is_not_read_at_post(tmp_path):
    """POST reads a local parent's model card for the base it names; a card padded to gigabytes (sparse) was read
    whole into the web process. Over `SIDE_FILE_MAX_BYTES` it names no base, as the loader treats it."""
    from hf_mudsc.load.config_json import SIDE_FILE_MAX_BYTES
    from hf_mudsc.serve.jobs import card_text

    (tmp_path / "README.md").write_text("---\nbase_model: org/base\n---\n")
    assert card_text(tmp_path) is not None
    with open(tmp_path / "README.md", "ab") as handle:
        handle.truncate(SIDE_FILE_MAX_BYTES + 1)  # sparse: no disk used
    assert card_text(tmp_path) is None
