"""Session 34's hunt of the service's and the CLI's hostile inputs: what a user or a client hits (test first, each
test's reproduction in its docstring's first line)."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from factories import make_model
from PIL import Image

from hf_mudsc.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---------------------------------------------------------------------------------------------- evaluate's parents


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ViT classifier folder (config and weights, no recipe) and a saved image dataset it can score."""
    root = tmp_path_factory.mktemp("scored")
    make_model("vit_cls", 1).save_pretrained(root / "merged")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(8)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0] * 8}).cast_column("image", datasets.Image())
    data.save_to_disk(root / "data")
    return root / "merged", root / "data"


@pytest.fixture
def no_weights_loaded(monkeypatch) -> list[str]:
    """Fails any load of a model's weights (the evaluated model's or a parent's): what is refused must be refused
    before them — a merged model of gigabytes is read (or downloaded) in minutes."""
    import hf_mudsc.load.parents as parents

    loads: list[str] = []

    def refuse(reference, *args, **kwargs):
        loads.append(str(reference))
        raise AssertionError(f"loaded {reference!r} before the command line was checked")

    monkeypatch.setattr(parents, "load_parent", refuse)
    return loads


def test_evaluate_refuses_missing_parent_folders_in_one_line_before_loading_the_merged_model(
        scored, no_weights_loaded, tmp_path, monkeypatch, capsys):
    """evaluate MERGED --dataset DATA --parents ./gone-a ./gone-b --no-card: one line naming both, exit 2, no load."""
    merged, data = scored
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", str(merged), "--dataset", f"{data}:train", "--parents", "./gone-a", "./gone-b",
                 "--no-card"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert no_weights_loaded == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "./gone-a" in err and "./gone-b" in err and "--parents" in err


