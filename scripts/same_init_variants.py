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

Beyond two equally weighted parents (`resolve_refit`'s same-base rule, docs/benchmarks/same_init_three.md):
`--parents 3` merges three fine-tunes of the one pretrained ViT, each on a part of a 4+3+3 split
(`common.three_way_splits`); `--weights 2 1` gives every variant the same per-parent weights (the target there:
never below `linear`, the plain average with those weights). Both default to the variants `default`, `linear`,
`linear + refit`, `regmean`, `regmean + refit`.

    python scripts/same_init_variants.py --parents 3 --widths 64 128 --splits 5 --out /tmp/same_three.json
    python scripts/same_init_variants.py --weights 2 1 --widths 64 128 --splits 5 --out /tmp/same_w21.json

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
    same_init_parents,
    set_threads,
    three_way_splits,
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
# Beyond two equally weighted parents (`--parents 3`, `--weights`): what `resolve_refit` decides between.
BEYOND_TWO = ("default", "linear", "linear + refit", "regmean", "regmean + refit")
LETTERS = "abcdefgh"


def figures_of(count: int) -> tuple[str, ...]:
    """The figures of a merge of `count` parents: each task's accuracy (task_a, task_b, ...) and the joint."""
    return (*(f"task_{LETTERS[k]}" for k in range(count)), "joint")



def run_pair(args: argparse.Namespace, width: int, index: int, classes: Any, names: Sequence[str]) -> dict[str, Any]:
    """Every variant merged from one set of same-init parents (a pair, or `--parents` of them), scored on test."""
    settings = pair_settings(cache_dir=args.cache_dir)
    if len(classes) == 2:
        model_a, model_b, splits, calibration = same_init_pair(settings, width, index, classes)
        parents, tasks_data = [model_a, model_b], digit_tasks(splits, "test")
    else:
        parents, tasks, calibration = same_init_parents(settings, width, index, classes)
        tasks_data = digit_tasks(tasks, "test")
    base = pretrained_all_digits(settings, width)
    weighted = {"weights": list(args.weights)} if args.weights else {}
    merged, seconds = {}, {}
    for label in names:
        options = {**VARIANTS, **SLOW, **WITH_BASE}[label]
        extra = {"base": base} if label in WITH_BASE else {}
        start = time.perf_counter()
        model = hf_mudsc.merge(parents, calibration, batch_size=64, progress=False, **options, **extra, **weighted)
        seconds[label] = round(time.perf_counter() - start, 2)
        refit = model.merge_report.refit
        seconds[label + " info"] = {"method": model.merge_report.method,
                                    "head_kept": None if refit is None else refit.head_kept}
        merged[label] = model
    test = evaluate_merge(merged, parents, tasks_data, progress=False)
    tasks = list(tasks_data)
    rows = {}
    for name in [*(f"parent_{LETTERS[k]}" for k in range(len(parents))), "ensemble", *merged]:
        rows[name] = {**{f"task_{LETTERS[k]}": test.score(name, task) for k, task in enumerate(tasks)},
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
    figures = figures_of(len(records[0]["classes"]))
    for key, pairs in groups.items():
        out[key] = {}
        for label in [name for name in pairs[0] if all(name in p for p in pairs)]:
            entry = {}
            for figure in figures:
                values = [p[label][figure] for p in pairs if p[label].get(figure) is not None]
                if values:
                    entry[figure] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            out[key][label] = entry
    return out


def table(result: dict[str, Any]) -> str:
    lines = []
    count = len(result["records"][0]["classes"])
    figures, letters = figures_of(count), LETTERS[:count].upper()
    for key, rows in result["summary"].items():
        lines += [f"## width {key}", f"| variant | {' | '.join(f'task {x}' for x in letters)} | joint | "
                  "Δjoint vs linear | worst per-task gap |", "|---|" + "---:|" * (count + 3)]
        linear = rows.get("linear", {}).get("joint", (float("nan"),))[0]
        parents = [rows[f"parent_{x}"][f"task_{x}"][0] for x in letters.lower()]
        for label, entry in rows.items():
            if not all(figure in entry for figure in figures):  # the parents: one task each
                continue
            gap = max(own - entry[f"task_{x}"][0] for own, x in zip(parents, letters.lower()))
            tasks = " | ".join(f"{100 * entry[figure][0]:.1f}" for figure in figures[:-1])
            lines.append(f"| {label} | {tasks} | {100 * entry['joint'][0]:.1f} ± {100 * entry['joint'][1]:.1f} | "
                         f"{100 * (entry['joint'][0] - linear):+.1f} | {100 * gap:.1f} |")
        lines.append("")
    return "\n".join(lines)


def pair_table(result: dict[str, Any]) -> str:
    """Per pair: each variant's joint % with its tasks' accuracies in brackets (`--per-pair`)."""
    records = result["records"]
    count = len(records[0]["classes"])
    labels = [name for name in records[0]["rows"] if not name.startswith("parent_")]
    lines = [f"| width | split | classes | parents {' / '.join(LETTERS[:count].upper())} | {' | '.join(labels)} |",
             "|---|---|---|---|" + "---:|" * len(labels)]
    for record in records:
        rows = record["rows"]
        own = " / ".join(f"{100 * rows[f'parent_{x}'][f'task_{x}']:.1f}" for x in LETTERS[:count])
        cells = [f"{100 * rows[label]['joint']:.1f} ("
                 + "/".join(f"{100 * rows[label][f'task_{x}']:.1f}" for x in LETTERS[:count]) + ")"
                 for label in labels]
        classes = " / ".join("".join(map(str, c)) for c in record["classes"])
        lines.append(f"| {record['width']} | {record['split']} | {classes} | {own} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=None, choices=[*VARIANTS, *SLOW, *WITH_BASE],
                        help="default: every variant for two equally weighted parents, else " + ", ".join(BEYOND_TWO))
    parser.add_argument("--parents", type=int, default=2, choices=(2, 3),
                        help="3: three fine-tunes of one base on a 4+3+3 digit split")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="per-parent merge weights given to every variant (e.g. 2 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=PAIR_DEFAULTS["cache_dir"])
    parser.add_argument("--out", default="bench_results/same_init_variants.json")
    parser.add_argument("--resume", action="store_true", help="keep the pairs already in --out")
    parser.add_argument("--per-pair", action="store_true", help="also print every pair's figures (a table)")
    args = parser.parse_args(argv)
    if args.weights is not None and len(args.weights) != args.parents:
        parser.error(f"--weights needs one weight per parent ({args.parents}), got {len(args.weights)}")
    if args.variants is None:
        beyond = args.parents != 2 or args.weights is not None
        args.variants = list(BEYOND_TWO) if beyond else [*VARIANTS, *WITH_BASE]
    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    out = Path(args.out)
    result: dict[str, Any] = {"records": []}
    if args.parents != 2 or args.weights is not None:  # recorded only beyond the default, whose format stays
        result.update(parents=args.parents, weights=args.weights)
    if args.resume and out.is_file():
        kept = json.loads(out.read_text())
        if (kept.get("parents", 2), kept.get("weights")) != (args.parents, args.weights):
            parser.error(f"--resume: {out} holds another setting (parents {kept.get('parents', 2)}, weights "
                         f"{kept.get('weights')}); pass another --out")
        result = kept
    done = {(r["width"], r["split"]) for r in result["records"]}
    splits = random_class_splits(args.splits) if args.parents == 2 else three_way_splits(args.splits)
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
    if args.per_pair:
        print(pair_table(result))


if __name__ == "__main__":
    main()
