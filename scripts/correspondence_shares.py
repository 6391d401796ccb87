#!/usr/bin/env python
"""How many units mudsc's solve leaves in place on fine-tunes of one base whose units DO correspond — the figures
behind `method="auto"`'s same-base check (`hf_mudsc.methods.auto.IN_PLACE_MAJORITY`, docs/design.md §4.8). (A
benchmark, not a test.)

* `vit` — the quality benchmark's same-init digit ViT pairs (`scripts/common.py`'s `same_init_pair`: one ViT
  pretrained on all digits, two fine-tunes), `--widths` x `--splits`;
* `text` — the MiniLM fine-tunes of `scripts/bench_same_base.py` (the real all-MiniLM-L6-v2 fine-tuned on four
  synthesised tasks), every pair of the four.

Each pair is merged by `hf_mudsc.merge(..., method="mudsc", refit="none")` (the check's own solve: every start) and
once more with `reference_compat=True` (the paper's single start), and the share of units left in place
(`hf_mudsc.solve.matchers.share_in_place`) and each start's final objective are recorded. `--timing` also times the
default merge (`auto`: the check, then regmean) against `method="regmean"` on the first MiniLM pair (CPU seconds).
The pairs where the units do NOT correspond are `scripts/same_base_far.py`'s.

    python scripts/correspondence_shares.py --threads 1 --timing --out docs/benchmarks/correspondence_shares.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from typing import Any

from common import BENCH_CACHE, log, pair_settings, random_class_splits, same_init_pair, set_threads, write_json

import hf_mudsc
from hf_mudsc.solve.matchers import share_in_place


def shares(parents: Sequence[Any], calibration: Any, **options: Any) -> dict[str, Any]:
    """The check's solve and the paper's single start on these parents: shares in place and start objectives."""
    record: dict[str, Any] = {}
    for label, extra in (("solve", {}), ("paper_start", {"reference_compat": True})):
        merged = hf_mudsc.merge(list(parents), calibration, method="mudsc", refit="none", progress=False,
                                **options, **extra)
        report = merged.merge_report
        record[label] = {"units_in_place": round(share_in_place(report.matches), 4), "kept": report.solve_start,
                         "starts": {name: round(value, 4) for name, value in report.starts.items()}}
    record["distance"] = merged.config.mudsc["parent_relation"]["weight_distance"]
    return record


def text_setting() -> Any:
    from bench_same_base import text_setting as build

    settings = argparse.Namespace(text_layers=6, text_epochs=3, text_lr=1e-4, max_length=16, calibration_samples=128,
                                  quick=False, cache_dir=str(BENCH_CACHE / "same_base"))
    return build(settings, 0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=["vit", "text"], choices=["vit", "text"])
    parser.add_argument("--timing", action="store_true", help="time auto vs regmean on the first MiniLM pair")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write every record here (JSON)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    result: dict[str, Any] = {"vit": [], "text": []}
    if "vit" in args.settings:
        splits = random_class_splits(args.splits)
        for width, index in itertools.product(args.widths, range(args.splits)):
            model_a, model_b, _, calibration = same_init_pair(pair_settings(), width, index, splits[index])
            record = {"width": width, "split": index, **shares([model_a, model_b], calibration, batch_size=64)}
            log(f"vit h{width} split {index}: {record['solve']['units_in_place']:.4f} in place "
                f"(paper's start {record['paper_start']['units_in_place']:.4f})")
            result["vit"].append(record)
    setting = text_setting() if "text" in args.settings or args.timing else None
    if "text" in args.settings:
        for pair in itertools.combinations(range(len(setting.parents)), 2):
            record = {"pair": [setting.tasks[k] for k in pair],
                      **shares([setting.parents[k] for k in pair], setting.calibration)}
            log(f"text {'+'.join(record['pair'])}: {record['solve']['units_in_place']:.4f} in place")
            result["text"].append(record)
    if args.timing:
        parents = setting.parents[:2]
        timing = {}
        for label, options in (("auto", {}), ("regmean", {"method": "regmean"})):
            started = time.process_time()
            merged = hf_mudsc.merge(parents, setting.calibration, progress=False, **options)
            timing[label] = {"cpu_seconds": round(time.process_time() - started, 1),
                             "method": merged.config.mudsc["method"]}
        result["timing"] = {"pair": setting.tasks[:2], **timing}
        log(f"timing: auto {timing['auto']['cpu_seconds']} s, regmean {timing['regmean']['cpu_seconds']} s CPU")
    summary = {key: [r["solve"]["units_in_place"] for r in result[key]] for key in ("vit", "text")}
    summary["paper_start_vit"] = [r["paper_start"]["units_in_place"] for r in result["vit"]]
    print(json.dumps({**summary, "timing": result.get("timing")}))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
