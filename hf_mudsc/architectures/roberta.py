"""RoBERTa (`RobertaModel`, `RobertaForSequenceClassification`; XLM-RoBERTa's and CamemBERT's classes alike): BERT's
encoder, its own classifier head."""

from __future__ import annotations

from torch import nn

from hf_mudsc.architectures.bert import BERT, MASK
from hf_mudsc.architectures.registry import register
from hf_mudsc.architectures.templates import (
    check_encoder_config,
    encoder_groups,
    first_token_head,
    in_cols,
    linear_out,
    refuse_labelless_head,
)
from hf_mudsc.errors import UnsupportedArchitectureError
from hf_mudsc.spec import Classifier, Group, HookPoint, PermutationSpec

# The embeddings and blocks carry BERT's module names, so BERT's table serves as is.
ROBERTA = BERT
# The model types of RoBERTa's layout (the same module names) -> their class names' prefix, for the messages.
CLASSES = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}


@register(*CLASSES)
def roberta_spec(model: nn.Module) -> PermutationSpec:
    config = model.config
    name = CLASSES.get(config.model_type, "Roberta")
    use = f"{name}Model or {name}ForSequenceClassification"
    params = dict(model.named_parameters())
    prefix = "roberta." if "roberta.embeddings.word_embeddings.weight" in params else ""
    has_head = "classifier.out_proj.weight" in params
    check_encoder_config(type(model).__name__, config, params, family="RoBERTa", use=use)
    if has_head and params["classifier.out_proj.weight"].shape[0] == 0:
        refuse_labelless_head(type(model).__name__, f"{name}Model")
    if f"{prefix}embeddings.word_embeddings.weight" not in params or (prefix and not has_head):
        raise UnsupportedArchitectureError(f"{type(model).__name__} is not supported; use {use}")
    width = config.hidden_size
    residual, groups = encoder_groups(ROBERTA, prefix, num_layers=config.num_hidden_layers, width=width,
                                      num_heads=config.num_attention_heads, intermediate=config.intermediate_size,
                                      params=params, mask=MASK)
    if has_head:
        # The head reads the first token: dense -> tanh -> out_proj. Its hidden layer is one more unit space.
        head, hook, hidden = first_token_head("classifier.dense", "classifier.out_proj", width)
        residual += head
        groups.append(hidden)
    elif f"{prefix}pooler.dense.weight" in params:
        residual += in_cols(f"{prefix}pooler.dense.weight")
        hook = HookPoint(f"{prefix}pooler.dense", "input", per_example=True)
        groups.append(Group(name=f"{prefix}pooler", width=width, members=tuple(linear_out(f"{prefix}pooler.dense")),
                            hooks=(HookPoint(f"{prefix}pooler", "output", per_example=True),)))
    else:
        last = f"{prefix}encoder.layer.{config.num_hidden_layers - 1}.output.LayerNorm"
        hook = HookPoint(last, "output", mask=MASK)
    residual_group = Group(name="residual", width=width, members=tuple(residual), hooks=(hook,))
    classifier = Classifier("classifier.out_proj.weight", "classifier.out_proj.bias") if has_head else None
    # Position ids start after the padding id: a sequence reaches max_position_embeddings - pad_token_id - 1 rows.
    offset = config.pad_token_id + 1 if config.pad_token_id is not None else 0
    return PermutationSpec(groups=(residual_group, *groups), classifier=classifier, family="roberta",
                           averaged=("classifier.out_proj.bias",) if has_head else (), inputs=("input_ids",),
                           max_tokens=config.max_position_embeddings - offset)
