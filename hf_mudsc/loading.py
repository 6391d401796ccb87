"""Parents from objects or local folders -> float32 `PreTrainedModel`s (safetensors only, no remote code)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

logger = logging.getLogger(__name__)


class LoadError(ValueError):
    """A parent cannot be loaded safely; the message says why and what to do."""


def model_class_for(config) -> type[PreTrainedModel]:
    """The class named in `config.architectures` (the class the checkpoint was saved from)."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise LoadError(
        f"the config names no transformers architecture ({getattr(config, 'architectures', None)!r}); "
        "save the model with save_pretrained so config.json records its class"
    )


def load_model(ref: PreTrainedModel | str | os.PathLike, *, allow_pickle: bool = False) -> PreTrainedModel:
    """A parent as a float32 model in eval mode. Objects are used as they are (never modified)."""
    if isinstance(ref, PreTrainedModel):
        return ref
    if not isinstance(ref, (str, os.PathLike)):
        raise LoadError(f"a parent must be a PreTrainedModel or a folder path, got {type(ref).__name__}")
    path = Path(ref)
    if not path.is_dir():
        raise LoadError(f"no model folder at {str(path)!r}")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    if not has_safetensors and not allow_pickle:
        raise LoadError(
            f"{str(path)!r} has no safetensors weights; pickle checkpoints (pytorch_model.bin) can run arbitrary "
            "code when loaded. Convert it to safetensors, or pass allow_pickle=True if you trust its source"
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    cls = model_class_for(config)
    model = cls.from_pretrained(
        path, dtype=torch.float32, use_safetensors=None if allow_pickle else True, trust_remote_code=False
    )
    return model.eval()
