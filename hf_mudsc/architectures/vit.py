"""ViT (`ViTModel`, `ViTForImageClassification`), on transformers 5's in-memory module names."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures import register
from hf_mudsc.architectures.templates import attention_groups, in_cols, linear_out, mlp_group, norm
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, Member, PermutationSpec


@register("vit")
def vit_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    params = dict(model.named_parameters())
    prefix = "vit." if "vit.embeddings.cls_token" in params else ""
    if f"{prefix}embeddings.cls_token" not in params:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like a ViT this adapter knows")
    has_classifier = "classifier.weight" in params
    has_pooler = f"{prefix}pooler.dense.weight" in params
    if prefix and not has_classifier:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported; use ViTModel or ViTForImageClassification"
        )
    width, heads = config.hidden_size, config.num_attention_heads

    embeddings = f"{prefix}embeddings"
    residual = [
        Member(f"{embeddings}.cls_token", 2, "out"),
        Member(f"{embeddings}.position_embeddings", 2, "out"),
        *linear_out(f"{embeddings}.patch_embeddings.projection"),
    ]
    if f"{embeddings}.mask_token" in params:
        residual.append(Member(f"{embeddings}.mask_token", 2, "out"))
    blocks: list[Group] = []
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}layers.{i}"
        attn = f"{layer}.attention"
        residual += norm(f"{layer}.layernorm_before")
        residual += in_cols(f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")
        residual += linear_out(f"{attn}.o_proj")
        residual += norm(f"{layer}.layernorm_after")
        residual += in_cols(f"{layer}.mlp.fc1.weight")
        residual += linear_out(f"{layer}.mlp.fc2")
        blocks += attention_groups(
            attn,
            query=f"{attn}.q_proj",
            key=f"{attn}.k_proj",
            value=f"{attn}.v_proj",
            output=f"{attn}.o_proj",
            width=width,
            num_heads=heads,
        )
        blocks.append(mlp_group(layer, up=f"{layer}.mlp.fc1", down=f"{layer}.mlp.fc2",
                                width=config.intermediate_size))
    residual += norm(f"{prefix}layernorm")

    groups: list[Group] = []
    tail: list[Group] = []
    if has_classifier:
        residual += in_cols("classifier.weight")
        hook = HookPoint("classifier", "input")
    elif has_pooler:
        residual += in_cols(f"{prefix}pooler.dense.weight")
        hook = HookPoint(f"{prefix}pooler.dense", "input")
        tail.append(
            Group(
                name=f"{prefix}pooler",
                width=params[f"{prefix}pooler.dense.weight"].shape[0],
                members=tuple(linear_out(f"{prefix}pooler.dense")),
                hooks=(HookPoint(f"{prefix}pooler", "output"),),
            )
        )
    else:
        hook = HookPoint(f"{prefix}layernorm", "output")
    groups.append(Group(name="residual", width=width, members=tuple(residual), hooks=(hook,)))
    groups += blocks + tail
    classifier = Classifier("classifier.weight", "classifier.bias") if has_classifier else None
    averaged = ("classifier.bias",) if has_classifier else ()
    return PermutationSpec(groups=tuple(groups), averaged=averaged, classifier=classifier, family="vit",
                           inputs=("pixel_values",))
