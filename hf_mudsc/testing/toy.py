"""Small ViTs trained locally on sklearn's digits: the project's offline stand-in for Hub checkpoints.

No ViT weights can be downloaded in this environment, yet the demo, the tests and the quality
benchmarks need what MuDSC is about: two *genuinely different* models of one architecture (different
random initializations, disjoint tasks). This module trains such pairs in seconds on CPU from data
that scikit-learn ships, and caches them as ordinary ``save_pretrained`` folders so that everything
downstream loads them exactly like Hub models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hf_mudsc.errors import brief

logger = logging.getLogger(__name__)

#: Mean and std of the raw 0..16 pixel values of ``load_digits`` (all 1797 images).  Fixed constants
#: rather than per-split statistics, so every split, seed and image size sees the same preprocessing.
DIGITS_MEAN = 4.884164579855314
DIGITS_STD = 6.016787548672236

#: Default training length: ~5 CPU-seconds per model (1 thread) at hidden 64, 94-99% test accuracy.
DEFAULT_EPOCHS = 25

#: Bump when a change to training would make previously cached models stale.
_CACHE_FORMAT = 1
_CACHE_MARKER = "hf_mudsc_toy.json"


# --------------------------------------------------------------------------------------------- data
def load_digit_images(image_size: int = 16, num_channels: int = 1) -> tuple[Tensor, Tensor]:
    """All 1797 digits as normalised ``(N, C, S, S)`` float32 images and int64 labels 0..9.

    Normalisation happens on the raw 8x8 values before the bilinear upsampling; interpolation is an
    affine-weight average, so the result stays centred with the same fixed constants at every size.
    ``num_channels=3`` repeats the grey channel: what RGB models (``rgb_digit_model``) and the stock
    pipelines, which turn every image into RGB, see.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grey) or 3 (RGB), got {num_channels}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    if num_channels == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous(), labels


def digit_processor() -> Any:
    """The image processor of the exported digit models: 8x8 digit images (PIL, 0..255 = the raw 0..16 values
    x 255/16) -> ``(N, 3, 16, 16)`` inputs of an ``rgb_digit_model``.

    RGB because ``transformers.pipeline`` converts every image to RGB before the processor runs; a grey image
    arrives with three equal channels. Bilinear resize to 16x16 then the module's fixed normalisation on
    every channel: matches ``load_digit_images(num_channels=3)`` to within uint8 rounding (< 0.01).
    """
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        do_resize=True, size={"height": 16, "width": 16}, resample=2, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[DIGITS_MEAN / 16] * 3, image_std=[DIGITS_STD / 16] * 3,
        do_convert_rgb=True,
    )


def rgb_digit_model(model: Any) -> Any:
    """A 3-channel copy of a (1-channel) toy digit ViT, for export: it computes what the original computes on
    the grey image when given that image as RGB (three equal channels), so it works with the stock
    ``image-classification`` pipeline, which always hands RGB to the model.

    The patch projection's single input channel is split evenly over the three; every other tensor is copied.
    Training stays 1-channel, so cached trained models and everything derived from them are unchanged.
    """
    import copy

    if model.config.num_channels == 3:
        return model
    if model.config.num_channels != 1:
        raise ValueError(f"expected a 1-channel digit ViT, got num_channels={model.config.num_channels}")
    config = copy.deepcopy(model.config)
    config.num_channels = 3
    rgb = type(model)(config).to(torch.float32)
    state = model.state_dict()
    projection = model.vit.embeddings.patch_embeddings.projection.weight
    name = next(k for k, v in model.named_parameters() if v is projection)
    state[name] = projection.detach().repeat(1, 3, 1, 1) / 3
    rgb.load_state_dict(state)
    return rgb.eval()


def _digit_name(digit: int) -> str:
    return f"digit {digit}"


