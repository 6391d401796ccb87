"""CLIP: `CLIPModel` (both towers + the projection space they share), and the single-tower models."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures import register
from hf_mudsc.architectures.templates import attention_groups, in_cols, linear_out, mlp_group, norm
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

TEXT_MASK = "attention_mask"


def _tower(prefix: str, config, *, text: bool) -> tuple[list[Member], list[Group]]:
    """Residual members and block groups of one tower (`prefix` ends with '.' or is empty)."""
    emb = f"{prefix}embeddings"
    mask = TEXT_MASK if text else None
    if text:
        residual = [Member(f"{emb}.token_embedding.weight", 1, "out"),
                    Member(f"{emb}.position_embedding.weight", 1, "out")]
    else:
        residual = [Member(f"{emb}.class_embedding", 0, "out"),
                    Member(f"{emb}.patch_embedding.weight", 0, "out"),
                    Member(f"{emb}.position_embedding.weight", 1, "out"),
                    *norm(f"{prefix}pre_layrnorm")]
    blocks: list[Group] = []
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layers.{i}"
        attn = f"{layer}.self_attn"
        residual += norm(f"{layer}.layer_norm1")
        residual += in_cols(f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")
        residual += linear_out(f"{attn}.out_proj")
        residual += norm(f"{layer}.layer_norm2")
        residual += in_cols(f"{layer}.mlp.fc1.weight")
        residual += linear_out(f"{layer}.mlp.fc2")
        blocks += attention_groups(attn, query=f"{attn}.q_proj", key=f"{attn}.k_proj", value=f"{attn}.v_proj",
                                   output=f"{attn}.out_proj", width=config.hidden_size,
                                   num_heads=config.num_attention_heads, mask=mask)
        blocks.append(mlp_group(layer, up=f"{layer}.mlp.fc1", down=f"{layer}.mlp.fc2",
                                width=config.intermediate_size, mask=mask))
    residual += norm(f"{prefix}final_layer_norm" if text else f"{prefix}post_layernorm")
    return residual, blocks


@register("clip", "clip_text_model", "clip_vision_model")
def clip_spec(model: nn.Module) -> PermutationSpec:
    params = dict(model.named_parameters())
    config = model.config
    groups: list[Group] = []
    blocks: list[Group] = []
    projection_members: list[Member] = []
    projection_hooks: list[HookPoint] = []

    towers = []
    if "vision_model.embeddings.class_embedding" in params:
        towers.append(("vision", "vision_model.", getattr(config, "vision_config", config)))
    elif "embeddings.class_embedding" in params:
        towers.append(("vision", "", config))
    if "text_model.embeddings.token_embedding.weight" in params:
        towers.append(("text", "text_model.", getattr(config, "text_config", config)))
    elif "embeddings.token_embedding.weight" in params:
        towers.append(("text", "", config))
    if not towers:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like a CLIP this adapter knows")

    for kind, prefix, tower_config in towers:
        text = kind == "text"
        residual, tower_blocks = _tower(prefix, tower_config, text=text)
        projection = "text_projection" if text else "visual_projection"
        if f"{projection}.weight" in params:
            residual += in_cols(f"{projection}.weight")
            hook = HookPoint(projection, "input")
            projection_members += linear_out(projection, bias=f"{projection}.bias" in params)
            projection_hooks.append(HookPoint(projection, "output"))
        elif text:
            hook = HookPoint(prefix.rstrip("."), "output", attr="pooler_output")
        else:
            hook = HookPoint(f"{prefix}post_layernorm", "input")
        groups.append(Group(name=f"{kind}.residual", width=tower_config.hidden_size, members=tuple(residual),
                            hooks=(hook,)))
        blocks += tower_blocks
    if projection_members:
        width = params[projection_members[0].param].shape[0]
        groups.append(Group(name="projection", width=width, members=tuple(projection_members),
                            hooks=tuple(projection_hooks)))
    averaged = tuple(name for name in ("logit_scale",) if name in params)
    inputs = tuple("pixel_values" if kind == "vision" else "input_ids" for kind, _, _ in towers)
    return PermutationSpec(groups=tuple(groups + blocks), averaged=averaged, family="clip", inputs=inputs)
