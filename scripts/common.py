"""What the benchmark scripts share: the quality benchmark's parent pairs (and their cache), atomic JSON, logging
and thread set-up. `python scripts/x.py` puts scripts/ on sys.path, so every script does `import common`; it
also finds the library of this checkout when it is not installed. Importing it is light (torch, no datasets).

The pairs are the quality benchmark's and also what `analyze_missed_targets.py` analyses and `merge_digests.py`
digests; the training is the library's own (`hf_mudsc.testing.toy`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:
    import hf_mudsc  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_mudsc.publish.folder import write_file_atomically
from hf_mudsc.testing import toy
from hf_mudsc.testing.cache import cache_root

if TYPE_CHECKING:
    from hf_mudsc.evaluate.tasks import TaskData

CACHE_ROOT = cache_root()
BENCH_CACHE = CACHE_ROOT / "bench"
# The pair settings' defaults (the quality benchmark's flags default to them; the other scripts use them as is).
PAIR_DEFAULTS: dict[str, Any] = {
    "widths": [64, 128, 256],
    "same_init_widths": [64],
    "epochs": toy.DEFAULT_EPOCHS,
    "depth": 2,
    "ft_epochs": 10,
    "num_samples": None,
    "cache_dir": str(BENCH_CACHE),
}
Classes = tuple[tuple[int, ...], tuple[int, ...]]


def pair_settings(**overrides: Any) -> argparse.Namespace:
    """The settings the pair builders read (`PAIR_DEFAULTS` with `overrides`), as the benchmark's args."""
    unknown = sorted(set(overrides) - set(PAIR_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown pair settings {unknown}; known: {sorted(PAIR_DEFAULTS)}")
    return argparse.Namespace(**{**copy.deepcopy(PAIR_DEFAULTS), **overrides})


def log(message: str, *, stream: Any = None) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=stream or sys.stdout, flush=True)


def set_threads(threads: int) -> int:
    """Use `threads` torch threads (tiny models: 1 is fastest and reproducible); returns the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    return previous


def write_json(path: Path, data: Any, *, sort_keys: bool = False) -> Path:
    """Written whole or not at all (the library's atomic write: temporary sibling, then rename)."""
    text = json.dumps(data, indent=1, sort_keys=sort_keys, ensure_ascii=True) + "\n"
    return write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def cache_key(**params: Any) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def save_model_atomically(model: Any, path: Path) -> None:
    """`save_pretrained` into a temporary sibling, renamed into place (a concurrent run's copy wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    model.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def finetune(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *, seed: int, epochs: int,
             lr: float, batch_size: int) -> Any:
    """The benchmark's fine-tuning: the library's toy loop with weight decay 0.01 on every parameter.

    Element-wise optimiser, no dropout: fine-tuning a permuted copy gives the permuted fine-tuned model.
    """
    return toy.fit_classifier(model, inputs, labels, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                              weight_decay=0.01, warmup_fraction=0.1, decay_all=True)


def random_class_splits(count: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split 0 is digits 0-4 / 5-9; the others are seeded random 5+5 partitions (distinct)."""
    splits = [(tuple(range(5)), tuple(range(5, 10)))]
    rng = random.Random(2024)
    while len(splits) < count:
        classes = list(range(10))
        rng.shuffle(classes)
        split = (tuple(sorted(classes[:5])), tuple(sorted(classes[5:])))
        if split not in splits and split[::-1] not in splits:
            splits.append(split)
    return splits


def three_way_splits(count: int) -> list[tuple[tuple[int, ...], ...]]:
    """Split 0 is digits 0-3 / 4-6 / 7-9; the others are seeded random 4+3+3 partitions (distinct)."""
    splits = [(tuple(range(4)), tuple(range(4, 7)), tuple(range(7, 10)))]
    rng = random.Random(2025)
    while len(splits) < count:
        digits = list(range(10))
        rng.shuffle(digits)
        split = (tuple(sorted(digits[:4])), tuple(sorted(digits[4:7])), tuple(sorted(digits[7:])))
        if split not in splits:
            splits.append(split)
    return splits


def digit_task_per_classes(class_sets: Sequence[Sequence[int]]) -> list[toy.DigitTask]:
    """One digit task per class set, all from the one stratified train/test split (`toy.digit_splits`)."""
    return [toy.digit_splits(classes, classes).task_a for classes in class_sets]


def pooled_calibration(tasks: Sequence[toy.DigitTask], num_samples: int | None) -> list[dict[str, torch.Tensor]]:
    """Every task's training images pooled, shuffled (seed 0), the first `num_samples` (None: all), batches of 64:
    the calibration of a merge of N digit parents."""
    pool = torch.cat([t.train_pixel_values for t in tasks])
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    pool = pool[order[:num_samples] if num_samples else order]
    return [{"pixel_values": pool[i:i + 64]} for i in range(0, len(pool), 64)]


def digit_tasks(splits: toy.DigitSplits | Sequence[toy.DigitTask], attr: str) -> dict[str, TaskData]:
    """Each task's `attr` ("train"/"test") images as evaluation data, named like the merged head's tasks (the
    tasks of a pair's splits, or N tasks in parent order)."""
    from hf_mudsc.evaluate.tasks import TaskData  # the evaluation stack (datasets, evaluate) only when scoring

    tasks = splits.tasks if isinstance(splits, toy.DigitSplits) else tuple(splits)
    names = [task_name(t) for t in tasks]
    return {
        name: TaskData(
            (getattr(t, f"{attr}_pixel_values"), getattr(t, f"{attr}_labels")),
            name="sklearn digits",
            split=attr,
        )
        for name, t in zip(names, tasks)
    }


def task_name(task: toy.DigitTask) -> str:
    """A digit task's name, which is also its parent's `_name_or_path` (the merged head's task names)."""
    return f"digits {''.join(map(str, task.classes))}"


def name_parents(model_a: Any, model_b: Any, splits: toy.DigitSplits) -> None:
    """Task names of the merged head come from the parents' names."""
    for model, task in zip((model_a, model_b), splits.tasks):
        model.config._name_or_path = task_name(task)


def different_init_pair(args: argparse.Namespace, width: int, split_index: int, classes: Classes) -> tuple:
    """(model A, model B, splits, calibration batches) of one different-init pair: two digit ViTs from
    different seeds, each trained on its half of the classes."""
    pair = toy.trained_digit_pair(
        classes[0],
        classes[1],
        seeds=(2 * split_index, 2 * split_index + 1),
        hidden_size=width,
        num_layers=args.depth,
        epochs=args.epochs,
        image_size=16,
        cache_dir=Path(args.cache_dir) / "vit",
    )
    return named_pair(args, pair.model_a, pair.model_b, pair.splits)


def same_init_pair(args: argparse.Namespace, width: int, split_index: int, classes: Classes) -> tuple:
    """(model A, model B, splits, calibration batches): two fine-tunes of one ViT pretrained on all digits."""
    pretrained = pretrained_all_digits(args, width)
    splits = toy.digit_splits(classes[0], classes[1])
    model_a = finetuned_copy(pretrained, splits.task_a, 10 + 2 * split_index, args, width, "a")
    model_b = finetuned_copy(pretrained, splits.task_b, 11 + 2 * split_index, args, width, "b")
    return named_pair(args, model_a, model_b, splits)


def same_init_parents(args: argparse.Namespace, width: int, split_index: int,
                      class_sets: Sequence[Sequence[int]]) -> tuple[list[Any], list[toy.DigitTask], list[dict]]:
    """(parents, tasks, calibration batches): N fine-tunes of one ViT pretrained on all digits, parent k on class
    set k (N = 3: a 4+3+3 split, `three_way_splits`), with seeds 40 + N·split + k (apart from `same_init_pair`'s);
    calibration pools every task's training images (`pooled_calibration`)."""
    pretrained = pretrained_all_digits(args, width)
    tasks = digit_task_per_classes(class_sets)
    count = len(tasks)
    parents = [finetuned_copy(pretrained, task, 40 + count * split_index + k, args, width, "abcdefgh"[k])
               for k, task in enumerate(tasks)]
    for model, task in zip(parents, tasks):
        model.config._name_or_path = task_name(task)
    return parents, tasks, pooled_calibration(tasks, args.num_samples)


def named_pair(args: argparse.Namespace, model_a: Any, model_b: Any, splits: Any) -> tuple:
    name_parents(model_a, model_b, splits)
    calibration = list(toy.digit_calibration_batches(splits, num_samples=args.num_samples, batch_size=64))
    return model_a, model_b, splits, calibration


def pretrained_all_digits(args: argparse.Namespace, width: int) -> Any:
    from transformers import ViTForImageClassification

    splits = toy.digit_splits(range(10), range(10))  # one task = all ten digits (B is unused)
    task = splits.task_a
    path = (
        Path(args.cache_dir) / "same_init" / f"pretrained-h{width}-{cache_key(w=width, e=args.epochs, v=1)}"
    )
    if (path / "config.json").is_file():
        return ViTForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
    config = toy.tiny_vit_config(10, hidden_size=width, id2label=task.id2label)
    model = toy.train_vit(config, task.train_pixel_values, task.train_labels, seed=100, epochs=args.epochs)
    save_model_atomically(model, path)
    return model


def finetuned_copy(
    pretrained: Any, task: toy.DigitTask, seed: int, args: argparse.Namespace, width: int, tag: str, *,
    epochs: int | None = None, lr: float = 5e-4
) -> Any:
    """`pretrained` fine-tuned on `task` (a fresh head), `args.ft_epochs` epochs at 5e-4 unless `epochs` / `lr` say
    otherwise (a parent fine-tuned farther than the others: scripts/average_check.py)."""
    from transformers import ViTForImageClassification

    epochs = args.ft_epochs if epochs is None else epochs
    farther = {} if lr == 5e-4 else {"lr": lr}  # the default's cache key as before
    path = (
        Path(args.cache_dir)
        / "same_init"
        / (
            f"ft-h{width}-{''.join(map(str, task.classes))}-"
            f"{cache_key(w=width, e=args.epochs, ft=epochs, s=seed, **farther)}"
        )
    )
    if (path / "config.json").is_file():
        return ViTForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
    config = copy.deepcopy(pretrained.config)
    config.num_labels = task.num_labels
    config.id2label = task.id2label
    config.label2id = {v: k for k, v in task.id2label.items()}
    model = ViTForImageClassification(config)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier.")}
    model.load_state_dict(state, strict=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=gen)
        model.classifier.bias.zero_()
    with torch.random.fork_rng(devices=[]):
        finetune(model, {"pixel_values": task.train_pixel_values}, task.train_labels, seed=seed,
                 epochs=epochs, lr=lr, batch_size=64)
    save_model_atomically(model, path)
    return model