@dataclass(frozen=True)
class DigitTask:
    """One classification task: a subset of the digits with task-local labels ``0..len(classes)-1``.

    ``*_indices`` index the 1797 images of ``load_digits`` (handy to deduplicate or trace samples).
    """

    classes: tuple[int, ...]
    train_pixel_values: Tensor
    train_labels: Tensor
    test_pixel_values: Tensor
    test_labels: Tensor
    train_indices: Tensor = field(repr=False)
    test_indices: Tensor = field(repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [_digit_name(c) for c in self.classes]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    def __repr__(self) -> str:  # tensors would flood logs
        return (
            f"DigitTask(classes={self.classes}, train={len(self.train_labels)}, test={len(self.test_labels)})"
        )


@dataclass(frozen=True)
class DigitSplits:
    """Task A and task B of a digits merging experiment, split by one deterministic stratified split."""

    task_a: DigitTask
    task_b: DigitTask
    image_size: int
    seed: int
    test_fraction: float

    @property
    def tasks(self) -> tuple[DigitTask, DigitTask]:
        return (self.task_a, self.task_b)

    def joint_test(self) -> tuple[Tensor, Tensor]:
        """Both tasks' test images with labels in the concatenated label space (A's, then B's offset).

        This is the label layout of a merged model whose classifier stacks A's rows on top of B's
        (docs/design.md §6): joint accuracy picks one of all labels (the evaluation decides by each task's softmax
        first, `hf_mudsc.joint_probabilities`; a plain argmax over the logits is the `raw` rule).
        """
        pixel_values = torch.cat([self.task_a.test_pixel_values, self.task_b.test_pixel_values])
        labels = torch.cat([self.task_a.test_labels, self.task_b.test_labels + self.task_a.num_labels])
        return pixel_values, labels


def _as_classes(classes: Iterable[int], name: str) -> tuple[int, ...]:
    result = tuple(int(c) for c in classes)
    if len(result) < 2:
        raise ValueError(f"{name} needs at least two digit classes to train a classifier, got {result}")
    if len(set(result)) != len(result):
        raise ValueError(f"{name} lists a digit twice: {result}")
    bad = [c for c in result if not 0 <= c <= 9]
    if bad:
        raise ValueError(f"{name} may only contain digits 0..9, got {bad}")
    return result


def digit_splits(
    classes_a: Iterable[int] = range(5),
    classes_b: Iterable[int] = range(5, 10),
    seed: int = 0,
    test_fraction: float = 0.3,
    image_size: int = 16,
    num_channels: int = 1,
) -> DigitSplits:
    """Split the digits into two tasks with a deterministic, per-class stratified train/test split.

    The split is made once over all ten digits, so a digit's train/test membership does not depend on
    which task it lands in; with disjoint class sets the two tasks share no image. ``num_channels=3``
    gives the same images as RGB (for ``rgb_digit_model``s).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    cls_a = _as_classes(classes_a, "classes_a")
    cls_b = _as_classes(classes_b, "classes_b")
    images, labels = load_digit_images(image_size, num_channels)

    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    labels_np = labels.numpy()
    for digit in range(10):
        idx = np.flatnonzero(labels_np == digit)
        n_test = round(test_fraction * len(idx))
        is_test[rng.permutation(idx)[:n_test]] = True

    def make_task(classes: tuple[int, ...]) -> DigitTask:
        local = torch.full((10,), -1, dtype=torch.int64)
        local[list(classes)] = torch.arange(len(classes))
        in_task = np.isin(labels_np, classes)
        train_idx = torch.from_numpy(np.flatnonzero(in_task & ~is_test))
        test_idx = torch.from_numpy(np.flatnonzero(in_task & is_test))
        return DigitTask(
            classes=classes,
            train_pixel_values=images[train_idx],
            train_labels=local[labels[train_idx]],
            test_pixel_values=images[test_idx],
            test_labels=local[labels[test_idx]],
            train_indices=train_idx,
            test_indices=test_idx,
        )

    return DigitSplits(make_task(cls_a), make_task(cls_b), image_size, seed, test_fraction)


def digit_calibration_batches(
    split: DigitSplits, num_samples: int | None = None, batch_size: int = 64, seed: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{"pixel_values": (b, 1, S, S)}`` batches drawn from BOTH tasks' training images.

    A merge measures activations of both parents on the same inputs, and the merged model must serve
    both tasks, so calibration mixes the tasks: half the samples come from each (as far as each task
    has images), shuffled together.  ``num_samples=None`` uses every training image once.  Arguments
    are checked at call time, not at the first ``next()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pools = [task.train_indices for task in split.tasks]
    if set(pools[0].tolist()) & set(pools[1].tolist()):  # overlapping class sets: count each image once
        pools[1] = pools[1][~torch.isin(pools[1], pools[0])]
    available = sum(len(p) for p in pools)
    if num_samples is None:
        num_samples = available
    if not 0 < num_samples <= available:
        raise ValueError(
            f"num_samples must be in 1..{available} (training images of both tasks), got {num_samples}"
        )

    gen = torch.Generator().manual_seed(seed)
    want_a = min(len(pools[0]), max(num_samples - len(pools[1]), num_samples // 2))
    take = [want_a, num_samples - want_a]
    chosen = torch.cat([pool[torch.randperm(len(pool), generator=gen)[:k]] for pool, k in zip(pools, take)])
    chosen = chosen[torch.randperm(len(chosen), generator=gen)]

    # Look images up by their global index, whichever task holds them.
    by_index: dict[int, Tensor] = {}
    for task in split.tasks:
        for row, idx in enumerate(task.train_indices.tolist()):
            by_index.setdefault(idx, task.train_pixel_values[row])
    images = torch.stack([by_index[i] for i in chosen.tolist()])
    return (
        {"pixel_values": images[start : start + batch_size]} for start in range(0, num_samples, batch_size)
    )


def as_dataset(pixel_values: Tensor, labels: Tensor | None = None) -> Any:
    """Wrap images (and optionally labels) as a torch-formatted ``datasets.Dataset``.

    Lets tests and the demo feed the same calibration/evaluation code path that real Hub datasets use.
    """
    import datasets

    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (N, C, H, W), got shape {tuple(pixel_values.shape)}")
    array = pixel_values.detach().to(torch.float32).cpu().numpy()
    columns: dict[str, Any] = {"pixel_values": array}
    features = {"pixel_values": datasets.Array3D(shape=array.shape[1:], dtype="float32")}
    if labels is not None:
        if len(labels) != len(array):
            raise ValueError(f"{len(labels)} labels for {len(array)} images")
        columns["labels"] = labels.detach().cpu().numpy().astype(np.int64)
        features["labels"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)).with_format("torch")


# -------------------------------------------------------------------------------------------- model
def tiny_vit_config(
    num_labels: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    image_size: int = 16,
    patch_size: int = 4,
    num_channels: int = 1,
    id2label: dict[int, str] | None = None,
) -> Any:
    """A ``ViTConfig`` small enough to train in seconds on CPU (dropout off: training stays short)."""
    from transformers import ViTConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
    if id2label is None:
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    if len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries but num_labels is {num_labels}")
    id2label = {int(k): str(v) for k, v in id2label.items()}
    return ViTConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size if intermediate_size is None else intermediate_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-6,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        encoder_stride=patch_size,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        architectures=["ViTForImageClassification"],
    )


def _random_shift(images: Tensor, max_shift: int, background: float, gen: torch.Generator) -> Tensor:
    """Translate every image by its own random offset in ``[-max_shift, max_shift]`` pixels."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=background)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)
    rows = offsets[0, :, None] + torch.arange(h)
    cols = offsets[1, :, None] + torch.arange(w)
    batch = torch.arange(b)[:, None, None]
    # Advanced indices around a slice: result is (B, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def train_vit(
    config: Any,
    pixel_values: Tensor,
    labels: Tensor,
    *,
    seed: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.1,
    max_shift: int = 0,
) -> Any:
    """Train ``ViTForImageClassification(config)`` from scratch; deterministic for a given ``seed``.

    The seed fixes both the initialization and the data order/augmentation, which is what makes two
    models "different initializations" for merging.  The caller's global RNG state is left untouched.
    AdamW with linear warm-up and cosine decay.  ``max_shift > 0`` adds random translations of up to
    that many pixels; off by default because the digits are already centred and, within these short
    schedules, 2-pixel shifts cost 1-4 test-accuracy points (measured at 30 epochs, 16x16).  Returns a
    float32 model in eval mode.
    """
    from transformers import ViTForImageClassification

    if pixel_values.ndim != 4 or len(pixel_values) != len(labels):
        raise ValueError(
            f"expected pixel_values (N, C, H, W) and N labels, "
            f"got {tuple(pixel_values.shape)} and {len(labels)}"
        )
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    if int(labels.min()) < 0 or int(labels.max()) >= config.num_labels:
        raise ValueError(f"labels must lie in 0..{config.num_labels - 1} (config.num_labels)")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTForImageClassification(config).to(torch.float32)
        fit_classifier(model, {"pixel_values": pixel_values.to(torch.float32)}, labels, seed=seed, epochs=epochs,
                       batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_fraction=warmup_fraction,
                       max_shift=max_shift)
    logger.info(
        "trained ViT (hidden %d, %d layers, %d labels, seed %d) for %d epochs in %.1fs",
        config.hidden_size,
        config.num_hidden_layers,
        config.num_labels,
        seed,
        epochs,
        time.perf_counter() - start,
    )
    return model


