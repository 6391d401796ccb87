"""Calibration data after the session-38 hunt (helper "calib"): raw text read by a tokenizer that pads on the left or
has no pad token, and an empty dataset. Each is either read correctly or refused in one line before any forward."""

from __future__ import annotations

import datasets
import pytest
import torch
from factories import BERT, make_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertTokenizer, PreTrainedTokenizerFast

import hf_mudsc
from hf_mudsc.architectures import spec_for
from hf_mudsc.calibrate.datasets import check_calibration_columns, resolve_calibration
from hf_mudsc.calibrate.statistics import collect_statistics, iter_batches
from hf_mudsc.errors import CalibrationError

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(BERT["vocab_size"] - 5)]
TEXTS = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + i % 5)) for i in range(8)]


def bert_tokenizer(padding_side: str = "right") -> BertTokenizer:
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)})
    tokenizer.padding_side = padding_side
    return tokenizer


def no_pad_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer without a pad token (as a tokenizer.json of a model trained without padding loads)."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert isinstance(caught.value, CalibrationError) and "\n" not in message, message
    return message


def correlations(a, b, stream, batch_size: int) -> list[torch.Tensor]:
    accumulators = collect_statistics(a, b, spec_for(a), iter_batches(stream, batch_size=batch_size),
                                      progress=False, statistics_dtype="float64")
    return [accumulator.finalize() for accumulator in accumulators]


def test_a_left_padding_tokenizer_gives_the_statistics_of_unpadded_texts():
    """BERT correlations on raw text via a tokenizer with padding_side="left": batch 1 vs 8 differed by 1.65."""
    a, b = make_model("bert_cls", 0), make_model("bert_cls", 1)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    left = resolve_calibration(data, [bert_tokenizer("left")], model_config=a.config)
    right = resolve_calibration(data, [bert_tokenizer("right")], model_config=a.config)
    alone = correlations(a, b, left, 1)  # no padding at all: the statistics the texts have
    for padded in (correlations(a, b, left, 8), correlations(a, b, right, 8)):
        assert max(float((x - y).abs().max()) for x, y in zip(alone, padded)) < 1e-4


def test_a_left_padding_tokenizer_is_left_as_it_was():
    """resolve_calibration(..., [tokenizer with padding_side='left']) read: the caller's tokenizer keeps its side."""
    tokenizer = bert_tokenizer("left")
    stream = resolve_calibration(datasets.Dataset.from_dict({"text": TEXTS}), [tokenizer])
    batch = next(iter(stream.batches(8)))
    assert bool((batch["attention_mask"][:, 0] == 1).all())  # padded on the right: every text starts at position 0
    assert tokenizer.padding_side == "left"


def test_a_tokenizer_without_a_pad_token_is_refused_before_the_weights():
    """check_calibration_columns(Dataset(text=...), [tokenizer without pad_token]) passed; merge() then failed at the
    first batch with transformers' bare ValueError ('Asking to pad but the tokenizer does not have a padding token')."""
    model = make_model("bert_cls", 0)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [no_pad_tokenizer()], model_config=model.config)
    message = one_line(caught)
    assert "pad" in message and "pad_token" in message, message
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([model, make_model("bert_cls", 1)], data, method="mudsc", progress=False,
                       processor=no_pad_tokenizer())
    assert "pad_token" in one_line(caught)


def test_an_empty_dataset_is_called_empty_not_a_column_of_nulls():
    """merge([bert, bert], Dataset.from_dict({'text': []})) said "column 'text' ... holds null, not text"."""
    model = make_model("bert_cls", 0)
    data = datasets.Dataset.from_dict({"text": []})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [bert_tokenizer()], model_config=model.config)
    message = one_line(caught)
    assert "empty (0 rows)" in message and "null" not in message, message


def bare_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a pad token that adds no special tokens: an empty text is no token at all."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.parametrize("texts", [TEXTS[:3] + [""] + TEXTS[4:], ["  "] * len(TEXTS)], ids=["one", "all"])
def test_a_text_the_tokenizer_turns_into_no_token_is_named_as_such(texts):
    """Dataset(text=[..., '', ...]) read by a tokenizer adding no special tokens: 'pass the attention_mask the
    tokenizer returns' (one empty text) or torch's 'cannot reshape tensor of 0 elements' from inside BERT (all)."""
    stream = resolve_calibration(datasets.Dataset.from_dict({"text": texts}), [bare_tokenizer()])
    with pytest.raises(CalibrationError) as caught:
        next(iter(stream.batches(8)))
    message = one_line(caught)
    assert "'text'" in message and "no token" in message and "reshape" not in message, message
    assert "pass the attention_mask" not in message, message
