"""`hf-mudsc serve --host 127.0.0.1 --port 8000 --state-dir DIR [--workers N] [--max-queued N] [--max-jobs N]
[--local-root DIR]`: the merging service.

Safe by default: it binds 127.0.0.1; any other host needs an API key (`HF_MUDSC_API_KEY`, or `--api-key`, which
other users of the machine can read in `ps`: a warning says so) that POST and DELETE must send as `X-API-Key`. Jobs
name Hub references only, unless the operator lists folders they may read with `--local-root`; at most
`--max-queued` jobs wait for a worker. Needs the `serve` extra (`pip install -e ".[serve]"` in a clone; hf-mudsc
is not on PyPI).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import Any

from hf_mudsc.cli.arguments import path_text
from hf_mudsc.serve import HEADER_MAX_BYTES, clean_api_key, is_loopback
from hf_mudsc.serve.store import MAX_JOBS, MAX_QUEUED, lock_state_dir

API_KEY_ENV = "HF_MUDSC_API_KEY"
# What uvicorn reads before the app sees a request, set here rather than left to its defaults of the day: an idle
# keep-alive connection is closed after KEEP_ALIVE_S, and a request line plus headers larger than
# `serve.HEADER_MAX_BYTES` still arriving is refused (400). That cap is h11's, so the server runs h11 whatever else
# is installed (uvicorn would pick httptools): `serve.protocol.ServiceH11Protocol`, whose 400 says `nosniff` like
# every answer of the app (a head that arrived whole is refused by the app: `serve.app.HeaderCap`). The body has its
# own limits (`serve.app.MAX_BODY`, `BODY_TIMEOUT_S`). uvicorn has no timeout for a request's headers: exposed beyond
# this machine, put it behind a reverse proxy that has one.
KEEP_ALIVE_S = 5
logger = logging.getLogger(__name__)


def port_number(text: str) -> int:
    """`--port`: a TCP port, 0 (any free one) to 65535; anything else is refused by argument parsing, in one line."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number: pass 1 to 65535, e.g. --port 8000") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number: pass 1 to 65535, e.g. --port 8000")
    return port


