"""The card's Usage section as a Hub user runs it: its snippet loads the merged model's own class with every weight
(and nothing random)."""

from __future__ import annotations

import re

import pytest
import torch
from factories import BERT, KINDS, fine_tune, make_model, randomize
from huggingface_hub import ModelCard
from transformers import RobertaConfig, RobertaModel, ViTConfig, ViTModel

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
