"""One Hub call -> its answer, or a one-line error saying what was awaited and what to do: loading and pushing alike.

Where the time limit comes from differs, and is the caller's: loading passes huggingface_hub's own per-request
timeouts (`HF_HUB_ETAG_TIMEOUT`, `HF_HUB_DOWNLOAD_TIMEOUT`); a push calls `HfApi` methods that take none, so
`publish/hub.py` puts `HF_MUDSC_HUB_TIMEOUT` on the client's shared session. Either way a request that times out or
a connection that drops ends here, in the caller's error class, naming the setting that allows more time.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

from hf_mudsc.errors import brief, first_line
from hf_mudsc.load.references import hide_tokens

T = TypeVar("T")


def http_client() -> ModuleType:
    """The HTTP client module huggingface_hub uses: httpx2 from 2.x, httpx before."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def hub_call(call: Callable[[], T], *, what: str, seconds: float | None, setting: str, error: type[Exception],
             subject: str = "", then: str = "retry the command") -> T:
    """`call()`, with a timeout or a dropped connection turned into one line: `{subject}the Hub did not answer
    within {seconds} s while {what}...` / `{subject}the connection to the Hub dropped while {what} (...); {then}`;
    a call made in offline mode (`HF_HUB_OFFLINE=1`) likewise, naming the setting.

    Args:
        call: the Hub request (any other exception passes through: HTTP answers are the caller's to explain).
        what: what was awaited, e.g. "downloading config.json".
        seconds, setting: the time limit that ran out and the environment variable that sets it.
        error: the exception class raised (`LoadError`, `PushError`).
        subject: the message's prefix, e.g. the parent's reference: "'org/name': ".
        then: what to do after a dropped connection.
    """
    from huggingface_hub.errors import OfflineModeIsEnabled

    http = http_client()
    try:
        return call()
    except OfflineModeIsEnabled as failure:
        raise error(f"{subject}the Hub is not reachable while {what}: offline mode is on (HF_HUB_OFFLINE=1); "
                    "unset HF_HUB_OFFLINE to reach the Hub") from failure
    except http.TimeoutException as failure:
        limit = f"{seconds:g} s" if seconds is not None else "its time limit"
        raise error(
            f"{subject}the Hub did not answer within {limit} while {what} ({type(failure).__name__}); the server is "
            f"stalled or the connection is too slow: retry later, or allow more time with {setting}=<seconds>"
        ) from failure
    except http.TransportError as failure:
        said = hide_tokens(first_line(failure))  # httpx repeats a header it refuses: `b'Bearer <token>'`
        raise error(f"{subject}the connection to the Hub dropped while {what} ({said}); {then}") from failure


# What to do about an HTTP answer, by status: the server's own words say what went wrong, not always the fix.
_HTTP_ADVICE = {
    401: "the token was refused: pass a valid one (CLI --token, token=, or `hf auth login`)",
    403: "the token lacks the right: use one with write access to this repo or organisation",
    429: "the Hub is rate-limiting this client: retry later",
}


def hub_error_line(error: BaseException) -> str:
    """One line for an error a Hub request ended in: huggingface_hub's HTTP errors span four lines (status and URL,
    a link to MDN's page on the status, the server's message); this keeps the first and the server's message and
    adds what to do. Any other error: its text with its line breaks folded."""
    from huggingface_hub.errors import HfHubHTTPError

    if not isinstance(error, HfHubHTTPError):
        cause = http_cause(error)
        if cause is None or first_line(cause) in str(error):  # no answer below it, or its text already says it
            return brief(error, None)
        # a wrapper (an LFS upload's `RuntimeError: Error while uploading ...`) keeps the answer as its cause
        return f"{first_line(error).rstrip('.')}: {hub_error_line(cause)}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    said = " ".join((getattr(error, "server_message", None) or "").split()).rstrip(".")
    parts = [first] + ([said] if said and said not in first else [])
    status = error.response.status_code if getattr(error, "response", None) is not None else None
    advice = _HTTP_ADVICE.get(status) or ("the Hub failed to answer: retry later"
                                          if status is not None and status >= 500 else None)
    return " — ".join(parts) + (f"; {advice}" if advice else "")


def http_cause(error: BaseException) -> BaseException | None:
    """The Hub's HTTP answer an error was raised from (`raise ... from answer`: its `__cause__` chain), None if none:
    wrappers drop the status and the server's message from their own text. An implicit `__context__` (an error
    raised while handling another) is not followed: the later error says what happened."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: set[int] = set()
    link = error.__cause__
    while link is not None and id(link) not in seen:
        if isinstance(link, HfHubHTTPError):
            return link
        seen.add(id(link))
        link = link.__cause__
    return None
