"""`hf-mudsc serve`: merge jobs over HTTP (docs/design.md §11).

    store.py      the job store: SQLite under --state-dir (jobs, logs; never a token)
    jobs.py       a request body -> a validated job (recipe keys, destination, 400 naming the key)
    scheduler.py  the web process's side: queue, at most --workers worker processes, cancel, restart recovery
    worker.py     the worker process: runs one job (merge or dry run), forwards progress and log lines
    app.py        the FastAPI app: the HTTP API and the server-rendered page (templates/)
    protocol.py   uvicorn's h11 protocol with the service's own answer to a request the app never sees (400)

Nothing here imports torch at start: the web process stays light and `hf-mudsc serve --help` answers at once;
the merge engine runs only inside worker processes (the web process imports torch once, for the first job whose
method checks shapes from a local parent's config at POST: `jobs.check_shapes_on_disk`).
"""

from __future__ import annotations

import ipaddress
import logging
import re

from hf_mudsc.load.references import TOKEN_SHAPE, looks_like_token

#: A request line plus headers larger than this is refused: by h11 while the head is still arriving (uvicorn's
#: `h11_max_incomplete_event_size`, set by `cli/serve.py`), by the app (431, `app.HeaderCap`) when it arrived whole.
HEADER_MAX_BYTES = 16 << 10
# The server's loggers that write what a client sent (request lines, bad requests): `TokenRedaction` guards them.
CLIENT_TEXT_LOGGERS = ("uvicorn.access", "uvicorn.error")
REDACTED = "hf_***"
# A secret (a job's Hub token, the service's API key) at least this long is found wherever it occurs (`mask_token`,
# `jobs.refuse_secrets`): Hub tokens are 37 characters; a shorter value would also match the words that contain it.
TOKEN_MIN_LENGTH = 16


# What an API key may hold: printable ASCII. A header value never begins or ends with whitespace (h11 strips it), a
# line break or control character cannot be sent at all, and a non-ASCII key is sent as UTF-8 by curl but as
# Latin-1 by a browser (the page's fetch), and read back as Latin-1 by the server: no client could match it.
API_KEY_CHARACTERS = re.compile(r"[ -~]+")


def clean_api_key(key: str | None) -> str | None:
    """The service's API key as clients can send it in `X-API-Key`: surrounding whitespace removed (a secret read
    from a file keeps its line break), None for an empty one (no key: the service stays on loopback, its Host guard
    on). A key no client can send is refused in one line that never shows it (ValueError): otherwise every POST and
    DELETE is refused (401) with the right key, or an empty key lets every request in."""
    if key is None or not key.strip():
        return None
    stripped = key.strip()
    if not API_KEY_CHARACTERS.fullmatch(stripped):
        raise ValueError("the API key holds a line break, a control character or a character outside ASCII (not "
                         "shown), which no client can send as it is in the `X-API-Key` header: choose a key of "
                         "printable ASCII characters, e.g. `python -c \"import secrets; "
                         "print(secrets.token_urlsafe(32))\"`")
    return stripped


class TokenRedaction(logging.Filter):
    """Replace token-shaped text in a log record by `REDACTED`. uvicorn's access log writes each request line
    whole, so a token a client put in a URL (the API takes it only in the Authorization header, which is never
    logged) would otherwise land in the server's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = TOKEN_SHAPE.sub(REDACTED, record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(TOKEN_SHAPE.sub(REDACTED, arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


def redact_tokens_in_server_logs() -> None:
    """Guard the server's loggers (`CLIENT_TEXT_LOGGERS`) with `TokenRedaction` (once; uvicorn's own logging
    set-up keeps a logger's filters)."""
    for name in CLIENT_TEXT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, TokenRedaction) for existing in logger.filters):
            logger.addFilter(TokenRedaction())


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1): the only names a service without an API key binds to
    and answers to (cli/serve.py, app.py)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """A Host header's name: `name:port`, `[v6]:port` or a bare name -> `name`, `v6`."""
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def is_long_secret(secret: str) -> bool:
    """A secret shaped like an access token or at least `TOKEN_MIN_LENGTH` characters: no word of a message or a
    name holds one by chance, so it is found wherever it occurs."""
    return looks_like_token(secret) or len(secret) >= TOKEN_MIN_LENGTH


def mask_token(text: str, token: str) -> str:
    """`text` with `token` replaced by `***`: every occurrence when it is long (`is_long_secret`), else only where no
    letter, digit or `_` adjoins it (the letters `e` in "folder" are not the token `e`)."""
    if is_long_secret(token):
        return text.replace(token, "***")
    return re.sub(rf"(?<![A-Za-z0-9_]){re.escape(token)}(?![A-Za-z0-9_])", "***", text)
