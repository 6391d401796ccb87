#!/usr/bin/env python
"""`method="auto"`'s correspondence check, first start vs solve: how many units the activation matching alone (the
solve's first start, unrefined) leaves in place next to the full solve, on every same-base family, and what skipping
the solve saves (`hf_mudsc.methods.auto`, docs/design.md §4.8). (A benchmark, not a test.)

The check confirms fine-tunes of one base without the solve when the first start alone leaves most units in place
(`IN_PLACE_MAJORITY`); otherwise the solve decides, as before. That is safe only if no pair whose solve moves most
units has a first start that keeps most — the `far` family is where that would show.

* `text` — the MiniLM fine-tunes of `scripts/bench_same_base.py` (the real all-MiniLM-L6-v2, four synthesised
  tasks), every pair of the four (the units correspond);
* `vit` — the quality benchmark's same-init digit ViT pairs (`scripts/common.py`'s `same_init_pair`), `--widths` x
  `--splits` (the units correspond; the activation matching alone does not find it);
* `far` — `scripts/same_base_far.py`'s tiny BERT fine-tunes trained far from their base (the units moved), `--seeds`
  at each of its three training settings.

For each pair: the share in place of mudsc's first start with the zip matcher (what the check reads, whatever the
merge's matcher: `methods.auto.START_MATCHER`) and with the align matcher (for comparison) — read off
`method="zipit"` / `"activation_align"`, which merge by exactly that matching (`tests/test_check_s37.py`) — and of
mudsc's solve (`refit="none"`). `--timing` times on the first `--timing-pairs` MiniLM pairs (CPU seconds, one
thread, one run each): `method="auto"` (default options), `method="regmean"` (no check) and mudsc's solve alone
(`refit="none"`); then `auto` and `regmean` on the first same-init ViT pair at the largest width, which the first
start does not settle (what the start adds there). Run it with `PYTHONPATH` at an older tree (the first start was
added in session 37) to time the check as it was; `--label` names the run in the output.

    python scripts/correspondence_start.py --threads 1 --timing --out docs/benchmarks/correspondence_start.json

Prints one JSON line (summary), then a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from common import log, pair_settings, random_class_splits, same_init_pair, set_threads, write_json

import hf_mudsc
from hf_mudsc.methods.auto import IN_PLACE_MAJORITY
from hf_mudsc.solve.matchers import share_in_place

# (label, merge options): the first start with each matcher, then the check's solve.
SHARES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("start_zip", {"method": "zipit"}),
    ("start_align", {"method": "activation_align"}),
    ("solve", {"method": "mudsc"}),
)
FAR_SETTINGS = ((1e-3, (200, 100)), (3e-4, (800, 400)), (1e-4, (2000, 1000)))


def shares(parents: Sequence[Any], calibration: Any, **options: Any) -> dict[str, float]:
    """The share of units each of `SHARES` leaves in place for these parents."""
    record = {}
    for label, extra in SHARES:
        merged = hf_mudsc.merge(list(parents), calibration, refit="none", progress=False, **extra, **options)
        record[label] = round(share_in_place(merged.merge_report.matches), 4)
    return record


def text_pairs() -> tuple[Any, list[tuple[str, list[Any]]]]:
    """The MiniLM setting and its six pairs, named."""
    from correspondence_shares import text_setting

    setting = text_setting()
    return setting, [("+".join(setting.tasks[k] for k in pair), [setting.parents[k] for k in pair])
                     for pair in itertools.combinations(range(len(setting.parents)), 2)]


def far_records(seeds: Sequence[int]) -> list[dict[str, Any]]:
    """`same_base_far.py`'s pairs: a tiny BERT base and two fine-tunes trained far from it, per setting and seed."""
    import datasets
    import numpy as np
    import same_base_far as far

    records = []
    tok = far.tokenizer()
    for (lr, steps), seed in itertools.product(FAR_SETTINGS, seeds):
        base = far.train_model(tok, "topic", 1000 + seed, steps=250, lr=2e-3)
        tasks = (("sentiment", steps[0], 2000 + seed), ("topic", steps[1], 3000 + seed))
        parents = [far.train_model(tok, task, task_seed, steps=count, lr=lr, base=base)
                   for task, count, task_seed in tasks]
        calibration = datasets.Dataset.from_dict(
            {"text": far.sentences(np.random.default_rng(7 + seed), 200, "topic")[0]})
        record = {"lr": lr, "steps": list(steps), "seed": seed, **shares(parents, calibration, processor=tok)}
        log(f"far lr {lr:g} seed {seed}: {record}")
        records.append(record)
    return records


def timed(parents: Sequence[Any], calibration: Any, **options: Any) -> tuple[float, str, dict[str, Any] | None]:
    """CPU seconds of one merge, the method it merged by and its correspondence check's record."""
    started = time.process_time()
    merged = hf_mudsc.merge(list(parents), calibration, progress=False, **options)
    seconds = round(time.process_time() - started, 1)
    return seconds, merged.config.mudsc["method"], merged.config.mudsc.get("correspondence_check")


