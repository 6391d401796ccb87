"""Downloads that go wrong: a connection dropped mid-body, a server that stalls (Hub emulator faults).

Every case must end in one line that says what failed and what to do, never a traceback or a hang.
"""

from __future__ import annotations

import logging

import pytest
from cli_runs import run_cli
from huggingface_hub import constants
from test_loading import make_model, save_vit

import hf_mudsc.load.parents as parents
from hf_mudsc.errors import LoadError, MergeInputError


def load() -> dict:
    """`load_parent("user/vit")` in this process (against the emulator: the `hub` fixture): its checksum or error."""
    try:
        parent = parents.load_parent("user/vit")
    except LoadError as error:
        return {"error": str(error)}
    return {"checksum": float(sum(p.detach().double().sum() for p in parent.model.parameters()))}


def expected_checksum() -> float:
    return float(sum(p.detach().double().sum() for p in make_model("vit_cls", seed=0).parameters()))


@pytest.fixture
def hub(local_hub, tmp_path):
    """The emulator as this process's Hub (the loads run in-process), holding `user/vit`."""
    local_hub.upload_folder("user/vit", save_vit(tmp_path / "vit", seed=0))
    return local_hub


def test_a_connection_dropped_once_is_resumed(hub):
    # the first GET of model.safetensors is its header's ranged read, before the download (a corrupt header is refused
    # without downloading the file): a first fault cut past that read's end spends itself on it harmlessly (the whole
    # answer is sent, then the connection closed), the second cuts the download itself
    size = len(hub.file_bytes("user/vit", "model.safetensors"))
    hub.drop_next(path="model.safetensors", after_bytes=size)
    hub.drop_next(path="model.safetensors")
    result = load()
    assert result == {"checksum": pytest.approx(expected_checksum(), rel=1e-12)}
    gets = [(r.status, "range" in r.headers) for r in hub.requests_for("resolve")
            if r.path.endswith("model.safetensors") and r.method == "GET"]
    assert gets == [(-1, True), (-1, False), (200, False)]  # the header, the dropped download, the retry completing it


def test_a_connection_that_keeps_dropping_gives_one_line_without_a_traceback(hub, tmp_path, monkeypatch, capsys):
    hub.drop_next(path="model.safetensors", times=50)
    monkeypatch.setenv("HF_TOKEN", hub.token)  # as a client's environment has it
    code, lines = run_cli(["merge", "user/vit", "user/vit", "--method", "average", "--output", str(tmp_path / "out")],
                          capsys)
    assert code == 1
    assert not [line for line in lines if "Traceback" in line]
    errors = [line for line in lines if line.startswith("hf-mudsc merge: error:")]
    assert len(errors) == 1, lines
    # the first GET of model.safetensors is its header's ranged read, before the download
    assert errors[0].startswith("hf-mudsc merge: error: 'user/vit': the connection to the Hub dropped while "
                                "reading the header of model.safetensors")
    assert "retry the command" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_stalled_server_gives_up_on_the_repository_information(hub, monkeypatch):
    hub.stall_next("repo_info", seconds=3, times=20)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # what the client read from the environment at import
    error = load()["error"]
    assert "\n" not in error
    assert error.startswith("'user/vit': the Hub did not answer within 1 s while fetching the repository "
                            "information (file list and commit)")
    assert "HF_HUB_ETAG_TIMEOUT" in error and "retry" in error


def test_a_stalled_download_gives_up_and_names_the_file(hub, monkeypatch):
    hub.stall_next("resolve", seconds=3, times=50, method="GET", path="model.safetensors")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)  # what the client read from the environment at import
    error = load()["error"]
    assert "\n" not in error
    # the first GET of model.safetensors is its header's ranged read, before the download
    assert error.startswith("'user/vit': the Hub did not answer within 1 s while reading the header of "
                            "model.safetensors")
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in error


def test_a_huge_side_file_is_refused_before_it_is_downloaded(local_hub, tmp_path, monkeypatch):
    """A Hub parent's top-level .json/.txt/.model files come down with its config, before any weight is read; a
    hostile repo's 'small' file could be gigabytes. Sizes are read from the repository listing and an oversized
    one is refused, named, before a byte of it is fetched (the limit is lowered here; it is 256 MiB)."""
    folder = save_vit(tmp_path / "vit", seed=0)
    (folder / "notes.txt").write_text("x" * 5000)
    hub_emulator = local_hub  # the loads run in this process against the emulator
    hub_emulator.upload_folder("user/vit", folder)
    default = parents.SIDE_FILE_MAX_BYTES
    monkeypatch.setattr(parents, "SIDE_FILE_MAX_BYTES", 4096)
    result = load()
    assert result == {"error": "'user/vit': notes.txt is 5,000 bytes, more than the 4,096 a file read with the "
                               "config may be (.json/.txt/.model/.jinja at the top level or in "
                               "additional_chat_templates/); a model repository's side files are small — remove it "
                               "from the repository or choose another revision"}
    fetched = [r.path for r in hub_emulator.requests_for("resolve")]
    assert not any(path.endswith("notes.txt") for path in fetched), fetched
    monkeypatch.setattr(parents, "SIDE_FILE_MAX_BYTES", default)
    ok = load()  # the default limit: it loads
    assert ok == {"checksum": pytest.approx(expected_checksum(), rel=1e-12)}


