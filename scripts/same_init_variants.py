#!/usr/bin/env python
"""Which label-free merge should `method="auto"` choose for fine-tunes of one base? (A benchmark, not a test.)

Issue 12's same-init target: with default settings and no base given, per-task accuracy within 1 point of the
parents and joint accuracy >= plain averaging's, at every width. This runs every candidate on the same-init digit
ViT pairs of `scripts/benchmark_quality.py` (one ViT pretrained on all ten digits, two copies fine-tuned on the two
halves of each random 5+5 split): linear / regmean / regmean++ / fisher, each without and with the ridge refit
(`refit="ridge"`: identity maps, targets the mean of the parents' outputs, the head kept when the parents share a
basis), regmean's off-diagonal scale, the refit's λ, and TIES with the base given (for reference; the target is
without a base). Every pair's figures and the mean ± std over pairs and widths go to `--out` (JSON) and stdout.

    python scripts/same_init_variants.py --widths 64 128 256 --splits 3 --threads 1 --out /tmp/same_variants.json

Pairs are cached under `--cache-dir` (the quality benchmark's cache: ~/.cache/hf_mudsc/bench/same_init).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (
    PAIR_DEFAULTS,
    digit_tasks,
    log,
    pair_settings,
    pretrained_all_digits,
    random_class_splits,
    same_init_pair,
    set_threads,
    write_json,
)

import hf_mudsc
from hf_mudsc.evaluate.harness import evaluate_merge

# Without "+ refit": refit="none" explicitly (refit="auto" refits after the data methods since issue 12).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "linear": {"method": "linear", "refit": "none"},
    "linear + refit": {"method": "linear", "refit": "ridge"},
    "linear + refit λ=1e-2": {"method": "linear", "refit": "ridge", "refit_lambda": 1e-2},
    "linear + refit λ=1e-1": {"method": "linear", "refit": "ridge", "refit_lambda": 1e-1},
    "regmean": {"method": "regmean", "refit": "none"},
    "regmean + refit": {"method": "regmean", "refit": "ridge"},
    "regmean scale=1.0": {"method": "regmean", "regmean_scale": 1.0, "refit": "none"},
    "regmean scale=0.5": {"method": "regmean", "regmean_scale": 0.5, "refit": "none"},
    "regmean scale=0.5 + refit": {"method": "regmean", "regmean_scale": 0.5, "refit": "ridge"},
    "regmean_plusplus": {"method": "regmean_plusplus", "refit": "none"},
    "regmean_plusplus + refit": {"method": "regmean_plusplus", "refit": "ridge"},
}
# Slow (per-sample gradients: ~2 min a pair at width 64); run with --variants.
SLOW: dict[str, dict[str, Any]] = {
    "fisher": {"method": "fisher", "refit": "none"},
    "fisher + refit": {"method": "fisher", "refit": "ridge"},
}
# With the base given (TIES needs it): not the target's setting, for reference.
WITH_BASE: dict[str, dict[str, Any]] = {
    "ties (base given)": {"method": "ties", "refit": "none"},
    "ties (base given) + refit": {"method": "ties", "refit": "ridge"},
}
FIGURES = ("task_a", "task_b", "joint")


def run_pair(args: argparse.Namespace, width: int, index: int, classes: Any, names: Sequence[str]) -> dict[str, Any]:
    settings = pair_settings(cache_dir=args.cache_dir)
    model_a, model_b, splits, calibration = same_init_pair(settings, width, index, classes)
    base = pretrained_all_digits(settings, width)
    merged, seconds = {}, {}
    for label in names:
        options = {**VARIANTS, **SLOW, **WITH_BASE}[label]
        extra = {"base": base} if label in WITH_BASE else {}
        start = time.perf_counter()
        model = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False, **options, **extra)
        seconds[label] = round(time.perf_counter() - start, 2)
        refit = model.merge_report.refit
        seconds[label + " info"] = {"method": model.merge_report.method,
                                    "head_kept": None if refit is None else refit.head_kept}
        merged[label] = model
    test = evaluate_merge(merged, [model_a, model_b], digit_tasks(splits, "test"), progress=False)
    tasks = list(digit_tasks(splits, "test"))
    rows = {}
    for name in ["parent_a", "parent_b", "ensemble", *merged]:
        rows[name] = {"task_a": test.score(name, tasks[0]), "task_b": test.score(name, tasks[1]),
                      "joint": test.score(name, "joint"), **({"seconds": seconds[name], **seconds[name + " info"]}
                                                             if name in seconds else {})}
    return rows


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over pairs per width, and the mean over every pair of every width ("all")."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["width"]), []).append(record["rows"])
        groups.setdefault("all", []).append(record["rows"])
    out: dict[str, Any] = {}
    for key, pairs in groups.items():
        out[key] = {}
        for label in [name for name in pairs[0] if all(name in p for p in pairs)]:
            entry = {}
            for figure in FIGURES:
                values = [p[label][figure] for p in pairs if p[label].get(figure) is not None]
                if values:
                    entry[figure] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            out[key][label] = entry
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    for key, rows in result["summary"].items():
        lines += [f"## width {key}", "| variant | task A | task B | joint | Δjoint vs linear | worst per-task gap |",
                  "|---|---:|---:|---:|---:|---:|"]
        linear = rows.get("linear", {}).get("joint", (float("nan"),))[0]
        parents = [rows["parent_a"]["task_a"][0], rows["parent_b"]["task_b"][0]]
        for label, entry in rows.items():
            if not all(figure in entry for figure in FIGURES):  # the parents: one task each
                continue
            gap = max(parents[0] - entry["task_a"][0], parents[1] - entry["task_b"][0])
            lines.append(f"| {label} | {100 * entry['task_a'][0]:.1f} | {100 * entry['task_b'][0]:.1f} | "
                         f"{100 * entry['joint'][0]:.1f} ± {100 * entry['joint'][1]:.1f} | "
                         f"{100 * (entry['joint'][0] - linear):+.1f} | {100 * gap:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, *WITH_BASE],
                        choices=[*VARIANTS, *SLOW, *WITH_BASE])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=PAIR_DEFAULTS["cache_dir"])
    parser.add_argument("--out", default="bench_results/same_init_variants.json")
    parser.add_argument("--resume", action="store_true", help="keep the pairs already in --out")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    out = Path(args.out)
    result: dict[str, Any] = {"records": []}
    if args.resume and out.is_file():
        result = json.loads(out.read_text())
    done = {(r["width"], r["split"]) for r in result["records"]}
    splits = random_class_splits(args.splits)
    for width in args.widths:
        for index, classes in enumerate(splits):
            if (width, index) in done:
                continue
            log(f"same_init variants: hidden {width}, split {index} {classes}")
            start = time.perf_counter()
            rows = run_pair(args, width, index, classes, args.variants)
            result["records"].append({"width": width, "split": index, "classes": [list(c) for c in classes],
                                      "seconds": round(time.perf_counter() - start, 1), "rows": rows})
            result["summary"] = summary(result["records"])
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json(out, result)
            log("  " + ", ".join(f"{label} {100 * rows[label]['joint']:.1f}" for label in rows))
    print(table(result))


if __name__ == "__main__":
    main()
