"""BERT (`BertModel`, `BertForSequenceClassification`): post-LN, padding masked out of statistics."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures import register
from hf_mudsc.architectures.templates import attention_groups, in_cols, linear_out, mlp_group, norm
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, Member, PermutationSpec

MASK = "attention_mask"


@register("bert")
def bert_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    params = dict(model.named_parameters())
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in params else ""
    if f"{prefix}embeddings.word_embeddings.weight" not in params:
        raise UnsupportedArchitectureError(f"{type(model).__name__} does not look like a BERT this adapter knows")
    has_classifier = "classifier.weight" in params
    if prefix and not has_classifier:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported; use BertModel or BertForSequenceClassification"
        )
    has_pooler = f"{prefix}pooler.dense.weight" in params
    width, heads = config.hidden_size, config.num_attention_heads

    emb = f"{prefix}embeddings"
    residual = [
        Member(f"{emb}.word_embeddings.weight", 1, "out"),
        Member(f"{emb}.position_embeddings.weight", 1, "out"),
        Member(f"{emb}.token_type_embeddings.weight", 1, "out"),
        *norm(f"{emb}.LayerNorm"),
    ]
    blocks: list[Group] = []
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layer.{i}"
        attn = f"{layer}.attention"
        residual += in_cols(f"{attn}.self.query.weight", f"{attn}.self.key.weight", f"{attn}.self.value.weight")
        residual += linear_out(f"{attn}.output.dense")
        residual += norm(f"{attn}.output.LayerNorm")
        residual += in_cols(f"{layer}.intermediate.dense.weight")
        residual += linear_out(f"{layer}.output.dense")
        residual += norm(f"{layer}.output.LayerNorm")
        blocks += attention_groups(
            attn,
            query=f"{attn}.self.query",
            key=f"{attn}.self.key",
            value=f"{attn}.self.value",
            output=f"{attn}.output.dense",
            width=width,
            num_heads=heads,
            mask=MASK,
        )
        blocks.append(mlp_group(layer, up=f"{layer}.intermediate.dense", down=f"{layer}.output.dense",
                                width=config.intermediate_size, mask=MASK))

    tail: list[Group] = []
    if has_pooler:
        residual += in_cols(f"{prefix}pooler.dense.weight")
        hook = HookPoint(f"{prefix}pooler.dense", "input")
        pooler = list(linear_out(f"{prefix}pooler.dense"))
        if has_classifier:
            pooler += in_cols("classifier.weight")
        tail.append(Group(name=f"{prefix}pooler", width=width, members=tuple(pooler),
                          hooks=(HookPoint(f"{prefix}pooler", "output"),)))
    elif has_classifier:
        raise UnsupportedArchitectureError("a BERT classifier without a pooler is not supported")
    else:
        last = f"{prefix}encoder.layer.{config.num_hidden_layers - 1}.output.LayerNorm"
        hook = HookPoint(last, "output", mask=MASK)
    groups = [Group(name="residual", width=width, members=tuple(residual), hooks=(hook,)), *blocks, *tail]
    classifier = Classifier("classifier.weight", "classifier.bias") if has_classifier else None
    averaged = ("classifier.bias",) if has_classifier else ()
    return PermutationSpec(groups=tuple(groups), averaged=averaged, classifier=classifier, family="bert",
                           inputs=("input_ids",))
