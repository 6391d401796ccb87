#!/usr/bin/env python
"""Behaviour baseline: SHA-256 digests of merged weights, so a restructure can prove "bit-identical".

Three parent pairs, each merged with every method the demo uses plus the defaults (and the two reference
switches, which take other code paths of the solver and apply step):

* ``demo`` — the pair `hf-mudsc demo` trains (two digit ViTs from seeds 0/1, width 64), loaded through
  `hf_mudsc.cli.demo.prepare_inputs` (so the demo's cache is reused), merged exactly as the demo
  merges (its recipe, its calibration folder, 512 images), plus ``cli defaults``: the real
  `hf-mudsc merge A B --calibration DIR --output TMP` run in-process and the written folder read back.
* ``different_init`` / ``same_init`` — the quality benchmark's first pair of each scenario (smallest
  default width, class split 0), built by `scripts/common.py`'s `different_init_pair` /
  `same_init_pair` and merged as the benchmark's `merge_all` merges (calibration batches, `batch_size=64`), plus
  ``api defaults``: `hf_mudsc.merge([a, b], batches)` with no options.

For every merge the digest covers the state_dict in sorted key order: each key, its shape and the bytes of
the contiguous float32 tensor. Next to it the `config.mudsc` essentials (method, matcher, alpha, zip
settings, head switches, seed, statistics dtype, calibration size, per-group match values), the sweep count
and the classifier's `task_label_ranges`. The parents are digested too, so a mismatch can be told apart:
"parents changed" (retrained, other cache) versus "the merge changed".

    python scripts/merge_digests.py --out docs/benchmarks/merge_digests.json   # record the baseline
    python scripts/merge_digests.py --check docs/benchmarks/merge_digests.json # exit 1 on any mismatch

Prints ONE JSON line, then a table. Bit-identity is only promised on the same machine (CPU: the baseline records
it, and a check on another one says so), torch version and thread count (`--check` reuses the recorded `--threads`);
to check a change on another machine, record a baseline at the old commit there first (`git worktree add`);
trained parents are cached under `--cache-dir` (the demo's and the benchmark's default caches: ~/.cache/hf_mudsc
or $HF_MUDSC_CACHE).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the Hub

import common  # noqa: E402
import torch  # noqa: E402

import hf_mudsc  # noqa: E402

logger = logging.getLogger("merge_digests")

FORMAT = 1
CASES = ("demo", "different_init", "same_init")
# Extra merges beyond the demo's methods: the reference switches exercise other solver/apply paths.
EXTRA_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("mudsc (zip) independent_heads", {"method": "mudsc", "matcher": "zip", "independent_heads": True}),
    ("mudsc (align) reference_compat", {"method": "mudsc", "matcher": "align", "reference_compat": True}),
]
MUDSC_KEYS = (
    "method", "matcher", "alpha", "zip_decay", "zip_budget", "independent_heads", "reference_compat", "seed",
    "statistics_dtype", "num_calibration_samples", "parents", "calibration", "group_match_values",
)


# ---------------------------------------------------------------------------------------------- digests
def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict: sorted keys, each key, shape and contiguous float32 bytes."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def merge_record(model: Any) -> dict[str, Any]:
    """The digest and the essentials of one merged model (what must not change in a restructure)."""
    mudsc = dict(getattr(model.config, "mudsc", None) or {})
    report = getattr(model, "merge_report", None)
    return {
        "state_sha256": state_digest(model),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "mudsc": {key: mudsc.get(key) for key in MUDSC_KEYS},
        "sweeps": getattr(report, "sweeps", None),
        "task_label_ranges": getattr(model.config, "task_label_ranges", None),
    }


def parents_record(model_a: Any, model_b: Any) -> dict[str, str]:
    return {"a": state_digest(model_a), "b": state_digest(model_b)}


# ------------------------------------------------------------------------------------------------ cases
def demo_methods() -> list[tuple[str, dict[str, Any]]]:
    """The demo's (label, options) list — read from the demo, not copied — then the extra switches."""
    from hf_mudsc.cli.demo import demo_methods as registry_runs

    return registry_runs()


