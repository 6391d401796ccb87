"""Tiny random models of every supported architecture (one table, `ROWS`), random batches, and permutations.

Norm parameters and biases are randomised too: default LayerNorm weights (all ones) would make the
permuted-copy tests blind to a norm left out of its group.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

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
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
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
DISTILBERT = dict(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=24,
                  dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
ELECTRA = dict(BERT, embedding_size=BERT["hidden_size"])  # ELECTRA-base's layout: no embeddings_project
VISION = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=2, intermediate_size=56, image_size=16,
              patch_size=4, num_channels=3, projection_dim=24)

BatchPart = Callable[[torch.Generator, int], dict[str, torch.Tensor]]


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


def fine_tune(model: torch.nn.Module, seed: int, scale: float, *, relative: bool = False) -> torch.nn.Module:
    """A stand-in for a fine-tune of `model` (same base, same names): a copy, in eval mode, with every parameter moved
    by seeded Gaussian noise — `scale` itself (absolute) or `scale` times the tensor's own spread (`relative`,
    tensors of more than one value only)."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            if relative and param.numel() <= 1:
                continue
            step = scale * param.std() if relative else scale
            param.add_(step * torch.randn(param.shape, generator=generator))
    return clone.eval()


def image_batch(channels: int) -> BatchPart:
    def part(generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(batch_size, channels, 16, 16, generator=generator)}

    return part


def text_batch(eos_token_id: int | None = None) -> BatchPart:
    """Token ids with padding (so masking is exercised); CLIP pools at the EOS token, so it ends each text."""

    def part(generator: torch.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        length = 12
        ids = torch.randint(1, 56, (batch_size, length), generator=generator)
        lengths = torch.randint(4, length + 1, (batch_size,), generator=generator)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        if eos_token_id is not None:
            ids[torch.arange(batch_size), lengths - 1] = eos_token_id
        return {"input_ids": ids * mask, "attention_mask": mask}

    return part


@dataclass(frozen=True)
class Architecture:
    """One row of the table that drives every architecture test.

    `build(num_labels)` makes an untrained model; `batch` parts are drawn in order from one generator;
    `logits`: the model returns logits, so merges are compared on them (the full method matrix runs);
    otherwise it is a bare model, compared through Gram matrices of its features. `labels`: label counts
    (A, B) for the unequal-label-sets tests, for models with a classifier.
    """

    kind: str
    build: Callable[[int], torch.nn.Module]
    batch: tuple[BatchPart, ...]
    logits: bool = False
    labels: tuple[int, int] | None = None


ROWS = (
    Architecture("vit_cls", lambda n: ViTForImageClassification(ViTConfig(**VIT, num_labels=n)), (image_batch(1),),
                 logits=True, labels=(3, 5)),
    Architecture("vit", lambda n: ViTModel(ViTConfig(**VIT)), (image_batch(1),)),
    Architecture("vit_nopool", lambda n: ViTModel(ViTConfig(**VIT), add_pooling_layer=False), (image_batch(1),)),
    Architecture("vit_nobias", lambda n: ViTForImageClassification(ViTConfig(**VIT, qkv_bias=False, num_labels=n)),
                 (image_batch(1),), logits=True, labels=(2, 3)),
    Architecture("bert_cls", lambda n: BertForSequenceClassification(BertConfig(**BERT, num_labels=n)),
                 (text_batch(),), logits=True, labels=(4, 2)),
    Architecture("bert", lambda n: BertModel(BertConfig(**BERT)), (text_batch(),)),
    Architecture("bert_nopool", lambda n: BertModel(BertConfig(**BERT), add_pooling_layer=False), (text_batch(),)),
    Architecture("roberta_cls", lambda n: RobertaForSequenceClassification(RobertaConfig(**BERT, num_labels=n)),
                 (text_batch(),), logits=True, labels=(3, 2)),
    Architecture("roberta", lambda n: RobertaModel(RobertaConfig(**BERT)), (text_batch(),)),
    Architecture("distilbert_cls",
                 lambda n: DistilBertForSequenceClassification(DistilBertConfig(**DISTILBERT, num_labels=n)),
                 (text_batch(),), logits=True, labels=(2, 4)),
    Architecture("distilbert", lambda n: DistilBertModel(DistilBertConfig(**DISTILBERT)), (text_batch(),)),
    Architecture("electra_cls", lambda n: ElectraForSequenceClassification(ElectraConfig(**ELECTRA, num_labels=n)),
                 (text_batch(),), logits=True, labels=(3, 4)),
    Architecture("electra", lambda n: ElectraModel(ElectraConfig(**ELECTRA)), (text_batch(),)),
    Architecture("clip", lambda n: CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)),
                 (image_batch(3), text_batch(TEXT["eos_token_id"])), logits=True),
    Architecture("clip_text", lambda n: CLIPTextModel(CLIPTextConfig(**TEXT)), (text_batch(TEXT["eos_token_id"]),)),
    Architecture("clip_text_proj", lambda n: CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)),
                 (text_batch(TEXT["eos_token_id"]),)),
    Architecture("clip_vision", lambda n: CLIPVisionModel(CLIPVisionConfig(**VISION)), (image_batch(3),)),
    Architecture("clip_vision_proj", lambda n: CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)),
                 (image_batch(3),)),
)
ARCHITECTURES: dict[str, Architecture] = {row.kind: row for row in ROWS}
# The parametrisations the architecture tests read (never their own lists).
KINDS = tuple(ARCHITECTURES)
WITH_LOGITS = tuple(row.kind for row in ROWS if row.logits)
BARE = tuple(row.kind for row in ROWS if not row.logits)
LABEL_COUNTS = tuple((row.kind, *row.labels) for row in ROWS if row.labels)
CLASSIFIERS = tuple(kind for kind, _, _ in LABEL_COUNTS)


