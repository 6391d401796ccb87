"""The merged `PreTrainedModel`: parent A's class and config with the merged parameters."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from transformers import PretrainedConfig, PreTrainedModel


def build_model(
    model_a: PreTrainedModel, config: PretrainedConfig, params: Mapping[str, torch.Tensor]
) -> PreTrainedModel:
    """A model of A's structure with `config`, holding `params` and A's buffers.

    A copy of A keeps constructor choices the config does not record (e.g. `add_pooling_layer=False`);
    a concatenated head changes the classifier's shape, so that case builds from the config.
    """
    if _first_shape_change(model_a, params) is None:
        merged = copy.deepcopy(model_a)
        merged.config = config
    else:
        merged = type(model_a)(config)
    state = dict(params)
    expected = merged.state_dict().keys()
    for name, buffer in model_a.named_buffers():
        if name in expected:
            state.setdefault(name, buffer)
    missing, unexpected = merged.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"merged state does not fit the model: missing {missing}, unexpected {unexpected}")
    return merged.eval()


def _first_shape_change(model: PreTrainedModel, params: Mapping[str, torch.Tensor]) -> str | None:
    for name, param in model.named_parameters():
        if tuple(params[name].shape) != tuple(param.shape):
            return name
    return None
