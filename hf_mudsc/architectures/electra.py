"""ELECTRA (`ElectraModel`, `ElectraForSequenceClassification`): BERT's encoder and RoBERTa's kind of head.

Only ELECTRA-base's and -large's layout (`embedding_size == hidden_size`). ELECTRA-small's embeddings are narrower
and projected into the stream (`embeddings_project`): a unit space of their own, the stream's only tie to the
vocabulary, and Git Re-Basin's weight-only matching (`weight_matching`) then does not find a permuted copy's units
again (0.30 of the objective against 1.0 on a tiny model), so that layout is refused until a method handles it."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures.bert import BERT, MASK
from hf_mudsc.architectures.registry import register
from hf_mudsc.architectures.templates import (
    check_encoder_config,
    encoder_groups,
    first_token_head,
    refuse_labelless_head,
)
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, PermutationSpec

USE = "ElectraModel (the discriminator) or ElectraForSequenceClassification"


@register("electra")
def electra_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    params = dict(model.named_parameters())
    prefix = "electra." if "electra.embeddings.word_embeddings.weight" in params else ""
    if f"{prefix}embeddings.word_embeddings.weight" not in params:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like an ELECTRA this adapter knows")
    check_encoder_config(type(model).__name__, config, params, family="ELECTRA", use=USE)
    has_head = "classifier.out_proj.weight" in params and "classifier.dense.weight" in params
    if has_head and params["classifier.out_proj.weight"].shape[0] == 0:
        refuse_labelless_head(type(model).__name__, "ElectraModel")
    if prefix and not has_head:  # the pre-training heads, token classification, multiple choice, QA
        raise UnsupportedArchitectureError(f"{type(model).__name__} is not supported; use {USE}")
    if f"{prefix}embeddings_project.weight" in params:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} projects its embeddings into the encoder (embedding_size "
            f"{config.embedding_size} != hidden_size {config.hidden_size}, ELECTRA-small's layout), which hf_mudsc "
            "does not merge; ELECTRA models whose embedding_size equals hidden_size (ELECTRA-base, -large) merge")
    width = config.hidden_size
    residual, groups = encoder_groups(BERT, prefix, num_layers=config.num_hidden_layers, width=width,
                                      num_heads=config.num_attention_heads, intermediate=config.intermediate_size,
                                      params=params, mask=MASK)
    if has_head:
        # The head reads the first token: dense -> GELU -> out_proj. Its hidden layer is one more unit space.
        head, hook, hidden = first_token_head("classifier.dense", "classifier.out_proj", width)
        residual += head
        groups.append(hidden)
    else:
        hook = HookPoint(f"{prefix}encoder.layer.{config.num_hidden_layers - 1}.output.LayerNorm", "output", mask=MASK)
    residual_group = Group(name="residual", width=width, members=tuple(residual), hooks=(hook,))
    classifier = Classifier("classifier.out_proj.weight", "classifier.out_proj.bias") if has_head else None
    return PermutationSpec(groups=(residual_group, *groups), classifier=classifier, family="electra",
                           averaged=("classifier.out_proj.bias",) if has_head else (), inputs=("input_ids",),
                           max_tokens=config.max_position_embeddings)
