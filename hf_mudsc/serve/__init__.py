"""`hf-mudsc serve`: merge jobs over HTTP (docs/design.md §11).

    store.py      the job store: SQLite under --state-dir (jobs, logs; never a token)
    jobs.py       a request body -> a validated job (recipe keys, destination, 400 naming the key)
    scheduler.py  the web process's side: queue, at most --workers worker processes, cancel, restart recovery
    worker.py     the worker process: runs one job (merge or dry run), forwards progress and log lines
    app.py        the FastAPI app: the HTTP API and the server-rendered page (templates/)

Nothing here imports torch: the web process stays light and `hf-mudsc serve --help` answers at once; the
merge engine is imported only inside worker processes.
"""

from __future__ import annotations

import ipaddress


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