def run_demo(cache_root: Path) -> dict[str, Any]:
    """The demo's pair and merges (`hf-mudsc demo` with its defaults), plus the CLI's default merge."""
    from transformers import AutoModelForImageClassification

    from hf_mudsc.cli import demo
    from hf_mudsc.cli.main import main as cli_main
    from hf_mudsc.load.parents import load_parents
    from hf_mudsc.publish.recipe import Recipe

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--cache-dir", str(cache_root / "demo")])
    folder_a, folder_b, calibration, _ = demo.prepare_inputs(args)
    parents = load_parents([str(folder_a), str(folder_b)])
    # The recipe `hf_mudsc/cli/demo.py` builds for its merges (same fields, same values).
    recipe = Recipe(models=[str(folder_a), str(folder_b)], calibration=str(calibration), method="mudsc",
                    matcher="zip", alpha=float(args.alpha), num_samples=args.num_samples,
                    batch_size=demo.CALIBRATION_BATCH, seed=0)
    merges: dict[str, Any] = {}
    for label, options in [*demo_methods(), *EXTRA_OPTIONS]:
        merged = hf_mudsc.merge(parents, str(calibration), **recipe.override(**options).merge_options(),
                                progress=False)
        merges[label] = merge_record(merged)
    with tempfile.TemporaryDirectory(prefix="merge-digests-") as tmp:
        output = Path(tmp) / "cli-defaults"
        code = cli_main(["merge", str(folder_a), str(folder_b), "--calibration", str(calibration),
                         "--output", str(output)])
        if code != 0:
            raise RuntimeError(f"`hf-mudsc merge` with the default options exited with {code}")
        merged = AutoModelForImageClassification.from_pretrained(output, dtype=torch.float32)
        merges["cli defaults"] = merge_record(merged)
    return {"parents": parents_record(parents[0].model, parents[1].model), "merges": merges}


def run_benchmark_pair(scenario: str, cache_root: Path) -> dict[str, Any]:
    """The quality benchmark's first pair of `scenario` (smallest default width, split 0), merged as it merges."""
    bargs = common.pair_settings(cache_dir=str(cache_root / "bench"))
    width = min(bargs.widths if scenario == "different_init" else bargs.same_init_widths)
    classes = common.random_class_splits(1)[0]
    build = common.different_init_pair if scenario == "different_init" else common.same_init_pair
    model_a, model_b, _, calibration = build(bargs, width, 0, classes)
    merges: dict[str, Any] = {}
    for label, options in [*demo_methods(), *EXTRA_OPTIONS]:
        merged = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False, **options)
        merges[label] = merge_record(merged)
    merges["api defaults"] = merge_record(hf_mudsc.merge([model_a, model_b], calibration, progress=False))
    return {"width": width, "split": 0, "classes": [list(c) for c in classes],
            "parents": parents_record(model_a, model_b), "merges": merges}


def cpu_name() -> str:
    """The processor and the vector unit torch uses: the calibration GEMMs sum in an order that depends on them, so
    a merge reading calibration data is bit-identical only on the same kind of CPU (measured: a baseline recorded
    on another machine mismatched 29 such digests at an unchanged commit, every other digest matched)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def compute(cases: Sequence[str], cache_root: Path, threads: int) -> dict[str, Any]:
    """Every requested case; the library's own prints (training notices, CLI output) go to stderr."""
    import transformers

    previous = common.set_threads(threads)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "format": FORMAT,
        "settings": {"threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
                     "hf_mudsc": hf_mudsc.__version__, "platform": platform.platform(), "cpu": cpu_name()},
        "cases": {},
    }
    try:
        with contextlib.redirect_stdout(sys.stderr):
            for case in cases:
                case_start = time.perf_counter()
                logger.info("%s: building the pair and merging", case)
                entry = run_demo(cache_root) if case == "demo" else run_benchmark_pair(case, cache_root)
                entry["seconds"] = round(time.perf_counter() - case_start, 1)
                result["cases"][case] = entry
    finally:
        torch.set_num_threads(previous)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# ------------------------------------------------------------------------------------------- comparison
