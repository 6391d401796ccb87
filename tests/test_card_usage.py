"""The card's Usage section as a Hub user runs it: its snippet loads the merged model's own class with every weight
(and nothing random), and tells how to read the head the merge made (softmax classes, regression scores or
per-label sigmoids)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from factories import BERT, KINDS, fine_tune, make_batches, make_model, randomize
from huggingface_hub import ModelCard
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaModel, ViTConfig, ViTModel

import hf_mudsc
from hf_mudsc.publish.card import render_card, usage_model_arguments
from hf_mudsc.publish.recipe import Recipe

# Every supported class (the factories' table) and the pooler-less RoBERTa encoder the table has no row for.
SNIPPET_KINDS = (*KINDS, "roberta_nopool")


def _parent(kind: str) -> torch.nn.Module:
    if kind == "roberta_nopool":
        torch.manual_seed(0)
        return randomize(RobertaModel(RobertaConfig(**BERT), add_pooling_layer=False), 0)
    return make_model(kind, 0)


def usage_blocks(text: str) -> list[str]:
    """The Python code blocks of the card's Usage section, in order."""
    usage = re.search(r"^## Usage\n(.*?)(?=^## )", text, re.S | re.M).group(1)
    return re.findall(r"```python\n(.*?)```", usage, re.S)


def run_snippet(code: str, folder, **namespace) -> dict:
    """Run one of the card's snippets as written, on `folder` (the card names no repo: `path/to/this/model`)."""
    exec(code.replace("path/to/this/model", str(folder)), namespace)  # noqa: S102 - the card's own snippet
    return namespace


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", SNIPPET_KINDS)
def test_the_usage_snippet_loads_the_merged_class_with_every_weight(kind, one_thread, tmp_path):
    """`AutoModel` loads a CLIP tower with projection as the tower without it (the projection dropped, no
    `image_embeds`), and an encoder saved without its pooler with a random one: the snippet must rebuild the merged
    model itself — its class, its weights, nothing missing, unexpected or randomly initialised."""
    parent = _parent(kind)
    merged = hf_mudsc.merge([parent, fine_tune(parent, 1, 0.01)], method="linear", progress=False)
    folder = hf_mudsc.save_merged(merged, tmp_path / "merged")
    loaded = run_snippet(usage_blocks(ModelCard.load(folder / "README.md").text)[0], folder)["model"]
    assert type(loaded) is type(merged)
    expected, got = merged.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_a_pooler_less_encoders_card_says_to_load_it_without_a_pooler(one_thread):
    parent = _parent("roberta_nopool")
    merged = hf_mudsc.merge([parent, fine_tune(parent, 1, 0.01)], method="linear", progress=False)
    text = str(render_card(merged, Recipe(models=["org/a", "org/b"], calibration="c")))
    assert 'from_pretrained("path/to/this/model", add_pooling_layer=False)' in usage_blocks(text)[0]
    assert re.search(r"no pooler.*`add_pooling_layer=False`", text, re.S)


def test_constructor_arguments_no_config_records_are_passed_by_the_snippet():
    """What `from_pretrained` cannot read from `config.json`: the pooler left out, a ViT's mask token kept."""
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                       image_size=16, patch_size=4, num_channels=1)
    assert usage_model_arguments(ViTModel(config)) == {}
    assert usage_model_arguments(ViTModel(config, add_pooling_layer=False, use_mask_token=True)) == {
        "add_pooling_layer": False, "use_mask_token": True}
    assert usage_model_arguments(make_model("bert_cls")) == {}


def _bert(labels: list[str], problem_type: str, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(**BERT, num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={label: i for i, label in enumerate(labels)}, problem_type=problem_type)
    return randomize(BertForSequenceClassification(config), seed)


HEADS = {"multi_label": ("multi_label_classification", ["a", "b", "c"], ["x", "y"]),
         "regression": ("regression", ["score_a"], ["score_b"])}


@pytest.fixture(scope="module")
def head_cards(one_thread, tmp_path_factory):
    """Per head kind: (merged model, the folder save_merged wrote); merged by MuDSC with its default refit gate."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        cards = {}
        for kind, (problem_type, labels_a, labels_b) in HEADS.items():
            merged = hf_mudsc.merge([_bert(labels_a, problem_type, 0), _bert(labels_b, problem_type, 1)],
                                    make_batches("bert_cls", num_batches=2), method="mudsc", progress=False)
            cards[kind] = merged, hf_mudsc.save_merged(merged, tmp_path_factory.mktemp(kind) / "merged")
        return cards
    finally:
        transformers.logging.set_verbosity(previous)


@pytest.mark.parametrize("kind", HEADS)
def test_regression_and_multi_label_cards_describe_no_softmax_or_argmax_rule(head_cards, kind):
    """An argmax over a regression slice (one output) is always 0, and sigmoid-per-label heads pick no one label:
    neither card may tell the user to take a slice's argmax, each task's softmax or the joint rule."""
    _, folder = head_cards[kind]
    text = ModelCard.load(folder / "README.md").text
    for rule in ("argmax within", "taking the argmax", ".argmax(", "softmax over its own slice", "each task's softmax",
                 "joint_probabilities", "--joint-rule"):
        assert rule not in text
    assert "no softmax or argmax applies" in text
    if kind == "regression":
        assert re.search(r"score.*one output per task", text, re.S)
    else:
        assert re.search(r"sigmoid.*threshold", text, re.S)


def test_a_regression_cards_snippet_gives_each_tasks_score(head_cards):
    merged, folder = head_cards["regression"]
    inputs = make_batches("bert_cls", num_batches=1, seed=5)[0]
    first, second = usage_blocks(ModelCard.load(folder / "README.md").text)
    namespace = run_snippet(second, folder, **run_snippet(first, folder), inputs=inputs)
    with torch.no_grad():
        logits = merged(**inputs).logits
    assert sorted(namespace["scores"]) == ["task_a", "task_b"]
    assert torch.allclose(namespace["scores"]["task_a"], logits[:, 0])
    assert torch.allclose(namespace["scores"]["task_b"], logits[:, 1])


def test_a_multi_label_cards_snippet_gives_each_label_past_the_threshold(head_cards):
    merged, folder = head_cards["multi_label"]
    inputs = make_batches("bert_cls", num_batches=1, seed=5)[0]
    first, second = usage_blocks(ModelCard.load(folder / "README.md").text)
    namespace = run_snippet(second, folder, **run_snippet(first, folder), inputs=inputs)
    with torch.no_grad():
        past = merged(**inputs).logits.sigmoid() > 0.5
    names = merged.config.id2label
    assert namespace["labels"] == [[names[i] for i in range(len(names)) if row[i]] for row in past]
