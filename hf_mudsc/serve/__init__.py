"""`hf-mudsc serve`: merge jobs over HTTP (docs/design.md §11).

    store.py      the job store: SQLite under --state-dir (jobs, logs; never a token)
    jobs.py       a request body -> a validated job (recipe keys, destination, 400 naming the key)
    scheduler.py  the web process's side: queue, at most --workers worker processes, cancel, restart recovery
    worker.py     the worker process: runs one job (merge or dry run), forwards progress and log lines
    app.py        the FastAPI app: the HTTP API and the server-rendered page (templates/)

Nothing here imports torch: the web process stays light and `hf-mudsc serve --help` answers at once; the
merge engine is imported only inside worker processes.
"""
