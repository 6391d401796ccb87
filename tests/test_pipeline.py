"""A merged model works with the stock `transformers.pipeline`, like any Hub model (issue 10).

The pipeline turns every PIL image into RGB before the image processor sees it, so a model (and the
processor saved with it) must take 3-channel input.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from factories import BERT, VIT, randomize
from PIL import Image
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import hf_mudsc
from hf_mudsc.cli.main import main
from hf_mudsc.testing import toy


def digit_image(index: int) -> Image.Image:
    """A raw 8x8 digit of sklearn's set as the PIL image the demo's processor expects (0..16 -> 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.round(digits.images[index] * 255 / 16), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L")


def check_pipeline_answers(classify, model_dir: Path, inputs, direct_logits: torch.Tensor) -> None:
    """Every label comes from the merged id2label and the ranking is the model's own."""
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(model_dir).id2label
    answers = classify(inputs, top_k=len(id2label))
    for answer, logits in zip(answers, direct_logits):
        assert {a["label"] for a in answer} == set(id2label.values())
        assert answer[0]["label"] == id2label[int(logits.argmax())]
        assert [a["score"] for a in answer] == pytest.approx(sorted(logits.softmax(-1).tolist(), reverse=True),
                                                             abs=1e-5)


def test_the_demo_model_works_with_the_image_classification_pipeline(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--hidden-size", "32", "--epochs", "3", "--num-samples", "64",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    images = [digit_image(i) for i in range(6)]
    classify = pipeline("image-classification", model=str(out))
    labels = [answer[0]["label"] for answer in classify(list(images))]
    assert all(label.startswith(("digits-0-4: digit", "digits-5-9: digit")) for label in labels)
    processed = toy.digit_processor()(images=[im.convert("RGB") for im in images], return_tensors="pt")
    with torch.no_grad():
        logits = classify.model(**processed).logits
    check_pipeline_answers(classify, out, list(images), logits)
    # The pipeline's processor reproduces the toy preprocessing the parents were trained with (grey, as RGB).
    trained_on = toy.load_digit_images(16, num_channels=3)[0][:6]
    assert (processed["pixel_values"] - trained_on).abs().max() < 0.01
    assert torch.equal(trained_on[:, 0], toy.load_digit_images(16)[0][:6, 0])


def tiny_rgb_vit(seed: int, labels: list[str]) -> ViTForImageClassification:
    config = ViTConfig(**{**VIT, "num_channels": 3}, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)})
    torch.manual_seed(seed)
    return randomize(ViTForImageClassification(config), seed)


def test_a_tiny_vit_merge_works_with_the_image_classification_pipeline(tmp_path):
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    parents = []
    for seed, labels in ((0, ["cat", "dog"]), (1, ["car", "bus", "van"])):
        folder = tmp_path / f"parent{seed}"
        tiny_rgb_vit(seed, labels).save_pretrained(folder)
        processor.save_pretrained(folder)
        parents.append(folder)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(24)]
    calibration = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
    merged = hf_mudsc.merge(parents, calibration, method="zipit", batch_size=8, progress=False)
    out = tmp_path / "merged"
    hf_mudsc.save_merged(merged, out)  # the library's writer: model, the parents' processor, card, recipe
    classify = pipeline("image-classification", model=str(out))
    with torch.no_grad():
        logits = merged(**processor(images=images[:4], return_tensors="pt")).logits
    check_pipeline_answers(classify, out, images[:4], logits)


def test_a_tiny_bert_merge_works_with_the_text_classification_pipeline(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(BERT["vocab_size"] - 5)]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    parents = []
    for seed, labels in ((0, ["negative", "positive"]), (1, ["sport", "news", "art"])):
        config = BertConfig(**BERT, id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
        torch.manual_seed(seed)
        folder = tmp_path / f"bert{seed}"
        randomize(BertForSequenceClassification(config), seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        parents.append(folder)
    rng = np.random.default_rng(1)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 50, rng.integers(2, 12))) for _ in range(24)]
    merged = hf_mudsc.merge(parents, datasets.Dataset.from_dict({"text": texts}), method="zipit", batch_size=8,
                            progress=False)
    out = tmp_path / "merged"
    hf_mudsc.save_merged(merged, out)  # the library's writer: model, the parents' tokenizer, card, recipe
    classify = pipeline("text-classification", model=str(out))
    with torch.no_grad():
        logits = merged(**AutoTokenizer.from_pretrained(out)(texts[:4], padding=True, return_tensors="pt")).logits
    check_pipeline_answers(classify, out, texts[:4], logits)