def flatten(result: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(path, value) of everything that must match: parent digests and each merge's record fields."""
    for case, entry in result["cases"].items():
        for side, digest in entry["parents"].items():
            yield f"{case}/parents/{side}", digest
        for label, record in entry["merges"].items():
            for key, value in record.items():
                if key == "mudsc":
                    for sub, sub_value in value.items():
                        yield f"{case}/{label}/mudsc.{sub}", sub_value
                else:
                    yield f"{case}/{label}/{key}", value


def mismatches(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """One line per difference, over the cases that were recomputed."""
    want = {path: value for path, value in flatten(expected) if path.split("/")[0] in actual["cases"]}
    have = dict(flatten(actual))
    lines = []
    for path in sorted(set(want) | set(have)):
        if path not in have:
            lines.append(f"{path}: missing now (baseline {want[path]!r})")
        elif path not in want:
            lines.append(f"{path}: not in the baseline (now {have[path]!r})")
        elif want[path] != have[path]:
            lines.append(f"{path}: baseline {want[path]!r}, now {have[path]!r}")
    return lines


def table(result: dict[str, Any]) -> str:
    rows = ["| case | merge | state sha256 (first 16) | sweeps | calibration samples |", "|---|---|---|---|---|"]
    for case, entry in result["cases"].items():
        parents = entry["parents"]
        rows.append(f"| {case} | parents A / B | {parents['a'][:16]} / {parents['b'][:16]} | | |")
        for label, record in entry["merges"].items():
            rows.append(f"| {case} | {label} | {record['state_sha256'][:16]} | {record['sweeps']} | "
                        f"{record['mudsc']['num_calibration_samples']} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="JSON", help="write the digests to this file")
    parser.add_argument("--check", metavar="JSON", help="recompute and compare with this baseline; exit 1 on "
                        "any mismatch")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which pairs to run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 1, or the baseline's with --check)")
    parser.add_argument("--cache-dir", default=str(common.CACHE_ROOT),
                        help="root of the trained-parent caches (demo/ and bench/ below it)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.logging.set_verbosity_error()
    baseline = None
    if args.check:
        path = Path(args.check)
        if not path.is_file():
            print(f"merge_digests: error: no baseline at {str(path)!r}; record one with --out", file=sys.stderr)
            return 2
        baseline = json.loads(path.read_text(encoding="utf-8"))
        if baseline.get("format") != FORMAT:
            print(f"merge_digests: error: {str(path)!r} has format {baseline.get('format')!r}, expected {FORMAT}",
                  file=sys.stderr)
            return 2
    threads = args.threads or (baseline["settings"]["threads"] if baseline else 1)
    if threads < 1:
        print("merge_digests: error: --threads must be >= 1", file=sys.stderr)
        return 2
    result = compute(args.cases, Path(args.cache_dir).expanduser(), threads)
    if args.out:
        common.write_json(Path(args.out), result)
    line: dict[str, Any] = {
        "benchmark": "merge_digests",
        "seconds": result["seconds"],
        "threads": threads,
        "digests": {f"{case}/{label}": record["state_sha256"][:16]
                    for case, entry in result["cases"].items() for label, record in entry["merges"].items()},
    }
    problems: list[str] = []
    if baseline is not None:
        problems = mismatches(baseline, result)
        if problems and baseline["settings"].get("cpu") != result["settings"]["cpu"]:
            logger.warning("the baseline was recorded on another CPU (%s; this one: %s): merges that read calibration "
                           "data are not bit-identical across CPUs. To check a change, record a baseline at the old "
                           "commit on this machine (--out) and check against that",
                           baseline["settings"].get("cpu", "not recorded"), result["settings"]["cpu"])
        for key in ("torch", "transformers"):
            if baseline["settings"].get(key) != result["settings"][key]:
                logger.warning("the baseline was recorded with %s %s, this run uses %s: bit-identity is not "
                               "promised across versions", key, baseline["settings"].get(key),
                               result["settings"][key])
        line["check"] = {"baseline": args.check, "mismatches": len(problems)}
    print(json.dumps(line, ensure_ascii=False))
    print(table(result))
    if baseline is not None:
        if problems:
            print(f"\n{len(problems)} mismatch(es) against {args.check}:")
            print("\n".join(f"  {p}" for p in problems))
            return 1
        print(f"\nAll digests match {args.check}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
