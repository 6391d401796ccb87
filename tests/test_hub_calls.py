"""`hf_mudsc.load.hub_calls.hub_call`: the one wrapper around Hub requests, used by loading (`load/parents.py`) and
pushing (`publish/hub.py`). A timeout or a dropped connection becomes one line in the caller's error class, naming
what was awaited and the setting that allows more time; any other exception passes through untouched.
(Through the Hub emulator: tests/test_loading_hub_faults.py and tests/test_push_safety.py.)"""

from __future__ import annotations

import pytest
from huggingface_hub.errors import HfHubHTTPError

from hf_mudsc.errors import LoadError, PushError
from hf_mudsc.load.hub_calls import http_client, hub_call


def raising(error: BaseException):
    def call():
        raise error

    return call


def test_an_answer_is_returned_as_is():
    assert hub_call(lambda: 42, what="x", seconds=1.0, setting="S", error=PushError) == 42


def test_a_timeout_names_what_was_awaited_and_the_setting():
    http = http_client()
    with pytest.raises(LoadError) as caught:
        hub_call(raising(http.ReadTimeout("timed out")), what="downloading config.json", seconds=10,
                 setting="HF_HUB_DOWNLOAD_TIMEOUT", error=LoadError, subject="'org/a': ")
    assert str(caught.value) == (
        "'org/a': the Hub did not answer within 10 s while downloading config.json (ReadTimeout); the server is "
        "stalled or the connection is too slow: retry later, or allow more time with HF_HUB_DOWNLOAD_TIMEOUT=<seconds>")
    with pytest.raises(PushError, match=r"^the Hub did not answer within 2\.5 s while creating the repo 'u/m' "
                                        r"\(ConnectTimeout\).*HF_MUDSC_HUB_TIMEOUT=<seconds>$"):
        hub_call(raising(http.ConnectTimeout("slow")), what="creating the repo 'u/m'", seconds=2.5,
                 setting="HF_MUDSC_HUB_TIMEOUT", error=PushError)


def test_a_dropped_connection_gives_its_first_line_and_what_to_do():
    http = http_client()
    with pytest.raises(PushError) as caught:
        hub_call(raising(http.RemoteProtocolError("peer closed connection\nmore detail")), what="uploading 3 files",
                 seconds=120, setting="HF_MUDSC_HUB_TIMEOUT", error=PushError, then="try again later")
    assert str(caught.value) == ("the connection to the Hub dropped while uploading 3 files (peer closed connection); "
                                 "try again later")
    assert "\n" not in str(caught.value)


def test_other_errors_pass_through_for_the_caller_to_explain():
    http = http_client()
    answer = http.Response(409, request=http.Request("POST", "http://127.0.0.1/api/repos/create"))
    refused = HfHubHTTPError("409 Conflict", response=answer)
    with pytest.raises(HfHubHTTPError) as caught:
        hub_call(raising(refused), what="x", seconds=1.0, setting="S", error=PushError)
    assert caught.value is refused
    with pytest.raises(KeyError):
        hub_call(raising(KeyError("k")), what="x", seconds=1.0, setting="S", error=LoadError)
