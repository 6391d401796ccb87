#!/usr/bin/env python
"""Does the default merge of fine-tunes of one base ever end below plain averaging, task by task, and does the
held-out check against averaging (docs/design.md §4.9, `refit_gate.AverageCheck`) catch it? (A benchmark, not a test;
issue 12: "a default that never loses to averaging"; docs/benchmarks/average_check.md.)

Per set of same-init digit ViT parents (fine-tunes of `common.pretrained_all_digits`), four merges, no labels read:

* `linear` — plain averaging (`method="linear"`);
* `before` — the default before the check: `method="auto"`'s choice asked by name, with `refit="gate"` (a method the
  user names is not held against averaging);
* `default` — `hf_mudsc.merge(parents, calibration)`: the same, then held against plain averaging on the gate's
  held-out examples;
* the ensemble (every parent run, each head's softmax).

Each is scored on the test images (per task: argmax within the task's slice; joint: each task's softmax, then the
argmax) and on the held-out calibration examples (`FidelityScorer.agreement`: each task's log-probability term).

Settings:
* `same2`: two fine-tunes, 5+5 digit splits (`same_init_pair`, the quality benchmark's pairs);
* `same3`: three fine-tunes, 4+3+3 splits (`same_init_parents`);
* `one_far`: three fine-tunes, 4+3+3 splits, the third fine-tuned three times as long at four times the rate
  (30 epochs at 2e-3 against 10 at 5e-4): the shape where the default lost a task to plain averaging (session 31's
  quality hunt: a task 33 points under it).

    python scripts/average_check.py --settings one_far same3 same2 --widths 64 --splits 5 --threads 1 \\
        --out docs/benchmarks/average_check.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import (
    digit_task_per_classes,
    finetuned_copy,
    log,
    pair_settings,
    pooled_calibration,
    pretrained_all_digits,
    random_class_splits,
    same_init_pair,
    same_init_parents,
    set_threads,
    task_name,
    three_way_splits,
    write_json,
)

import hf_mudsc
from hf_mudsc.apply.classifier import task_ranges
from hf_mudsc.apply.fidelity import FidelityScorer, holdout_split

SETTINGS = ("same2", "same3", "one_far")


def one_far_parents(args: argparse.Namespace, width: int, index: int, class_sets: Sequence[Sequence[int]]) -> tuple:
    """Three fine-tunes of one pretrained ViT, the third trained three times as long at four times the rate."""
    pretrained = pretrained_all_digits(args, width)
    tasks = digit_task_per_classes(class_sets)
    parents = [finetuned_copy(pretrained, task, 70 + 3 * index + k, args, width, "abc"[k],
                              **({"epochs": 3 * args.ft_epochs, "lr": 2e-3} if k == 2 else {}))
               for k, task in enumerate(tasks)]
    for model, task in zip(parents, tasks):
        model.config._name_or_path = task_name(task)
    return parents, tasks, pooled_calibration(tasks, args.num_samples)


@torch.no_grad()
def test_figures(model: Any, tests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Per task (argmax within its slice) and joint (each task's softmax, then the argmax), %."""
    ranges = list(task_ranges(model.config).values())
    out, hits, total = {}, 0, 0
    for k, (pixels, labels) in enumerate(tests):
        logits = model(pixel_values=pixels).logits
        low, high = ranges[k]
        out[f"task_{k}"] = 100 * float((logits[:, low:high].argmax(-1) == labels).double().mean())
        hits += int((hf_mudsc.joint_predictions(logits, model.config) == labels + low).sum())
        total += len(labels)
    out["joint"] = 100 * hits / total
    return out