def check_port(host: str, port: int) -> None:
    """Bind `host:port` once and let it go, before the job store is opened: a port in use or an address this
    machine does not have is one line, not uvicorn's traceback after the store was recovered."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except (OSError, UnicodeError) as error:
            said = getattr(error, "strerror", None) or error
            raise ValueError(f"cannot listen on {host}:{port} ({said}): another server may be using that port, or "
                             "the address is not this machine's; pass another --port (or --host)") from None


def check_output_root(output_root: Path) -> None:
    """The output root, created if missing; one that is a file, a symbolic link to nothing, or cannot be created (a
    file on its way, no permission) is one line naming it and the fix, as `--state-dir`'s (mkdir would say `[Errno 17]
    File exists`, or raise NotADirectoryError with a traceback)."""
    if os.path.lexists(output_root) and not output_root.is_dir():
        kind = "a symbolic link to nothing" if output_root.is_symlink() and not output_root.exists() else "not a folder"
        raise ValueError(f"the output root {str(output_root)!r} is {kind}: pass --output-root DIR, a folder (created "
                         "if missing) where the jobs' output folders go")
    try:
        output_root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output-root {str(output_root)!r} cannot be created ({error.strerror or error}): pass a "
                         "folder you can write to, where the jobs' output folders go") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but a loopback address needs --api-key")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (1 to 65535)")
    parser.add_argument("--state-dir", default="hf-mudsc-serve", metavar="DIR", type=path_text,
                        help="where the job store (SQLite) and, by default, the output folders live; jobs "
                        "survive a restart with the same folder")
    parser.add_argument("--workers", type=int, default=1,
                        help="merges run at once, each in its own process (memory: a few parents' worth each)")
    parser.add_argument("--api-key", default=argparse.SUPPRESS, metavar="KEY",
                        help=f"a key POST and DELETE must send as `X-API-Key` (default: ${API_KEY_ENV}, the better "
                        "place: a command line is visible in `ps`); required with a non-loopback --host")
    parser.add_argument("--max-queued", type=int, default=MAX_QUEUED, metavar="N",
                        help="jobs that may wait for a worker at once; a POST beyond it answers 429 with Retry-After "
                        "(each queued job is a store row and later a whole merge: without a cap, anyone who may "
                        "POST could queue unbounded work; the default is hours of merges)")
    parser.add_argument("--max-jobs", type=int, default=MAX_JOBS, metavar="N",
                        help="finished jobs whose records (status, result, log) the store keeps; submitting a job "
                        "beyond it removes the records of those that finished longest ago — never a queued or "
                        "running job, never an output folder (each POST adds a record: without a cap, anyone who "
                        "may POST could fill the disk)")
    parser.add_argument("--local-root", action="append", default=argparse.SUPPRESS, metavar="DIR", type=path_text,
                        help="a folder whose contents jobs may name as local paths (parents, base, calibration "
                        "data, and a base_model a local parent's model card names), symlinks followed; "
                        "repeatable. Without it jobs name Hub references only: anyone who may POST could "
                        "otherwise merge, and push to the Hub, any folder the server can read")
    parser.add_argument("--output-root", default=argparse.SUPPRESS, metavar="DIR", type=path_text,
                        help="the folder a job's `output` names a folder in (default: STATE_DIR/outputs)")


def server_settings() -> dict[str, Any]:
    """uvicorn's settings for the service, beyond where it listens (`run`; a test runs the same server): the limits
    above, and the protocol whose own 400 says `nosniff` as every answer of the app does (`serve.protocol`)."""
    from hf_mudsc.serve.protocol import ServiceH11Protocol

    return {"http": ServiceH11Protocol, "timeout_keep_alive": KEEP_ALIVE_S,
            "h11_max_incomplete_event_size": HEADER_MAX_BYTES}


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key (one line naming the flag)."""
    if not is_loopback(host) and not api_key:
        raise ValueError(f"--host {host} exposes the service beyond this machine: pass --api-key KEY (or set "
                         f"{API_KEY_ENV}); POST and DELETE will then need the header `X-API-Key`")


def run(args: argparse.Namespace) -> int:
    flag = getattr(args, "api_key", None)
    if flag is not None and not flag.strip():  # else it would win over the environment's key and mean none
        raise ValueError(f"--api-key is empty: pass the key, or leave the flag out (then {API_KEY_ENV} is read; "
                         "without either the service serves this machine only, with no key)")
    api_key = clean_api_key(flag or os.environ.get(API_KEY_ENV))
    if getattr(args, "api_key", None):
        logger.warning("--api-key on the command line is visible to every user of this machine (ps, "
                       "/proc/<pid>/cmdline): set the environment variable %s instead", API_KEY_ENV)
    check_exposure(args.host, api_key)
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.max_queued < 1:
        raise ValueError(f"--max-queued must be at least 1, got {args.max_queued}")
    if args.max_jobs < 1:
        raise ValueError(f"--max-jobs must be at least 1, got {args.max_jobs}")
    local_roots = getattr(args, "local_root", [])
    for root in local_roots:
        if not Path(root).expanduser().is_dir():
            raise ValueError(f"--local-root {root!r} is not a folder: pass an existing folder jobs may read from")
    try:
        import uvicorn

        from hf_mudsc.serve import redact_tokens_in_server_logs
        from hf_mudsc.serve.app import create_app
    except ModuleNotFoundError as missing:
        raise ValueError(f"`hf-mudsc serve` needs {missing.name}: pip install fastapi uvicorn (the serve extra; from "
                         "a clone of hf-mudsc: pip install -e \".[serve]\")") from None
    # The state directory's lock first: a second server on it refuses before it touches the store (the live one's
    # jobs), then the port, before the store is opened and recovered.
    with lock_state_dir(args.state_dir):
        output_root = getattr(args, "output_root", None)
        check_output_root(Path(output_root).expanduser().absolute() if output_root
                          else Path(args.state_dir).expanduser().absolute() / "outputs")
        check_port(args.host, args.port)
        app = create_app(args.state_dir, workers=args.workers, api_key=api_key, output_root=output_root,
                         max_queued=args.max_queued, max_jobs=args.max_jobs, local_roots=local_roots)
        logger.info("serving on http://%s:%d (state in %s)", args.host, args.port, args.state_dir)
        redact_tokens_in_server_logs()
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=True, **server_settings())
    return 0