def timing(setting: Any, pairs: Sequence[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """`method="auto"` (default options: the check, then regmean and its refit), `method="regmean"` (no check) and
    mudsc's solve alone (`refit="none"`: what the check ran before this change, besides its statistics)."""
    records = []
    for name, parents in pairs:
        record: dict[str, Any] = {"pair": name}
        for label, options in (("auto", {}), ("regmean", {"method": "regmean"}),
                               ("mudsc_solve", {"method": "mudsc", "refit": "none"})):
            seconds, method, check = timed(parents, setting.calibration, **options)
            record[label] = {"cpu_seconds": seconds, "method": method,
                             "check": None if check is None else check.get("solved", "solve")}
        log(f"timing {name}: {record}")
        records.append(record)
    return records


def vit_timing(width: int) -> list[dict[str, Any]]:
    """`auto` and `regmean` on the first same-init digit ViT pair at `width`: a pair the first start does not settle
    (the solve runs after it), so what the start adds there is seen."""
    model_a, model_b, _, calibration = same_init_pair(pair_settings(), width, 0, random_class_splits(1)[0])
    record: dict[str, Any] = {"pair": f"same-init ViT h{width} split 0"}
    for label, options in (("auto", {}), ("regmean", {"method": "regmean"})):
        seconds, method, check = timed([model_a, model_b], calibration, batch_size=64, **options)
        record[label] = {"cpu_seconds": seconds, "method": method,
                         "check": None if check is None else check.get("solved", "solve")}
    log(f"timing {record}")
    return [record]


def table(result: dict[str, Any]) -> str:
    rows = ["| family | pairs | first start, zip (min–max) | first start, align (min–max) | solve (min–max) | "
            "decided by the first start (zip) |", "|---|---|---|---|---|---|"]
    for family in ("text", "vit", "far"):
        records = result.get(family) or []
        if not records:
            continue
        cells = [f"{min(r[k] for r in records):.1%}–{max(r[k] for r in records):.1%}"
                 for k in ("start_zip", "start_align", "solve")]
        decided = sum(r["start_zip"] >= IN_PLACE_MAJORITY for r in records)
        rows.append(f"| {family} | {len(records)} | {' | '.join(cells)} | {decided} of {len(records)} |")
    if result.get("timing"):
        rows += ["", "| MiniLM pair | auto (s) | check decided by | regmean (s) | auto / regmean | mudsc solve (s) |",
                 "|---|---|---|---|---|---|"]
        for r in result["timing"] + result.get("timing_vit", []):
            base = r["regmean"]["cpu_seconds"]
            solve = r["mudsc_solve"]["cpu_seconds"] if "mudsc_solve" in r else "–"
            rows.append(f"| {r['pair']} | {r['auto']['cpu_seconds']} | {r['auto']['check']} | {base} | "
                        f"{r['auto']['cpu_seconds'] / base:.2f}x | {solve} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=["text", "vit", "far"], choices=["text", "vit", "far"])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="far: seeds per setting")
    parser.add_argument("--timing", action="store_true", help="time auto, regmean and mudsc's solve")
    parser.add_argument("--timing-pairs", type=int, default=3, help="how many MiniLM pairs to time")
    parser.add_argument("--label", default="", help="a name for this run (e.g. the commit), in the output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write every record here (JSON)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    result: dict[str, Any] = {}
    setting, pairs = text_pairs() if "text" in args.families or args.timing else (None, [])
    if "text" in args.families:
        result["text"] = [{"pair": name, **shares(parents, setting.calibration)} for name, parents in pairs]
        for record in result["text"]:
            log(f"text {record}")
    if "vit" in args.families:
        splits = random_class_splits(args.splits)
        result["vit"] = []
        for width, index in itertools.product(args.widths, range(args.splits)):
            model_a, model_b, _, calibration = same_init_pair(pair_settings(), width, index, splits[index])
            record = {"width": width, "split": index, **shares([model_a, model_b], calibration, batch_size=64)}
            log(f"vit {record}")
            result["vit"].append(record)
    if "far" in args.families:
        result["far"] = far_records(args.seeds)
    if args.timing:
        result["timing"] = timing(setting, pairs[: args.timing_pairs])
        result["timing_vit"] = vit_timing(max(args.widths))
    summary: dict[str, Any] = {
        family: {"pairs": len(records), "decided_by_start": sum(r["start_zip"] >= IN_PLACE_MAJORITY for r in records),
                 "start_zip_min": min(r["start_zip"] for r in records),
                 "start_zip_max": max(r["start_zip"] for r in records),
                 "solve_min": min(r["solve"] for r in records), "solve_max": max(r["solve"] for r in records)}
        for family, records in result.items() if family != "timing" and records}
    if result.get("timing"):
        summary["median_auto_over_regmean"] = round(statistics.median(
            r["auto"]["cpu_seconds"] / r["regmean"]["cpu_seconds"] for r in result["timing"]), 2)
    summary["label"] = result["label"] = args.label
    print(json.dumps(summary))
    print(table(result))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
