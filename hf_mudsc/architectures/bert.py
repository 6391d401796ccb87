"""BERT (`BertModel`, `BertForSequenceClassification`): post-LN, padding masked out of statistics."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures.registry import register
from hf_mudsc.architectures.templates import (
    BlockNames,
    Embedding,
    EncoderTable,
    check_encoder_config,
    encoder_groups,
    in_cols,
    linear_out,
    refuse_labelless_head,
)
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, PermutationSpec

MASK = "attention_mask"

BERT = EncoderTable(
    embeddings=(
        Embedding("embeddings.word_embeddings.weight", 1),
        Embedding("embeddings.position_embeddings.weight", 1),
        Embedding("embeddings.token_type_embeddings.weight", 1),
        Embedding("embeddings.LayerNorm.weight", 0),
        Embedding("embeddings.LayerNorm.bias", 0),
    ),
    block=BlockNames(
        layer="encoder.layer.{i}",
        attention="attention",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        output="attention.output.dense",
        up="intermediate.dense",
        down="output.dense",
        attention_norm="attention.output.LayerNorm",
        mlp_norm="output.LayerNorm",
        post_norm=True,
    ),
)


@register("bert")
def bert_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    params = dict(model.named_parameters())
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in params else ""
    if f"{prefix}embeddings.word_embeddings.weight" not in params:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like a BERT this adapter knows")
    check_encoder_config(type(model).__name__, config, params, family="BERT",
                         use="BertModel or BertForSequenceClassification")
    has_classifier = "classifier.weight" in params
    if has_classifier and params["classifier.weight"].shape[0] == 0:
        refuse_labelless_head(type(model).__name__, "BertModel")
    if prefix and not has_classifier:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported; use BertModel or BertForSequenceClassification"
        )
    from transformers import BertForMultipleChoice

    if isinstance(model, BertForMultipleChoice):  # a sequence classifier's pooler and classifier, other inputs
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported (a score per choice, read from inputs of shape (batch, choices, "
            "tokens)); use BertModel or BertForSequenceClassification"
        )
    has_pooler = f"{prefix}pooler.dense.weight" in params
    width = config.hidden_size
    residual, blocks = encoder_groups(BERT, prefix, num_layers=config.num_hidden_layers, width=width,
                                      num_heads=config.num_attention_heads, intermediate=config.intermediate_size,
                                      params=params, mask=MASK)
    tail: list[Group] = []
    if has_pooler:
        residual += in_cols(f"{prefix}pooler.dense.weight")
        hook = HookPoint(f"{prefix}pooler.dense", "input", per_example=True)
        pooler = list(linear_out(f"{prefix}pooler.dense"))
        if has_classifier:
            pooler += in_cols("classifier.weight")
        tail.append(Group(name=f"{prefix}pooler", width=width, members=tuple(pooler),
                          hooks=(HookPoint(f"{prefix}pooler", "output", per_example=True),)))
    elif has_classifier:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported (a classifier without the pooler this adapter "
            "matches); use BertModel or BertForSequenceClassification"
        )
    else:
        last = f"{prefix}encoder.layer.{config.num_hidden_layers - 1}.output.LayerNorm"
        hook = HookPoint(last, "output", mask=MASK)
    groups = [Group(name="residual", width=width, members=tuple(residual), hooks=(hook,)), *blocks, *tail]
    classifier = Classifier("classifier.weight", "classifier.bias") if has_classifier else None
    averaged = ("classifier.bias",) if has_classifier else ()
    return PermutationSpec(groups=tuple(groups), averaged=averaged, classifier=classifier, family="bert",
                           inputs=("input_ids",), max_tokens=config.max_position_embeddings)