@torch.no_grad()
def ensemble_figures(parents: Sequence[Any], tests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    sizes = [p.config.num_labels for p in parents]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    out, hits, total = {}, 0, 0
    for k, (pixels, labels) in enumerate(tests):
        logits = [p(pixel_values=pixels).logits for p in parents]
        out[f"task_{k}"] = 100 * float((logits[k].argmax(-1) == labels).double().mean())
        hits += int((torch.cat([z.softmax(-1) for z in logits], -1).argmax(-1) == labels + offsets[k]).sum())
        total += len(labels)
    out["joint"] = 100 * hits / total
    return out


def run_set(name: str, parents: Sequence[Any], tests: Sequence[tuple[torch.Tensor, torch.Tensor]],
            calibration: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    _, held = holdout_split(lambda: iter(calibration))
    scorer = FidelityScorer(parents, held, task_sizes=[p.config.num_labels for p in parents])
    default = hf_mudsc.merge(list(parents), calibration, batch_size=64, progress=False)
    check = (default.config.mudsc["refit_gate"] or {}).get("average")
    method = check["merge"].split(" + ")[0] if check else default.config.mudsc["method"]  # auto's choice
    models = {
        "linear": hf_mudsc.merge(list(parents), method="linear", progress=False),
        "before": hf_mudsc.merge(list(parents), calibration, method=method, refit="gate", batch_size=64,
                                 progress=False),
        "default": default,
    }
    record: dict[str, Any] = {"set": name, "auto_method": method, "check": check,
                              "ensemble": ensemble_figures(parents, tests)}
    for label, model in models.items():
        agreement = scorer.agreement(model)
        record[label] = {"method": model.config.mudsc["method"], "held_out": agreement.score,
                         "held_out_tasks": list(agreement.tasks or ()), **test_figures(model, tests)}
    log(f"{name}: " + " | ".join(
        f"{label} " + " ".join(f"{record[label][k]:.1f}" for k in record[label] if k.startswith("task") or k == "joint")
        for label in ("linear", "before", "default", "ensemble")) + f" | check {record['check']}")
    return record


def sets(args: argparse.Namespace, setting: str) -> list[dict[str, Any]]:
    records = []
    for width in args.widths:
        if setting == "same2":
            for index, classes in enumerate(random_class_splits(args.splits)):
                model_a, model_b, splits, calibration = same_init_pair(args, width, index, classes)
                tests = [(t.test_pixel_values, t.test_labels) for t in splits.tasks]
                records.append({"width": width, **run_set(f"same2 h{width} split {index}", [model_a, model_b],
                                                           tests, calibration)})
        else:
            build = same_init_parents if setting == "same3" else one_far_parents
            for index, class_sets in enumerate(three_way_splits(args.splits)):
                parents, tasks, calibration = build(args, width, index, class_sets)
                tests = [(t.test_pixel_values, t.test_labels) for t in tasks]
                records.append({"width": width, **run_set(f"{setting} h{width} split {index}", parents, tests,
                                                           calibration)})
    return records


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over sets of each figure, how often the check kept averaging, and the worst task shortfall of each
    merge against plain averaging (min over sets and tasks of merge − linear)."""
    figures = [k for k in records[0]["linear"] if k.startswith("task") or k == "joint"]
    out: dict[str, Any] = {"sets": len(records),
                           "averaging_kept": sum(bool(r["check"] and r["check"]["kept"]) for r in records)}
    for label in ("linear", "before", "default", "ensemble"):
        out[label] = {k: {"mean": statistics.fmean(r[label][k] for r in records),
                          "std": statistics.stdev([r[label][k] for r in records]) if len(records) > 1 else 0.0}
                      for k in figures}
        if label in ("before", "default"):
            out[label]["worst_task_vs_linear"] = min(r[label][k] - r["linear"][k] for r in records
                                                     for k in figures if k.startswith("task"))
    return out


def table(setting: str, result: dict[str, Any]) -> str:
    figures = [k for k in result["linear"] if k.startswith("task") or k == "joint"]
    lines = [f"| {setting} ({result['sets']} sets; averaging kept on {result['averaging_kept']}) | "
             + " | ".join(figures) + " | worst task − linear |", "|---|" + "---:|" * (len(figures) + 1)]
    for label in ("linear", "before", "default", "ensemble"):
        cells = [f"{result[label][k]['mean']:.1f} ± {result[label][k]['std']:.1f}" for k in figures]
        worst = result[label].get("worst_task_vs_linear")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if worst is None else f'{worst:+.1f}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--widths", type=int, nargs="+", default=[64])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="every set's figures and the summaries (JSON)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    settings = pair_settings()
    settings.widths, settings.splits = args.widths, args.splits
    result: dict[str, Any] = {"args": vars(args), "records": {}, "summary": {}}
    for setting in args.settings:
        result["records"][setting] = records = sets(settings, setting)
        result["summary"][setting] = summary(records)
        print(table(setting, result["summary"][setting]) + "\n", flush=True)
        if args.out:
            write_json(Path(args.out), result)
    print(json.dumps({s: {label: round(v[label]["joint"]["mean"], 2) for label in ("linear", "before", "default")}
                      for s, v in result["summary"].items()}))
    return result


if __name__ == "__main__":
    main()
