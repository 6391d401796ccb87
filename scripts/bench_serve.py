"""Load check of `hf-mudsc serve` (a benchmark, not a test): is the API answered while merges run?

Starts the service in a subprocess (`--workers 2`) on two random ViT parents saved locally, then at once:
- one real merge (zipit with calibration on random images, sized by --hidden/--layers/--samples) — while it
  runs, a poller times `GET /api/jobs` back to back;
- `--clients` concurrent clients submit `--jobs` dry-run jobs between them (POST /api/jobs) and poll each to its end.
Prints one JSON line, then a table. Nothing touches the Hub.

    python scripts/bench_serve.py                                    # quick: ~1 min on 2 busy cores
    python scripts/bench_serve.py --hidden 384 --layers 6 --samples 512   # a MiniLM-sized merge
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FINAL = ("succeeded", "failed", "cancelled")


def call(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any, float]:
    """One request; returns (status, JSON answer, seconds)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            payload, status = answer.read(), answer.status
    except urllib.error.HTTPError as failure:
        payload, status = failure.read(), failure.code
    return status, json.loads(payload), time.perf_counter() - start


def attention_heads(hidden: int) -> int:
    """Heads of about 32 dimensions, as many as divide `hidden` (a count that does not divide it leaves attention
    weights the merge cannot split into heads): 128 -> 4, 100 -> 2, 32 -> 1."""
    return max(n for n in range(1, max(1, hidden // 32) + 1) if hidden % n == 0)


def make_inputs(root: Path, hidden: int, layers: int, samples: int) -> tuple[Path, Path, Path]:
    """Two random ViT classifiers (different seeds) with a processor, and random 32x32 calibration images."""
    import datasets
    import numpy as np
    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=attention_heads(hidden), intermediate_size=4 * hidden, num_labels=10)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        folder = root / f"parent-{seed}"
        ViTForImageClassification(config).save_pretrained(folder)
        processor.save_pretrained(folder)
        folders.append(folder)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(samples)]
    data = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    data.save_to_disk(root / "calibration")
    return folders[0], folders[1], root / "calibration"


def start_service(state: Path, workers: int, local_root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(state.parent / "server.log", "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen([sys.executable, "-m", "hf_mudsc", "serve", "--port", str(port), "--state-dir",
                                str(state), "--workers", str(workers), "--local-root", str(local_root)],
                               env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            call(url + "/api/jobs")
            return process, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the service did not start; see {state.parent / 'server.log'}")


def wait(url: str, job_id: str, timeout: float = 3600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job, _ = call(f"{url}/api/jobs/{job_id}")
        if job["status"] in FINAL:
            return job
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50, help="dry-run jobs submitted")
    parser.add_argument("--clients", type=int, default=5, help="concurrent clients submitting them")
    parser.add_argument("--workers", type=int, default=2, help="the service's --workers")
    parser.add_argument("--hidden", type=int, default=128, help="parents' hidden size")
    parser.add_argument("--layers", type=int, default=4, help="parents' layers")
    parser.add_argument("--samples", type=int, default=256, help="calibration images")
    args = parser.parse_args()
    for name in ("jobs", "clients", "workers", "hidden", "layers", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    a, b, calibration = make_inputs(root, args.hidden, args.layers, args.samples)
    process, url = start_service(root / "state", args.workers, local_root=root)  # the parents are local folders
    try:
        status, answer, _ = call(url + "/api/jobs", "POST", {
            "models": [str(a), str(b)], "method": "zipit", "calibration": str(calibration), "batch_size": 16,
            "output": "merged"})
        assert status == 201, answer
        merge_id = answer["id"]
        while call(f"{url}/api/jobs/{merge_id}")[1]["status"] == "queued":
            time.sleep(0.05)

        get_latencies: list[float] = []
        merge_done = threading.Event()

        def poll() -> None:
            while not merge_done.is_set():
                status, _, seconds = call(url + "/api/jobs")
                assert status == 200
                get_latencies.append(seconds)

        def client(count: int) -> tuple[list[float], list[dict[str, Any]]]:
            latencies, ids = [], []
            for _ in range(count):
                status, answer, seconds = call(url + "/api/jobs", "POST", {
                    "models": [str(a), str(b)], "method": "average", "dry_run": True})
                assert status == 201, answer
                latencies.append(seconds)
                ids.append(answer["id"])
            return latencies, [wait(url, job_id) for job_id in ids]

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        started = time.perf_counter()
        shares = [args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)]
        with ThreadPoolExecutor(args.clients) as pool:
            outcomes = list(pool.map(client, shares))
        dry_seconds = time.perf_counter() - started
        merge = wait(url, merge_id)
        merge_seconds = time.perf_counter() - started
        merge_done.set()
        poller.join()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)

    post_latencies = [s for latencies, _ in outcomes for s in latencies]
    finished = [job for _, jobs in outcomes for job in jobs]
    report = {
        "bench": "serve", "workers": args.workers, "clients": args.clients, "jobs": args.jobs,
        "answered": sum(job["status"] == "succeeded" for job in finished),
        "dry_runs_seconds": round(dry_seconds, 2),
        "post_p50_ms": round(1000 * percentile(post_latencies, 50), 1),
        "post_p95_ms": round(1000 * percentile(post_latencies, 95), 1),
        "merge_status": merge["status"], "merge_seconds": round(merge_seconds, 1),
        "merge_size": {"hidden": args.hidden, "layers": args.layers, "samples": args.samples},
        "get_jobs_requests": len(get_latencies),
        "get_jobs_p50_ms": round(1000 * percentile(get_latencies, 50), 1),
        "get_jobs_p95_ms": round(1000 * percentile(get_latencies, 95), 1),
        "get_jobs_max_ms": round(1000 * max(get_latencies), 1),
    }
    print(json.dumps(report))
    rows = [("dry-run jobs answered", f"{report['answered']} / {args.jobs} ({args.clients} clients)"),
            ("all dry runs finished in", f"{report['dry_runs_seconds']} s"),
            ("POST /api/jobs p50 / p95", f"{report['post_p50_ms']} / {report['post_p95_ms']} ms"),
            ("merge", f"{merge['status']} in {report['merge_seconds']} s "
                      f"(hidden {args.hidden}, {args.layers} layers, {args.samples} images)"),
            ("GET /api/jobs during the merge", f"{len(get_latencies)} requests"),
            ("GET /api/jobs p50 / p95 / max",
             f"{report['get_jobs_p50_ms']} / {report['get_jobs_p95_ms']} / {report['get_jobs_max_ms']} ms")]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0 if report["answered"] == args.jobs and merge["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
