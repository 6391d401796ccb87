"""Probe: a per-task temperature on the merged head, fitted without labels (issue 12, the joint decision).

The joint decision (each task's softmax, then the argmax over all labels) compares the tasks' confidences. The refit
fits each task's logits up to a shift, but ridge shrinkage and fused features can leave one task's slice more or less
confident than its parent's, which moves joint decisions and never per-task ones. This probe fits, per task t, one
scalar beta_t >= 0 minimising the cross-entropy of the parent's softmax against softmax(beta_t * merged slice t) on
the calibration images (label-free: the parents' outputs only), then scores the test images' joint accuracy with and
without it, next to the ensemble (per-task accuracy is unchanged by construction: beta_t > 0 keeps each argmax).

    python scripts/probe_temperature.py --scenarios different_init same_init --widths 64 128 256 --splits 5

Prints one JSON line per pair. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import common
import torch
from scipy.optimize import minimize_scalar


def logits(model: Any, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(pixel_values=images[i:i + 256]).logits for i in range(0, len(images), 256)]).double()


def fit_beta(parent: torch.Tensor, merged: torch.Tensor) -> float:
    """argmin_beta mean CE(softmax(parent), softmax(beta * merged)); convex in beta."""
    target = parent.softmax(dim=1)

    def loss(beta: float) -> float:
        return float(-(target * (beta * merged).log_softmax(dim=1)).sum(dim=1).mean())

    return float(minimize_scalar(loss, bounds=(1e-3, 100.0), method="bounded", options={"xatol": 1e-6}).x)


def joint(slices: Sequence[torch.Tensor], labels: torch.Tensor, *, raw: bool = False) -> float:
    """Joint accuracy: per-task softmax then argmax (the ensemble's rule), or the argmax of the raw logits."""
    scores = torch.cat([s if raw else s.softmax(dim=1) for s in slices], dim=1)
    return round(100 * float((scores.argmax(dim=1) == labels).double().mean()), 2)


def probe(scenario: str, width: int, split: int, classes: common.Classes) -> dict[str, Any]:
    import hf_mudsc

    pair = common.different_init_pair if scenario == "different_init" else common.same_init_pair
    model_a, model_b, splits, calibration = pair(common.pair_settings(), width, split, classes)
    merged = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False)
    task_a, task_b = splits.tasks
    k = len(task_a.classes)
    seen = torch.cat([batch["pixel_values"] for batch in calibration])
    parents_seen = [logits(model_a, seen), logits(model_b, seen)]
    merged_seen = logits(merged, seen)
    merged_seen = [merged_seen[:, :k], merged_seen[:, k:]]
    betas = [fit_beta(p, m) for p, m in zip(parents_seen, merged_seen)]
    images = torch.cat([task_a.test_pixel_values, task_b.test_pixel_values])
    labels = torch.cat([task_a.test_labels, task_b.test_labels + k])
    z = logits(merged, images)
    slices = [z[:, :k], z[:, k:]]
    parents_test = [logits(model_a, images), logits(model_b, images)]
    tempered = [b * s for b, s in zip(betas, slices)]
    return {"method": merged.config.mudsc.get("method"), "betas": [round(b, 4) for b in betas],
            "default": joint(slices, labels), "tempered": joint(tempered, labels),
            "ensemble": joint(parents_test, labels), "default_raw": joint(slices, labels, raw=True),
            "tempered_raw": joint(tempered, labels, raw=True), "ensemble_raw": joint(parents_test, labels, raw=True)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["different_init", "same_init"],
                        choices=["different_init", "same_init"])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args(argv)
    common.set_threads(1)
    classes = common.random_class_splits(args.splits)
    for scenario in args.scenarios:
        for width in args.widths:
            for split in range(args.splits):
                row = probe(scenario, width, split, classes[split])
                print(json.dumps({"scenario": scenario, "width": width, "split": split, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
