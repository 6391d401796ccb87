"""Probe of the different-init gap to the ensemble at larger widths (docs/research/width_gap.md, issue 12).

Two measurements on the quality benchmark's different-init pairs (`common.different_init_pair`, cached):

* ``rules``: the joint decision rules over the two PARENTS' logits on the test images — raw logits, per-task centred
  logits (the refit's head target), per-task log-softmax (the benchmark's ensemble: each head's softmax
  concatenated), centred and scaled to unit RMS on the calibration images. What a head fitted to each target could
  reach at best.
* ``refit``: mudsc zip + ridge refit with each variant (sample count, head target, ridge λ); per task and joint
  test accuracy next to the ensemble's. Head targets other than the library's are swapped in for the probe only.
* ``features``: where the refitted merge loses per-task accuracy — its body or its head. An oracle linear head
  (ridge least squares on one-hot LABELS of each task's training images, λ 1e-3 of the mean feature energy) on the
  final CLS features of each parent and of the default merge (size 1, and size 1.5 `size_spend="heads"`), per task
  on the test images, next to the models' own heads. Oracle ≈ own head: the features, not the head, are the limit.
* ``head``: is the concatenated head starved by the refit's sample count (one row per example)? The default merge's
  head refitted alone, by the library's ridge accumulator (λ 1e-3, toward the refitted head) to the centred parent
  logits, on every calibration image and — the control — on the refit's own subset.

    python scripts/probe_width_gap.py rules --widths 64 128 256 --splits 5
    python scripts/probe_width_gap.py refit --widths 128 256 --splits 3 --variants s128_c auto_c all_c auto_raw
    python scripts/probe_width_gap.py features --widths 128 256 --splits 5
    python scripts/probe_width_gap.py head --widths 64 128 256 --splits 5

Prints one JSON line per pair. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import common
import torch

# name -> (refit_samples, head target, refit_lambda); "auto" is the library's default sample count.
VARIANTS: dict[str, tuple[int | str | None, str, float]] = {
    "s128_c": (128, "centred", 1e-3),
    "k8_c": ("k8", "centred", 1e-3),
    "auto_c": ("auto", "centred", 1e-3),
    "all_c": (None, "centred", 1e-3),
    "auto_raw": ("auto", "raw", 1e-3),
    "auto_ls": ("auto", "logsoftmax", 1e-3),
    "auto_lsf0": ("auto", "lsf0", 1e-3),
    "auto_lsf1": ("auto", "lsf1", 1e-3),
    "auto_lsf5": ("auto", "lsf5", 1e-3),
    "auto_prob": ("auto", "prob", 1e-3),
    "auto_c_l1e-2": ("auto", "centred", 1e-2),
    "all_raw": (None, "raw", 1e-3),
    "all_ls": (None, "logsoftmax", 1e-3),
    "auto_crms": ("auto", "centred_rms", 1e-3),
}


def head_target(kind: str) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    """The concatenated head's target from the parents' logits (one tensor per parent, rows = images)."""
    def target(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if kind == "raw":
            return torch.cat(list(outputs), dim=1)
        if kind == "logsoftmax":
            return torch.cat([y.log_softmax(dim=1) for y in outputs], dim=1)
        if kind == "prob":
            return torch.cat([y.softmax(dim=1) for y in outputs], dim=1)
        if kind == "centred_rms":  # each parent's centred logits at unit RMS (over the batch's rows)
            centred = [y - y.mean(dim=1, keepdim=True) for y in outputs]
            return torch.cat([c / c.pow(2).mean().sqrt().clamp_min(1e-12) for c in centred], dim=1)
        if kind.startswith("lsf"):  # log-probabilities floored at -(log k + m): every argmax is unchanged
            margin = float(kind[3:])
            return torch.cat([y.log_softmax(dim=1).clamp_min(-(math.log(y.shape[1]) + margin)) for y in outputs],
                             dim=1)
        return torch.cat([y - y.mean(dim=1, keepdim=True) for y in outputs], dim=1)
    return target


def logits(model: Any, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(pixel_values=images[i:i + 256]).logits for i in range(0, len(images), 256)])


def rules(width: int, split: int, classes: common.Classes) -> dict[str, Any]:
    model_a, model_b, splits, calibration = common.different_init_pair(common.pair_settings(), width, split, classes)
    task_a, task_b = splits.tasks
    images = torch.cat([task_a.test_pixel_values, task_b.test_pixel_values])
    labels = torch.cat([task_a.test_labels, task_b.test_labels + len(task_a.classes)])
    z = [logits(model_a, images), logits(model_b, images)]
    seen = torch.cat([batch["pixel_values"] for batch in calibration])
    centred = [y - y.mean(dim=1, keepdim=True) for y in (logits(model_a, seen), logits(model_b, seen))]
    rms = [c.pow(2).mean().sqrt() for c in centred]
    decided = {
        "raw": torch.cat(z, dim=1),
        "centred": head_target("centred")(z),
        "logsoftmax (ensemble)": head_target("logsoftmax")(z),
        "centred_rms": torch.cat([(y - y.mean(dim=1, keepdim=True)) / r for y, r in zip(z, rms)], dim=1),
    }
    return {name: round(100 * float((scores.argmax(1) == labels).float().mean()), 1)
            for name, scores in decided.items()}


def refit(width: int, split: int, classes: common.Classes, variants: Sequence[str]) -> dict[str, Any]:
    import hf_mudsc
    import hf_mudsc.apply.refit as refit_module
    from hf_mudsc.evaluate.harness import evaluate_merge

    model_a, model_b, splits, calibration = common.different_init_pair(common.pair_settings(), width, split, classes)
    library_target = refit_module.head_target
    merged, resolved = {}, {}
    try:
        for name in variants:
            samples, head, ridge = VARIANTS[name]
            if samples == "k8":  # 8 rows per unknown of the widest per-token layer (17 tokens, MLP 4·width)
                samples = max(128, math.ceil(8 * (4 * width + 1) / 17))
            refit_module.head_target = head_target(head)
            merged[name] = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False,
                                          method="mudsc", matcher="zip", refit_samples=samples, refit_lambda=ridge)
            resolved[name] = merged[name].config.mudsc["refit_examples"]
    finally:
        refit_module.head_target = library_target
    tasks = common.digit_tasks(splits, "test")
    results = evaluate_merge(merged, [model_a, model_b], tasks, progress=False)
    scores = {name: [round(100 * results.score(name, view), 1) for view in (*tasks, "joint")]
              for name in [*merged, "ensemble"]}
    return {"refit_examples": resolved, **scores}


# The merges `features` reads (merge() options): the default at size 1 and at size 1.5 spent on heads.
FEATURE_MERGES: dict[str, dict[str, Any]] = {"default": {}, "heads 1.5": {"size": 1.5, "size_spend": "heads"}}


def cls_features(model: Any, images: torch.Tensor) -> torch.Tensor:
    """The final CLS features the classifier reads (after the last LayerNorm), float64."""
    with torch.no_grad():
        return model.vit(pixel_values=images).last_hidden_state[:, 0].double()


def oracle_accuracy(model: Any, task: Any) -> float:
    """Test accuracy (%) of a ridge least-squares head fitted on `task`'s labelled training images' features."""
    def design(images: torch.Tensor) -> torch.Tensor:
        features = cls_features(model, images)
        return torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)

    inputs = design(task.train_pixel_values)
    gram = inputs.T @ inputs
    ridge = 1e-3 * gram.diagonal().mean()
    targets = torch.nn.functional.one_hot(task.train_labels, len(task.classes)).double()
    weight = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), inputs.T @ targets)
    predicted = (design(task.test_pixel_values) @ weight).argmax(dim=1)
    return round(100 * float((predicted == task.test_labels).double().mean()), 1)


def features(width: int, split: int, classes: common.Classes) -> dict[str, Any]:
    import hf_mudsc

    model_a, model_b, splits, calibration = common.different_init_pair(common.pair_settings(), width, split, classes)
    row: dict[str, Any] = {}
    for name, parent, task in (("parent A", model_a, splits.task_a), ("parent B", model_b, splits.task_b)):
        own = logits(parent, task.test_pixel_values).argmax(dim=1)
        row[name] = {"oracle": oracle_accuracy(parent, task),
                     "head": round(100 * float((own == task.test_labels).double().mean()), 1)}
    for name, options in FEATURE_MERGES.items():
        merged = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False, **options)
        offset = 0
        for letter, task in (("A", splits.task_a), ("B", splits.task_b)):
            slice_ = logits(merged, task.test_pixel_values)[:, offset:offset + len(task.classes)]
            row[f"{name} {letter}"] = {"oracle": oracle_accuracy(merged, task), "head": round(
                100 * float((slice_.argmax(dim=1) == task.test_labels).double().mean()), 1)}
            offset += len(task.classes)
    return row


def head_on_all(width: int, split: int, classes: common.Classes) -> dict[str, Any]:
    import copy

    import hf_mudsc
    from hf_mudsc.apply.refit import RidgeAccumulator, head_target, subset_batches
    from hf_mudsc.evaluate.harness import evaluate_merge

    model_a, model_b, splits, calibration = common.different_init_pair(common.pair_settings(), width, split, classes)
    default = hf_mudsc.merge([model_a, model_b], calibration, batch_size=64, progress=False)
    total = sum(len(batch["pixel_values"]) for batch in calibration)
    subset = list(subset_batches(lambda: calibration, default.merge_report.refit.samples, seed=0, total=total)())
    merged = {"default": default}
    for name, batches in (("head all", calibration), ("head subset", subset)):
        model = copy.deepcopy(default)
        accumulator = RidgeAccumulator(model.classifier.in_features, model.classifier.out_features, True)
        for batch in batches:
            images = batch["pixel_values"]
            accumulator.update(cls_features(model, images),
                               head_target([logits(model_a, images), logits(model_b, images)]).double())
        weight, bias, _ = accumulator.solve(model.classifier.weight, model.classifier.bias, 1e-3)
        with torch.no_grad():
            model.classifier.weight.copy_(weight)
            model.classifier.bias.copy_(bias)
        merged[name] = model
    tasks = common.digit_tasks(splits, "test")
    results = evaluate_merge(merged, [model_a, model_b], tasks, progress=False)
    return {name: [round(100 * results.score(name, view), 1) for view in (*tasks, "joint")]
            for name in [*merged, "ensemble"]} | {"refit_examples": default.merge_report.refit.samples}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rules", "refit", "features", "head"])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--splits", type=int, default=3, help="class splits 0..N-1 (the benchmark's)")
    parser.add_argument("--variants", nargs="+", default=["s128_c", "auto_c", "all_c", "auto_raw"],
                        choices=sorted(VARIANTS))
    args = parser.parse_args(argv)
    common.set_threads(1)
    classes = common.random_class_splits(args.splits)
    for width in args.widths:
        for split in range(args.splits):
            if args.what == "refit":
                row = refit(width, split, classes[split], args.variants)
            else:
                row = {"rules": rules, "features": features, "head": head_on_all}[args.what](
                    width, split, classes[split])
            print(json.dumps({"width": width, "split": split, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
