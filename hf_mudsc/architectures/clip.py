"""CLIP: `CLIPModel` (both towers + the projection space they share), and the single-tower models."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures.registry import register
from hf_mudsc.architectures.templates import BlockNames, Embedding, EncoderTable, encoder_groups, in_cols, linear_out
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Group, HookPoint, Member, PermutationSpec

TEXT_MASK = "attention_mask"

BLOCK = BlockNames(
    layer="encoder.layers.{i}",
    attention="self_attn",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    output="self_attn.out_proj",
    up="mlp.fc1",
    down="mlp.fc2",
    attention_norm="layer_norm1",
    mlp_norm="layer_norm2",
)
TEXT = EncoderTable(
    embeddings=(
        Embedding("embeddings.token_embedding.weight", 1),
        Embedding("embeddings.position_embedding.weight", 1),
    ),
    block=BLOCK,
    final_norm="final_layer_norm",
)
VISION = EncoderTable(
    embeddings=(
        Embedding("embeddings.class_embedding", 0),
        Embedding("embeddings.patch_embedding.weight", 0),
        Embedding("embeddings.position_embedding.weight", 1),
        Embedding("pre_layrnorm.weight", 0),
        Embedding("pre_layrnorm.bias", 0),
    ),
    block=BLOCK,
    final_norm="post_layernorm",
)


@register("clip", "clip_text_model", "clip_vision_model")
def clip_spec(model: nn.Module) -> PermutationSpec:
    params = dict(model.named_parameters())
    config = model.config
    groups: list[Group] = []
    blocks: list[Group] = []
    projection_members: list[Member] = []
    projection_hooks: list[HookPoint] = []

    # CLIPForImageClassification: a head on the mean of the vision tokens (with num_labels=0 an nn.Identity, no
    # tensor: known by its class then)
    if "classifier.weight" in params or type(model).__name__ == "CLIPForImageClassification":
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported (a classifier over the vision tower's mean patch token, which "
            "the CLIP adapter does not match); use CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection / "
            "CLIPTextModel / CLIPTextModelWithProjection")
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
        residual, tower_blocks = encoder_groups(
            TEXT if text else VISION, prefix, num_layers=tower_config.num_hidden_layers,
            width=tower_config.hidden_size, num_heads=tower_config.num_attention_heads,
            intermediate=tower_config.intermediate_size, params=params, mask=TEXT_MASK if text else None,
            config_prefix="" if tower_config is config else f"{kind}_config.")
        projection = "text_projection" if text else "visual_projection"
        if f"{projection}.weight" in params:
            residual += in_cols(f"{projection}.weight")
            hook = HookPoint(projection, "input", per_example=True)
            projection_members += linear_out(projection, bias=f"{projection}.bias" in params)
            projection_hooks.append(HookPoint(projection, "output", per_example=True))
        elif text:
            hook = HookPoint(prefix.rstrip("."), "output", attr="pooler_output", per_example=True)
        else:
            hook = HookPoint(f"{prefix}post_layernorm", "input", per_example=True)
        groups.append(Group(name=f"{kind}.residual", width=tower_config.hidden_size, members=tuple(residual),
                            hooks=(hook,)))
        blocks += tower_blocks
    if projection_members:
        width = params[projection_members[0].param].shape[0]
        groups.append(Group(name="projection", width=width, members=tuple(projection_members),
                            hooks=tuple(projection_hooks)))
    averaged = tuple(name for name in ("logit_scale",) if name in params)
    inputs = tuple("pixel_values" if kind == "vision" else "input_ids" for kind, _, _ in towers)
    max_tokens = next((c.max_position_embeddings for kind, _, c in towers if kind == "text"), None)
    return PermutationSpec(groups=tuple(groups + blocks), averaged=averaged, family="clip", inputs=inputs,
                           max_tokens=max_tokens)
