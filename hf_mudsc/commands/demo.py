"""`hf-mudsc demo`: the embedded default job — two digit ViTs from different seeds, merged without training."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("HF_MUDSC_CACHE", Path.home() / ".cache" / "hf_mudsc")) / "demo"
DEMO_METHODS = [
    ("mudsc", "zip"),
    ("mudsc", "align"),
    ("zipit", "zip"),
    ("activation_align", "align"),
    ("weight_matching", "align"),
    ("average", None),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="hf-mudsc-demo", help="folder for the MuDSC-merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--hidden-size", type=int, default=64, help="width of the two ViTs")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per parent")
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 1), help="initialization seeds of A and B")
    parser.add_argument("--num-samples", type=int, default=512, help="calibration images (from both tasks)")
    parser.add_argument("--alpha", type=float, default=0.5, help="MuDSC balance factor")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where trained parents are cached")


def _logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(pixel_values=chunk).logits for chunk in pixel_values.split(512)])


def task_and_joint_accuracy(model: torch.nn.Module, splits) -> tuple[float, float, float]:
    """Per-task accuracy (argmax within the task's slice of the concatenated head) and joint accuracy."""
    offsets = [0, splits.task_a.num_labels]
    per_task = []
    for task, offset in zip(splits.tasks, offsets):
        logits = _logits(model, task.test_pixel_values)[:, offset : offset + task.num_labels]
        per_task.append(float((logits.argmax(1) == task.test_labels).float().mean()))
    pixel_values, labels = splits.joint_test()
    joint = float((_logits(model, pixel_values).argmax(1) == labels).float().mean())
    return per_task[0], per_task[1], joint


def run(args: argparse.Namespace) -> int:
    import hf_mudsc
    from hf_mudsc import toy

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it or --output to choose another")
    start = time.perf_counter()
    print(f"Training (or loading cached) parents: two ViTs (hidden {args.hidden_size}) from seeds {args.seeds}, "
          "A on digits 0-4, B on digits 5-9 ...")
    pair = toy.trained_digit_pair(seeds=tuple(args.seeds), hidden_size=args.hidden_size, epochs=args.epochs,
                                  cache_dir=args.cache_dir)
    pair.model_a.config._name_or_path = "digits-0-4"
    pair.model_b.config._name_or_path = "digits-5-9"
    splits = pair.splits
    accuracy_a = toy.accuracy(pair.model_a, splits.task_a.test_pixel_values, splits.task_a.test_labels)
    accuracy_b = toy.accuracy(pair.model_b, splits.task_b.test_pixel_values, splits.task_b.test_labels)
    calibration = list(toy.digit_calibration_batches(splits, num_samples=args.num_samples, batch_size=64))

    rows = [("parent A (digits 0-4)", accuracy_a, float("nan"), float("nan")),
            ("parent B (digits 5-9)", float("nan"), accuracy_b, float("nan"))]
    mudsc_model = None
    for method, matcher in DEMO_METHODS:
        options = {"matcher": matcher} if matcher else {}
        merged = hf_mudsc.merge([pair.model_a, pair.model_b], calibration, method=method, alpha=args.alpha,
                                progress=False, **options)
        name = f"{method} ({matcher})" if matcher and method == "mudsc" else method
        rows.append((name, *task_and_joint_accuracy(merged, splits)))
        if method == "mudsc" and matcher == "zip":
            mudsc_model = merged

    print(f"\n{'model':<24} {'task A':>8} {'task B':>8} {'joint':>8}")
    for name, a, b, joint in rows:
        cells = " ".join(f"{v:>8.3f}" if v == v else f"{'-':>8}" for v in (a, b, joint))
        print(f"{name:<24} {cells}")

    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mudsc_model.save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    print(f"\nMuDSC-merged model written to {output}/ ({time.perf_counter() - start:.0f} s in total). "
          "Load it with transformers.AutoModelForImageClassification.from_pretrained.")
    return 0
