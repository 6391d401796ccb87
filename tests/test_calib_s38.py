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


class CallWithoutPaddingSide(BertTokenizer):
    """A tokenizer whose `__call__` names its own parameters (as some remote-code tokenizers do): no padding_side."""

    def __call__(self, text, text_pair=None, padding=False, truncation=None, max_length=None, return_tensors=None):
        return super().__call__(text, text_pair, padding=padding, truncation=truncation, max_length=max_length,
                                return_tensors=return_tensors)


def test_a_tokenizer_whose_call_takes_no_padding_side_still_reads_the_texts():
    """resolve_calibration(Dataset(text=...), [BertTokenizer subclass with __call__(text, text_pair, padding, ...)])
    then a batch: TypeError "__call__() got an unexpected keyword argument 'padding_side'" (worked at 524b33a)."""
    tokenizer = CallWithoutPaddingSide(vocab={word: index for index, word in enumerate(WORDS)})
    tokenizer.padding_side = "left"
    stream = resolve_calibration(datasets.Dataset.from_dict({"text": TEXTS}), [tokenizer])
    batch = next(iter(stream.batches(8)))
    assert bool((batch["attention_mask"][:, 0] == 1).all())  # still padded on the right
    assert tokenizer.padding_side == "left"


def fast_bert_tokenizer(padding_side: str) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer with BERT's special tokens and a pad token."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                   padding_side=padding_side)


@pytest.mark.parametrize("make", [bert_tokenizer, fast_bert_tokenizer], ids=["slow", "fast"])
def test_a_left_padding_tokenizer_is_left_as_it_was(make):
    """resolve_calibration(..., [tokenizer padding_side='left']) read, then tokenizer(texts, padding=True): padded on
    the left still (attribute and fast backend), and the backend keeps no padding switched on."""
    tokenizer = make("left")
    stream = resolve_calibration(datasets.Dataset.from_dict({"text": TEXTS}), [tokenizer])
    batch = next(iter(stream.batches(8)))
    assert bool((batch["attention_mask"][:, 0] == 1).all())
    assert tokenizer.padding_side == "left"
    own = tokenizer([TEXTS[0], TEXTS[4]], padding=True)["attention_mask"]
    assert own[0][0] == 0 and own[0][-1] == 1, own  # the shorter text padded on the left
    if make is fast_bert_tokenizer:
        fresh = make("left")
        next(iter(resolve_calibration(datasets.Dataset.from_dict({"text": TEXTS}), [fresh]).batches(8)))
        assert fresh.backend_tokenizer.padding is None  # a read leaves the backend's padding as it was (off)


def test_pre_tokenized_input_ids_with_a_tokenizer_without_a_pad_token_are_not_refused():
    """check_calibration_columns(Dataset(input_ids=..., attention_mask=...), [tokenizer without pad_token]): no
    tokenizer call pads anything, so nothing to refuse."""
    model = make_model("bert_cls", 0)
    ids = [[2, 10 + i, 11, 3] for i in range(8)]
    data = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 4] * 8})
    check_calibration_columns(data, [no_pad_tokenizer()], model_config=model.config)
    batch = next(iter(resolve_calibration(data, [no_pad_tokenizer()], model_config=model.config).batches(8)))
    assert batch["input_ids"].tolist() == ids


def test_a_text_pair_with_one_side_empty_is_not_refused():
    """Dataset(a=[texts], b=['', ...]) as text pairs, read by a tokenizer adding no special tokens: the pair has
    tokens (its first side's), so it is read, not called "no token"."""
    data = datasets.Dataset.from_dict({"a": TEXTS, "b": [""] * len(TEXTS)})
    stream = resolve_calibration(data, [bare_tokenizer()], text_column="a,b")
    batch = next(iter(stream.batches(8)))
    assert batch["attention_mask"].sum(-1).tolist() == [len(t.split()) for t in TEXTS]


