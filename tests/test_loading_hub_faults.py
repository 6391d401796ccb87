"""Downloads that go wrong: a connection dropped mid-body, a server that stalls (Hub emulator faults).

Every case must end in one line that says what failed and what to do, never a traceback or a hang.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_loading import make_model, save_vit

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
from hf_mudsc.errors import LoadError
from hf_mudsc.load.parents import load_parent
try:
    parent = load_parent("user/vit")
    emit({"checksum": float(sum(p.double().sum() for p in parent.model.parameters()))})
except LoadError as error:
    emit({"error": str(error)})
"""


def expected_checksum() -> float:
    return float(sum(p.detach().double().sum() for p in make_model("vit_cls", seed=0).parameters()))


@pytest.fixture
def hub(hub_emulator, tmp_path):
    hub_emulator.upload_folder("user/vit", save_vit(tmp_path / "vit", seed=0))
    return hub_emulator


def test_a_connection_dropped_once_is_resumed(hub):
    hub.drop_next(path="model.safetensors")
    result = hub.run_client(LOAD, env={"PYTHONPATH": str(ROOT)}).result
    assert result == {"checksum": pytest.approx(expected_checksum(), rel=1e-12)}
    gets = [r.status for r in hub.requests_for("resolve") if r.path.endswith("model.safetensors") and r.method == "GET"]
    assert gets == [-1, 200]  # the dropped download, then the retry that completed it


def test_a_connection_that_keeps_dropping_gives_one_line_without_a_traceback(hub, tmp_path):
    hub.drop_next(path="model.safetensors", times=50)
    env = hub.client_env(extra={"PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-m", "hf_mudsc", "merge", "user/vit", "user/vit", "--method", "average",
                           "--output", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("hf-mudsc merge: error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("hf-mudsc merge: error: 'user/vit': the connection to the Hub dropped while "
                                "downloading model.safetensors")
    assert "retry the command" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_stalled_server_gives_up_on_the_repository_information(hub):
    hub.stall_next("repo_info", seconds=3, times=20)
    error = hub.run_client(LOAD, env={"PYTHONPATH": str(ROOT), "HF_HUB_ETAG_TIMEOUT": "1"},
                           timeout=120).result["error"]
    assert "\n" not in error
    assert error.startswith("'user/vit': the Hub did not answer within 1 s while fetching the repository "
                            "information (file list and commit)")
    assert "HF_HUB_ETAG_TIMEOUT" in error and "retry" in error


def test_a_stalled_download_gives_up_and_names_the_file(hub):
    hub.stall_next("resolve", seconds=3, times=50, method="GET", path="model.safetensors")
    error = hub.run_client(LOAD, env={"PYTHONPATH": str(ROOT), "HF_HUB_DOWNLOAD_TIMEOUT": "1"},
                           timeout=200).result["error"]
    assert "\n" not in error
    assert error.startswith("'user/vit': the Hub did not answer within 1 s while downloading model.safetensors")
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in error


def test_a_huge_side_file_is_refused_before_it_is_downloaded(hub_emulator, tmp_path):
    """A Hub parent's top-level .json/.txt/.model files come down with its config, before any weight is read; a
    hostile repo's 'small' file could be gigabytes. Sizes are read from the repository listing and an oversized
    one is refused, named, before a byte of it is fetched (the limit is lowered here; it is 256 MiB)."""
    folder = save_vit(tmp_path / "vit", seed=0)
    (folder / "notes.txt").write_text("x" * 5000)
    hub_emulator.upload_folder("user/vit", folder)
    script = ("import hf_mudsc.load.parents as parents\n"
              "parents.SIDE_FILE_MAX_BYTES = 4096\n") + LOAD
    result = hub_emulator.run_client(script, env={"PYTHONPATH": str(ROOT)}).result
    assert result == {"error": "'user/vit': notes.txt is 5,000 bytes, more than the 4,096 a file read with the "
                               "config may be (.json/.txt/.model at the top level); a model repository's side files "
                               "are small — remove it from the repository or choose another revision"}
    fetched = [r.path for r in hub_emulator.requests_for("resolve")]
    assert not any(path.endswith("notes.txt") for path in fetched), fetched
    ok = hub_emulator.run_client(LOAD, env={"PYTHONPATH": str(ROOT)}).result  # the default limit: it loads
    assert ok == {"checksum": pytest.approx(expected_checksum(), rel=1e-12)}


def test_a_huge_model_card_is_not_downloaded_for_the_base_it_names(hub_emulator, tmp_path):
    """A method that needs a base reads it from the parents' cards: a Hub parent's README.md is downloaded for that,
    whatever its size. Over the side-file limit (lowered here) it is not fetched, and names no base (logged)."""
    folder = save_vit(tmp_path / "vit", seed=0)
    card = "---\nbase_model: user/base\n---\n" + "x" * 5000
    (folder / "README.md").write_text(card)
    hub_emulator.upload_folder("user/vit", folder)
    script = """
import logging
import hf_mudsc.load.parents as parents
from hf_mudsc.errors import MergeInputError
parents.SIDE_FILE_MAX_BYTES = 4096
logging.basicConfig(level=logging.WARNING)
try:
    parents.load_parents_and_base(["user/vit", "user/vit"], None, base_needed_for="task_arithmetic")
    emit({"error": None})
except MergeInputError as error:
    emit({"error": str(error)})
"""
    result = hub_emulator.run_client(script, env={"PYTHONPATH": str(ROOT)})
    assert "needs the parents' common base model and none was given" in result.result["error"], result.result
    assert f"README.md is {len(card):,} bytes, more than the 4,096" in result.stderr, result.stderr
    fetched = [r.path for r in hub_emulator.requests_for("resolve")]
    assert not any(path.endswith("README.md") for path in fetched), fetched
