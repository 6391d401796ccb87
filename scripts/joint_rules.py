#!/usr/bin/env python
"""Which rule decides the joint test? The default merge and the ensemble under both rules (issue 12).
(A benchmark, not a test; docs/benchmarks/joint_rules.md.)

The joint test asks a model with every task's labels to pick one label among all of them. Two rules:

* `raw` — the argmax over the concatenated logits (what `transformers`' pipeline does with a merged model);
* `per_task` — each task's softmax over its own slice, concatenated, then the argmax
  (`hf_mudsc.joint_predictions`; the ensemble's rule, and what `hf_mudsc.evaluate_merge` scores).

For each different-init digit ViT pair of the quality benchmark (`common.different_init_pair`, cached) the
library's default merge (`hf_mudsc.merge` with no option set) and the parents' ensemble are scored under both rules
on both tasks' test images, with per-task accuracy (argmax within the task's slice, the same under both rules).

    python scripts/joint_rules.py --widths 64 128 256 --splits 5 --out docs/benchmarks/joint_rules.json

Prints one JSON line per pair, then a summary JSON line and a table (mean ± std over pairs, % accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import torch

import hf_mudsc
from hf_mudsc.apply.classifier import per_task_log_probabilities

RULES = ("raw", "per_task")


def logits(model: Any, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(pixel_values=images[i:i + 256]).logits for i in range(0, len(images), 256)])


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * float((scores.argmax(1) == labels).double().mean())


def decide(concatenated: torch.Tensor, ranges: dict[str, list[int]], rule: str) -> torch.Tensor:
    # per_task: the rule's per-task log-probabilities (argmax = hf_mudsc.joint_predictions; confident tasks never tie)
    return concatenated if rule == "raw" else per_task_log_probabilities(concatenated, list(ranges.values()))


def measure(width: int, split: int, classes: common.Classes) -> dict[str, Any]:
    start = time.perf_counter()
    model_a, model_b, splits, calibration = common.different_init_pair(common.pair_settings(), width, split, classes)
    task_a, task_b = splits.tasks
    images = torch.cat([task_a.test_pixel_values, task_b.test_pixel_values])
    count_a, classes_a = len(task_a.test_labels), len(task_a.classes)
    labels = torch.cat([task_a.test_labels, task_b.test_labels + classes_a])
    merged = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False)
    ranges = dict(merged.config.task_label_ranges)
    outputs = {"merged": logits(merged, images),
               "ensemble": torch.cat([logits(model_a, images), logits(model_b, images)], dim=1)}
    row: dict[str, Any] = {"width": width, "split": split, "classes": [list(c) for c in classes]}
    for name, out in outputs.items():
        row[name] = {f"joint_{rule}": round(accuracy(decide(out, ranges, rule), labels), 2) for rule in RULES}
        row[name]["task_a"] = round(accuracy(out[:count_a, :classes_a], task_a.test_labels), 2)
        row[name]["task_b"] = round(accuracy(out[count_a:, classes_a:], task_b.test_labels), 2)
    gate = merged.config.mudsc.get("refit_gate") or {}
    row["refit_kept"] = gate.get("kept") if isinstance(gate, dict) else None
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for width in sorted({row["width"] for row in rows}):
        at = [row for row in rows if row["width"] == width]
        figures: dict[str, Any] = {"pairs": len(at)}
        for name in ("merged", "ensemble"):
            for key in at[0][name]:
                values = [row[name][key] for row in at]
                figures[f"{name}_{key}"] = [round(statistics.mean(values), 2),
                                            round(statistics.stdev(values), 2) if len(values) > 1 else 0.0]
        for rule in RULES:
            gaps = [row["ensemble"][f"joint_{rule}"] - row["merged"][f"joint_{rule}"] for row in at]
            figures[f"gap_{rule}"] = round(statistics.mean(gaps), 2)
        summary[str(width)] = figures
    return summary


def table(summary: dict[str, Any]) -> str:
    def cell(pair: Sequence[float]) -> str:
        return f"{pair[0]:.1f} ± {pair[1]:.1f}"

    lines = ["| hidden | pairs | merged joint, raw | ensemble joint, raw | gap | merged joint, per task | "
             "ensemble joint, per task | gap | merged task A / B | ensemble task A / B |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for width, f in summary.items():
        lines.append(
            f"| {width} | {f['pairs']} | {cell(f['merged_joint_raw'])} | {cell(f['ensemble_joint_raw'])} | "
            f"{f['gap_raw']:.1f} | {cell(f['merged_joint_per_task'])} | {cell(f['ensemble_joint_per_task'])} | "
            f"{f['gap_per_task']:.1f} | {f['merged_task_a'][0]:.1f} / {f['merged_task_b'][0]:.1f} | "
            f"{f['ensemble_task_a'][0]:.1f} / {f['ensemble_task_b'][0]:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=5, help="class splits 0..N-1 (the quality benchmark's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write every pair and the summary as JSON here")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    classes = common.random_class_splits(args.splits)
    rows = []
    for width in args.widths:
        for split in range(args.splits):
            rows.append(measure(width, split, classes[split]))
            print(json.dumps(rows[-1]), flush=True)
    summary = summarise(rows)
    if args.out is not None:
        common.write_json(args.out, {"command": " ".join(sys.argv), "pairs": rows, "summary": summary})
    print(json.dumps({"summary": summary}), flush=True)
    print(table(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
