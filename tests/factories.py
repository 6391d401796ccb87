"""Tiny random models of every supported architecture, random calibration batches, and spec permutations.

Norm parameters and biases are randomised too: default LayerNorm weights (all ones) would make the
permuted-copy tests blind to a norm left out of its group.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from hf_mudsc.spec import PermutationSpec
from hf_mudsc.testing.permute import permute_model, random_permutations  # noqa: F401 (re-exported)

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
           patch_size=4, num_channels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TEXT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=24, projection_dim=24, bos_token_id=57, eos_token_id=58, pad_token_id=0)
VISION = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, intermediate_size=56, image_size=16,
              patch_size=4, num_channels=3, projection_dim=24)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() <= 1 and ("norm" in name.lower() or "LayerNorm" in name or name.endswith("bias")):
                scale = 0.3 if name.endswith("weight") else 0.1
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + scale * torch.randn(param.shape, generator=generator))
            elif name.endswith("logit_scale"):
                continue
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def make_model(kind: str, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "vit_cls":
        model = ViTForImageClassification(ViTConfig(**VIT, num_labels=num_labels))
    elif kind == "vit":
        model = ViTModel(ViTConfig(**VIT))
    elif kind == "vit_nopool":
        model = ViTModel(ViTConfig(**VIT), add_pooling_layer=False)
    elif kind == "bert_cls":
        model = BertForSequenceClassification(BertConfig(**BERT, num_labels=num_labels))
    elif kind == "bert":
        model = BertModel(BertConfig(**BERT))
    elif kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))
    elif kind == "clip_text":
        model = CLIPTextModel(CLIPTextConfig(**TEXT))
    elif kind == "clip_text_proj":
        model = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT))
    elif kind == "clip_vision":
        model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    elif kind == "clip_vision_proj":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION))
    else:
        raise KeyError(kind)
    return randomize(model, seed)


def make_batches(kind: str, num_batches: int = 4, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """Random inputs; text batches carry padding so masking is exercised."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        batch: dict[str, torch.Tensor] = {}
        if kind.startswith("vit"):
            batch["pixel_values"] = torch.randn(batch_size, 1, 16, 16, generator=generator)
        if kind.startswith("clip") and "text" not in kind:
            batch["pixel_values"] = torch.randn(batch_size, 3, 16, 16, generator=generator)
        if kind.startswith("bert") or (kind.startswith("clip") and "vision" not in kind):
            length = 12
            ids = torch.randint(1, 56, (batch_size, length), generator=generator)
            lengths = torch.randint(4, length + 1, (batch_size,), generator=generator)
            mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
            if kind.startswith("clip"):
                ids[torch.arange(batch_size), lengths - 1] = TEXT["eos_token_id"]
            ids = ids * mask
            batch["input_ids"] = ids
            batch["attention_mask"] = mask
        batches.append(batch)
    return batches


def _gram(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`X Xᵀ` over samples: invariant under any permutation of the feature units."""
    if features.dim() == 3:
        if mask is not None:
            features = features[mask.bool()]
        else:
            features = features.reshape(-1, features.shape[-1])
    return features @ features.T


def model_output(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """What a test compares: logits, or — for bare models, whose outputs live in their own unit basis —
    Gram matrices of their output features, which any unit permutation leaves unchanged."""
    with torch.no_grad():
        out = model(**batch)
    for attr in ("logits", "logits_per_image"):
        value = getattr(out, attr, None)
        if value is not None:
            return value
    mask = batch.get("attention_mask")
    parts = []
    for attr in ("text_embeds", "image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(out, attr, None)
        if value is not None:
            use_mask = mask if value.dim() == 3 and "input_ids" in batch else None
            parts.append(_gram(value, use_mask).flatten())
    return torch.cat(parts)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def permuted_copy(model: torch.nn.Module, spec: PermutationSpec, seed: int) -> torch.nn.Module:
    """A copy whose unit j of every group is the original's unit perm[j] (same function, other basis)."""
    return permute_model(model, spec, random_permutations(spec, seed))


def with_new_head(model: torch.nn.Module, num_labels: int, seed: int) -> torch.nn.Module:
    """A copy of a `*ForXClassification` model whose classifier is a fresh random `num_labels`-way head.

    Everything but the classifier is `model`'s: the pair shares its body, so a merge that finds the right
    units must reproduce both parents' logits on their own slices of the concatenated head.
    """
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    config.id2label = {i: f"class_{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    clone = type(model)(config)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = clone.load_state_dict(body, strict=False)
    assert not unexpected and set(missing) == {"classifier.weight", "classifier.bias"}, (missing, unexpected)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clone.classifier.weight.copy_(0.2 * torch.randn(clone.classifier.weight.shape, generator=generator))
        clone.classifier.bias.copy_(0.1 * torch.randn(clone.classifier.bias.shape, generator=generator))
    return clone.eval()
