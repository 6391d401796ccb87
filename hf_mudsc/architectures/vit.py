"""ViT (`ViTModel`, `ViTForImageClassification`), on transformers 5's in-memory module names."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures.registry import register
from hf_mudsc.architectures.templates import (
    BlockNames,
    Embedding,
    EncoderTable,
    encoder_groups,
    in_cols,
    linear_out,
    refuse_labelless_head,
)
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, PermutationSpec, Stream

VIT = EncoderTable(
    embeddings=(
        Embedding("embeddings.cls_token", 2),
        Embedding("embeddings.position_embeddings", 2),
        Embedding("embeddings.patch_embeddings.projection.weight", 0),
        Embedding("embeddings.patch_embeddings.projection.bias", 0),
        Embedding("embeddings.mask_token", 2, optional=True),
    ),
    block=BlockNames(
        layer="layers.{i}",
        attention="attention",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        output="attention.o_proj",
        up="mlp.fc1",
        down="mlp.fc2",
        attention_norm="layernorm_before",
        mlp_norm="layernorm_after",
    ),
    final_norm="layernorm",
)


@register("vit")
def vit_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    params = dict(model.named_parameters())
    prefix = "vit." if "vit.embeddings.cls_token" in params else ""
    if f"{prefix}embeddings.cls_token" not in params:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like a ViT this adapter knows")
    has_classifier = "classifier.weight" in params
    has_pooler = f"{prefix}pooler.dense.weight" in params
    if prefix and not has_classifier and isinstance(getattr(model, "classifier", None), nn.Identity):
        refuse_labelless_head(type(model).__name__, "ViTModel")  # transformers' num_labels=0 head
    if has_classifier and params["classifier.weight"].shape[0] == 0:
        refuse_labelless_head(type(model).__name__, "ViTModel")
    if prefix and not has_classifier:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported; use ViTModel or ViTForImageClassification"
        )
    width = config.hidden_size
    head_dim = getattr(config, "head_dim", None)  # pinned by a size_spend="residual" merge (docs/design.md §4.12)
    residual, blocks = encoder_groups(VIT, prefix, num_layers=config.num_hidden_layers, width=width,
                                      num_heads=config.num_attention_heads, intermediate=config.intermediate_size,
                                      params=params,
                                      attention_width=config.num_attention_heads * head_dim if head_dim else None)
    groups: list[Group] = []
    tail: list[Group] = []
    if has_classifier:
        residual += in_cols("classifier.weight")
        hook = HookPoint("classifier", "input", per_example=True)
    elif has_pooler:
        residual += in_cols(f"{prefix}pooler.dense.weight")
        hook = HookPoint(f"{prefix}pooler.dense", "input", per_example=True)
        tail.append(
            Group(
                name=f"{prefix}pooler",
                width=params[f"{prefix}pooler.dense.weight"].shape[0],
                members=tuple(linear_out(f"{prefix}pooler.dense")),
                hooks=(HookPoint(f"{prefix}pooler", "output", per_example=True),),
            )
        )
    else:
        hook = HookPoint(f"{prefix}layernorm", "output")
    groups.append(Group(name="residual", width=width, members=tuple(residual), hooks=(hook,)))
    groups += blocks + tail
    classifier = Classifier("classifier.weight", "classifier.bias") if has_classifier else None
    averaged = ("classifier.bias",) if has_classifier else ()
    return PermutationSpec(groups=tuple(groups), averaged=averaged, classifier=classifier, family="vit",
                           inputs=("pixel_values",), stream=Stream())
