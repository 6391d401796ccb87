"""Declarative adapter tables and the builders that turn them into groups.

A transformer encoder is the same four groups per layer everywhere (residual stream, attention q/k,
attention v, MLP); only the tensor names differ. An adapter therefore states the names once, as data
(`Embedding` rows, a `BlockNames` table of per-layer name templates, a final norm) — as peft's model-type
mapping or mergekit's architecture JSON do — and `encoder_groups` expands them. The builders only name
tensors; they know nothing about matching.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Group, HookPoint, Member


def refuse_labelless_head(class_name: str, backbone: str) -> None:
    """Refuse a classification class built with `num_labels=0` (a zero-row classifier, or an `nn.Identity` in its
    place): it predicts nothing, and a zero-row head broke the merge late (the refit's reshape of 0 elements).
    `backbone`: the bare class to merge instead."""
    raise UnsupportedArchitectureError(
        f"{class_name}'s head has no labels (num_labels=0): merge the {backbone} backbone instead, or give the head "
        "its labels (num_labels >= 1)")


def check_encoder_config(model_name: str, config: object, parameters: Collection[str], *, family: str,
                         use: str) -> None:
    """Refuse, from the config and parameter names, BERT-style encoders whose layout the installed transformers
    or the adapter cannot hold: relative position embeddings (transformers 5 implements only absolute ones, so a
    checkpoint's per-layer `distance_embedding` tensors were dropped with an "unused tensors" warning and the merged
    config still claimed them) and cross-attention blocks (no group holds them). `use`: the classes to merge."""
    positions = getattr(config, "position_embedding_type", None)
    if positions not in (None, "absolute"):
        raise UnsupportedArchitectureError(
            f"{model_name} uses position_embedding_type {positions!r}, which the installed transformers' {family} "
            "does not implement (its trained distance embeddings would be dropped); merge models trained with "
            "absolute position embeddings (position_embedding_type 'absolute')")
    if any(".crossattention." in name for name in parameters):
        raise UnsupportedArchitectureError(
            f"{family} with cross-attention (add_cross_attention=True) is not supported; merge encoder-only models "
            f"({use}, built without add_cross_attention)")


def out_rows(*params: str) -> list[Member]:
    """Tensors whose first axis produces the units (weight rows, biases, norm parameters)."""
    return [Member(p, 0, "out") for p in params]


def in_cols(*weights: str) -> list[Member]:
    """Linear weights whose columns consume the units."""
    return [Member(w, 1, "in") for w in weights]


def linear_out(prefix: str, bias: bool = True) -> list[Member]:
    return out_rows(f"{prefix}.weight", *([f"{prefix}.bias"] if bias else []))


def norm(prefix: str, bias: bool = True) -> list[Member]:
    return out_rows(f"{prefix}.weight", *([f"{prefix}.bias"] if bias else []))


def attention_groups(
    block: str,
    *,
    query: str,
    key: str,
    value: str,
    output: str,
    width: int,
    num_heads: int,
    mask: str | None = None,
    biases: bool | Collection[str] = True,
) -> list[Group]:
    """The q/k group (read at the key projection output) and the v group (read at the output projection input).

    Both share a head tie, so one head pairing serves the attention pattern and the values it mixes.
    `biases`: True (every projection has one) or the model's parameter names (a bias is a member iff it exists).
    """

    def out(prefix: str) -> list[Member]:
        return linear_out(prefix, bias=biases is True or (biases is not False and f"{prefix}.bias" in biases))

    qk = Group(
        name=f"{block}.qk",
        width=width,
        members=tuple(out(query) + out(key)),
        hooks=(HookPoint(key, "output", mask=mask),),
        num_heads=num_heads,
        head_tie=block,
    )
    v = Group(
        name=f"{block}.v",
        width=width,
        members=tuple(out(value) + in_cols(f"{output}.weight")),
        hooks=(HookPoint(output, "input", mask=mask),),
        num_heads=num_heads,
        head_tie=block,
    )
    return [qk, v]


def mlp_group(block: str, *, up: str, down: str, width: int, mask: str | None = None,
              width_key: str | None = "intermediate_size") -> Group:
    """The MLP hidden layer, read at the input of the second linear (post-activation); its width is the config's
    `width_key` (a size budget may widen it: docs/design.md §4.12)."""
    return Group(
        name=f"{block}.mlp",
        width=width,
        members=tuple(linear_out(up) + in_cols(f"{down}.weight")),
        hooks=(HookPoint(down, "input", mask=mask),),
        width_key=width_key,
    )


def first_token_head(dense: str, out: str, width: int) -> tuple[list[Member], HookPoint, Group]:
    """A sequence classifier on the first token with one hidden layer (`dense` -> activation -> `out`: RoBERTa's,
    ELECTRA's and DistilBERT's heads): the stream's members it holds (`dense`'s columns), where the stream is read
    (`dense`'s input, one sample per example), and its hidden layer as one more group (`dense`'s rows and `out`'s
    columns, read at `out`'s input)."""
    hidden = Group(name=dense, width=width, members=tuple(linear_out(dense) + in_cols(f"{out}.weight")),
                   hooks=(HookPoint(out, "input", per_example=True),))
    return in_cols(f"{dense}.weight"), HookPoint(dense, "input", per_example=True), hidden


@dataclass(frozen=True)
class Embedding:
    """One embedding-side tensor of the residual stream: its name (after the tower prefix) and unit axis.

    `optional`: the tensor exists only in some variants (e.g. ViT's `mask_token`) and is skipped when absent.
    """

    param: str
    axis: int
    optional: bool = False


@dataclass(frozen=True)
class BlockNames:
    """The per-layer names of one encoder block; `{i}` in `layer` is the layer index.

    Every other name is relative to the layer. Linears are named without `.weight`; norms without
    `.weight`/`.bias`. `post_norm`: the norms follow their sublayer (BERT) instead of preceding it (ViT, CLIP);
    it only decides where they sit in the residual group's member order.
    """

    layer: str
    attention: str
    query: str
    key: str
    value: str
    output: str
    up: str
    down: str
    attention_norm: str
    mlp_norm: str
    post_norm: bool = False


@dataclass(frozen=True)
class EncoderTable:
    """A whole encoder tower as data: embeddings, the repeated block, and the final norm (if any)."""

    embeddings: tuple[Embedding, ...]
    block: BlockNames
    final_norm: str | None = None


def encoder_groups(
    table: EncoderTable,
    prefix: str,
    *,
    num_layers: int,
    width: int,
    num_heads: int,
    intermediate: int,
    params: Collection[str],
    mask: str | None = None,
    config_prefix: str = "",
    attention_width: int | None = None,
    intermediate_key: str = "intermediate_size",
) -> tuple[list[Member], list[Group]]:
    """The residual stream's members and the per-layer block groups of one tower (`prefix` ends in '.' or is '').

    `attention_width`: the q/k/v width when it differs from the stream's (`num_heads × head_dim` of a config that
    pins `head_dim`, e.g. a `size_spend="residual"` merge); default `width`.

    `config_prefix`: where the tower's config sits in the model's config ('' or e.g. 'vision_config.'), so the
    MLP groups name the attribute that sets their width (`{config_prefix}{intermediate_key}`; `intermediate_key`:
    the config's name for the MLP width, `intermediate_size` but for configs that call it otherwise, e.g.
    DistilBERT's `hidden_dim`).

    A linear's bias is a member iff the model has it (a missing bias is simply absent; an extra one would
    still be caught by `PermutationSpec.validate`), so variants such as ViT's `qkv_bias=False` need no code.
    """
    residual: list[Member] = []
    for row in table.embeddings:
        name = f"{prefix}{row.param}"
        if row.optional and name not in params:
            continue
        residual.append(Member(name, row.axis, "out"))

    def out(linear: str) -> list[Member]:
        return linear_out(linear, bias=f"{linear}.bias" in params)

    names = table.block
    blocks: list[Group] = []
    for i in range(num_layers):
        layer = f"{prefix}{names.layer.format(i=i)}"
        attention_norm = norm(f"{layer}.{names.attention_norm}")
        mlp_norm = norm(f"{layer}.{names.mlp_norm}")
        q, k, v, o = (f"{layer}.{n}" for n in (names.query, names.key, names.value, names.output))
        up, down = f"{layer}.{names.up}", f"{layer}.{names.down}"
        if not names.post_norm:
            residual += attention_norm
        residual += in_cols(f"{q}.weight", f"{k}.weight", f"{v}.weight")
        residual += out(o)
        residual += attention_norm if names.post_norm else mlp_norm
        residual += in_cols(f"{up}.weight")
        residual += out(down)
        if names.post_norm:
            residual += mlp_norm
        blocks += attention_groups(f"{layer}.{names.attention}", query=q, key=k, value=v, output=o,
                                   width=attention_width or width, num_heads=num_heads, mask=mask, biases=params)
        blocks.append(mlp_group(layer, up=up, down=down, width=intermediate, mask=mask,
                                width_key=f"{config_prefix}{intermediate_key}"))
    if table.final_norm is not None:
        residual += norm(f"{prefix}{table.final_norm}")
    return residual, blocks
