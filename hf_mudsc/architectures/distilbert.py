"""DistilBERT (`DistilBertModel`, `DistilBertForSequenceClassification`): BERT's post-LN encoder under other names,
no segment embeddings, and a head on the first token (pre_classifier -> ReLU -> classifier)."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures.registry import register
from hf_mudsc.architectures.templates import (
    BlockNames,
    Embedding,
    EncoderTable,
    encoder_groups,
    first_token_head,
    refuse_labelless_head,
)
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, PermutationSpec

MASK = "attention_mask"
USE = "DistilBertModel or DistilBertForSequenceClassification"

DISTILBERT = EncoderTable(
    embeddings=(
        Embedding("embeddings.word_embeddings.weight", 1),
        Embedding("embeddings.position_embeddings.weight", 1),
        Embedding("embeddings.LayerNorm.weight", 0),
        Embedding("embeddings.LayerNorm.bias", 0),
    ),
    block=BlockNames(
        layer="transformer.layer.{i}",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        up="ffn.lin1",
        down="ffn.lin2",
        attention_norm="sa_layer_norm",
        mlp_norm="output_layer_norm",
        post_norm=True,
    ),
)


@register("distilbert")
def distilbert_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    params = dict(model.named_parameters())
    prefix = "distilbert." if "distilbert.embeddings.word_embeddings.weight" in params else ""
    if f"{prefix}embeddings.word_embeddings.weight" not in params:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like a DistilBERT this adapter knows")
    from transformers import DistilBertForMultipleChoice

    if isinstance(model, DistilBertForMultipleChoice):  # the sequence classifier's head, other inputs
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported (a score per choice, read from inputs of shape (batch, choices, "
            f"tokens)); use {USE}")
    has_head = "classifier.weight" in params and "pre_classifier.weight" in params
    if has_head and params["classifier.weight"].shape[0] == 0:
        refuse_labelless_head(type(model).__name__, "DistilBertModel")
    if prefix and not has_head:
        raise UnsupportedArchitectureError(f"{type(model).__name__} is not supported; use {USE}")
    width = config.dim
    # The MLP width is `hidden_dim` in DistilBERT's config (`dim` is the stream's).
    residual, groups = encoder_groups(DISTILBERT, prefix, num_layers=config.n_layers, width=width,
                                      num_heads=config.n_heads, intermediate=config.hidden_dim, params=params,
                                      mask=MASK, intermediate_key="hidden_dim")
    if has_head:
        # The head reads the first token: pre_classifier -> ReLU -> classifier. Its hidden layer is one more unit
        # space, as RoBERTa's classifier.dense.
        head, hook, hidden = first_token_head("pre_classifier", "classifier", width)
        residual += head
        groups.append(hidden)
    else:
        hook = HookPoint(f"{prefix}transformer.layer.{config.n_layers - 1}.output_layer_norm", "output", mask=MASK)
    residual_group = Group(name="residual", width=width, members=tuple(residual), hooks=(hook,))
    classifier = Classifier("classifier.weight", "classifier.bias") if has_head else None
    return PermutationSpec(groups=(residual_group, *groups), classifier=classifier, family="distilbert",
                           averaged=("classifier.bias",) if has_head else (), inputs=("input_ids",),
                           max_tokens=config.max_position_embeddings)