def test_evaluate_refuses_recipe_parents_that_are_gone_before_loading_the_merged_model(
        scored, no_weights_loaded, tmp_path, monkeypatch, capsys):
    """evaluate MERGED --dataset DATA --no-card, its recipe naming parent folders since deleted: one line, no load."""
    merged, data = scored
    folder = tmp_path / "merged"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((merged / name).read_bytes())
    (folder / "mudsc_recipe.yaml").write_text(
        f"models:\n- {tmp_path / 'deleted-a'}\n- {tmp_path / 'deleted-b'}\nmethod: average\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", str(folder), "--dataset", f"{data}:train", "--no-card"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert no_weights_loaded == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "deleted-a" in err and "deleted-b" in err and "--parents" in err and "--no-parents" in err


# ---------------------------------------------------------------------------------------------- the API key

BODY = {"models": ["user/a", "user/b"], "method": "average", "dry_run": True}


def test_an_api_key_read_with_its_line_break_still_lets_its_clients_in(tmp_path):
    """Key "s3cret-key\\n" (a secret file's line break), client sends X-API-Key: s3cret-key: 201, not 401 forever."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    client = TestClient(create_app(tmp_path / "state", api_key="s3cret-key\n"), base_url="http://127.0.0.1")
    # what every HTTP client sends: a header value never ends in a line break (h11 strips the whitespace around it)
    answer = client.post("/api/jobs", json=BODY, headers={"X-API-Key": "s3cret-key"})
    assert answer.status_code == 201, answer.text
    assert client.post("/api/jobs", json=BODY).status_code == 401


@pytest.mark.parametrize("key", ["", "   ", "\n"])
def test_an_empty_api_key_keeps_the_loopback_guard_and_is_no_key(tmp_path, key):
    """create_app(state, api_key=os.environ.get("KEY", "")), POST with Host: rebound.example, no key: 400, not 201."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    client = TestClient(create_app(tmp_path / "state", api_key=key), base_url="http://rebound.example")
    answer = client.post("/api/jobs", json=BODY)
    assert answer.status_code == 400, answer.text
    assert "Host header" in answer.json()["error"]
    assert create_app(tmp_path / "other", api_key=key).state.store.list() == []


@pytest.mark.parametrize("key", ["clé-secrète-1234", "line\nbreak", "bell\x07key"])
def test_an_api_key_no_client_can_send_is_refused_in_one_line_at_start(tmp_path, key, monkeypatch, capsys):
    """HF_MUDSC_API_KEY='clé-secrète-1234' hf-mudsc serve --host 0.0.0.0: one line, exit 1, key not shown (not 401s)."""
    import uvicorn

    from hf_mudsc.serve.app import create_app

    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(args))
    monkeypatch.setenv("HF_MUDSC_API_KEY", key)
    code = main(["serve", "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 1 and started == [], err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "API key" in err and key not in err and "secrète" not in err
    with pytest.raises(ValueError, match="API key") as refused:
        create_app(tmp_path / "lib", api_key=key)
    assert key not in str(refused.value)


def test_checking_the_api_key_takes_the_same_steps_whatever_the_length_of_the_key_sent(tmp_path, monkeypatch):
    """POST with X-API-Key: x, then with a 4 KB key: hmac.compare_digest saw inputs of the key's length (its timing)."""
    import hmac

    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def recording(a, b):
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    client = TestClient(create_app(tmp_path / "state", api_key="the-right-key-0123456789"),
                        base_url="http://127.0.0.1")
    for sent in ("x", "y" * 4096, "the-right-key-0123456789"):
        client.post("/api/jobs", json=BODY, headers={"X-API-Key": sent})
    assert len(compared) == 3
    # compare_digest returns at once on inputs of different lengths: the answer's time told the key's length
    assert len(set(compared)) == 1 and compared[0][0] == compared[0][1], compared


# ---------------------------------------------------------------------------------------------- cancel


def test_cancelling_a_finished_job_pruned_meanwhile_answers_409_not_500(tmp_path, monkeypatch):
    """DELETE /api/jobs/{finished id} while a POST prunes that record (--max-jobs): one-line 409, not a 500."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    app = create_app(tmp_path / "state")
    store = app.state.store
    job_id = store.add({"models": ["user/a", "user/b"]}, output=None, repo_id=None, dry_run=True, has_token=False)
    store.update(job_id, status="succeeded")
    reads = []
    real_get = store.get

    def pruned_after_first_read(wanted):  # a POST pruned the finished record right after the route read it
        reads.append(wanted)
        return real_get(wanted) if len(reads) == 1 else None

    monkeypatch.setattr(store, "get", pruned_after_first_read)
    answer = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False).delete(f"/api/jobs/{job_id}")
    assert answer.status_code == 409, answer.text
    assert "nothing to cancel" in answer.json()["error"] and "succeeded" in answer.json()["error"]


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_of_a_recipe_refuses_output_instead_of_ignoring_it(tmp_path, capsys):
    """hf-mudsc inspect mudsc_recipe.yaml --output plots: exit 0 with no plot and no word; now one line, exit 2."""
    recipe = tmp_path / "mudsc_recipe.yaml"
    recipe.write_text("models: [org/a, org/b]\nmethod: average\n", encoding="utf-8")
    code = main(["inspect", str(recipe), "--output", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "--output" in captured.err
    assert not (tmp_path / "plots").exists()
    assert main(["inspect", str(recipe)]) == 0  # the recipe itself is still summarised


# ---------------------------------------------------------------------------------------------- the page's body


def test_json_indented_with_tabs_sent_as_yaml_is_read_as_json(tmp_path):
    """The page sends its textarea ("YAML or JSON") as YAML: a JSON recipe indented with tabs was a 400 (YAML's tab)."""
    import json

    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import create_app

    client = TestClient(create_app(tmp_path / "state"), base_url="http://127.0.0.1")
    body = json.dumps(BODY, indent="\t")
    answer = client.post("/api/jobs", content=body.encode(), headers={"Content-Type": "application/yaml"})
    assert answer.status_code == 201, answer.text
    job = client.get(f"/api/jobs/{answer.json()['id']}").json()
    assert job["recipe"]["models"] == BODY["models"] and job["dry_run"] is True
    # a key given twice is refused as in any JSON or YAML body, and YAML's own flow mapping still reads as YAML
    twice = body.replace('"method": "average"', '"method": "average",\n\t"method": "linear"')
    refused = client.post("/api/jobs", content=twice.encode(), headers={"Content-Type": "application/yaml"})
    assert refused.status_code == 400 and "twice" in refused.json()["error"]
    flow = b"{models: [user/a, user/b], method: average, dry_run: true}"
    assert client.post("/api/jobs", content=flow, headers={"Content-Type": "application/yaml"}).status_code == 201


@pytest.mark.parametrize("body", ['{"models": ["user/a", "user/b"], "seed": 1' + "0" * 5000 + "}",
                                  "{" * 100000 + "}" * 100000])
def test_a_json_body_sent_as_yaml_that_json_cannot_read_answers_400(tmp_path, body):
    """POST a {-body as YAML with a 5000-digit integer or nested 100000 deep: one-line 400, not a 500."""
    from fastapi.testclient import TestClient

    from hf_mudsc.serve.app import MAX_YAML_BODY, create_app

    client = TestClient(create_app(tmp_path / "state"), base_url="http://127.0.0.1", raise_server_exceptions=False)
    answer = client.post("/api/jobs", content=body.encode()[:MAX_YAML_BODY], headers={"Content-Type": "text/yaml"})
    assert answer.status_code == 400, answer.text
