"""Evaluation data given as model inputs is checked against the models' configs before any forward, as calibration
data is (`calibrate.statistics.ModelInputCheck`): ids past the vocabulary failed inside the embedding with
"IndexError: index out of range in self"."""

from __future__ import annotations

import logging

import pytest
import torch
from factories import make_model

import hf_mudsc
from hf_mudsc.errors import EvaluationError


def _named(model, prefix: str):
    model.config.id2label = {i: f"{prefix}{i}" for i in range(model.config.num_labels)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model


@pytest.fixture(scope="module")
def bert_merge():
    parents = [_named(make_model("bert_cls", seed=1), "a"), _named(make_model("bert_cls", seed=2), "b")]
    return hf_mudsc.merge(parents, method="linear", progress=False), parents


def _ids(vocab: int, rows: int = 6) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, 5), generator=torch.Generator().manual_seed(0))


def test_token_ids_past_the_vocabulary_are_refused_in_one_line(bert_merge):
    merged, parents = bert_merge
    vocab = merged.config.vocab_size
    ids = _ids(vocab)
    ids[2, 3] = vocab + 7
    data = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros(6, dtype=torch.long))
    with pytest.raises(EvaluationError) as caught:
        hf_mudsc.evaluate_merge(merged, parents, [data, data], progress=False)
    message = str(caught.value)
    assert "\n" not in message and "calibration" not in message, message
    assert f"evaluation input_ids hold token id {vocab + 7}" in message and f"{vocab} tokens" in message, message


def test_pixel_values_of_another_size_are_refused_in_one_line():
    parents = [_named(make_model("vit_cls", seed=1), "a"), _named(make_model("vit_cls", seed=2), "b")]
    merged = hf_mudsc.merge(parents, method="linear", progress=False)
    side = merged.config.image_size
    data = ({"pixel_values": torch.randn(4, 3, side + 4, side + 4)}, torch.zeros(4, dtype=torch.long))
    with pytest.raises(EvaluationError, match=rf"evaluation pixel_values have shape \(4, 3, {side + 4}, {side + 4}\)"
                       ) as caught:
        hf_mudsc.evaluate_merge(merged, parents, [data, data], progress=False)
    assert "\n" not in str(caught.value)


def test_padded_ids_without_a_mask_are_warned_about_once(bert_merge, caplog):
    merged, parents = bert_merge
    ids = _ids(merged.config.vocab_size)
    ids[:, -1] = merged.config.pad_token_id
    data = ({"input_ids": ids}, torch.zeros(6, dtype=torch.long))
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        hf_mudsc.evaluate_merge(merged, parents, [data, data], progress=False)
    said = [r.getMessage() for r in caplog.records if "pad token id" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("evaluation input_ids hold"), said