def test_a_text_pair_turned_into_no_token_is_worded_for_its_columns():
    """Dataset(sentence1=['', ...], sentence2=['', ...]) as pairs: "columns ... holds" and a hint of `text.strip()`
    whatever the columns were called."""
    data = datasets.Dataset.from_dict({"sentence1": [""] * 4, "sentence2": [" "] * 4})
    stream = resolve_calibration(data, [bare_tokenizer()], text_column="sentence1,sentence2")
    with pytest.raises(CalibrationError) as caught:
        next(iter(stream.batches(4)))
    message = one_line(caught)
    assert "columns 'sentence1' and 'sentence2' of the calibration data hold text" in message, message
    assert "text.strip()" not in message and "row['sentence1'].strip()" in message, message


def test_the_pad_token_refusal_for_a_processor_given_names_its_class_once():
    """merge([bert, bert], texts, processor=<tokenizer without pad token>): "... (processor=, a
    <Class>)'s tokenizer (<Class>) has no pad token" (the class named twice)."""
    model, tokenizer = make_model("bert_cls", 0), no_pad_tokenizer()
    data = datasets.Dataset.from_dict({"text": TEXTS})
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge([model, make_model("bert_cls", 1)], data, method="mudsc", progress=False, processor=tokenizer)
    message = one_line(caught)
    assert message.count(type(tokenizer).__name__) == 1, message


def test_the_pad_token_advice_fits_a_tokenizer_without_an_eos_token():
    """A BERT-like tokenizer without pad and EOS tokens was told `tokenizer.pad_token = tokenizer.eos_token`, which
    sets nothing (its eos_token is None)."""
    model = make_model("bert_cls", 0)
    data = datasets.Dataset.from_dict({"text": TEXTS})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [no_pad_tokenizer()], model_config=model.config)
    message = one_line(caught)
    assert "eos_token" not in message and "tokenizer.add_special_tokens({'pad_token': '[PAD]'})" in message, message
    assert "resize" not in message, message  # '[PAD]' is already in its vocabulary: no new token
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS[1:])}, unk_token="[UNK]"))
    with pytest.raises(CalibrationError) as caught:  # no '[PAD]' in its vocabulary: a new token the models lack
        check_calibration_columns(data, [PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")],
                                  model_config=model.config)
    assert "add_special_tokens" in one_line(caught) and "resize the models' token embeddings" in one_line(caught)
    with_eos = no_pad_tokenizer()
    with_eos.add_special_tokens({"eos_token": "[SEP]"})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [with_eos], model_config=model.config)
    assert "tokenizer.pad_token = tokenizer.eos_token" in one_line(caught)


def test_a_text_column_of_numbers_is_named_before_a_missing_pad_token():
    """check_calibration_columns(Dataset(text=[1, 2, ...]), [tokenizer without pad_token]) blamed the pad token, and
    once one was given, the column of ints."""
    model = make_model("bert_cls", 0)
    data = datasets.Dataset.from_dict({"text": list(range(8))})
    with pytest.raises(CalibrationError) as caught:
        check_calibration_columns(data, [no_pad_tokenizer()], model_config=model.config)
    message = one_line(caught)
    assert "pad" not in message and "'text'" in message and "int64" in message, message


def test_clip_class_prompts_with_a_tokenizer_without_a_pad_token_are_refused_in_one_line():
    """evaluate_merge({'merged': clip}, None, {'t': images}, processor=CLIPProcessor(tokenizer pad_token=None)):
    transformers' bare ValueError 'Asking to pad but the tokenizer does not have a padding token'."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    from hf_mudsc.errors import EvaluationError
    from hf_mudsc.evaluate.harness import evaluate_merge

    vocab = {"<|startoftext|>": 57, "<|endoftext|>": 58, "a</w>": 2, "b</w>": 3, "a": 4, "ab</w>": 6, "<unk>": 1,
             "!": 0}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("a", "b</w>")])
    tokenizer.pad_token = None
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer)
    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    data = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}).cast_column("image", datasets.Image())
    with pytest.raises(EvaluationError) as caught:
        evaluate_merge({"merged": make_model("clip", 1)}, None, {"t": data}, processor=processor,
                       class_names={"t": ["a", "b"]}, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "pad token" in message and "pad_token" in message, message
    assert "Asking to pad" not in message, message
