#!/usr/bin/env python
"""Two MiniLM fine-tunes of one base, no base given: the `method="auto"` default against regmean and linear.
(A benchmark, not a test.)

The text setting of `scripts/bench_same_base.py` (all-MiniLM-L6-v2 fully fine-tuned on four synthesised tasks; the
same cached fine-tunes), merged two at a time WITHOUT the base — the setting of issue 12's same-init target — and
scored as that benchmark scores: each task's accuracy with the merged backbone under the task's own fine-tuned head,
divided by its fine-tune's own accuracy ("normalised"), averaged over the two tasks.

    python scripts/same_base_text_pairs.py --seed 0 --pairs 0,1 2,3 --threads 1

A "pair" may name more tasks (`--pairs 0,1,2`: three parents) and `--weights 2 1` weighs every variant's parents
(docs/benchmarks/same_init_three.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from bench_same_base import backbone_of, batched_accuracy, normalised, text_setting
from common import BENCH_CACHE, log, set_threads

import hf_mudsc

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "linear": {"method": "linear"},
    "linear + refit": {"method": "linear", "refit": "ridge"},
    "regmean": {"method": "regmean", "refit": "none"},
    "regmean + refit": {"method": "regmean", "refit": "ridge"},
    "regmean + repair": {"method": "regmean", "refit": "repair"},  # docs/benchmarks/repair.md
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="the fine-tunes' seed (bench_same_base's --seeds)")
    parser.add_argument("--pairs", nargs="+", default=["0,1", "2,3"],
                        help="task indices, e.g. 0,1 (topic, intent); 0,1,2 merges three")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="per-parent merge weights given to every variant (one per task of a pair)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write every pair's figures here (JSON)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    # bench_same_base's defaults: the same cache keys, so its cached fine-tunes are reused.
    settings = argparse.Namespace(text_layers=6, text_epochs=3, text_lr=1e-4, max_length=16, calibration_samples=128,
                                  quick=False, cache_dir=str(BENCH_CACHE / "same_base"))
    setting = text_setting(settings, args.seed)
    own = [batched_accuracy(p, inputs, labels) for p, (inputs, labels) in zip(setting.parents, setting.test)]
    result: dict[str, Any] = {"seed": args.seed, "tasks": setting.tasks, "own": own, "pairs": {}}
    for pair in args.pairs:
        indices = [int(x) for x in pair.split(",")]
        if args.weights is not None and len(args.weights) != len(indices):
            parser.error(f"--weights needs one weight per task of {pair}")
        parents = [setting.parents[index] for index in indices]
        weighted = {"weights": list(args.weights)} if args.weights is not None else {}
        rows = {}
        for label in args.variants:
            start = time.perf_counter()
            merged = hf_mudsc.merge(parents, setting.calibration, progress=False, **VARIANTS[label], **weighted)
            seconds = time.perf_counter() - start
            backbone = backbone_of(merged)
            accuracies = []
            for index, model in zip(indices, parents):  # each task under its own fine-tuned head
                inputs, labels = setting.test[index]
                saved = {k: v.clone() for k, v in model.state_dict().items()}
                model.load_state_dict(backbone, strict=False)
                accuracies.append(batched_accuracy(model, inputs, labels))
                model.load_state_dict(saved)
            rows[label] = {"accuracy": accuracies, "normalised": normalised(accuracies, [own[k] for k in indices]),
                           "method": merged.config.mudsc["method"], "refit": merged.config.mudsc["refit"],
                           "seconds": round(seconds, 1)}
            names = "+".join(setting.tasks[k] for k in indices)
            log(f"pair {names}: {label:<16} normalised {rows[label]['normalised']:.4f} "
                f"{[round(a, 4) for a in accuracies]} ({seconds:.0f} s, {rows[label]['method']}, "
                f"refit {rows[label]['refit']})")
        result["pairs"][pair] = rows
    result["mean"] = {label: statistics.fmean(r[label]["normalised"] for r in result["pairs"].values())
                      for label in args.variants}
    print(json.dumps(result["mean"]))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
