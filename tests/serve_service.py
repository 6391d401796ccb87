"""A running `hf-mudsc serve` for tests: a subprocess on a free port, pointed at the Hub emulator.

The service (and its worker processes) talk to the emulator, so they run in a subprocess whose environment is
`hub.client_env(token=None)`: the only Hub token a job has is the one its request carries.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hf_mudsc.serve.worker import DELAY_ENV

FINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`python -m hf_mudsc serve` in a subprocess; `request` speaks JSON to it."""

    def __init__(self, hub: Any, state_dir: Path, log: Path, *, delay: float | None = None, workers: int = 1,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.hub, self.state_dir, self.log = hub, Path(state_dir), Path(log)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        values = {"OMP_NUM_THREADS": "1", **(env or {})}
        if delay:
            values[DELAY_ENV] = str(delay)
        environment = hub.client_env(self.state_dir.parent / "hf_home", token=None, extra=values)
        if not delay:
            environment.pop(DELAY_ENV, None)
        self._log_file = open(self.log, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hf_mudsc", "-v", "serve", "--port", str(self.port), "--state-dir",
             str(self.state_dir), "--workers", str(workers), *extra],
            env=environment, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.request("GET", "/api/jobs")
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the service did not start:\n{self.log.read_text()[-4000:]}") from None
                time.sleep(0.2)

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                payload = answer.read()
                status = answer.status
        except urllib.error.HTTPError as failure:
            payload, status = failure.read(), failure.code
        kind = answer.headers.get("content-type", "") if status < 400 else "application/json"
        return status, json.loads(payload) if "json" in kind else payload.decode()

    def submit(self, body: dict[str, Any], *, token: str | None = None) -> str:
        status, answer = self.request("POST", "/api/jobs", body, token=token)
        assert status == 201 and answer["status"] == "queued", (status, answer)
        return answer["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        status, answer = self.request("GET", f"/api/jobs/{job_id}")
        assert status == 200, answer
        return answer

    def wait(self, job_id: str, until: Any = FINAL, timeout: float = 180) -> dict[str, Any]:
        """Poll until the job's status is in `until` (or `until(job)` is true)."""
        test = until if callable(until) else (lambda job: job["status"] in until)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if test(job):
                return job
            if time.monotonic() > deadline:
                log = self.request("GET", f"/api/jobs/{job_id}/log")[1]
                raise AssertionError(f"job {job_id} stuck at {job}\n{log}\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the web process (its workers see their pipe close)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log_file.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._log_file.closed:
            self._log_file.close()

    def workers(self) -> list[int]:
        """The pids of the service's worker processes: children of its forkserver (the server's child that runs
        multiprocessing.forkserver), or spawned children of the server itself."""
        table = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
        servers = {pid for pid, (parent, cmd) in table.items()
                   if parent == self.process.pid and "forkserver" in cmd}
        return sorted(pid for pid, (parent, cmd) in table.items()
                      if parent in servers or (parent == self.process.pid and "spawn_main" in cmd))

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def files_containing(folder: Path, needle: str) -> list[str]:
    """Every file under `folder` whose bytes contain `needle`."""
    raw = needle.encode()
    return [str(p) for p in Path(folder).rglob("*") if p.is_file() and raw in p.read_bytes()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]


def drain_job(app: Any, job_id: str, timeout: float = 20) -> dict[str, Any]:
    """Run the app's scheduler loop in a thread until `job_id` leaves queued/running (or `timeout` s), stop it and
    return the job's stored row (tests that replace or keep the scheduler's `_start`)."""
    scheduler = app.state.scheduler
    loop = threading.Thread(target=scheduler._loop, daemon=True)
    loop.start()
    scheduler.submit(job_id, None)
    deadline = time.monotonic() + timeout
    while app.state.store.get(job_id)["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    scheduler.stop()
    loop.join(timeout=10)
    return app.state.store.get(job_id)