def test_a_huge_model_card_is_not_downloaded_for_the_base_it_names(local_hub, tmp_path, monkeypatch, caplog):
    """A method that needs a base reads it from the parents' cards: a Hub parent's README.md is downloaded for that,
    whatever its size. Over the side-file limit (lowered here) it is not fetched, and names no base (logged)."""
    folder = save_vit(tmp_path / "vit", seed=0)
    card = "---\nbase_model: user/base\n---\n" + "x" * 5000
    (folder / "README.md").write_text(card)
    hub_emulator = local_hub  # the load runs in this process against the emulator
    hub_emulator.upload_folder("user/vit", folder)
    monkeypatch.setattr(parents, "SIDE_FILE_MAX_BYTES", 4096)
    caplog.set_level(logging.WARNING)
    with pytest.raises(MergeInputError) as refused:
        parents.load_parents_and_base(["user/vit", "user/vit"], None, base_needed_for="task_arithmetic")
    result = {"error": str(refused.value)}
    assert "needs the parents' common base model and none was given" in result["error"], result
    assert f"README.md is {len(card):,} bytes, more than the 4,096" in caplog.text, caplog.text
    fetched = [r.path for r in hub_emulator.requests_for("resolve")]
    assert not any(path.endswith("README.md") for path in fetched), fetched


@pytest.mark.parametrize("status", [403, 500])
def test_a_hub_refusing_a_parents_file_is_named_not_called_offline(hub, status):
    """Online, huggingface_hub raises `LocalEntryNotFoundError` from the Hub's own 403/500: it was reported as
    "not in the local cache and the Hub is unreachable or offline (HF_HUB_OFFLINE=1)" — the status, the server's
    words and the fix lost."""
    hub.fail_next("resolve", status=status, times=50, repo_id="user/vit", message=f"emulated {status} from the Hub")
    result = load()
    assert "error" in result, result
    assert "offline" not in result["error"], result
    assert "the Hub refused 'user/vit' while" in result["error"] and str(status) in result["error"], result
    assert f"emulated {status} from the Hub" in result["error"], result


def test_a_refused_lfs_upload_names_the_hubs_answer():
    """An LFS upload refused with 403 (a storage quota) was `Error while uploading 'x' to the Hub.`: huggingface_hub
    wraps the HTTP answer in a RuntimeError, and the line kept only the wrapper."""
    from huggingface_hub.errors import HfHubHTTPError
    from test_hub_error_lines import http_error

    from hf_mudsc.load.hub_calls import hub_error_line

    try:
        try:
            raise http_error(403, "storage quota exceeded for org")
        except HfHubHTTPError as answer:
            raise RuntimeError("Error while uploading 'plots/a.png' to the Hub.") from answer
    except RuntimeError as wrapped:
        line = hub_error_line(wrapped)
    assert line.startswith("Error while uploading 'plots/a.png' to the Hub: Client error '403'"), line
    assert "storage quota exceeded for org" in line and "the token lacks the right" in line, line


def test_a_hub_error_on_a_parents_card_is_named_not_read_as_no_card(local_hub, tmp_path):
    """A 500 on a Hub parent's README.md was read as "this parent has no card": the base its card names dropped out,
    and the merge said no base was given (with method auto, the choice of method changed silently)."""
    folder = save_vit(tmp_path / "vit", seed=0)
    (folder / "README.md").write_text("---\nbase_model: user/base\n---\n# a fine-tune\n")
    local_hub.upload_folder("user/vit", folder)
    local_hub.fail_next("resolve", status=500, times=50, repo_id="user/vit", path="/README.md",
                        message="emulated 500 on the card")
    with pytest.raises(LoadError) as caught:
        parents.load_parents_and_base(["user/vit", "user/vit"], None, base_needed_for="task_arithmetic")
    message = str(caught.value)
    assert "\n" not in message and "README.md" in message and "500" in message, message
    assert "emulated 500 on the card" in message, message
