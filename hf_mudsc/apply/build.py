"""The merged `PreTrainedModel`: parent A's stock transformers class and config with the merged parameters."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from hf_mudsc.load.checks import OUTPUT_SWITCHES, stock_class
from hf_mudsc.load.objects import held_as_given
from hf_mudsc.load.parents import constructor_options
from hf_mudsc.spec import Group, PermutationSpec

logger = logging.getLogger(__name__)


def build_model(
    model_a: PreTrainedModel, config: PretrainedConfig, params: Mapping[str, torch.Tensor]
) -> PreTrainedModel:
    """A model of A's structure with `config`, holding `params` and A's buffers.

    A copy of A keeps constructor choices the config does not record (e.g. `add_pooling_layer=False`);
    a concatenated head changes the classifier's shape, and A of a user's subclass of a transformers class would
    keep the subclass (its `forward`, a class name `from_pretrained` does not know), so those cases build the stock
    class (`stock_class`) from the config. Either way the result is a stock model, as `from_pretrained` gives it: none
    of A's hooks (copied with them held aside), replaced `forward`s or gradient checkpointing (`_as_loaded`), every
    parameter trainable whatever A's `requires_grad` were, eval mode.
    """
    stock = stock_class(type(model_a))
    if stock is type(model_a) and _first_shape_change(model_a, params) is None:
        with held_as_given([model_a]):
            # every module holding A's config (or a sub-config: CLIP's text_config) holds `config`'s in the copy:
            # one config object, as in a built model, so that a setting made on `merged.config` acts
            merged = copy.deepcopy(model_a, memo=_shared_configs(model_a.config, config))
        _as_loaded(merged)
        merged.config = config
    else:
        merged = stock(config, **constructor_options(stock, params))
        _mirror_absent_modules(model_a, merged)
    state = dict(params)
    expected = merged.state_dict().keys()
    for name, buffer in model_a.named_buffers():
        if name in expected:
            state.setdefault(name, buffer)
    missing, unexpected = merged.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"merged state does not fit the model: missing {missing}, unexpected {unexpected}")
    return merged.requires_grad_(True).eval()


def with_stock_outputs(config: PretrainedConfig) -> PretrainedConfig:
    """`config` (changed in place and returned) with transformers' default output switches (`OUTPUT_SWITCHES`), in
    its sub-configs too: the merged config is copied from parent A's, and a parent loaded to return tuples or hidden
    states (`from_pretrained(..., return_dict=False)` sets it on the object, not in its checkpoint) would write that
    into the merged config.json — its folder then returned tuples, and `pipeline(...)` on it failed (a TypeError
    indexing them). The merged model is a stock one; a switch reset is said (set it on the merged model to export)."""
    holders = [config, *(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})]
    reset = []
    for holder in holders:
        if not isinstance(holder, PretrainedConfig):
            continue
        for key, default in OUTPUT_SWITCHES.items():
            if getattr(holder, key, default) != default:
                reset.append(f"{key}={getattr(holder, key)!r}")
                setattr(holder, key, default)
    if reset:
        logger.info("the merged config has transformers' default output switches (parent A's object had %s); set "
                    "them on the merged model's config if you need them (e.g. for torch.jit / ONNX export)",
                    ", ".join(dict.fromkeys(reset)))
    return config


def _shared_configs(given: PretrainedConfig, config: PretrainedConfig) -> dict[int, Any]:
    """A `copy.deepcopy` memo mapping `given` and each of its sub-configs (`text_config`, `vision_config`) to
    `config`'s: the copied modules then hold `config` itself, not a copy of `given` that `merged.config = config`
    would leave behind in them (a stock model's modules share its config)."""
    memo: dict[int, Any] = {id(given): config}
    for key, value in vars(given).items():
        replacement = getattr(config, key, None)
        if isinstance(value, PretrainedConfig) and isinstance(replacement, PretrainedConfig):
            memo.update(_shared_configs(value, replacement))
    return memo


def _as_loaded(merged: PreTrainedModel) -> None:
    """A copy of parent A without what was done to A's object after it was built, which `from_pretrained` would not
    give: every module runs its class's `forward` (a `forward` replaced on A's module — a wrapper, accelerate's
    `add_hook_to_module` — is copied as an attribute, and a wrapper that closes over A's own `forward` would run A's
    weights inside the merged model), and gradient checkpointing is off."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(merged, recurse=True)
    for module in merged.modules():
        vars(module).pop("forward", None)
    # Read from the modules (what transformers' own property reads; its name changed across 5.x releases).
    if any(getattr(module, "gradient_checkpointing", False) is True for module in merged.modules()):
        # `activation_checkpointing_disable` where this transformers has it (the old name warns it will go in v6).
        getattr(merged, "activation_checkpointing_disable", merged.gradient_checkpointing_disable)()


def _mirror_absent_modules(model: PreTrainedModel, merged: PreTrainedModel) -> None:
    """Set to None every submodule of `merged` that is None in `model`: a constructor choice the config does not
    record (`ViTModel(add_pooling_layer=False)`) would otherwise come back when the model is built from its config."""
    for name, _ in list(merged.named_modules()):
        if not name:
            continue
        owner, _, attribute = name.rpartition(".")
        try:
            source = model.get_submodule(owner) if owner else model
        except AttributeError:
            continue
        if hasattr(source, attribute) and getattr(source, attribute) is None:
            setattr(merged.get_submodule(owner) if owner else merged, attribute, None)


def _first_shape_change(model: PreTrainedModel, params: Mapping[str, torch.Tensor]) -> str | None:
    for name, param in model.named_parameters():
        if tuple(params[name].shape) != tuple(param.shape):
            return name
    return None


def widened_config(config: PretrainedConfig, spec: PermutationSpec,
                   params: Mapping[str, torch.Tensor]) -> PretrainedConfig:
    """`config` (changed in place and returned) with each group's width attribute (`Group.width_key`, e.g.
    `intermediate_size` or `vision_config.intermediate_size`) read from the merged tensors: a size budget may have
    widened the MLP groups (docs/design.md §4.12), and the stock class builds its layers from these numbers."""
    for group in spec.groups:
        if group.width_key is None:
            continue
        width = _width(group, params)
        *path, attribute = group.width_key.split(".")
        holder = config
        for name in path:
            holder = getattr(holder, name)
        if getattr(holder, attribute) != width:
            setattr(holder, attribute, width)
    stream = spec.stream
    if stream is not None:  # size_spend="heads"/"residual": the stream grew (head_dim is kept)
        group = spec.groups[spec.group_index(stream.group)]
        width = _width(group, params)
        if width != group.width:
            attention = next(g for g in spec.groups if g.is_attention)
            head_dim = attention.width // attention.num_heads
            heads_width = _width(attention, params)
            setattr(config, stream.heads_key, heads_width // head_dim)
            setattr(config, stream.width_key, width)
            if heads_width != width:  # the stream alone grew: the stock class must not derive head_dim from it
                setattr(config, stream.head_dim_key, head_dim)
    return config


def _width(group: Group, params: Mapping[str, torch.Tensor]) -> int:
    """The group's width in `params` (its first member's unit axis)."""
    member = group.members[0]
    return int(params[member.param].shape[member.axis])