def fit_classifier(
    model: Any,
    inputs: dict[str, Tensor],
    labels: Tensor,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.1,
    max_shift: int = 0,
    decay_all: bool = False,
) -> Any:
    """Train a classifier in place on whole-tensor `inputs` (cross-entropy); the loop `train_vit` uses, also
    for fine-tuning an existing model (the quality benchmark's same-init and MiniLM pairs).

    Deterministic for a ``seed`` (it fixes the data order and the shifts); the caller's global RNG state is
    left untouched. AdamW with linear warm-up and cosine decay; weight decay on the weight matrices only,
    or on every parameter with ``decay_all``. ``max_shift`` translates `pixel_values` (see `train_vit`).
    Returns the model in eval mode.
    """
    labels = labels.to(torch.int64)
    background = float((0.0 - DIGITS_MEAN) / DIGITS_STD)
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, int(warmup_fraction * total_steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    with torch.random.fork_rng(devices=[]):
        gen = torch.Generator().manual_seed(seed)
        if decay_all:
            groups = [{"params": list(model.parameters()), "weight_decay": weight_decay}]
        else:
            decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in name]
            no_decay = [
                p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in name)
            ]
            groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total_loss = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                batch = {k: v[idx] for k, v in inputs.items()}
                if max_shift > 0:
                    batch["pixel_values"] = _random_shift(batch["pixel_values"], max_shift, background, gen)
                logits = model(**batch).logits
                loss = F.cross_entropy(logits, labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(idx)
            logger.debug("seed %d epoch %d/%d: loss %.4f", seed, epoch + 1, epochs, total_loss / n)
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, pixel_values: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of an image classifier (eval mode, no grad); the model's mode is restored."""
    if len(labels) == 0:
        raise ValueError("accuracy needs at least one sample")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(labels), batch_size):
            logits = model(pixel_values=pixel_values[start : start + batch_size]).logits
            correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(labels)