def same_weights(x: torch.nn.Module, y: torch.nn.Module) -> bool:
    """The same parameter and buffer names, each bit for bit equal."""
    a, b = x.state_dict(), y.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_model(kind: str, seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(ARCHITECTURES[kind].build(num_labels), seed)


def make_batches(kind: str, num_batches: int = 4, batch_size: int = 16, seed: int = 0) -> list[dict]:
    """Random inputs of the row's modalities; text batches carry padding so masking is exercised."""
    generator = torch.Generator().manual_seed(seed)
    parts = ARCHITECTURES[kind].batch
    return [{k: v for part in parts for k, v in part(generator, batch_size).items()} for _ in range(num_batches)]


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


def classifier_names(model: torch.nn.Module) -> tuple[str, str]:
    """The names of the label head's weight and bias (rows = labels), as the model's adapter declares them."""
    from hf_mudsc.architectures import spec_for

    head = spec_for(model).classifier
    assert head is not None and head.bias is not None, type(model).__name__
    return head.weight, head.bias


def classifier_params(model: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    weight, bias = classifier_names(model)
    return params[weight], params[bias]


def with_new_head(model: torch.nn.Module, num_labels: int, seed: int) -> torch.nn.Module:
    """A copy of a `*ForXClassification` model whose label head is a fresh random `num_labels`-way head.

    Everything but the label rows is `model`'s: the pair shares its body, so a merge that finds the right
    units must reproduce both parents' logits on their own slices of the concatenated head.
    """
    config = copy.deepcopy(model.config)
    config.num_labels = num_labels
    config.id2label = {i: f"class_{i}" for i in range(num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    clone = type(model)(config)
    head = set(classifier_names(model))
    body = {k: v for k, v in model.state_dict().items() if k not in head}
    missing, unexpected = clone.load_state_dict(body, strict=False)
    assert not unexpected and set(missing) == head, (missing, unexpected)
    generator = torch.Generator().manual_seed(seed)
    weight, bias = classifier_params(clone)
    with torch.no_grad():
        weight.copy_(0.2 * torch.randn(weight.shape, generator=generator))
        bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
    return clone.eval()


class OneLinear(torch.nn.Module):
    """One linear layer: the smallest model a refit known-answer test can solve by hand."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def one_linear(d_in: int, d_out: int, seed: int) -> OneLinear:
    torch.manual_seed(seed)
    return OneLinear(d_in, d_out).eval()


def ridge_solution(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, lambda_rel: float):
    """argmin ‖[x, 1] W̃ − y‖² + λ‖W̃ − [Wᵀ; b]‖², λ = lambda_rel · mean diag(xᵀx), directly in float64."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    gram = x1.T @ x1
    lam = lambda_rel * gram.diagonal()[:-1].mean()
    start = torch.cat([weight.T, bias[None]], dim=0).to(torch.float64)
    solution = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64), x1.T @ y + lam * start)
    return solution[:-1].T, solution[-1]


def vit_folder(folder, edit: Callable[[dict], object] | None = None, raw: str | bytes | None = None):
    """A tiny ViT classifier saved with save_pretrained into `folder`, its config.json edited (a change to the
    dict) or replaced by `raw` — the hostile-config tests' parent."""
    import json
    from pathlib import Path

    folder = Path(folder)
    make_model("vit_cls", seed=0).save_pretrained(folder)
    path = folder / "config.json"
    if edit is not None:
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    if raw is not None:
        path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
    return folder


def vit_cli_case(folder) -> tuple[list[str], str]:
    """Two `vit_cls` parents (seeds 1, 2) saved with a 16x16 grey-scale processor, and 24 random images saved as a
    `datasets` folder: what the CLI's merge takes (parent folders, `--calibration`)."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5])
    parents = []
    for name, seed in (("vit-a", 1), ("vit-b", 2)):
        make_model("vit_cls", seed).save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
        parents.append(str(folder / name))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L") for _ in range(24)]
    datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image()).save_to_disk(
        folder / "calibration")
    return parents, str(folder / "calibration")


def recipe_refusal(folder, option: str, value: object) -> str:
    """The error a recipe file giving `option: value` (with two Hub parents and Hub data) gets from `validate()`."""
    import pytest
    import yaml

    from hf_mudsc.errors import RecipeError
    from hf_mudsc.publish.recipe import RECIPE_FILENAME, Recipe

    path = folder / RECIPE_FILENAME
    path.write_text(yaml.safe_dump({"models": ["org/a", "org/b"], "calibration": "org/ds:train", option: value}))
    with pytest.raises(RecipeError) as caught:
        Recipe.load(path).validate()
    return str(caught.value)


def count_runs(module: torch.nn.Module, counted: Callable[[], None]) -> None:
    """Call `counted` whenever `module` runs: a wrapper around its `forward`, not a hook (merge() sets a parent's
    hooks aside while it runs the parent)."""
    import functools

    forward = module.forward

    @functools.wraps(forward)  # its signature: merge() reads the model's input names from it
    def run(*args, **kwargs):
        counted()
        return forward(*args, **kwargs)

    module.forward = run
