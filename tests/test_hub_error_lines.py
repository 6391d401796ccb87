"""A Hub that refuses a request (a rejected token, no write access, a rate limit) is reported in one line that keeps
the server's own words and says what to do — not huggingface_hub's four-line message with a link to MDN."""

from __future__ import annotations

import pytest
from cli_runs import run_cli
from factories import vit_cli_case

from hf_mudsc.load.hub_calls import hub_error_line

WRONG = "hf_wrongTokenForHubErrorLines0123456"


def http_error(status: int, server_message: str | None):
    """The error huggingface_hub raises for an HTTP answer `status`, built as its own `hf_raise_for_status` does."""
    from huggingface_hub.errors import HfHubHTTPError

    from hf_mudsc.load.hub_calls import http_client

    http = http_client()
    request = http.Request("GET", "https://hub.example/api/models/org/x")
    response = http.Response(status, request=request, headers={"x-request-id": "abc"})
    message = (f"Client error '{status}' for url 'https://hub.example/api/models/org/x' (Request ID: abc)\n"
               f"For more information check: https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/{status}")
    if server_message:
        message += f"\n\n{server_message}"
    return HfHubHTTPError(message, response=response, server_message=server_message)


@pytest.mark.parametrize(("status", "advice"), [
    (401, "the token was refused"),
    (403, "write access"),
    (429, "retry later"),
    (503, "retry later"),
])
def test_an_http_error_is_one_line_with_the_servers_words_and_what_to_do(status, advice):
    line = hub_error_line(http_error(status, "Something the server said."))
    assert "\n" not in line
    assert f"'{status}'" in line and "Something the server said" in line and advice in line
    assert "developer.mozilla.org" not in line


def test_an_http_error_without_a_server_message_keeps_its_first_line():
    line = hub_error_line(http_error(404, None))
    assert line.startswith("Client error '404'") and "\n" not in line and "mozilla" not in line


def test_any_other_error_is_its_text_on_one_line():
    assert hub_error_line(ValueError("two\n  lines")) == "two lines"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return vit_cli_case(tmp_path_factory.mktemp("hub_error_lines"))


@pytest.fixture
def merged(case, tmp_path, capsys):
    parents, calibration = case
    code, _ = run_cli(["-q", "merge", *parents, "--calibration", calibration, "--output", str(tmp_path / "m"),
                       "--method", "average"], capsys)
    assert code == 0
    return tmp_path / "m"


def test_push_with_a_rejected_token_says_so_in_one_line(local_hub, merged, capsys):
    local_hub.accept_any_token = False
    code, err = run_cli(["push", str(merged), "org/x", "--token", WRONG], capsys)
    assert code == 1
    assert len(err) == 1, err
    assert "401" in err[0] and "Invalid credentials" in err[0] and "the token was refused" in err[0]
    assert WRONG not in err[0]


def test_merge_push_to_hub_with_a_rejected_token_says_so_in_one_line(local_hub, case, tmp_path, capsys):
    local_hub.accept_any_token = False
    parents, calibration = case
    code, err = run_cli(["-q", "merge", *parents, "--calibration", calibration, "--method", "average",
                         "--output", str(tmp_path / "m"), "--push-to-hub", "org/y", "--token", WRONG], capsys)
    assert code == 1
    assert len(err) == 1, err
    assert "401" in err[0] and "the token was refused" in err[0]


def test_a_parent_the_hub_refuses_for_the_token_says_what_to_do(local_hub, case, tmp_path, capsys):
    local_hub.accept_any_token = False
    _, calibration = case
    code, err = run_cli(["-q", "merge", "org/a", "org/b", "--calibration", calibration,
                         "--output", str(tmp_path / "m"), "--token", WRONG], capsys)
    assert code == 1
    assert len(err) == 1, err
    assert "'org/a'" in err[0] and "401" in err[0] and "the token was refused" in err[0]


def test_a_merge_that_reads_no_calibration_does_not_claim_it_calibrated(case, tmp_path, capsys):
    parents, calibration = case
    from hf_mudsc.cli.main import main

    capsys.readouterr()
    assert main(["-q", "merge", *parents, "--calibration", calibration, "--output", str(tmp_path / "m"),
                 "--method", "average"]) == 0
    out = capsys.readouterr().out
    assert "Merged model written to" in out
    assert "Calibrated on 0 samples" not in out


def test_merge_push_to_hub_of_an_unchanged_model_says_nothing_was_pushed(local_hub, case, tmp_path, capsys):
    """The same merge pushed again (--overwrite) makes no commit: the CLI says so, as `hf-mudsc push` does."""
    from hf_mudsc.cli.main import main

    parents, calibration = case
    argv = ["-q", "merge", *parents, "--calibration", calibration, "--method", "average", "--push-to-hub", "org/same",
            "--token", "hf_anyTokenTheEmulatorAccepts0123"]
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "m1")]) == 0
    assert "Pushed to " in capsys.readouterr().out
    assert main([*argv, "--output", str(tmp_path / "m2"), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "Pushed to " not in out
    assert "Nothing to push: org/same already holds exactly these files" in out