# --------------------------------------------------------------------------------------------- pairs
class DigitPair(NamedTuple):
    """Two ViTs trained on different digit tasks from different seeds, plus the data they came from."""

    model_a: Any
    model_b: Any
    splits: DigitSplits


def _cache_key(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_cached(path: Path) -> Any | None:
    from safetensors import SafetensorError
    from transformers import ViTForImageClassification

    if not (path / _CACHE_MARKER).is_file():
        return None
    try:
        model = ViTForImageClassification.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as error:  # a file truncated or edited since it was cached
        reason = brief(error, 200)
        raise ValueError(f"the cached model {str(path)!r} cannot be loaded ({reason}); delete that folder to "
                         "train it again") from None
    return model.eval()


def _save_atomically(model: Any, path: Path, params: dict[str, Any]) -> None:
    """Write into a sibling temp folder and rename, so readers never see a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(params, indent=2, sort_keys=True))
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / _CACHE_MARKER).is_file():  # not a concurrent writer that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def trained_digit_pair(
    classes_a: Iterable[int] = range(5),
    classes_b: Iterable[int] = range(5, 10),
    seeds: Sequence[int] = (0, 1),
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    image_size: int = 16,
    patch_size: int = 4,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 1.5e-3,
    weight_decay: float = 0.05,
    max_shift: int = 0,
    split_seed: int = 0,
    test_fraction: float = 0.3,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DigitPair:
    """Train model A on task A (seed ``seeds[0]``) and model B on task B (seed ``seeds[1]``).

    With ``cache_dir``, each model is stored as a ``save_pretrained`` folder named by a hash of every
    setting that influences it, and later calls load it instead of retraining.
    """
    if len(seeds) != 2:
        raise ValueError(f"seeds must hold two seeds (model A, model B), got {seeds!r}")
    splits = digit_splits(
        classes_a, classes_b, seed=split_seed, test_fraction=test_fraction, image_size=image_size
    )
    if intermediate_size is None:
        intermediate_size = 4 * hidden_size
    models = []
    for tag, task, seed in zip("ab", splits.tasks, seeds):
        config = tiny_vit_config(
            task.num_labels,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            image_size=image_size,
            patch_size=patch_size,
            id2label=task.id2label,
        )
        train_kwargs: dict[str, Any] = dict(
            seed=int(seed),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            max_shift=max_shift,
        )
        params = {
            "format": _CACHE_FORMAT,
            "classes": list(task.classes),
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "intermediate_size": intermediate_size,
            "image_size": image_size,
            "patch_size": patch_size,
            "split_seed": split_seed,
            "test_fraction": test_fraction,
            **train_kwargs,
        }
        path = None
        model = None
        if cache_dir is not None:
            path = (
                Path(cache_dir) / f"digits-vit-{''.join(map(str, task.classes))}-s{seed}-{_cache_key(params)}"
            )
            model = _load_cached(path)
            if model is not None:
                logger.info("model %s: loaded cached %s", tag.upper(), path)
        if model is None:
            model = train_vit(config, task.train_pixel_values, task.train_labels, **train_kwargs)
            logger.info(
                "model %s: test accuracy %.3f on digits %s",
                tag.upper(),
                accuracy(model, task.test_pixel_values, task.test_labels),
                task.classes,
            )
            if path is not None:
                _save_atomically(model, path, params)
        models.append(model)
    return DigitPair(models[0], models[1], splits)
