"""Tests for hf_mudsc.toy: the locally trained digit ViTs every other test and benchmark relies on."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch

from hf_mudsc.testing import toy

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ images
def test_load_digit_images_shapes_and_normalisation() -> None:
    images, labels = toy.load_digit_images()
    assert images.shape == (1797, 1, 16, 16)
    assert images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert labels.shape == (1797,)
    assert sorted(labels.unique().tolist()) == list(range(10))
    # Bilinear upsampling averages neighbours: still centred, slightly smoother than unit std.
    assert abs(images.mean().item()) < 0.05
    assert 0.8 < images.std().item() < 1.05
    # The background (raw 0) maps to the same fixed value everywhere.
    assert images.min().item() == pytest.approx(-toy.DIGITS_MEAN / toy.DIGITS_STD, abs=1e-5)


def test_load_digit_images_native_size_uses_fixed_constants() -> None:
    images, _ = toy.load_digit_images(8)
    assert images.shape == (1797, 1, 8, 8)
    assert images.double().mean().item() == pytest.approx(0.0, abs=1e-5)
    assert images.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    big, _ = toy.load_digit_images(32)
    assert big.shape == (1797, 1, 32, 32)


# ------------------------------------------------------------------------------------------ splits
def test_digit_splits_deterministic_stratified_and_disjoint() -> None:
    first = toy.digit_splits(range(5), range(5, 10), seed=0, test_fraction=0.3)
    again = toy.digit_splits(range(5), range(5, 10), seed=0, test_fraction=0.3)
    other = toy.digit_splits(range(5), range(5, 10), seed=1, test_fraction=0.3)
    _, all_labels = toy.load_digit_images()

    for a, b in zip(first.tasks, again.tasks):
        assert torch.equal(a.train_indices, b.train_indices)
        assert torch.equal(a.test_indices, b.test_indices)
        assert torch.equal(a.train_pixel_values, b.train_pixel_values)
        assert torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(first.task_a.test_indices, other.task_a.test_indices)

    sets = {
        name: set(getattr(task, f"{part}_indices").tolist())
        for task, tag in zip(first.tasks, "ab")
        for part in ("train", "test")
        for name in [f"{tag}_{part}"]
    }
    names = list(sets)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not sets[x] & sets[y], f"{x} and {y} overlap"
    assert set().union(*sets.values()) == set(range(1797))

    for task, classes in zip(first.tasks, (range(5), range(5, 10))):
        assert task.classes == tuple(classes)
        assert task.class_names == [f"digit {c}" for c in classes]
        assert task.id2label == {i: f"digit {c}" for i, c in enumerate(classes)}
        for part in ("train", "test"):
            local = getattr(task, f"{part}_labels")
            idx = getattr(task, f"{part}_indices")
            assert local.dtype == torch.int64
            assert sorted(local.unique().tolist()) == list(range(5))
            # task-local label i is the digit classes[i]
            assert torch.equal(torch.tensor(task.classes)[local], all_labels[idx])
        # stratified: every digit contributes round(30%) of its images to the test set
        for i, digit in enumerate(classes):
            n_digit = int((all_labels == digit).sum())
            assert int((task.test_labels == i).sum()) == round(0.3 * n_digit)
    assert len(first.task_a.train_pixel_values) == len(first.task_a.train_labels)
    assert first.task_a.test_pixel_values.shape[1:] == (1, 16, 16)


def test_digit_splits_custom_classes_and_joint_test() -> None:
    splits = toy.digit_splits([3, 8], [1, 7, 9], seed=2)
    assert splits.task_a.num_labels == 2 and splits.task_b.num_labels == 3
    pixel_values, labels = splits.joint_test()
    n_a = len(splits.task_a.test_labels)
    assert len(pixel_values) == len(labels) == n_a + len(splits.task_b.test_labels)
    assert torch.equal(labels[:n_a], splits.task_a.test_labels)
    assert torch.equal(labels[n_a:], splits.task_b.test_labels + 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes_a": [1, 1, 2]}, "twice"),
        ({"classes_a": [1, 12]}, "0..9"),
        ({"classes_b": [4]}, "at least two"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_digit_splits_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        toy.digit_splits(**kwargs)


# ----------------------------------------------------------------------------------------- configs
def test_tiny_vit_config() -> None:
    config = toy.tiny_vit_config(5, id2label={i: f"digit {i}" for i in range(5)})
    assert config.num_labels == 5
    assert config.hidden_size == 64 and config.intermediate_size == 256
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert (config.image_size, config.patch_size, config.num_channels) == (16, 4, 1)
    assert config.id2label[3] == "digit 3" and config.label2id["digit 3"] == 3
    with pytest.raises(ValueError, match="divisible by num_heads"):
        toy.tiny_vit_config(5, hidden_size=66)
    with pytest.raises(ValueError, match="id2label"):
        toy.tiny_vit_config(5, id2label={0: "a"})


# ---------------------------------------------------------------------------------------- training
def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_vit_deterministic_per_seed_and_leaves_global_rng_alone() -> None:
    splits = toy.digit_splits()
    x, y = splits.task_a.train_pixel_values[:96], splits.task_a.train_labels[:96]
    config = toy.tiny_vit_config(5, hidden_size=32, num_layers=1)

    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first = toy.train_vit(config, x, y, seed=0, epochs=2, batch_size=32, max_shift=2)
    assert torch.equal(torch.rand(3), expected_next), "train_vit must not consume the caller's RNG"

    again = toy.train_vit(config, x, y, seed=0, epochs=2, batch_size=32, max_shift=2)
    other = toy.train_vit(config, x, y, seed=1, epochs=2, batch_size=32, max_shift=2)
    s_first, s_again, s_other = _state(first), _state(again), _state(other)
    assert all(torch.equal(s_first[k], s_again[k]) for k in s_first)
    assert not any(torch.equal(s_first[k], s_other[k]) for k in s_first if s_first[k].numel() > 8)
    assert not first.training
    assert all(p.dtype == torch.float32 for p in first.parameters())


def test_train_vit_rejects_bad_labels() -> None:
    config = toy.tiny_vit_config(3, hidden_size=32, num_layers=1)
    with pytest.raises(ValueError, match="labels must lie"):
        toy.train_vit(config, torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), seed=0, epochs=1)


@pytest.fixture(scope="module")
def pair_and_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[toy.DigitPair, object, float]:
    cache = tmp_path_factory.mktemp("toy_cache")
    start = time.perf_counter()
    pair = toy.trained_digit_pair(cache_dir=cache)
    return pair, cache, time.perf_counter() - start


@pytest.mark.slow  # the three tests of the trained pair share its 25-epoch training
def test_trained_pair_reaches_accuracy(pair_and_cache: tuple, record_property) -> None:
    pair, _, seconds = pair_and_cache
    acc_a = toy.accuracy(pair.model_a, pair.splits.task_a.test_pixel_values, pair.splits.task_a.test_labels)
    acc_b = toy.accuracy(pair.model_b, pair.splits.task_b.test_pixel_values, pair.splits.task_b.test_labels)
    record_property("test_accuracy_a", acc_a)
    record_property("test_accuracy_b", acc_b)
    record_property("train_seconds_both", seconds)
    logger.info("default pair: acc A %.3f, acc B %.3f, %.1fs for both", acc_a, acc_b, seconds)
    assert acc_a >= 0.9, acc_a
    assert acc_b >= 0.9, acc_b
    # A model knows nothing of the other task: on B's images, A's predictions are A-classes only.
    assert pair.model_a.config.id2label == {i: f"digit {i}" for i in range(5)}
    assert pair.model_b.config.id2label == {i: f"digit {i + 5}" for i in range(5)}
    assert not pair.model_a.training and not pair.model_b.training


@pytest.mark.slow
def test_trained_pair_models_differ(pair_and_cache: tuple) -> None:
    pair, _, _ = pair_and_cache
    a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    assert not any(torch.allclose(a[k], b[k]) for k in a if a[k].numel() > 8)


@pytest.mark.slow
def test_trained_pair_cache_round_trip(pair_and_cache: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    pair, cache, _ = pair_and_cache
    folders = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len(folders) == 2
    for folder in folders:
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("cached models must be loaded, not retrained")

    monkeypatch.setattr(toy, "train_vit", must_not_train)
    start = time.perf_counter()
    cached = toy.trained_digit_pair(cache_dir=cache)
    logger.info("cached pair loaded in %.2fs", time.perf_counter() - start)
    x = pair.splits.task_a.test_pixel_values[:64]
    with torch.no_grad():
        for fresh, loaded in ((pair.model_a, cached.model_a), (pair.model_b, cached.model_b)):
            assert not loaded.training
            assert all(p.dtype == torch.float32 for p in loaded.parameters())
            assert loaded.config.id2label == fresh.config.id2label
            assert torch.equal(fresh(pixel_values=x).logits, loaded(pixel_values=x).logits)
    assert torch.equal(cached.splits.task_b.test_indices, pair.splits.task_b.test_indices)


def test_trained_pair_cache_key_covers_hyper_parameters(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []

    def fake_train(config, pixel_values, labels, **kwargs):
        calls.append(kwargs)
        from transformers import ViTForImageClassification

        return ViTForImageClassification(config).eval()

    monkeypatch.setattr(toy, "train_vit", fake_train)
    small = {"hidden_size": 32, "num_layers": 1}
    toy.trained_digit_pair(cache_dir=tmp_path, **small)
    assert len(calls) == 2
    toy.trained_digit_pair(cache_dir=tmp_path, **small)
    assert len(calls) == 2  # both cached
    toy.trained_digit_pair(cache_dir=tmp_path, epochs=3, **small)
    assert len(calls) == 4  # a changed hyper-parameter is a new cache entry
    toy.trained_digit_pair(cache_dir=tmp_path, seeds=(0, 2), **small)
    assert len(calls) == 5  # only model B's seed changed
    toy.trained_digit_pair(range(5), [5, 6, 7], cache_dir=tmp_path, **small)
    assert len(calls) == 6  # only task B changed
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 6


# ------------------------------------------------------------------------------------ helpers
def test_accuracy_matches_manual_argmax(pair_and_cache: tuple) -> None:
    pair, _, _ = pair_and_cache
    task = pair.splits.task_a
    pair.model_a.train()
    try:
        acc = toy.accuracy(pair.model_a, task.test_pixel_values, task.test_labels, batch_size=50)
        assert pair.model_a.training, "accuracy must restore the model's mode"
    finally:
        pair.model_a.eval()
    with torch.no_grad():
        manual = pair.model_a(pixel_values=task.test_pixel_values).logits.argmax(-1) == task.test_labels
    assert acc == pytest.approx(manual.float().mean().item())


def test_digit_calibration_batches() -> None:
    splits = toy.digit_splits()
    batches = list(toy.digit_calibration_batches(splits, num_samples=100, batch_size=32, seed=0))
    assert len(batches) == math.ceil(100 / 32)
    assert all(set(b) == {"pixel_values"} for b in batches)
    assert [len(b["pixel_values"]) for b in batches] == [32, 32, 32, 4]
    assert all(b["pixel_values"].shape[1:] == (1, 16, 16) for b in batches)
    assert all(b["pixel_values"].dtype == torch.float32 for b in batches)

    images = torch.cat([b["pixel_values"] for b in batches]).flatten(1)

    def rows(x: torch.Tensor) -> set[bytes]:
        return {r.numpy().tobytes() for r in x.flatten(1)}

    drawn = [r.numpy().tobytes() for r in images]
    pool_a, pool_b = (rows(t.train_pixel_values) for t in splits.tasks)
    assert sum(r in pool_a for r in drawn) == 50  # half from each task's training images
    assert sum(r in pool_b for r in drawn) == 50
    assert set(drawn) <= pool_a | pool_b  # nothing but training images
    assert len(set(drawn)) == len(drawn) == 100  # no image drawn twice

    again = torch.cat([b["pixel_values"] for b in toy.digit_calibration_batches(splits, 100, 32, seed=0)])
    other = torch.cat([b["pixel_values"] for b in toy.digit_calibration_batches(splits, 100, 32, seed=1)])
    assert torch.equal(again.flatten(1), images)
    assert not torch.equal(other.flatten(1), images)

    everything = list(toy.digit_calibration_batches(splits, batch_size=500))
    n_train = sum(len(t.train_labels) for t in splits.tasks)
    assert sum(len(b["pixel_values"]) for b in everything) == n_train
    with pytest.raises(ValueError, match="num_samples"):
        toy.digit_calibration_batches(splits, num_samples=n_train + 1)  # eager check, no next()


def test_as_dataset() -> None:
    import datasets

    splits = toy.digit_splits()
    x, y = splits.task_b.test_pixel_values[:10], splits.task_b.test_labels[:10]
    ds = toy.as_dataset(x)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["pixel_values"] and len(ds) == 10
    row = ds[0]["pixel_values"]
    assert isinstance(row, torch.Tensor) and row.dtype == torch.float32 and row.shape == (1, 16, 16)
    assert torch.equal(ds[:10]["pixel_values"], x)

    labelled = toy.as_dataset(x, y)
    assert labelled.column_names == ["pixel_values", "labels"]
    assert torch.equal(labelled[:10]["labels"], y)
    with pytest.raises(ValueError, match="labels"):
        toy.as_dataset(x, y[:3])


# ------------------------------------------------------------------------------------------ RGB export
def test_rgb_images_repeat_the_grey_channel() -> None:
    grey, labels = toy.load_digit_images()
    rgb, rgb_labels = toy.load_digit_images(num_channels=3)
    assert rgb.shape == (1797, 3, 16, 16) and torch.equal(labels, rgb_labels)
    assert all(torch.equal(rgb[:, c], grey[:, 0]) for c in range(3))
    splits = toy.digit_splits(num_channels=3)
    assert torch.equal(splits.task_b.test_pixel_values[:, 2], toy.digit_splits().task_b.test_pixel_values[:, 0])
    with pytest.raises(ValueError, match="num_channels must be 1"):
        toy.load_digit_images(num_channels=2)


def test_rgb_digit_model_computes_what_the_grey_model_computes() -> None:
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    grey = ViTForImageClassification(toy.tiny_vit_config(5, hidden_size=32)).eval()
    before = {k: v.clone() for k, v in grey.state_dict().items()}
    rgb = toy.rgb_digit_model(grey)
    assert rgb.config.num_channels == 3 and grey.config.num_channels == 1
    assert all(torch.equal(v, grey.state_dict()[k]) for k, v in before.items())  # the original is untouched
    changed = [k for k, v in rgb.state_dict().items() if v.shape != before[k].shape or not torch.equal(v, before[k])]
    assert changed == ["vit.embeddings.patch_embeddings.projection.weight"]
    images = toy.load_digit_images()[0][:64]
    with torch.no_grad():
        expected = grey(pixel_values=images).logits
        got = rgb(pixel_values=images.expand(-1, 3, -1, -1)).logits
    assert (got - expected).abs().max() < 1e-5
    assert toy.rgb_digit_model(rgb) is rgb


def test_digit_processor_matches_the_training_images() -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits().images[:8]
    images = [Image.fromarray(np.round(d * 255 / 16).astype(np.uint8), mode="L") for d in raw]
    processed = toy.digit_processor()(images=images, return_tensors="pt")["pixel_values"]
    assert processed.shape == (8, 3, 16, 16)
    assert (processed - toy.load_digit_images(num_channels=3)[0][:8]).abs().max() < 0.01
