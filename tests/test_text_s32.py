"""Text inputs after the session-32 text hunt: segment ids (token_type_ids) past the config's type_vocab_size refused
naming both numbers (and text pairs for a one-segment model before any weights), `joint_probabilities` refusing
heads with no softmax rule, and CLIP class prompts cut by the text tower's positions said (refused when the cut leaves
two classes the same prompt)."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from factories import make_model
from test_evaluation import word_tokenizer
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

import hf_mudsc
from hf_mudsc.calibrate.datasets import check_calibration_columns
from hf_mudsc.calibrate.statistics import ModelInputCheck
from hf_mudsc.errors import CalibrationError, EvaluationError

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
BERT = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)


def tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


def sentences(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (5,), generator=generator)) for _ in range(count)]


def pairs(count: int = 16, **extra) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"sentence1": sentences(count, 0), "sentence2": sentences(count, 1), **extra})


def bert_folders(root, type_vocab_size: int) -> list[str]:
    folders = []
    for seed, labels in ((0, ["x", "y", "z"]), (1, ["p", "q", "r"])):
        torch.manual_seed(seed)
        folder = root / f"bert{seed}"
        config = BertConfig(**BERT, type_vocab_size=type_vocab_size, num_labels=3, id2label=dict(enumerate(labels)))
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    return folders


def one_line(caught: pytest.ExceptionInfo, kind: type[Exception]) -> str:
    message = str(caught.value)
    assert isinstance(caught.value, kind) and "\n" not in message, message
    return message


# 1: token_type_ids past type_vocab_size
def test_text_pairs_for_a_model_with_one_segment_type_are_refused_before_reading():
    config = BertConfig(**BERT, type_vocab_size=1)
    for text_column in (None, "sentence1,sentence2"):
        with pytest.raises(CalibrationError) as caught:
            check_calibration_columns(pairs(), [tokenizer()], text_column=text_column, inputs=("input_ids",),
                                      model_config=config)
        message = one_line(caught, CalibrationError)
        assert "type_vocab_size 1" in message and "token_type_ids" in message and "text_column" in message, message
    # one column of the pair, or a model trained on pairs, reads as before
    check_calibration_columns(pairs(), [tokenizer()], text_column="sentence1", inputs=("input_ids",),
                              model_config=config)
    check_calibration_columns(pairs(), [tokenizer()], inputs=("input_ids",),
                              model_config=BertConfig(**BERT, type_vocab_size=2))


def test_merge_and_its_dry_run_refuse_text_pairs_for_one_segment_parents_before_weights(tmp_path, monkeypatch):
    folders = bert_folders(tmp_path, type_vocab_size=1)
    for dry_run in (True, False):
        with pytest.raises(CalibrationError) as caught:
            hf_mudsc.merge(folders, pairs(), method="mudsc", refit="none", progress=False, batch_size=8,
                           dry_run=dry_run)
        message = one_line(caught, CalibrationError)
        assert "type_vocab_size 1" in message and "index out of range" not in message, message


def test_a_batch_with_token_type_ids_past_type_vocab_size_is_refused_naming_both_numbers():
    check = ModelInputCheck.of(BertConfig(**BERT, type_vocab_size=2))
    ids = torch.tensor([[2, 7, 8, 3]])
    check({"input_ids": ids, "token_type_ids": torch.tensor([[0, 0, 1, 1]])})  # within the segments: read
    with pytest.raises(CalibrationError) as caught:
        check({"input_ids": ids, "token_type_ids": torch.tensor([[0, 0, 2, 2]])})
    message = one_line(caught, CalibrationError)
    assert "token_type_ids" in message and "segment id 2" in message and "type_vocab_size 2" in message, message
    evaluation = ModelInputCheck.of(BertConfig(**BERT, type_vocab_size=1), data="evaluation", models="the model",
                                    error=EvaluationError)
    with pytest.raises(EvaluationError) as caught:
        evaluation({"input_ids": ids, "token_type_ids": torch.tensor([[0, 0, 1, 1]])})
    assert "type_vocab_size 1" in one_line(caught, EvaluationError)
    ModelInputCheck.of(BertConfig(**BERT))({"input_ids": ids, "token_type_ids": torch.tensor([[0, 1, 1, 1]])})


def test_merge_of_pre_tokenized_data_with_segment_ids_past_type_vocab_size_names_them(tmp_path):
    folders = bert_folders(tmp_path, type_vocab_size=2)
    encoded = dict(tokenizer()(sentences(16, 2), padding=True))
    encoded["token_type_ids"] = [[2] * len(row) for row in encoded["token_type_ids"]]
    with pytest.raises(CalibrationError) as caught:
        hf_mudsc.merge(folders, datasets.Dataset.from_dict(encoded), method="mudsc", refit="none", progress=False,
                       batch_size=8)
    message = one_line(caught, CalibrationError)
    assert "token_type_ids" in message and "type_vocab_size 2" in message and "index out of range" not in message


def test_evaluate_refuses_text_pairs_for_a_one_segment_model(tmp_path):
    folder = bert_folders(tmp_path, type_vocab_size=1)[0]
    with pytest.raises(EvaluationError) as caught:
        hf_mudsc.evaluate_merge(folder, None, [pairs(label=[0, 1] * 8)], progress=False)
    message = one_line(caught, EvaluationError)
    assert "type_vocab_size 1" in message and "index out of range" not in message, message


# 2: joint_probabilities for heads with no softmax rule
def merged_head_config(**head) -> BertConfig:
    config = BertConfig(**BERT, **head)
    config.task_label_ranges = {"a": [0, config.num_labels // 2], "b": [config.num_labels // 2, config.num_labels]}
    return config


def test_joint_probabilities_refuses_a_multi_label_head_naming_its_sigmoid():
    config = merged_head_config(problem_type="multi_label_classification", num_labels=6)
    logits = torch.randn(3, 6)
    for given in (config, config.to_dict()):
        with pytest.raises(EvaluationError) as caught:
            hf_mudsc.joint_probabilities(logits, given)
        message = one_line(caught, EvaluationError)
        assert "multi-label" in message and "logits.sigmoid()" in message, message


def test_joint_probabilities_refuses_regression_heads():
    logits = torch.randn(3, 2)
    for config in (merged_head_config(problem_type="regression", num_labels=2),
                   BertConfig(**BERT, num_labels=1)):  # one output, no problem_type: transformers' regression
        for given in (config, config.to_dict()):
            with pytest.raises(EvaluationError) as caught:
                hf_mudsc.joint_probabilities(logits[:, :config.num_labels], given)
            message = one_line(caught, EvaluationError)
            assert "regression" in message and "scores" in message, message


def test_joint_probabilities_of_a_softmax_head_or_bare_ranges_is_each_tasks_softmax():
    logits = torch.randn(3, 6)
    expected = torch.cat([logits[:, :3].softmax(-1), logits[:, 3:].softmax(-1)], dim=-1)
    config = merged_head_config(num_labels=6)
    for given in (config, config.to_dict(), {"a": [0, 3], "b": [3, 6]}):
        assert torch.allclose(hf_mudsc.joint_probabilities(logits, given), expected)


# 3: CLIP class prompts cut by the text tower's positions (24 in the factories' tiny CLIP)
def pets() -> datasets.Dataset:
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    features = datasets.Features({"pixel_values": datasets.Array3D((3, 16, 16), "float32"),
                                  "label": datasets.ClassLabel(names=["cat", "dog", "car"])})
    return datasets.Dataset.from_dict({"pixel_values": images.numpy(), "label": [0, 1, 2] * 2}, features=features)


def test_a_template_whose_cut_leaves_classes_the_same_prompt_is_refused_before_scoring():
    template = "a " * 24 + "{}"  # 24 words, the name, <bos> and <eos>: 27 tokens, the name cut off
    with pytest.raises(EvaluationError) as caught:
        hf_mudsc.evaluate_merge(make_model("clip", seed=0), None, {"pets": pets()}, prompt_template=template,
                                processor=word_tokenizer(["cat", "dog", "car", "a"]), progress=False)
    message = one_line(caught, EvaluationError)
    assert repr(template) in message and "27 tokens" in message and "24 positions" in message, message
    assert "'cat'" in message and "'dog'" in message and "prompt_template" in message, message


def test_a_template_cut_without_losing_the_class_names_is_warned_about_once(caplog):
    template = "{} " + "a " * 24
    models = {"first": make_model("clip", seed=0), "second": make_model("clip", seed=1)}
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        result = hf_mudsc.evaluate_merge(models, None, {"pets": pets()}, prompt_template=template,
                                         processor=word_tokenizer(["cat", "dog", "car", "a"]), progress=False)
    said = [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]
    assert len(said) == 1 and repr(template) in said[0] and "27 tokens" in said[0] and "24" in said[0], said
    assert set(result.scores) == {"first", "second"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_mudsc"):
        hf_mudsc.evaluate_merge(models["first"], None, {"pets": pets()}, prompt_template="a photo of a {}",
                                processor=word_tokenizer(["cat", "dog", "car", "a", "photo", "of"]), progress=False)
    assert not [r for r in caplog.records if "positions" in r.getMessage()]
